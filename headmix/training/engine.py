"""The training engine: Hugging Face ``Trainer``, plus what it lacks for headmix.

``Trainer`` brings the loop, mixed precision, gradient accumulation, warm-up + cosine schedule,
evaluation, progress bars, resumable checkpoints (optimizer, scheduler, RNG, data position) and
DDP / FSDP2 under ``torchrun``. :class:`HeadmixTrainer` adds:

* atomic checkpoints: written to a staging directory, fsynced, then renamed into place, so a run
  killed at any moment leaves only complete checkpoints; the last ``keep_last`` are kept;
* a stop on a non-finite loss, after saving the last good state, naming the step;
* a CSV log of every logged metric with the tokens seen, cut back to the checkpoint on resume.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..models import DCFormerConfig, DCFormerForCausalLM
from .config import TrainConfig
from .data import PreparedData, collate

CHECKPOINT_PREFIX = "checkpoint-"
STAGING = ".staging"
METRICS = "metrics.csv"
RESULT = "result.json"
RUN = "run.json"  # the settings that define a model directory's run
# fields that do not change what a run computes: they may differ between a run and its resumption
NON_DEFINING = ("models", "init_from", "output_dir", "overwrite", "cache_dir", "num_proc", "keep_last", "log_every",
                "save_every", "eval_every", "deterministic")
# transformers renamed `gradient_checkpointing` to `activation_checkpointing` in 5.x; use what is there
CHECKPOINTING_FIELD = next(
    (f.name for f in dataclasses.fields(TrainingArguments) if f.name == "activation_checkpointing"),
    "gradient_checkpointing",
)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def _fsync_tree(path: Path) -> None:
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first (staged, unfinished ones are never listed)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


class HeadmixTrainer(Trainer):
    """``Trainer`` with atomic checkpoints, last-K rotation and a stop on non-finite loss."""

    def __init__(self, *args, keep_last: int = 2, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.keep_last = keep_last

    def _save_checkpoint(self, model, trial) -> None:
        final_root = Path(self.args.output_dir)
        staging_root = final_root / STAGING
        self._get_output_dir = lambda trial=None: str(staging_root)  # Trainer writes into the staging area
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            name = f"{CHECKPOINT_PREFIX}{self.state.global_step}"
            staged, final = staging_root / name, final_root / name
            _fsync_tree(staged)
            if final.exists():
                shutil.rmtree(final)
            os.replace(staged, final)  # atomic: the checkpoint appears whole or not at all
            _fsync_dir(final_root)
            for old in checkpoints(final_root)[: -self.keep_last]:
                shutil.rmtree(old)
            try:
                staging_root.rmdir()  # leave no empty staging folder behind
            except OSError:
                pass
        self.accelerator.wait_for_everyone()

    def training_step(self, model, inputs, *args, **kwargs):
        loss = super().training_step(model, inputs, *args, **kwargs)
        finite = torch.isfinite(loss.detach()).float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if finite.item() < 1:
            step = self.state.global_step + 1
            self._save_checkpoint(model, trial=None)  # parameters are still those after the last good step
            raise TrainingDiverged(
                f"loss is {loss.item()} at step {step}: training stopped; the last good state (after step "
                f"{step - 1}) is saved in {Path(self.args.output_dir) / (CHECKPOINT_PREFIX + str(step - 1))}"
            )
        return loss


class CSVLogger(TrainerCallback):
    """Appends every log (train loss, eval loss, learning rate) to ``metrics.csv`` with the tokens seen."""

    fields = ("step", "tokens", "loss", "eval_loss", "learning_rate", "grad_norm")

    def __init__(self, path: Path, tokens_per_step: int) -> None:
        self.path = path
        self.tokens_per_step = tokens_per_step

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        rows = read_metrics(self.path)
        kept = [r for r in rows if int(r["step"]) <= state.global_step]  # drop what a killed run logged after its checkpoint
        with self.path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.fields)
            writer.writeheader()
            writer.writerows(kept)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "tokens": state.global_step * self.tokens_per_step}
        row.update({k: logs[k] for k in self.fields[2:] if k in logs})
        if len(row) == 2:
            return
        with self.path.open("a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.fields).writerow(row)


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@dataclass
class ModelResult:
    """What one training run produced."""

    name: str
    parameters: int
    validation_loss: float
    tokens_per_second: float
    tokens: int
    output_dir: Path
    world_size: int = 1
    peak_memory_gib: float | None = None  # peak CUDA memory allocated on rank 0

    @property
    def perplexity(self) -> float:
        return math.exp(self.validation_loss)


def _precision(config: TrainConfig) -> dict:
    precision = config.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def training_arguments(config: TrainConfig, output_dir: Path) -> TrainingArguments:
    """``TrainingArguments`` from a :class:`TrainConfig` (the only place they are set)."""
    distributed = {}
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if config.distributed == "fsdp2" and world_size > 1:
        if not torch.cuda.is_available():
            # accelerate (under Trainer) applies FSDP only on accelerators and would silently fall back to DDP
            raise ValueError("distributed='fsdp2' needs CUDA devices (Hugging Face accelerate shards only on "
                             "accelerators); use distributed=ddp on the CPU")
        distributed = dict(fsdp=True, fsdp_config={"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                                   "transformer_layer_cls_to_wrap": ["DecoderLayer"],
                                                   "reshard_after_forward": True})
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": config.min_lr_ratio},
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        adam_beta1=config.adam_beta1,
        adam_beta2=config.adam_beta2,
        max_grad_norm=config.max_grad_norm,
        eval_strategy="steps",
        eval_steps=config.eval_every,
        logging_steps=config.log_every,
        save_strategy="steps",
        save_steps=config.save_every,
        save_total_limit=None,  # HeadmixTrainer keeps the last `keep_last` itself, after the atomic rename
        seed=config.seed,
        data_seed=config.seed,
        full_determinism=config.deterministic,
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        torch_compile=config.compile,
        **{CHECKPOINTING_FIELD: config.gradient_checkpointing},
        use_cpu=not torch.cuda.is_available(),
        **_precision(config),
        **distributed,
    )


def model_config(name: str, config: TrainConfig, **fields) -> DCFormerConfig:
    """The config of preset ``name`` with the run's overrides (or of the ``init_from`` model ``name``), checked
    against the run's ``seq_len``."""
    initial = config.initial_models()
    if name in initial:
        model = DCFormerConfig.from_pretrained(initial[name])
    else:
        model = DCFormerConfig.from_preset(name, **{**fields, **config.model_overrides})
    if config.seq_len > model.max_position_embeddings:
        raise ValueError(
            f"seq_len={config.seq_len} is longer than model {name!r} takes "
            f"(max_position_embeddings={model.max_position_embeddings})"
        )
    return model


def build_model(name: str, config: TrainConfig, tokenizer) -> DCFormerForCausalLM:
    """A fresh model of preset ``name`` sized for the tokenizer, with the config's overrides; or the ``init_from``
    model ``name`` as saved (float32 weights: the run's ``precision`` decides the compute)."""
    initial = config.initial_models()
    if name in initial:
        model = DCFormerForCausalLM.from_pretrained(initial[name], dtype=torch.float32)
        if model.config.vocab_size < len(tokenizer):
            raise ValueError(f"init_from={initial[name]!r} has vocab_size={model.config.vocab_size}, fewer than the "
                             f"tokenizer's {len(tokenizer)} tokens: use the model's own tokenizer (tokenizer=DIR)")
        return model
    special = {f"{t}_token_id": getattr(tokenizer, f"{t}_token_id") for t in ("eos", "bos", "pad")}
    torch.manual_seed(config.seed)
    return DCFormerForCausalLM(model_config(name, config, vocab_size=len(tokenizer), **special))


def run_settings(name: str, config: TrainConfig) -> dict:
    """The settings that define model ``name``'s run: what ``run.json`` records."""
    settings = {k: v for k, v in config.to_dict().items() if k not in NON_DEFINING}
    initial = config.initial_models()
    source = {"init_from": str(Path(initial[name]).resolve())} if name in initial else {}
    return {"model": name, **source, **settings}


def claim_output_dir(name: str, config: TrainConfig, write: bool = True) -> None:
    """Make sure model ``name``'s directory holds nothing made with other settings, then record ours.

    A directory from a run with the same settings is kept (it is resumed, or its finished model
    reused). One with other settings, or with unrecorded settings, is refused with the differing
    fields named, unless ``config.overwrite`` is set: then it is deleted. ``write=False`` (the
    non-main processes of a distributed run) only checks.

    Raises:
        ValueError: naming the directory, the differing fields and the options.
    """
    output_dir = Path(config.output_dir) / name
    wanted = json.loads(json.dumps(run_settings(name, config)))  # as it reads back from JSON
    record = output_dir / RUN
    used = output_dir.is_dir() and any(p.name != RUN for p in output_dir.iterdir())  # anything trained there
    if used:
        if record.is_file():
            recorded = json.loads(record.read_text())
            differing = [k for k in sorted(set(wanted) | set(recorded)) if wanted.get(k) != recorded.get(k)]
            problem = ", ".join(f"{k}={recorded.get(k)!r} there, {wanted.get(k)!r} now" for k in differing)
        else:
            differing, problem = ["(not recorded)"], "its settings were not recorded (an older headmix made it)"
        if differing:
            if not config.overwrite:
                raise ValueError(
                    f"{output_dir} holds a run of {name} with other settings ({problem}); reusing it would mix "
                    f"two runs. Choose a new output_dir=..., or set overwrite=true to delete it and train afresh"
                )
            if write:
                print(f"overwrite=true: deleting {output_dir} (made with other settings: {problem})", flush=True)
                shutil.rmtree(output_dir)
                used = False
    if write:
        output_dir.mkdir(parents=True, exist_ok=True)
        if not used:
            record.write_text(json.dumps(wanted, indent=2) + "\n")


def train_one(name: str, config: TrainConfig, data: PreparedData) -> ModelResult:
    """Train (or resume, or reuse the finished result of) preset ``name`` on ``data``.

    The directory must have been claimed for this run's settings first (:func:`claim_output_dir`).
    """
    from accelerate import PartialState

    main = PartialState().is_main_process
    output_dir = Path(config.output_dir) / name
    final_dir = output_dir / "final"
    if (final_dir / RESULT).is_file():
        if main:
            print(f"{name}: reusing the finished model in {final_dir} (same settings)", flush=True)
        stored = json.loads((final_dir / RESULT).read_text())
        return ModelResult(**{**stored, "output_dir": output_dir})
    output_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(output_dir / STAGING, ignore_errors=True)  # an unfinished save of a killed run
    args = training_arguments(config, output_dir)
    model = build_model(name, config, data.tokenizer)
    tokens_per_step = config.batch_size * config.grad_accum * config.seq_len * args.world_size
    trainer = HeadmixTrainer(
        model=model, args=args, train_dataset=data.train, eval_dataset=data.validation,
        data_collator=collate, processing_class=data.tokenizer, keep_last=config.keep_last,
        callbacks=[CSVLogger(output_dir / METRICS, tokens_per_step)],
    )
    existing = checkpoints(output_dir)
    resume = str(existing[-1]) if existing else None
    start_step = int(existing[-1].name[len(CHECKPOINT_PREFIX):]) if existing else 0
    if main:
        print(f"{name}: resuming from {existing[-1]}" if existing else f"{name}: training in {output_dir}", flush=True)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    elapsed = time.perf_counter() - started
    metrics = trainer.evaluate()
    result = ModelResult(
        name=name,
        parameters=sum(p.numel() for p in model.parameters()),
        validation_loss=float(metrics["eval_loss"]),
        tokens_per_second=(config.max_steps - start_step) * tokens_per_step / elapsed,
        tokens=config.max_steps * tokens_per_step,
        output_dir=output_dir,
        world_size=args.world_size,
        peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
    )
    trainer.save_model(str(final_dir))  # every rank: under FSDP2 gathering the weights is collective
    if trainer.is_world_process_zero():
        stored = {k: v for k, v in vars(result).items() if k != "output_dir"}
        (final_dir / RESULT).write_text(json.dumps(stored, indent=2))
    trainer.accelerator.wait_for_everyone()
    return result
