"""Checks a model directory before loading it, so that a bad file fails with a message naming the tensor.

``transformers`` would warn and re-initialise a missing tensor, or fail deep inside on a shape
mismatch; headmix refuses both, and a truncated or corrupt safetensors file, with a ``ValueError``
naming the file and the tensor. Nothing here unpickles: safetensors headers only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def safetensors_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors weight files of a model directory (one file or the shards of an index)."""
    directory = Path(directory)
    if (directory / INDEX_FILE).is_file():
        index = json.loads((directory / INDEX_FILE).read_text())
        return sorted({directory / name for name in index["weight_map"].values()})
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    return []


def read_shapes(files: list[Path]) -> dict[str, tuple[tuple[int, ...], Path]]:
    """``{tensor name: (shape, file)}`` from safetensors headers; every tensor is also read once, so a
    truncated or corrupt file is caught here rather than half-way through loading."""
    shapes: dict[str, tuple[tuple[int, ...], Path]] = {}
    for file in files:
        if not file.is_file():
            raise ValueError(f"weights file {file} is listed in {INDEX_FILE} but does not exist")
        current = None
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    current = name
                    shapes[name] = (tuple(handle.get_slice(name).get_shape()), file)
                    handle.get_tensor(name)
        except SafetensorError as error:
            where = f" (at tensor {current!r})" if current is not None else ""
            raise ValueError(f"weights file {file} is truncated or corrupt{where}: {error}") from error
    return shapes


def verify_checkpoint(directory: str | os.PathLike, model: torch.nn.Module, prefix: str = "") -> None:
    """Compare the shapes of the tensors stored in ``directory`` with the parameters and buffers ``model`` expects.

    Missing and unexpected tensors are left to ``transformers``, which reports them as for its own models (a
    warning, ``output_loading_info=True``) and initialises what is missing; a tensor whose shape differs, or a
    truncated or corrupt file, is refused here with its name.

    Args:
        directory: a model directory written by ``save_pretrained``.
        model: the model to load into (may live on the meta device).
        prefix: the ``base_model_prefix`` (``"model"``): a checkpoint of the base model (names without it) or of
            the model with a head (names with it) is compared name for name as transformers will load it.

    Raises:
        ValueError: naming the file and the first mis-shaped tensor, or a truncated file.
    """
    files = safetensors_files(directory)
    if not files:
        return  # not a safetensors checkpoint: transformers loads .bin files with weights_only=True
    stored = read_shapes(files)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    lead = f"{prefix}." if prefix else ""
    for name, (shape, file) in stored.items():
        candidates = (name, lead + name, name[len(lead):] if lead and name.startswith(lead) else None)
        target = next((c for c in candidates if c is not None and c in expected), None)
        if target is not None and expected[target] != shape:
            raise ValueError(f"tensor {name!r} in {file} has shape {shape}: the model expects {expected[target]}")
