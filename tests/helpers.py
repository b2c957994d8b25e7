"""Test helpers: random composition parameters, parameter transfer between switch settings, CPU peak memory."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from headmix import DCMHA

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj", "query", "key", "q_norm", "k_norm")


def composition_parameters(layer: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Every parameter that is not a q/k/v/output projection or norm."""
    return {n: p for n, p in layer.named_parameters() if n.split(".")[0] not in PROJECTIONS}


def randomise_composition(layer: torch.nn.Module, std: float = 0.5, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in composition_parameters(layer).values():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


def copy_into(src: DCMHA, dst: DCMHA) -> None:
    """Copy ``src``'s parameters into ``dst``, which has a subset of ``src``'s composition terms."""
    dst.load_state_dict({k: v for k, v in src.state_dict().items() if k.split(".")[0] in PROJECTIONS}, strict=False)
    with torch.no_grad():
        for c, kind in enumerate(dst.dynamic.factor_kinds):
            cs = src.dynamic.factor_kinds.index(kind)
            dst.dynamic.hidden[:, :, c] = src.dynamic.hidden[:, :, cs]
            dst.dynamic.factors[:, c] = src.dynamic.factors[:, cs]
        for c, kind in enumerate(dst.dynamic.gate_kinds):
            dst.dynamic.gates[:, :, c] = src.dynamic.gates[:, :, src.dynamic.gate_kinds.index(kind)]
        for name, w in dst.static.items():
            w.copy_(src.static[name])


class PeakMemory(TorchDispatchMode):
    """Peak bytes of live tensor storage created inside the ``with`` block (CPU or any device).

    Every op's outputs are tracked by storage; a storage is freed when the last tensor produced for
    it is garbage collected. Tensors created before the block (inputs, parameters) are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, int] = {}

    def _release(self, key: int, nbytes: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key, nbytes = storage._cdata, storage.nbytes()
                if key not in self._refs:
                    self._refs[key] = 0
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                self._refs[key] += 1
                weakref.finalize(t, self._release, key, nbytes)
        return out


class Completed:
    """What ``subprocess.run(..., capture_output=True, text=True)`` returns: ``returncode``, ``stdout``, ``stderr``."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_in_process(target: str, *args: str) -> Completed:
    """Run the ``headmix`` command line (``target="headmix"``) or a script (a path) in this process, as
    ``python -m headmix.cli ARGS`` / ``python SCRIPT ARGS`` would, with its output captured.

    A fresh interpreter costs ~10 s of imports on the 2-core CI machine; tests of argument errors and short
    commands run here instead (the suite keeps a few true subprocess runs of the entry points)."""
    import contextlib
    import io
    import runpy
    import sys

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            if target == "headmix":
                from headmix.cli import main

                sys.argv = ["headmix", *args]
                code = main(list(args))
            else:
                sys.argv = [target, *args]
                runpy.run_path(target, run_name="__main__")
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if not isinstance(done.code, (int, type(None))):
            err.write(f"{done.code}\n")
    finally:
        sys.argv = argv
    return Completed(int(code or 0), out.getvalue(), err.getvalue())
