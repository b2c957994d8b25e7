"""Training configuration: every default lives in :class:`TrainConfig`, and only there.

A run is configured by (in order of precedence) command-line overrides ``field=value``, a YAML file,
and the defaults below. The defaults are the embedded job: a tiny DCFormer++ against a tiny
Transformer++ on the packaged Shakespeare corpus, sized to finish in about five minutes on two CPU
cores.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .._validation import check_choice, check_positive_int
from ..models.configuration import PRESETS

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
STRATEGIES = ("ddp", "fsdp2")


@dataclass
class TrainConfig:
    """What to train, on what, and how. Every field can be set in YAML or as ``field=value``.

    Models and data:
        models: presets to train from scratch, one after the other on the same tokens (see ``headmix presets``).
        init_from: headmix model directories to train further (an upcycled Llama, a finished run's ``final``),
            after the ``models``, on the same tokens; each is named after its directory. With ``init_from`` set
            on the command line or in a file and ``models`` not, only these are trained. The tokenizer is the
            first directory's (unless ``tokenizer`` is set); ``model_overrides`` apply to presets only.
        model_overrides: config fields applied to every model (e.g. ``{attention_options: {backend: chunked}}``).
        data: text/JSONL/Parquet files or directories; empty: the embedded Shakespeare corpus.
        text_field: the field holding the text in JSONL/Parquet rows.
        tokenizer: a saved tokenizer directory; empty: train a byte-level BPE on the training data (cached).
        vocab_size: size of the trained BPE vocabulary (also the models' vocabulary).
        seq_len: tokens per training sequence (packed).
        validation_fraction: share of documents held out for validation.
        max_validation_sequences: cap on validation sequences evaluated each time.
        streaming: stream the tokenised data instead of materialising it (for data larger than memory).
        num_proc: processes for tokenisation.

    Optimisation:
        max_steps, batch_size (per device), grad_accum, learning_rate, min_lr_ratio, warmup_steps,
        weight_decay, adam_beta1, adam_beta2, max_grad_norm, seed.

    Running:
        output_dir: where checkpoints, logs, the table and the plot go (one sub-directory per model).
            A model directory belongs to the settings that made it (recorded in ``run.json``): rerunning
            with the same settings resumes or reuses it; with different ones the run stops and names
            the fields that differ, unless ``overwrite`` is set.
        overwrite: delete what an earlier run with other settings left in a model's directory and
            train afresh (default ``false``: refuse).
        eval_every, log_every, save_every: in optimizer steps.
        keep_last: checkpoints kept per model (older ones are deleted).
        precision: ``auto`` (bf16 on a GPU that supports it, else fp32), ``fp32``, ``bf16``, ``fp16``.
        distributed: ``ddp`` or ``fsdp2`` when launched with ``torchrun`` on several processes.
        compile: ``torch.compile`` the model.
        deterministic: the same bits on every run of the same settings on the same hardware, at some speed:
            transformers' ``full_determinism`` (``torch.use_deterministic_algorithms(True)``, cuBLAS and cuDNN in
            their deterministic modes), under which the DCMHA training kernels add their key-side gradient sums in a
            fixed order instead of by atomic adds (default ``false``; runs on the CPU are deterministic either way).
        gradient_checkpointing: recompute activations in the backward pass.
        cache_dir: tokenizer, corpus and tokenised-data cache (default ``~/.cache/headmix``).
    """

    models: list[str] = field(default_factory=lambda: ["tiny-dcformer++", "tiny-transformer++"])
    init_from: list[str] = field(default_factory=list)
    model_overrides: dict[str, Any] = field(default_factory=dict)
    data: list[str] = field(default_factory=list)
    text_field: str = "text"
    tokenizer: str = ""
    vocab_size: int = 4096
    seq_len: int = 128
    validation_fraction: float = 0.02
    max_validation_sequences: int = 64
    streaming: bool = False
    num_proc: int = 2
    max_steps: int = 180
    batch_size: int = 16
    grad_accum: int = 1
    learning_rate: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    max_grad_norm: float = 1.0
    seed: int = 0
    output_dir: str = "runs/default"
    overwrite: bool = False
    eval_every: int = 30
    log_every: int = 10
    save_every: int = 60
    keep_last: int = 2
    precision: str = "auto"
    distributed: str = "ddp"
    compile: bool = False
    deterministic: bool = False
    gradient_checkpointing: bool = False
    cache_dir: str = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), f.type))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field, its value and what is allowed."""
        if not self.models and not self.init_from:
            raise ValueError("models is empty: name at least one preset (see `headmix presets`) or a model "
                             "directory to train further (init_from=DIR)")
        for name in self.models:
            check_choice("models", name, tuple(PRESETS))
        for directory in self.init_from:
            check_model_directory(directory)
        names = self.run_names()
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"models and init_from name {repeated} more than once: each model trains in "
                             f"output_dir/NAME (an init_from directory's NAME is its directory's name)")
        for name in ("vocab_size", "seq_len", "max_steps", "batch_size", "grad_accum", "eval_every", "log_every",
                     "save_every", "keep_last", "num_proc", "max_validation_sequences"):
            check_positive_int(name, getattr(self, name))
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction={self.validation_fraction!r} is not allowed: expected 0 < x < 1")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate={self.learning_rate!r} is not allowed: expected a positive number")
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("distributed", self.distributed, STRATEGIES)

    def run_names(self) -> list[str]:
        """The names of the models this run trains: the presets, then each ``init_from`` directory's name."""
        return [*self.models, *self.initial_models()]

    def initial_models(self) -> dict[str, str]:
        """Name -> directory of each ``init_from`` model."""
        return {Path(d).resolve().name: d for d in self.init_from}

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else Path.home() / ".cache" / "headmix"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_model_directory(directory: str) -> None:
    """Refuse an ``init_from`` entry that is not a headmix model directory, saying what it is and what to do."""
    import json

    from ..models.configuration import MODEL_TYPE, foreign_config_message

    config = Path(directory) / "config.json"
    if not config.is_file():
        raise ValueError(f"init_from={directory!r} is not a model directory (no config.json): expected a headmix "
                         "model directory, e.g. one written by `headmix convert upcycle` or a run's final/")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type != MODEL_TYPE:
        raise ValueError(f"init_from={directory!r}: " + foreign_config_message(model_type, "it"))


def parse_value(text: str) -> Any:
    """A command-line value, read as YAML: ``0.0003`` -> float, ``true`` -> bool, ``[a, b]`` -> list.

    YAML reads ``3e-4`` (no dot) as the string ``"3e-4"``; :class:`TrainConfig` turns such strings
    into numbers for its numeric fields, so ``learning_rate=3e-4`` works on the command line and in files.
    """
    return yaml.safe_load(text)


def _coerce(name: str, value: Any, kind: str) -> Any:
    """``value`` as the type ``kind`` (a field's annotation) or a ``ValueError`` naming the field."""
    if kind == "float":
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{name}={value!r} is not allowed: expected a number, e.g. {name}=0.001 or {name}=1e-3")
    if kind == "int":
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if isinstance(number, float) and number.is_integer():
            return int(number)
        if isinstance(number, int) and not isinstance(number, bool):
            return number
        raise ValueError(f"{name}={value!r} is not allowed: expected an integer, e.g. {name}=100")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name}={value!r} is not allowed: expected true or false")
    if kind == "str":
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{name}={value!r} is not allowed: expected a string")
    if kind.startswith("list"):
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float)) for v in value):
            return [str(v) for v in value]
        raise ValueError(f"{name}={value!r} is not allowed: expected a list, e.g. {name}=[a, b]")
    if kind.startswith("dict"):
        if value is None:
            return {}
        if isinstance(value, dict):
            return value
        raise ValueError(f"{name}={value!r} is not allowed: expected a mapping, e.g. {name}={{field: value}}")
    return value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults, then the YAML file at ``path``, then ``field=value`` overrides.

    Raises:
        ValueError: for a missing file, an unknown field or a malformed override.
    """
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values: dict[str, Any] = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping of field: value, got {type(loaded).__name__}")
        values.update(loaded)
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not allowed: expected field=value, e.g. max_steps=100")
        key, _, raw = item.partition("=")
        values[key.strip()] = parse_value(raw)
    unknown = sorted(set(values) - fields)
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name.replace("-", "_"), sorted(fields), n=1, cutoff=0.6)
            if close:
                hints.append(f"{name!r}: did you mean {close[0]!r}?")
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise ValueError(f"unknown config field(s) {unknown}{hint}; allowed fields are {sorted(fields)} "
                         "(`headmix train --show-config` prints them with their defaults)")
    if values.get("init_from") and "models" not in values:  # `headmix train init_from=DIR` trains DIR only
        values["models"] = []
    return TrainConfig(**values)
