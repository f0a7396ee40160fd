"""What pre-training and fine-tuning share: validation, data, the Trainer, the record."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors import safe_open
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments

from longswap.data import (
    local_documents,
    pack_documents,
    split_documents,
    stdlib_documents,
    synthetic_texts,
)
from longswap.data.corpus import Document
from longswap.data.packing import Packed
from longswap.data.tokenizer import EOS, token_counter
from longswap.environment import environment
from longswap.io import output_problem, overlap_problems, staged_folder
from longswap.swap import observe
from longswap.train.config import TrainingFields
from longswap.train.signals import AttentionTransfer, SelectorDistillation


class PackedDataset(Dataset):
    """Fixed-length token sequences for causal language modelling.

    With ``position_ids`` (restarting at each document), attention stays inside documents.
    """

    def __init__(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> None:
        self.input_ids, self.position_ids = input_ids, position_ids

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[i]
        item = {"input_ids": ids, "labels": ids}
        if self.position_ids is not None:
            item["position_ids"] = self.position_ids[i]
        return item


def common_problems(config: TrainingFields) -> list[str]:
    """Problems with the fields every run has."""
    found = []
    if not config.out:
        found.append("--out is required")
    else:
        out = Path(config.out)
        if out.exists() and not out.is_dir():
            found.append(f"--out {out} exists and is not a folder")
        elif problem := output_problem(out):
            found.append(problem)
        elif out.is_dir() and any(out.iterdir()) and not (config.overwrite or config.resume):
            found.append(f"--out {out} is not empty; pass --resume to continue or --overwrite")
        if config.resume and not (out / "checkpoints").is_dir():
            found.append(f"--resume: {out}/checkpoints holds no checkpoint to resume from")
        elif config.resume:
            found += _resume_problems(config, out / "checkpoints" / RUN_FILE)
    for path in config.data:
        if not Path(path).exists():
            found.append(f"data path {path} does not exist")
    if config.out:
        found += overlap_problems(Path(config.out), [("--data", path) for path in config.data])
    for name, low in (("seq_len", 8), ("steps", 1), ("batch_size", 1), ("eval_steps", 1)):
        value = getattr(config, name)
        if not isinstance(value, int) or value < low:
            found.append(f"{name} must be an integer >= {low}, got {value!r}")
    if not config.learning_rate > 0:
        found.append(f"learning_rate must be positive, got {config.learning_rate!r}")
    if not 0 <= config.synthetic_ratio < 1:
        found.append(f"synthetic_ratio must be in [0, 1), got {config.synthetic_ratio!r}")
    if not 0 < config.validation_share < 1:
        found.append(f"validation_share must be in (0, 1), got {config.validation_share!r}")
    return found


#: What a run is, written beside its checkpoints: a resumed run must be the same run.
RUN_FILE = "longswap_run.json"
#: The fields that make a run: changing one of them and resuming would mix two runs.
RUN_FIELDS = ("model", "pattern", "method", "seq_len", "size", "lora_rank", "full_layers", "dtype")


def _run_fields(config: TrainingFields) -> dict[str, Any]:
    return {f: getattr(config, f) for f in RUN_FIELDS if hasattr(config, f)}


def _resume_problems(config: TrainingFields, record: Path) -> list[str]:
    """Fields of ``config`` that differ from the run being resumed (recorded in ``record``)."""
    if not record.is_file():
        return []  # checkpoints from before this record existed: nothing to compare
    try:
        before = json.loads(record.read_text())
    except (OSError, ValueError) as err:
        return [f"--resume: {record} is unreadable ({err}); remove it to resume anyway"]
    return [
        f"--resume: this run was started with {name}={before[name]!r}, not {value!r}; resume "
        "it with the same settings, or start a new run in another --out"
        for name, value in _run_fields(config).items()
        if name in before and before[name] != value
    ]


def _readable(checkpoint: Path) -> bool:
    """Whether a Trainer checkpoint was written completely: its state parses and every
    weight file's header reads."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
        weights = list(checkpoint.glob("*.safetensors"))
        for file in weights:
            with safe_open(str(file), framework="pt") as f:
                list(f.keys())
        return bool(weights)
    except Exception:  # a truncated file fails in many ways (json, safetensors, OS)
        return False


def last_good_checkpoint(folder: Path) -> Path | None:
    """The newest completely written ``checkpoint-N`` in ``folder``; a damaged newer one is
    passed over with a warning that names it."""
    found = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    for checkpoint in reversed(found):
        if _readable(checkpoint):
            return checkpoint
        warnings.warn(
            f"{checkpoint} is incomplete or damaged (an interrupted save?): resuming from an "
            "earlier checkpoint instead",
            stacklevel=2,
        )
    return None


def refuse(found: list[str], what: str) -> None:
    """Raise one ValueError listing every problem, if there are any."""
    if found:
        raise ValueError(f"invalid {what} configuration:\n- " + "\n- ".join(found))


def _token_arrays(docs: list[Document], tokenizer: PreTrainedTokenizerBase) -> list[Any]:
    if len(tokenizer) == 257 and tokenizer.eos_token == EOS:  # the byte tokenizer
        return [np.frombuffer(d.text.encode("utf-8"), dtype=np.uint8) for d in docs]
    return tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"]


def datasets(
    config: TrainingFields, tokenizer: PreTrainedTokenizerBase
) -> tuple[PackedDataset, PackedDataset]:
    """Packed train and validation sets (validation capped at 64 sequences, 65,536 tokens).

    Documents are split by name (``validation_share``). When either side cannot fill one
    sequence (one file, or a few long ones), the last whole sequences of all the data are
    held out instead, with a warning that says so.
    """
    docs = (
        local_documents(config.data, config.text_field)
        if config.data
        else stdlib_documents("train")
    )
    train_docs, val_docs = split_documents(docs, config.validation_share)
    train_part, val_part = _pack(train_docs, config, tokenizer), _pack(val_docs, config, tokenizer)
    if train_part is None or val_part is None:
        train_part, val_part = _split_sequences(docs, config, tokenizer)
    val_cap = max(1, min(64, 2**16 // config.seq_len))  # enough to compare, cheap at any length
    sets = []
    for packed, cap in ((train_part, None), (val_part, val_cap)):
        positions = packed.position_ids()[:cap] if config.separate_documents else None
        sets.append(PackedDataset(packed.input_ids[:cap], positions))
    if config.synthetic_ratio:
        sets[0] = _with_synthetic(sets[0], config, tokenizer)
    return sets[0], sets[1]


def _pack(
    docs: list[Document], config: TrainingFields, tokenizer: PreTrainedTokenizerBase
) -> Packed | None:
    """``docs`` packed into sequences of ``seq_len``, or None when they cannot fill one."""
    if not docs:
        return None
    try:
        return pack_documents(
            _token_arrays(docs, tokenizer), config.seq_len, tokenizer.eos_token_id
        )
    except ValueError:
        return None


def _split_sequences(
    docs: list[Document], config: TrainingFields, tokenizer: PreTrainedTokenizerBase
) -> tuple[Packed, Packed]:
    """All documents packed; the last ``validation_share`` of the sequences (at least one)
    held out for validation."""
    packed = pack_documents(_token_arrays(docs, tokenizer), config.seq_len, tokenizer.eos_token_id)
    n = packed.input_ids.shape[0]
    if n < 2:
        raise ValueError(
            f"the data fills only {n} sequence of {config.seq_len} tokens; training and "
            "validation need one each: add data or lower --seq-len"
        )
    held = min(n - 1, max(1, round(n * config.validation_share)))
    warnings.warn(
        f"the held-out documents cannot fill one sequence of {config.seq_len} tokens (or "
        f"the rest cannot): validation uses the last {held} of the {n} packed sequences "
        "instead (whole sequences, never seen in training)",
        stacklevel=3,
    )
    return (
        Packed(packed.input_ids[:-held], packed.document_ids[:-held]),
        Packed(packed.input_ids[-held:], packed.document_ids[-held:]),
    )


def _with_synthetic(
    train_set: PackedDataset, config: TrainingFields, tokenizer: PreTrainedTokenizerBase
) -> PackedDataset:
    """Mix synthetic task sequences into ``train_set`` at ``config.synthetic_ratio``."""
    real = len(train_set)
    n = max(1, round(config.synthetic_ratio / (1 - config.synthetic_ratio) * real))

    texts = synthetic_texts(n, config.seq_len - 1, config.seed, token_counter(tokenizer))
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    pad = tokenizer.eos_token_id
    # One task per sequence; a task longer than the sequence keeps its end (the answer).
    rows = [row[-config.seq_len :] + [pad] * (config.seq_len - len(row)) for row in ids]
    synthetic = torch.tensor(rows, dtype=torch.long)
    positions = train_set.position_ids
    if positions is not None:
        fresh = torch.arange(config.seq_len).expand(len(rows), -1)
        positions = torch.cat([positions, fresh])
    return PackedDataset(torch.cat([train_set.input_ids, synthetic]), positions)


@contextlib.contextmanager
def run_folder(config: TrainingFields) -> Iterator[Path]:
    """The folder a run writes into: ``--out`` itself, or, when ``--overwrite`` replaces a
    non-empty ``--out``, a staging folder beside it that takes its place only once the run
    has finished (a failed or interrupted run leaves the old ``--out`` untouched)."""
    out = Path(config.out)
    if config.overwrite and not config.resume and out.is_dir() and any(out.iterdir()):
        with staged_folder(out, overwrite=True) as staging:
            yield staging
    else:
        out.mkdir(parents=True, exist_ok=True)
        yield out


class RunRecord(TrainerCallback):
    """Writes what makes the run (:data:`RUN_FIELDS`) beside its checkpoints, at every save
    of the main process, so that ``--resume`` can refuse a different run."""

    def __init__(self, path: Path, config: TrainingFields) -> None:
        self.path, self.fields = path, _run_fields(config)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Record the run beside the checkpoint just written."""
        if state.is_world_process_zero:
            self.path.write_text(json.dumps(self.fields, indent=1))


class NonFiniteGuard(TrainerCallback):
    """Stop at the first NaN or inf loss, and never write a checkpoint of broken weights."""

    def __init__(self) -> None:
        self.bad_step: int | None = None
        self.bad_value: float | None = None

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any
    ) -> None:
        """A logged training loss that is not finite stops the run before any saving."""
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self._stop(state, control, float(loss))

    def on_step_end(
        self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
    ) -> None:
        """Before a checkpoint, check that every parameter is finite."""
        if (
            control.should_save
            and model is not None
            and not all(bool(torch.isfinite(p).all()) for p in model.parameters())
        ):
            self._stop(state, control, float("nan"))

    def _stop(self, state: Any, control: Any, value: float) -> None:
        if self.bad_step is None:
            self.bad_step, self.bad_value = state.global_step, value
        control.should_save = False
        control.should_evaluate = False
        control.should_training_stop = True


#: How learned selectors train: not at all, alone (the warm-up), or along with the model.
SelectorStage = Literal["none", "warmup", "joint"]


class SignalTrainer(Trainer):
    """A Trainer whose loss can come from signals inside attention (``swap.observe``).

    The first ``transfer_steps`` optimise attention transfer instead of the LM loss. With
    learned selectors, ``selectors="warmup"`` optimises their distillation loss alone (the
    base is frozen), and ``"joint"`` adds it to the LM loss over the selected blocks only
    (the selectors' inputs are detached, so each loss trains only its own parameters).
    """

    def __init__(
        self, *args: Any, transfer_steps: int = 0, selectors: SelectorStage = "none", **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.transfer_steps, self.selectors = transfer_steps, selectors

    def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        """The loss of this step (see the class); evaluation always reports the LM loss."""
        transfer = model.training and self.state.global_step < self.transfer_steps
        if not model.training or (self.selectors == "none" and not transfer):
            return super().compute_loss(model, inputs, *args, **kwargs)
        if transfer or self.selectors == "warmup":
            signal = AttentionTransfer() if transfer else SelectorDistillation()
            with observe(model, signal):
                model(input_ids=inputs["input_ids"], logits_to_keep=1)
            loss = signal.loss()
            return (loss, None) if kwargs.get("return_outputs") else loss
        distill = SelectorDistillation(selected_only=True)
        with observe(model, distill):
            result = super().compute_loss(model, inputs, *args, **kwargs)
        lm_loss = result[0] if isinstance(result, tuple) else result
        loss = lm_loss + distill.loss()
        return (loss, result[1]) if isinstance(result, tuple) else loss


def train(
    model: Any,
    train_set: Dataset,
    val_set: Dataset,
    config: TrainingFields,
    out: Path,
    callbacks: list[TrainerCallback] | None = None,
    transfer_steps: int = 0,
    selectors: SelectorStage = "none",
    **extra: Any,
) -> tuple[Trainer, dict[str, Any]]:
    """Run the Trainer; returns it and a record of the run (config, command, metrics).

    Checkpoints go to ``out/checkpoints``. ``extra`` overrides TrainingArguments fields. A
    NaN or inf loss raises RuntimeError naming the step and the last good checkpoint.
    """
    settings = dict(
        output_dir=str(out / "checkpoints"),
        max_steps=config.steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        logging_steps=max(1, min(50, config.steps // 20)),
        eval_strategy="steps",
        eval_steps=config.eval_steps,
        save_strategy="steps",
        save_steps=config.eval_steps,
        save_total_limit=2,
        seed=config.seed,
        data_seed=config.seed,
        report_to=[],
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )
    args = TrainingArguments(**{**settings, **extra})
    guard = NonFiniteGuard()
    trainer = SignalTrainer(
        transfer_steps=transfer_steps,
        selectors=selectors,
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=val_set,
        callbacks=[guard, RunRecord(out / "checkpoints" / RUN_FILE, config), *(callbacks or [])],
    )
    start = last_good_checkpoint(out / "checkpoints") if config.resume else None
    if config.resume and start is None:
        raise ValueError(f"--resume: no readable checkpoint in {out / 'checkpoints'}")
    result = trainer.train(resume_from_checkpoint=str(start) if start else None)
    model.config.use_cache = True  # training turns the KV cache off; the saved model decodes
    if guard.bad_step is not None:
        kept = sorted((out / "checkpoints").glob("checkpoint-*"))
        raise RuntimeError(
            f"the training loss became {guard.bad_value} at step {guard.bad_step}; training "
            f"stopped and nothing was saved after it. Last good checkpoint: "
            f"{kept[-1] if kept else 'none yet'}. Lower the learning rate, or resume from it."
        )
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    if evals and evals[-1]["step"] == trainer.state.global_step:
        metrics = evals[-1]  # the last step was just evaluated
    else:
        metrics = trainer.evaluate()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    record = {
        "config": dict(config.__dict__),
        "command": "longswap " + " ".join(sys.argv[1:]),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_sequences": len(train_set),
        "world_size": trainer.args.world_size,
        "train_seconds": result.metrics["train_runtime"],
        "train_tokens_per_second": result.metrics["train_samples_per_second"] * config.seq_len,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "eval_loss": metrics["eval_loss"],
        "eval_bits_per_token": metrics["eval_loss"] / math.log(2),
        "environment": environment(trainer.args.device),
    }
    return trainer, record


def write_record(out: Path, record: dict[str, Any]) -> None:
    """``longswap_train.json`` beside the saved model."""
    (out / "longswap_train.json").write_text(json.dumps(record, indent=1))
