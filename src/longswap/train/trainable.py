"""Which parameters train: everything, the attention projections, LoRA+ (LongLoRA), or
only the learned selectors.

LongLoRA found LoRA on the attention projections alone fails to adapt to long contexts;
its remedy, kept here as ``lora-plus``, also trains the embeddings and the normalisation
layers (saved with the adapter as PEFT ``modules_to_save``). Learned selectors
(``learned_topk``) train under every method, from their own distillation loss: ``selector``
trains them alone (the warm-up, base frozen); ``lora-plus`` saves them with the adapter.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from longswap.selectors import SELECTOR_ATTR
from longswap.swap.model import attention_modules


def projection_names(model: nn.Module) -> list[str]:
    """Names of the weight layers inside the attention modules (q_proj, c_attn, ...)."""
    names = set()
    for attn in attention_modules(model).values():
        for name, child in attn.named_children():
            if isinstance(child, nn.Linear) or type(child).__name__ == "Conv1D":
                names.add(name)
    return sorted(names)


def embedding_and_norm_names(model: nn.Module) -> list[str]:
    """Leaf names of the input embeddings and of every normalisation layer."""
    names = set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if module is model.get_input_embeddings() or "Norm" in type(module).__name__:
            names.add(leaf)
    return sorted(n for n in names if n)


def apply_method(model: nn.Module, method: str, rank: int = 8, alpha: int = 16) -> Any:
    """Set ``requires_grad`` for ``method``; ``lora-plus`` returns the PEFT-wrapped model."""
    selectors = [m for m in attention_modules(model).values() if hasattr(m, SELECTOR_ATTR)]
    if method == "selector":
        if not selectors:
            raise ValueError(
                "method 'selector' trains learned selectors, and this model has none: swap it "
                "to a pattern with learned selection, e.g. learned_topk(block_size=64, top_k=16)"
            )
        model.requires_grad_(False)
        for module in selectors:
            getattr(module, SELECTOR_ATTR).requires_grad_(True)
        return model
    targets = projection_names(model)
    if not targets:
        raise ValueError(
            f"{type(model).__name__} has no attention projection layers that "
            f"'{method}' could train (looked for Linear/Conv1D children of attention modules)"
        )
    if method == "full":
        model.requires_grad_(True)
        return model
    if method == "attention":
        model.requires_grad_(False)
        for attn in attention_modules(model).values():
            for name in [*targets, SELECTOR_ATTR]:
                if hasattr(attn, name):
                    getattr(attn, name).requires_grad_(True)
        return model
    if method == "lora-plus":
        import peft

        config = peft.LoraConfig(
            r=rank,
            lora_alpha=alpha,
            target_modules=targets,
            lora_dropout=0.0,
            modules_to_save=embedding_and_norm_names(model) + [SELECTOR_ATTR] * bool(selectors),
            task_type="CAUSAL_LM",
            fan_in_fan_out=any(type(m).__name__ == "Conv1D" for m in model.modules()),
        )
        return peft.get_peft_model(model, config)
    raise ValueError(f"unknown method {method!r}; choose lora-plus, full, attention or selector")
