"""Retrieval tasks: prompts, scoring, and a model that answers correctly by construction."""

import pytest
import torch

from longswap.data import byte_tokenizer
from longswap.evaluate.tasks import passkey, recall

from ..swap.conftest import make_model


class Oracle(torch.nn.Module):
    """Generates the digits that follow 'The pass key is ' in its prompt (a perfect reader)."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer, self.weight = tokenizer, torch.nn.Parameter(torch.zeros(1))

    def generate(self, ids, max_new_tokens, **kwargs):
        text = self.tokenizer.decode(ids[0])
        key = text.split("The pass key is ")[1].split(".")[0]
        answer = self.tokenizer(f" {key}.", add_special_tokens=False, return_tensors="pt")
        return torch.cat([ids, answer["input_ids"][:, :max_new_tokens]], 1)


def test_passkey_scores_a_perfect_reader_and_a_random_model():
    tok = byte_tokenizer()
    record = passkey(Oracle(tok), tok, length=400, depth=0.5, trials=3)
    assert record["accuracy"] == 1.0
    assert all(a["answered"] == a["key"] for a in record["answers"])
    random_model = make_model("llama", vocab_size=257)
    record = passkey(random_model, tok, length=300, depth=0.0, trials=2)
    assert record["accuracy"] == 0.0  # 5 random bytes are not the key
    assert all(a["answered"] is None or a["answered"] != a["key"] for a in record["answers"])


def test_recall_runs_and_scores():
    tok = byte_tokenizer()
    record = recall(make_model("llama", vocab_size=257), tok, length=300, trials=2)
    assert record["accuracy"] == 0.0 and record["trials"] == 2


def test_multi_key_needles_prompt_and_task():
    from longswap.data.synthetic import needles_prompt
    from longswap.evaluate.tasks import needles

    keys = {"amber": 11111, "birch": 22222, "cedar": 33333}
    prompt = needles_prompt(600, keys, "birch", seed=1)
    assert len(prompt) <= 600
    assert all(f"The pass key for {n} is {k}." in prompt for n, k in keys.items())
    assert prompt.endswith("What is the pass key for birch? The pass key for birch is")
    assert needles_prompt(600, keys, "birch", seed=1) == prompt  # seeded
    tok = byte_tokenizer()
    record = needles(make_model("llama", vocab_size=257), tok, length=400, trials=2)
    assert record["accuracy"] == 0.0 and record["needles"] == 4


class Recorder(torch.nn.Module):
    """Records how long each generation would run: prompt plus new tokens."""

    def __init__(self):
        super().__init__()
        self.weight, self.totals = torch.nn.Parameter(torch.zeros(1)), []

    def generate(self, ids, max_new_tokens, **kwargs):
        self.totals.append(ids.shape[1] + max_new_tokens)
        return ids


def test_prompts_and_answers_fit_within_the_length():
    from longswap.evaluate.tasks import needles

    tok = byte_tokenizer()
    for length in (400, 512, 1000):
        model = Recorder()
        passkey(model, tok, length, depth=0.5, trials=2)
        recall(model, tok, length, trials=2)
        needles(model, tok, length, trials=2)
        assert max(model.totals) <= length  # generation never runs past the model's positions
    with pytest.raises(ValueError, match="shortest prompt of this task takes 3.. tokens"):
        needles(Recorder(), tok, 300, trials=1)  # four needles and a question need more
