"""RMS norm of short rows: PyTorch's ``rms_norm`` against :func:`headmix.ops.rms_norm` (Triton), forward and
forward+backward, at the rows DCFormer++ normalises: QK-norm (a head's channels, queries laid out ``(batch, seq,
heads, head_dim)``) and DCMHA's dynamic-weight factors (``M`` numbers per row, no weight).

    python benchmarks/norm.py                      # GPU: the training and prefill shapes below
    python benchmarks/norm.py --device cpu --small # CPU smoke run (the kernels in Triton's interpreter)

Prints a markdown table with device, date and versions: per call, the kernels' own time (the PyTorch profiler's
CUDA time, mean of ``--repeats`` calls) and the time per call of back-to-back calls (``triton.testing.do_bench``,
medians), which also holds the host's time when the host is slower than the kernels (a Python autograd function and
a Triton launch cost more host time than PyTorch's C++ ``rms_norm``). On the CPU only the second.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (name, shape, weighted): QK-norm of B x T tokens x heads x head_dim; factor norm of (kinds, B, T, G, R, M)
SHAPES = [("QK-norm 16 x 64, 8 x 2048 (training)", (8, 2048, 16, 64), True),
          ("QK-norm 32 x 128, 8 x 2048", (8, 2048, 32, 128), True),
          ("QK-norm 16 x 64, 16 x 512 (prefill)", (16, 512, 16, 64), True),
          ("factor norm M = 16, 8 x 2048", (4, 8, 2048, 1, 2, 16), False),
          ("factor norm M = 32, 8 x 2048", (4, 8, 2048, 1, 2, 32), False)]
SMALL = [("QK-norm 4 x 16, 2 x 8", (2, 8, 4, 16), True), ("factor norm M = 4, 2 x 8", (4, 2, 8, 1, 2, 4), False)]


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median microseconds per call."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return 1e3 * do_bench(fn, warmup=10, rep=max(20, repeats))
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * sorted(times)[len(times) // 2]


def kernel_time(fn, device: torch.device, repeats: int) -> float:
    """Mean microseconds of CUDA kernel time per call (``nan`` off CUDA)."""
    if device.type != "cuda":
        return float("nan")
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    return sum(e.device_time_total for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) / repeats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--small", action="store_true", help="tiny shapes (a smoke run)")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # (before triton is imported)
    from headmix.ops.triton.norm import triton_rms_norm
    import triton

    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    print(f"# RMS norm of short rows: {name}, {datetime.date.today()}, torch {torch.__version__}, triton "
          f"{triton.__version__}, {str(dtype).removeprefix('torch.')}, us per call\n")
    print("| rows | kernels fwd+bwd: PyTorch | headmix | speed-up | back-to-back fwd: PyTorch | headmix | fwd+bwd: "
          "PyTorch | headmix |")
    print("|---|---|---|---|---|---|---|---|")
    for label, shape, weighted in SMALL if args.small else SHAPES:
        N = shape[-1]
        x = torch.randn(shape, device=device, dtype=dtype)
        if len(shape) == 4:  # QK-norm: queries as the layer sees them, (batch, heads, seq, head_dim) transposed
            x = x.transpose(1, 2)
        x.requires_grad_()
        w = torch.ones(N, device=device, dtype=dtype, requires_grad=True) if weighted else None
        leaves = [x] + ([w] if weighted else [])
        dy = torch.randn_like(x)

        def torch_norm():
            return F.rms_norm(x, (N,), w, 1e-6)

        def ours():
            t = x.transpose(1, 2) if x.dim() == 4 else x  # rows in memory order, as HeadNorm takes them
            out = triton_rms_norm(t, w, 1e-6)
            return out.transpose(1, 2) if x.dim() == 4 else out

        steps = [lambda f=f: torch.autograd.grad(f(), leaves, dy) for f in (torch_norm, ours)]
        kernels = [kernel_time(step, device, args.repeats) for step in steps]
        row = [timed(f, device, args.repeats) for f in (torch_norm, ours)] + [timed(s, device, args.repeats)
                                                                             for s in steps]
        print(f"| {label} | {kernels[0]:.1f} | {kernels[1]:.1f} | {kernels[0] / kernels[1]:.2f}x | {row[0]:.1f} | "
              f"{row[1]:.1f} | {row[2]:.1f} | {row[3]:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
