"""Saving and loading swapped models, plain or wrapped by PEFT.

A plain swapped model is a normal checkpoint whose ``config.json`` carries the swap. A
PEFT-wrapped one saves its adapter as PEFT does, plus ``longswap.json`` with the swap and
the base model (absolute path and fingerprint), so that loading rebuilds base model, swap
and adapter in that order, from the base the adapter was trained on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import safe_open
from transformers import AutoModelForCausalLM, PreTrainedModel

from longswap.checkpoint import base_record, is_gguf, load_gguf, model_problem, resolve_base
from longswap.io import save_checkpoint, staged_folder, write_json
from longswap.selectors import SELECTOR_ATTR
from longswap.swap.attention import register
from longswap.swap.model import apply_spec, attach_selectors, attention_modules
from longswap.swap.spec import CONFIG_KEY, SwapSpec

#: File beside a PEFT adapter that records its base model and the base's swap.
ADAPTER_SWAP_FILE = "longswap.json"


def _is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def save(model: Any, out: str | Path, overwrite: bool = False) -> Path:
    """Save a swapped model (or a PEFT model around one) into ``out``, atomically."""
    out = Path(out)
    if not _is_peft(model):
        save_checkpoint(model, out, overwrite=overwrite)
        return out
    with staged_folder(out, overwrite) as staging:
        write_adapter(model, staging)
    return out


def write_adapter(model: Any, folder: Path) -> None:
    """Write a PEFT model's adapter into ``folder`` as PEFT does, with its base model
    (:func:`longswap.checkpoint.base_record`) and the base's swap in
    :data:`ADAPTER_SWAP_FILE`, as it is (:func:`save` stages it)."""
    base = model.get_base_model()
    record = getattr(base.config, CONFIG_KEY, None)
    model.save_pretrained(folder)
    payload = base_record(str(base.name_or_path))
    write_json(folder / ADAPTER_SWAP_FILE, payload | ({} if record is None else {"swap": record}))


def load(path: str | Path, base: str | Path | None = None, **kwargs: Any) -> PreTrainedModel:
    """Load a model folder (swapped or not), a PEFT adapter saved by :func:`save` (swap
    included), or a ``.gguf`` file (dequantized to a plain float model).

    An adapter loads onto the base model it records (see
    :func:`longswap.checkpoint.resolve_base`), or onto ``base`` where that moved: a missing
    base, or another model than the one it was trained on, raises ValueError.
    """
    path = Path(path)
    register()
    problem = model_problem(path, flag="model")
    if problem is None and base is not None and not (path / "adapter_config.json").is_file():
        problem = (
            f"a base model ({base}) was given, but {path} is no LoRA output (it holds no "
            "adapter_config.json): --base (base=) is only for those; leave it out"
        )
    if problem is not None:
        raise ValueError(problem)
    if is_gguf(path):
        return load_gguf(path, **kwargs)
    if (path / "adapter_config.json").is_file():
        return _load_adapter(path, base, **kwargs)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as err:  # a damaged folder fails in many ways (safetensors, json, torch)
        raise ValueError(
            f"the model in {path} could not be loaded ({type(err).__name__}: {err}); its "
            "config.json or weights may be damaged or incomplete"
        ) from err
    record = getattr(model.config, CONFIG_KEY, None)
    if record is not None:
        _load_selectors(model, _recorded_swap(record, path / "config.json"), path)
    return model


def _recorded_swap(record: Any, file: Path) -> SwapSpec:
    """The swap ``file`` records, or a ValueError that names the file."""
    try:
        return SwapSpec.from_dict(record)
    except ValueError as err:
        raise ValueError(
            f"{file} records a swap that longswap cannot read ({err}); fix its "
            f"{CONFIG_KEY!r} entry, or swap the base model again"
        ) from None


def _read_json(file: Path) -> Any:
    """The JSON in ``file``, or a ValueError that names the file."""
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{file} could not be read as JSON ({err}); it may be damaged") from None


def _load_selectors(model: PreTrainedModel, spec: SwapSpec, path: Path) -> None:
    """Rebuild the learned selectors a swap records and read their weights from ``path``
    (transformers' loader skips them: the model class has no such modules)."""
    patterns = [spec.pattern(i) for i in range(len(spec.layers))]
    if not any(p.needs_selector for p in patterns):
        return
    attach_selectors(model, attention_modules(model), patterns)
    wanted = {k for k in model.state_dict() if f".{SELECTOR_ATTR}." in k}
    found, stored = {}, set()
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as weights:
                here = {k for k in weights.keys() if f".{SELECTOR_ATTR}." in k}  # noqa: SIM118
                found |= {k: weights.get_tensor(k) for k in here & wanted}
        except Exception as err:  # a damaged file fails in several ways (header, OS, data)
            raise ValueError(
                f"{file} could not be read ({type(err).__name__}: {err}); the file may be "
                "damaged or incomplete: save the model again"
            ) from err
        stored |= here
    missing = sorted(wanted - set(found))
    if missing and any(k.endswith(".query_map.weight") for k in stored):
        raise ValueError(
            f"{path} holds learned selectors of an earlier longswap (one query map over a KV "
            "group's concatenated queries), which this version's gate (a map per query head) "
            "cannot read; swap the base model again and rerun the warm-up "
            "(longswap finetune --method selector)"
        )
    if missing:
        raise ValueError(
            f"{path} records learned selection but holds no weights for {len(missing)} "
            f"selector tensors (first: {missing[0]}); save swapped models with longswap.save "
            "or save_pretrained after the swap"
        )
    model.load_state_dict(found, strict=False)


def adapter_base(path: Path, base: str | Path | None = None) -> Path:
    """The base model the adapter in ``path`` was trained on (or ``base``, checked to be
    it); ValueError when it is missing or another model (nothing is loaded)."""
    return resolve_base(path, _adapter_record(path), base)


def _adapter_record(path: Path) -> dict[str, Any]:
    """What the adapter in ``path`` records of its base: :data:`ADAPTER_SWAP_FILE`, or of
    an adapter saved without it, the base PEFT names."""
    swap_file = path / ADAPTER_SWAP_FILE
    if swap_file.is_file():
        return _read_json(swap_file)
    return {"base_model": _read_json(path / "adapter_config.json").get("base_model_name_or_path")}


def _load_adapter(path: Path, base: str | Path | None, **kwargs: Any) -> Any:
    from peft import PeftModel

    payload = _adapter_record(path)
    model = load(resolve_base(path, payload, base), **kwargs)
    if "swap" in payload and getattr(model.config, CONFIG_KEY, None) is None:
        apply_spec(model, _recorded_swap(payload["swap"], path / ADAPTER_SWAP_FILE))
    return PeftModel.from_pretrained(model, path)
