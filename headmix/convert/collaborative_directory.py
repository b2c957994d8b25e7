"""A saved Hugging Face model directory -> its collaborative form, saved: what ``headmix convert collab`` runs.

Loads the model (and its tokenizer), optionally tokenises calibration texts and records the attention
inputs on them (data-aware decomposition), converts every attention module
(:func:`headmix.convert.collaborative_hf.convert_to_collaborative`), optionally distils, saves, and returns a
:class:`CollaborativeReport` with the per-layer errors and the parameter, FLOP and cache savings.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

from .collaborative import ALS_ITERATIONS, CollaborativeWeights

CALIBRATION_BATCH = 32  # sentences per forward pass when recording attention inputs
CALIBRATION_MAX_TOKENS = 128  # tokens kept per calibration sentence


@dataclass
class CollaborativeReport:
    """What a conversion did: per-layer factors and errors, sizes before/after, and the distillation losses."""

    layers: dict[str, CollaborativeWeights]
    parameters: tuple[int, int]
    attention_modules: int
    cache_bytes_per_token: tuple[int, int] | None
    cache_dtype: str
    distill_losses: list[float] | None
    distill_lines: int
    calibrated: bool

    @property
    def key_dim(self) -> int:
        return next(iter(self.layers.values())).mixing.shape[1]

    def lines(self) -> list[str]:
        """The report as printed by ``headmix convert collab``."""
        first = next(iter(self.layers.values()))
        d_in, heads, key_dim = first.query.shape[0], first.mixing.shape[0], self.key_dim
        before, after = self.parameters
        weighted = self.calibrated
        out = [f"{'layer':<44}{'D~k':>6}{'rel. error':>12}" + (f"{'weighted':>10}" if weighted else "")]
        for name, w in self.layers.items():
            extra = f"{w.whitened_error:>10.4f}" if weighted and w.whitened_error is not None else ""
            out.append(f"{name:<44}{w.mixing.shape[1]:>6}{w.relative_error:>12.4f}{extra}")
        out.append("rel. error: ||T~ - T|| / ||T|| over every head's query-key product T_h = W_Q^h W_K^h^T (0 = exact)."
                   + (" The data-aware decomposition minimises the error weighted by the calibration activations "
                      "('weighted'), so its plain rel. error is higher by design." if weighted else ""))
        out.append(f"parameters: {before:,} -> {after:,} ({(after - before) / before:+.1%}); query/key projection "
                   f"FLOPs per token per layer: {2 * 2 * d_in * d_in:,} -> {2 * 2 * d_in * key_dim:,} "
                   f"({self.attention_modules} attention module(s))")
        out.append(f"score FLOPs per query-key pair per layer: {2 * d_in:,} -> {2 * heads * key_dim:,}: each of the "
                   f"{heads} heads now scores with D~k={key_dim}-wide vectors (the shared key times its own mixing) "
                   f"instead of d_k={d_in // heads}: fewer parameters and a smaller key cache, but more work per score")
        if weighted:
            out.append("calibration: the data-aware decomposition fits the calibration texts' activations; its gain "
                       "is largest on text like them and smaller, or none, on other text (MiniLM measurements: "
                       "docs/collaborative.md). Calibrate on text like what the model will see.")
        if self.distill_losses is not None:
            steps = len(self.distill_losses)
            out.append(f"distillation: {steps} steps on {self.distill_lines:,} lines, "
                       f"loss {self.distill_losses[0]:.4f} -> {self.distill_losses[-1]:.4f}")
        if self.cache_bytes_per_token is not None:
            old, new = self.cache_bytes_per_token
            out.append(f"key+value cache per token (all layers, {self.cache_dtype}): {old:,} -> {new:,} bytes "
                       f"({(new - old) / old:+.1%}; one shared key of D~k per position)")
        return out


def model_width(model_dir: str | os.PathLike) -> int:
    """heads x head_dim of a Hugging Face model, from its config.json alone (no weights loaded)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    for name in ("hidden_size", "n_embd", "dim"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"{model_dir}/config.json names no hidden size (hidden_size, n_embd or dim)")


def calibration_texts(paths: list[str], sentences: int | None = None) -> list[str]:
    """The non-empty lines of the text files (or directories) ``paths``, the first ``sentences`` of them."""
    from ..training.data import resolve_data_files

    _, files = resolve_data_files(paths)
    lines = [line.strip() for f in files for line in Path(f).read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines if sentences is None else lines[:sentences]


def calibration_batches(tokenizer, lines: list[str]) -> list[dict]:
    """Padded, truncated token batches of ``lines`` for :func:`collect_attention_inputs`."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return [dict(tokenizer(lines[i : i + CALIBRATION_BATCH], padding=True, truncation=True,
                           max_length=CALIBRATION_MAX_TOKENS, return_tensors="pt"))
            for i in range(0, len(lines), CALIBRATION_BATCH)]


def convert_directory(
    model_dir: str | os.PathLike, out_dir: str | os.PathLike, *, key_dim: int | None = None,
    key_dim_ratio: float | None = None, calibration: list[str] | None = None, calibration_sentences: int = 256,
    init: str = "svd", n_iter_max: int = ALS_ITERATIONS, tol: float = 1e-8, seed: int = 0, distill_steps: int = 0,
) -> CollaborativeReport:
    """Convert the model saved in ``model_dir`` to collaborative attention and save it (with its tokenizer) in
    ``out_dir``; it reloads with ``AutoModel.from_pretrained`` after ``import headmix``.

    Args:
        key_dim, key_dim_ratio: the shared key size, or its share of ``heads x head_dim`` (one of the two).
        calibration: text files whose first ``calibration_sentences`` lines drive a data-aware decomposition
            (and the distillation); needs the model's tokenizer.
        init, n_iter_max, tol, seed: of the CP decomposition (:func:`headmix.convert.collaborative.reparametrize`).
        distill_steps: then fine-tune the collaborative parameters this many steps against the original model
            on the calibration texts (:func:`headmix.convert.distill.distill`).
    """
    from transformers import AutoModel, AutoTokenizer

    from .collaborative_hf import (attention_modules, collect_attention_inputs, convert_to_collaborative,
                                   kv_cache_bytes_per_token)

    model_dir = Path(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    tokenizer = None
    if (model_dir / "tokenizer_config.json").is_file() or (model_dir / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    inputs, texts = None, []
    if calibration:
        if tokenizer is None:
            raise ValueError(f"calibration texts need the model's tokenizer, and {model_dir} has none")
        texts = calibration_texts(calibration)
        inputs = collect_attention_inputs(model, calibration_batches(tokenizer, texts[:calibration_sentences]))
    teacher = copy.deepcopy(model) if distill_steps else None
    before = sum(p.numel() for p in model.parameters())
    modules = len(attention_modules(model))
    layers = convert_to_collaborative(model, key_dim=key_dim, key_dim_ratio=key_dim_ratio, calibration=inputs,
                                      init=init, n_iter_max=n_iter_max, tol=tol, seed=seed)
    after = sum(p.numel() for p in model.parameters())
    losses = None
    if teacher is not None:
        from .distill import distill

        losses = distill(model, teacher, tokenizer, texts, steps=distill_steps)
    model.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return CollaborativeReport(layers, (before, after), modules, kv_cache_bytes_per_token(model),
                               str(next(model.parameters()).dtype), losses, len(texts), inputs is not None)
