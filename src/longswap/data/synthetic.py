"""Synthetic long-context tasks, generated offline from seeds.

* Passkey retrieval in the Landmark / LongLoRA format: a five-digit key hidden in filler
  at a chosen depth, followed by "What is the pass key?".
* Multi-query associative recall: many ``key: value`` pairs, then several keys to recall.

Keys are split once and for all into a training and a held-out set (by a hash of the
key), so evaluation never asks for a key that training mixed in.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and "
    "memorize it. I will quiz you about the important information there.\n"
)
FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
QUESTION = "\nWhat is the pass key? The pass key is"


def heldout_key(key: int | str) -> bool:
    """True for the tenth of keys reserved for evaluation (stable across machines)."""
    return hashlib.sha256(str(key).encode()).digest()[0] % 10 == 0


def draw_key(rng: random.Random, heldout: bool, low: int = 10000, high: int = 99999) -> int:
    """A random key from the held-out set, or from the training set."""
    while True:
        key = rng.randint(low, high)
        if heldout_key(key) == heldout:
            return key


def passkey_prompt(length: int, depth: float, key: int, count: Callable[[str], int] = len) -> str:
    """A prompt of about ``length`` units (``count``: e.g. tokens) with ``key`` at ``depth``.

    ``depth`` in [0, 1] is where the key sentence goes among the filler sentences (0: first,
    1: last). Filler is added sentence by sentence until the prompt would exceed ``length``.
    """
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be within [0, 1], got {depth!r}")
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    sentences = [s.strip() + ". " for s in FILLER.split(". ") if s.strip()]

    def build(n: int) -> str:
        filler = [sentences[i % len(sentences)] for i in range(n)]
        at = round(depth * n)
        return INTRO + "".join(filler[:at]) + needle + "".join(filler[at:]) + QUESTION

    unit = count(FILLER) / len(sentences)
    n = max(int((length - count(build(0))) / unit), 0)
    while n > 0 and count(build(n)) > length:
        n -= 1
    return build(n)


def first_integer(answer: str) -> int | None:
    """The first integer in a generated answer, or None when it has no digits."""
    match = re.search(r"\d+", answer)
    return int(match.group()) if match else None


def associative_recall(
    pairs: int, queries: int, seed: int, heldout: bool = False
) -> tuple[str, list[str]]:
    """``pairs`` lines ``key: value``, then ``Recall.`` and ``queries`` of them again.

    Keys are four letters, values four digits. Returns the full text (as training data)
    and the recalled values in order; an evaluation cuts the text after a query's colon.
    """
    if queries > pairs:
        raise ValueError(f"cannot query {queries} keys out of {pairs} pairs")
    rng = random.Random(seed)
    keys: list[str] = []
    while len(keys) < pairs:
        key = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(4))
        if heldout_key(key) == heldout and key not in keys:
            keys.append(key)
    values = [f"{rng.randint(0, 9999):04d}" for _ in keys]
    lines = "".join(f"{k}: {v}\n" for k, v in zip(keys, values, strict=True))
    asked = rng.sample(range(pairs), queries)
    text = lines + "Recall.\n" + "".join(f"{keys[i]}: {values[i]}\n" for i in asked)
    return text, [values[i] for i in asked]


def synthetic_texts(
    n: int, length: int, seed: int, count: Callable[[str], int] = len, heldout: bool = False
) -> list[str]:
    """``n`` task texts of at most ``length`` units, answers included (training data).

    Even items are passkey prompts with their answer, at a random depth; odd items are
    associative-recall texts with as many pairs as fit. Keys come from the training set
    unless ``heldout``.
    """
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        if i % 2 == 0:
            key = draw_key(rng, heldout)
            answer = f" {key}."
            texts.append(passkey_prompt(length - count(answer), rng.random(), key, count) + answer)
        else:
            pairs = max(2, length // max(count("abcd: 1234\n"), 1) // 2)
            while True:
                text, _ = associative_recall(
                    pairs, max(1, pairs // 4), rng.randint(0, 2**31), heldout
                )
                if count(text) <= length or pairs <= 2:
                    break
                pairs = int(pairs * 0.9)
            texts.append(text)
    return texts


NAMES = (
    "amber",
    "birch",
    "cedar",
    "delta",
    "ember",
    "fjord",
    "grove",
    "harbor",
    "iris",
    "juniper",
    "kestrel",
    "lumen",
)


def needles_prompt(
    length: int, keys: dict[str, int], asked: str, seed: int, count: Callable[[str], int] = len
) -> str:
    """Several named keys hidden at seeded depths in filler; the prompt asks for one of them."""
    rng = random.Random(seed)
    needles = [f"The pass key for {name} is {key}. " for name, key in keys.items()]
    question = f"\nWhat is the pass key for {asked}? The pass key for {asked} is"
    sentences = [s.strip() + ". " for s in FILLER.split(". ") if s.strip()]

    def build(n: int) -> str:
        filler = [sentences[i % len(sentences)] for i in range(n)]
        for needle in needles:
            filler.insert(rng.randint(0, len(filler)), needle)
        rng.seed(seed)  # the same depths for every candidate length
        return INTRO + "".join(filler) + question

    unit = count(FILLER) / len(sentences)
    n = max(int((length - count(build(0))) / unit), 0)
    while n > 0 and count(build(n)) > length:
        n -= 1
    return build(n)
