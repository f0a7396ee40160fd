"""Retrieval tasks with greedy generation: passkey and associative recall, held-out keys."""

from __future__ import annotations

import random
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from longswap.data.synthetic import (
    NAMES,
    associative_recall,
    draw_key,
    first_integer,
    needles_prompt,
    passkey_prompt,
)
from longswap.data.tokenizer import token_counter


def _generate(
    model: Any, tokenizer: PreTrainedTokenizerBase, prompt: str, new: int, length: int
) -> str:
    """The ``new`` greedy tokens after ``prompt``; prompt and answer must fit in ``length``."""
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if ids.shape[1] + new > length:
        raise ValueError(
            f"the shortest prompt of this task takes {ids.shape[1]} tokens and its answer "
            f"{new}, more than the length {length}; measure it at a longer length"
        )
    ids = ids.to(next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            use_cache=True,
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def passkey(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    length: int,
    depth: float,
    trials: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """Share of ``trials`` held-out passkeys retrieved at ``length`` tokens and ``depth``.

    Scored by the first integer of the greedy answer matching the key.
    """
    rng = random.Random(f"{seed}-{length}-{depth}")

    count = token_counter(tokenizer)

    answers = []
    for _ in range(trials):
        key = draw_key(rng, heldout=True)
        prompt = passkey_prompt(length - 8, depth, key, count)
        answers.append((key, first_integer(_generate(model, tokenizer, prompt, 8, length))))
    correct = sum(k == a for k, a in answers)
    return {
        "length": length,
        "depth": depth,
        "trials": trials,
        "accuracy": correct / trials,
        "answers": [{"key": k, "answered": a} for k, a in answers],
    }


def recall(
    model: Any, tokenizer: PreTrainedTokenizerBase, length: int, trials: int = 3, seed: int = 0
) -> dict[str, Any]:
    """Multi-query associative recall at about ``length`` tokens: share of values recalled.

    The context lists held-out ``key: value`` pairs; after ``Recall.`` each trial asks one
    key (the prompt ends at its colon) and checks the four generated digits.
    """
    rng = random.Random(f"{seed}-{length}")

    count = token_counter(tokenizer)

    new = 5  # the generated answer: a space and four digits
    # Pairs, the "Recall." line, the asked key and the answer fit within ``length``.
    pairs = max(2, (length - new - count("Recall.\nabcd: ")) // count("abcd: 1234\n"))
    correct = 0
    for _ in range(trials):
        text, answers = associative_recall(pairs, 1, rng.randint(0, 2**31), heldout=True)
        prompt = text[: text.index("Recall.\n") + len("Recall.\n")]
        key = text[len(prompt) :].split(":")[0]
        answer = _generate(model, tokenizer, f"{prompt}{key}: ", new, length).strip()[:4]
        correct += answer == answers[0]
    return {"length": length, "trials": trials, "accuracy": correct / trials}


def needles(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    length: int,
    count: int = 4,
    trials: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """Multi-key needle in a haystack: ``count`` named held-out keys, one asked per trial."""
    rng = random.Random(f"{seed}-{length}-needles")

    units = token_counter(tokenizer)

    correct = 0
    for trial in range(trials):
        names = rng.sample(NAMES, count)
        keys = {name: draw_key(rng, heldout=True) for name in names}
        asked = rng.choice(names)
        prompt = needles_prompt(length - 8, keys, asked, seed + trial, units)
        correct += first_integer(_generate(model, tokenizer, prompt, 8, length)) == keys[asked]
    return {"length": length, "trials": trials, "needles": count, "accuracy": correct / trials}
