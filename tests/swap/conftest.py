"""Tiny randomly initialised models of several families, built locally (no hub)."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

COMMON = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
)

CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON, num_key_value_heads=2),
    "mistral": lambda: MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**COMMON, num_key_value_heads=2),
    "qwen3": lambda: Qwen3Config(**COMMON, num_key_value_heads=1, head_dim=8),
    "gpt2": lambda: GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "gpt_neox": lambda: GPTNeoXConfig(**COMMON),
    "phi3": lambda: Phi3Config(**COMMON, num_key_value_heads=2, pad_token_id=0),
}
FAMILIES = list(CONFIGS)


def make_model(family, seed=0, **overrides):
    config = CONFIGS[family]()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture
def tokens():
    return torch.randint(1, 97, (2, 40), generator=torch.Generator().manual_seed(1))


def assert_generate_equals_recomputation(model, prompt, new_tokens, pad_token_id=0, cache=None):
    """Greedy ``generate`` with a KV cache (the default one, or ``cache``) gives the tokens
    of recomputing every step."""
    with torch.no_grad():
        generated = model.generate(
            prompt,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_token_id,
            **({} if cache is None else {"cache": cache}),
        )
        ids = prompt
        for _ in range(new_tokens):  # the whole forward at every step, no cache
            step = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, step], 1)
    assert generated.shape[1] == prompt.shape[1] + new_tokens
    assert torch.equal(generated, ids)
