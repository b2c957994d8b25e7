"""Reading and writing checkpoints tensor by tensor, for :mod:`headmix.convert.official`: weights files
(safetensors or ``.bin``, sharded or not) read one tensor at a time, safetensors shards written one at a time,
the tokenizer files copied along, and an output directory left clean when a conversion fails.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "generation_config.json")
# config fields that say nothing about the architecture (or only about the official training run)
DEFAULT_SHARD_BYTES = 2 * 1024**3


# -- reading checkpoints tensor by tensor ---------------------------------------------------------
@dataclass
class TensorFile:
    """One weights file: safetensors (memory-mapped, one tensor at a time) or a ``.bin`` pickle
    (loaded with ``weights_only=True`` and memory-mapped where the file allows it)."""

    path: Path

    def read(self, only: set[str] | None = None) -> Iterator[tuple[str, Tensor]]:
        """``(name, tensor)`` pairs, in file order (only the names in ``only`` when given)."""
        if self.path.suffix == ".safetensors":
            with self._unreadable_as_value_error():
                handle_context = safe_open(str(self.path), framework="pt")
            with handle_context as handle:
                for name in handle.keys():
                    if only is not None and name not in only:
                        continue
                    with self._unreadable_as_value_error():
                        tensor = handle.get_tensor(name)
                    yield name, tensor
            return
        with self._unreadable_as_value_error():
            try:
                state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:  # legacy (non-zip) serialisation cannot be memory-mapped
                if "mmap" not in str(error) and "zip" not in str(error).lower():
                    raise
                state = torch.load(self.path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{self.path} holds a {type(state).__name__}: expected a dict of tensors (a state dict)")
        names = [n for n in state if only is None or n in only]
        for name in names:
            yield name, state.pop(name)
        del state

    def shapes(self) -> dict[str, tuple[int, ...]]:
        if self.path.suffix == ".safetensors":
            with self._unreadable_as_value_error():
                with safe_open(str(self.path), framework="pt") as handle:
                    return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
        return {name: tuple(t.shape) for name, t in self.read()}

    @contextlib.contextmanager
    def _unreadable_as_value_error(self) -> Iterator[None]:
        """A file that cannot be parsed becomes one ``ValueError`` naming it (a download cut short, say)."""
        try:
            yield
        except ValueError:
            raise
        except Exception as error:  # SafetensorError, RuntimeError/EOFError/UnpicklingError from torch.load
            size = self.path.stat().st_size if self.path.exists() else 0
            state = "empty (0 bytes)" if size == 0 else f"truncated or corrupt ({size:,} bytes)"
            raise ValueError(
                f"weights file {self.path} is {state}: {(type(error).__name__ + ': ' + str(error)).splitlines()[0][:200]}. "
                "Download or copy it again"
            ) from None


def weight_files(directory: Path) -> list[TensorFile]:
    """The weights files of a checkpoint directory: a safetensors or ``.bin`` index, else single files."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (directory / index).is_file():
            weight_map = json.loads((directory / index).read_text())["weight_map"]
            files = [directory / name for name in sorted(set(weight_map.values()))]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise ValueError(f"{directory / index} lists weights files that do not exist: {missing[:3]}")
            return [TensorFile(f) for f in files]
    for single in ("model.safetensors", "pytorch_model.bin", "consolidated.pth", "model.pth"):
        if (directory / single).is_file():
            return [TensorFile(directory / single)]
    raise ValueError(
        f"{directory} has no weights: expected model.safetensors, pytorch_model.bin, or a "
        "model.safetensors.index.json / pytorch_model.bin.index.json with its shards"
    )


class ShardWriter:
    """Writes tensors into safetensors shards of at most ``max_bytes`` each (one shard in memory at a
    time), then names them as ``transformers`` does and writes the index."""

    def __init__(self, directory: Path, max_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_shard_bytes={max_bytes} is not allowed: expected a positive number of bytes")
        self.directory, self.max_bytes = directory, max_bytes
        self.buffer: dict[str, Tensor] = {}
        self.buffer_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.peak_buffer_bytes = 0

    def add(self, name: str, tensor: Tensor) -> None:
        if name in self.buffer or any(name in names for _, names in self.shards):
            raise ValueError(f"tensor {name!r} would be written twice: the source checkpoint has duplicate entries")
        size = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffer_bytes + size > self.max_bytes:
            self.flush()
        self.buffer[name] = tensor.contiguous()
        self.buffer_bytes += size
        self.peak_buffer_bytes = max(self.peak_buffer_bytes, self.buffer_bytes)

    def flush(self) -> None:
        if not self.buffer:
            return
        path = self.directory / f".shard-{len(self.shards):05d}.safetensors"
        save_file(self.buffer, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.buffer)))
        self.buffer, self.buffer_bytes = {}, 0

    def close(self) -> list[Path]:
        """Flush, rename the shards (``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` with
        ``model.safetensors.index.json``) and return their paths."""
        self.flush()
        n = len(self.shards)
        if n == 0:
            raise ValueError("no tensors to write")
        if n == 1:
            final = self.directory / "model.safetensors"
            self.shards[0][0].replace(final)
            return [final]
        weight_map, total, paths = {}, 0, []
        for i, (path, names) in enumerate(self.shards):
            final = self.directory / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.replace(final)
            paths.append(final)
            with safe_open(str(final), framework="pt") as handle:
                for name in names:
                    weight_map[name] = final.name
                    sl = handle.get_slice(name)
                    total += _numel(sl.get_shape()) * _dtype_bytes(sl.get_dtype())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return paths


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _dtype_bytes(name: str) -> int:
    return {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}.get(name, 4)


def copy_tokenizer(src: Path, out: Path) -> list[str]:
    """Copy the tokenizer files of ``src`` that exist into ``out``; their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
            copied.append(name)
    return copied


def prepare_out(out: Path, src: Path) -> None:
    """Create ``out``, refusing the source directory itself or a directory that already holds weights."""
    if out.resolve() == src.resolve():
        raise ValueError(f"output directory {out} is the source directory: choose another one")
    out.mkdir(parents=True, exist_ok=True)
    stale = [p.name for p in out.glob("*.safetensors")] + [p.name for p in out.glob("*.index.json")]
    if stale:
        raise ValueError(f"output directory {out} already holds weights ({stale[:3]}): choose an empty directory")


@contextlib.contextmanager
def no_partial_output(out: Path) -> Iterator[None]:
    """On any failure, remove what the conversion wrote into ``out`` (all of ``out`` if it created it)."""
    existed = out.exists()
    before = set(out.iterdir()) if existed and out.is_dir() else set()
    try:
        yield
    except BaseException:
        if not existed:
            shutil.rmtree(out, ignore_errors=True)
        elif out.is_dir():
            for path in set(out.iterdir()) - before:
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        raise


def cast(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    """``t`` in ``dtype`` if it is floating and a dtype is given, else unchanged."""
    return t if dtype is None or not t.is_floating_point() else t.to(dtype)


