"""Running the Hugging Face Trainer for longswap: losses from inside attention, a guard
against non-finite losses, resuming from the last complete checkpoint, the run record."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Literal, NoReturn

import torch
from safetensors import safe_open
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from longswap.environment import environment
from longswap.io import disk_is_full, explain_disk_full, write_json
from longswap.swap import observe
from longswap.train.budget import check_budget
from longswap.train.common import RUN_FILE, run_fields
from longswap.train.config import TrainingFields
from longswap.train.distributed import parallelism, sharded, whole_size
from longswap.train.recovery import DenseParent, recovery_loss
from longswap.train.signals import AttentionTransfer, SelectorDistillation, step_generator
from longswap.train.teacher import SelectorStudent, warm_up_samples


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


class RunRecord(TrainerCallback):
    """Writes what makes the run (:data:`RUN_FIELDS`) beside its checkpoints, at every save
    of the main process, so that ``--resume`` can refuse a different run."""

    def __init__(self, path: Path, config: TrainingFields) -> None:
        self.path, self.fields = path, run_fields(config)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Record the run beside the checkpoint just written."""
        if state.is_world_process_zero:
            write_json(self.path, self.fields)


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


@dataclasses.dataclass(frozen=True)
class WarmUp:
    """The selector warm-up (base frozen): ``rows`` query rows per step, ``reuse`` steps
    from each sequence's targets (see ``train.teacher``)."""

    rows: int
    reuse: int


@dataclasses.dataclass(frozen=True)
class Joint:
    """Selectors trained along with the model (DSA's sparse stage): each step's dense
    targets on ``rows`` query rows per layer (see ``train.signals.SelectorDistillation``)."""

    rows: int


#: How learned selectors train: not at all, along with the model, or alone (the warm-up).
SelectorStage = Literal["none"] | Joint | WarmUp


class SignalTrainer(Trainer):
    """A Trainer whose loss can come from signals inside attention (``swap.observe``).

    The first ``transfer_steps`` optimise attention transfer instead of the LM loss. With
    learned selectors, :class:`Joint` adds their distillation loss to the LM loss (after
    the first ``dense_steps``, which run full attention: no selector scores), over the
    selected blocks only (the selectors' inputs are detached, so each loss trains only its
    own parameters); its sampled rows derive from the seed and the step. The selector
    warm-up trains a ``SelectorStudent`` (``train.teacher``), whose own loss the Trainer
    takes as it is. ``chunked``: the training loss of a causal LM comes from its hidden
    states a chunk of positions at a time (``recovery.recovery_loss`` without a parent), so
    that a long sequence never holds its whole logits; evaluation keeps the model's loss.
    """

    def __init__(
        self,
        *args: Any,
        transfer_steps: int = 0,
        dense_steps: int = 0,
        selectors: Literal["none"] | Joint = "none",
        parent: DenseParent | None = None,
        kl_weight: float = 0.0,
        chunked: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.transfer_steps, self.dense_steps = transfer_steps, dense_steps
        self.selectors = selectors
        self.parent, self.kl_weight = parent, kl_weight
        self.chunked = chunked
        if chunked or parent is not None:
            # recovery_loss is a mean over its own batch's tokens: the Trainer divides it by
            # the accumulation steps, and each process's mean weighs alike.
            self.loss_is_scaled_for_ga = False
        self._forwards = (-1, 0)  # (step, its forwards so far): each micro-batch draws anew

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's training; forwards before it (the budget probe) draw no rows of its
        steps."""
        self._forwards = (-1, 0)
        return super().train(*args, **kwargs)

    def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        """The loss of this step (see the class); evaluation always reports the LM loss."""
        transfer = model.training and self.state.global_step < self.transfer_steps
        selecting = self.selectors != "none" and self.state.global_step >= self.dense_steps
        recovering = self.parent is not None and model.training and not transfer
        chunked = self.chunked and model.training and not transfer
        if not model.training or not (selecting or transfer or recovering or chunked):
            return super().compute_loss(model, inputs, *args, **kwargs)
        if transfer:
            signal = AttentionTransfer()
            with observe(model, signal):  # positions too: sequence parallelism needs them
                kept = {k: inputs[k] for k in ("input_ids", "position_ids") if k in inputs}
                model(**kept, logits_to_keep=1)
            loss = signal.loss()
            return (loss, None) if kwargs.get("return_outputs") else loss
        step = self.state.global_step
        micro = self._forwards[1] + 1 if self._forwards[0] == step else 0
        self._forwards = (step, micro)
        sampler = step_generator(self.args.seed, step, micro)
        distill = SelectorDistillation(self.selectors.rows, sampler) if selecting else None
        if recovering or chunked:
            parent, weight = (self.parent, self.kl_weight) if recovering else (None, 0.0)
            loss = recovery_loss(model, parent, inputs, weight, observer=distill)
            loss = loss if distill is None else loss + distill.loss()
            return (loss, None) if kwargs.get("return_outputs") else loss
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
    dense_steps: int = 0,
    parent: DenseParent | None = None,
    kl_weight: float = 0.0,
    **extra: Any,
) -> tuple[Trainer, dict[str, Any]]:
    """Run the Trainer; returns it and a record of the run (config, command, metrics).

    Checkpoints go to ``out/checkpoints``. ``dense_steps``: the first steps that run full
    attention (a callback switches it), in which joint selectors have nothing to learn.
    ``extra`` overrides TrainingArguments fields. A NaN or inf loss raises RuntimeError
    naming the step and the last good checkpoint.
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
        save_strategy="no" if config.no_checkpoints else "steps",
        save_steps=config.save_steps or config.eval_steps,
        save_total_limit=2,
        seed=config.seed,
        data_seed=config.seed,
        report_to=[],
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )
    args = TrainingArguments(**{**settings, **extra})
    guard = NonFiniteGuard()
    trained, train_data, val_data = model, train_set, val_set
    if isinstance(selectors, WarmUp):
        trained = SelectorStudent(model, train_set, val_set)
        train_data, val_data = warm_up_samples(
            train_set,
            val_set,
            selectors.rows,
            selectors.reuse,
            config.steps * config.batch_size,
            config.seed,
        )
    trainer = SignalTrainer(
        transfer_steps=transfer_steps,
        dense_steps=dense_steps,
        selectors="none" if trained is not model else selectors,  # a student's loss is whole
        parent=parent,
        kl_weight=kl_weight,
        # DeepSpeed's engine (and its sequence-parallel loss) and DDP's wrapper (whose
        # forward must run for its gradients) keep the model's own loss.
        chunked=trained is model and not args.deepspeed and args.world_size == 1,
        model=trained,
        args=args,
        train_dataset=train_data,
        eval_dataset=val_data,
        callbacks=[guard, RunRecord(out / "checkpoints" / RUN_FILE, config), *(callbacks or [])],
    )
    start = last_good_checkpoint(out / "checkpoints") if config.resume else None
    if config.resume and start is None:
        raise ValueError(f"--resume: no readable checkpoint in {out / 'checkpoints'}")
    # No probe for the warm-up (a forward without gradients), nor on DeepSpeed (its engine
    # and sequence-parallel groups exist only once training starts).
    planned = None
    if config.skip_budget_check:
        warnings.warn(
            "--skip-budget-check: a step's memory was not estimated; a step that does not fit "
            "fails with out-of-memory during training",
            stacklevel=2,
        )
    elif trained is model and not args.deepspeed:
        planned = check_budget(trainer, config.seq_len, config.batch_size, config.steps)
    spread = parallelism(trainer)
    if spread.get("note"):
        print(f"longswap: {spread['note']}", file=sys.stderr, flush=True)
    try:
        result = trainer.train(resume_from_checkpoint=str(start) if start else None)
    except (OSError, RuntimeError) as err:
        if not disk_is_full(err):
            raise
        _remove_damaged(out / "checkpoints", err)
    model.config.use_cache = True  # training turns the KV cache off; the saved model decodes
    if guard.bad_step is not None:
        kept = last_good_checkpoint(out / "checkpoints")
        after = (
            f"Last good checkpoint: {kept}. Lower the learning rate, or resume from it."
            if kept
            else "No checkpoint was written before it: lower the learning rate and start again."
        )
        raise RuntimeError(
            f"the training loss became {guard.bad_value} at step {guard.bad_step}; training "
            f"stopped and nothing was saved after it. {after}"
        )
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    if evals and evals[-1]["step"] == trainer.state.global_step:
        metrics = evals[-1]  # the last step was just evaluated
    else:
        metrics = trainer.evaluate()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    read_per_second = result.metrics["train_samples_per_second"]
    if isinstance(selectors, WarmUp):  # it reads a sequence once per ``reuse`` samples
        read_per_second /= selectors.reuse
    record = {
        "config": dict(config.__dict__),
        "command": "longswap " + " ".join(sys.argv[1:]),
        "trainable_parameters": sum(whole_size(p) for p in model.parameters() if p.requires_grad),
        "parameters": sum(whole_size(p) for p in model.parameters()),
        "train_sequences": len(train_set),
        "world_size": trainer.args.world_size,
        "parallelism": spread | {"sharded_parameters": sharded(trainer.model_wrapped)},
        "train_seconds": result.metrics["train_runtime"],
        "train_tokens_per_second": read_per_second * config.seq_len,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "eval_loss": metrics["eval_loss"],
        "eval_bits_per_token": metrics["eval_loss"] / math.log(2),
        "budget": dataclasses.asdict(planned) | {"peak_gb": planned.peak_gb} if planned else None,
        "environment": environment(trainer.args.device),
    }
    return trainer, record


def _remove_damaged(folder: Path, err: BaseException) -> NoReturn:
    """After a full disk stopped training: delete the checkpoints in ``folder`` that were
    left half-written, then raise the disk-full error naming the last complete one."""
    for checkpoint in folder.glob("checkpoint-*"):
        if not _readable(checkpoint):
            shutil.rmtree(checkpoint, ignore_errors=True)
    kept = last_good_checkpoint(folder)
    after = " The half-written checkpoints were removed." + (
        f" The last complete checkpoint is {kept}: rerun the same command with --resume to "
        "continue from it once there is space."
        if kept
        else " No checkpoint was complete yet."
    )
    with explain_disk_full(folder, after):
        raise err


def write_record(out: Path, record: dict[str, Any]) -> None:
    """``longswap_train.json`` beside the saved model."""
    write_json(out / "longswap_train.json", record)
