"""Merging a LoRA(+) output of ``longswap finetune`` into a plain checkpoint.

The merged folder holds the base model with the adapter's products added to its weights
and its trained embeddings, norms and learned selectors in place, the swap in its
``config.json`` and the tokenizer: ``longswap.load`` reads it as the same swapped model, and
so does transformers' ``from_pretrained`` once ``longswap.swap`` is imported, for patterns
without learned selectors.
"""

from __future__ import annotations

from pathlib import Path

from longswap.checkpoint import model_problem
from longswap.io import check_output_dir, output_problem, overlap_problems, save_checkpoint
from longswap.swap import load
from longswap.swap.persist import adapter_base


def merge_problems(model: Path, out: Path, overwrite: bool, base: Path | None = None) -> list[str]:
    """What stops merging the adapter in ``model`` (onto ``base`` where its base moved)
    into ``out`` (nothing is loaded)."""
    found = [problem] if (problem := model_problem(model)) else []
    if not found and not (model / "adapter_config.json").is_file():
        found.append(
            f"--model {model} holds no LoRA adapter (no adapter_config.json): there is nothing "
            "to merge; give the output folder of `longswap finetune --method lora-plus`"
        )
    inputs = [("--model", model)]
    if not found:
        try:
            inputs.append(("the adapter's base model", adapter_base(model, base)))
        except ValueError as err:
            found.append(str(err))
    found += overlap_problems(out, inputs)
    found += [problem] if (problem := output_problem(out)) else []
    try:
        check_output_dir(out, overwrite)
    except ValueError as err:
        found.append(str(err))
    return found


def merge(model: Path, out: Path, overwrite: bool = False, base: Path | None = None) -> Path:
    """Merge the LoRA(+) adapter in ``model`` into its base (the one it records, or ``base``
    where that moved; see :func:`longswap.checkpoint.resolve_base`) and save the result in
    ``out``.

    An existing ``out`` (with ``overwrite``) is replaced only once the merged checkpoint is
    completely written.
    """
    found = merge_problems(model, out, overwrite, base)
    if found:
        raise ValueError("cannot merge:\n- " + "\n- ".join(found))
    merged = load(model, base=base).merge_and_unload()
    save_checkpoint(merged, out, source=model, overwrite=overwrite)
    return out
