"""Tiny randomly initialised models of several families, built locally (no hub)."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GPT2Config,
    GPTNeoXConfig,
    GptOssConfig,
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
    # Soft-capped logits (weights large enough for the cap to bite) and native windows on
    # every other layer.
    "gemma2": lambda: Gemma2Config(
        **COMMON,
        initializer_range=0.3,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=16,
        attn_logit_softcapping=1.0,
        query_pre_attn_scalar=8,
    ),
    # Learned sinks, native windows on every other layer, a mixture of experts.
    "gpt_oss": lambda: GptOssConfig(
        **(COMMON | {"intermediate_size": 32}),
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
}
FAMILIES = list(CONFIGS)


def swapped_layers(model, pattern):
    """The patterns a swap to ``pattern`` reports: the family's native windows kept."""
    config = model.config
    window, types = getattr(config, "sliding_window", None), getattr(config, "layer_types", None)
    if not window or types is None:
        return [pattern] * model.config.num_hidden_layers
    native = f"sliding_window(window={window}, sinks=0)"
    own = native if pattern == "full()" else f"{pattern} & {native}"
    return [own if t == "sliding_attention" else pattern for t in types]


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
