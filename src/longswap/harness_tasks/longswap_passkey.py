"""longswap's passkey task for lm-evaluation-harness (``longswap_passkey.yaml``).

Each length of lm-eval's ``max_seq_lengths`` gets :data:`PROMPTS` prompts of that many
tokens (the tokenizer given in the metadata), the key at evenly spaced depths, keys drawn
from a fixed seed; a prompt scores 1 when the first integer of the answer is its key.
"""

from __future__ import annotations

import random
from typing import Any

import datasets
from transformers import AutoTokenizer

from longswap.data.synthetic import draw_key, first_integer, passkey_prompt

#: Prompts per length (depths 0, 1/9, ..., 1).
PROMPTS = 10
#: The lengths the YAML's metrics name; a prompt scores -1 (absent) at the others.
LENGTHS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
#: Tokens left for the model's answer inside a length.
ANSWER = 16


def passkey_dataset(**metadata: Any) -> dict[str, datasets.Dataset]:
    """The test split: ``PROMPTS`` prompts per length, each with its key as the target."""
    lengths = metadata.get("max_seq_lengths", [4096])
    name = metadata.get("tokenizer") or metadata.get("pretrained")
    if not name:
        raise ValueError("longswap_passkey needs a tokenizer: metadata 'tokenizer' (a folder)")
    if unknown := sorted(set(lengths) - set(LENGTHS)):
        raise ValueError(f"longswap_passkey scores lengths {LENGTHS}; got {unknown}")
    tokenizer = AutoTokenizer.from_pretrained(name)

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    rng = random.Random(0)
    rows = []
    for length in lengths:
        for i in range(PROMPTS):
            key = draw_key(rng, heldout=True)
            prompt = passkey_prompt(length - ANSWER, i / (PROMPTS - 1), key, count)
            rows.append({"input": prompt, "outputs": [str(key)], "max_length": length})
    return {"test": datasets.Dataset.from_list(rows, split=datasets.Split.TEST)}


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """1.0 at the prompt's length when the answer's first integer is the key, else 0.0;
    -1 (absent) at every other length."""
    scores = dict.fromkeys((str(n) for n in LENGTHS), -1.0)
    found = first_integer(results[0])
    scores[str(doc["max_length"])] = float(found is not None and str(found) == doc["outputs"][0])
    return scores


def aggregate(scores: list[float]) -> float:
    """The mean over the prompts of one length (-1 when it had none)."""
    present = [s for s in scores if s != -1]
    return sum(present) / len(present) if present else -1.0
