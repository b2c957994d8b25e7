"""Host time of one eager attention layer call: what an eager prefill (the part of ``generate()`` transformers does
not compile) pays per layer before the GPU does any work.

For each layer kind, a static-cache prefill of ``--tokens`` tokens into an empty cache and a one-token step against
it, timed ``--repeat`` times each; prints the fastest and the median call in µs (the fastest is the least disturbed
by other work on the machine). Shapes are small on purpose: the GPU keeps up, so the time is the host's (Python,
PyTorch dispatch, kernel launches).

``--stub-kernels`` replaces the fused DCMHA kernels' launches by no-ops, so what remains is headmix's Python and
PyTorch's own ops around them; on the CPU it is the only way to time the Triton path (it sets ``TRITON_INTERPRET=1``,
whose kernel launches would otherwise dominate). On a GPU without it the launches count too::

    python benchmarks/host_overhead.py                        # GPU: real launches
    python benchmarks/host_overhead.py --device cpu           # CPU: Triton launches stubbed
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](*args)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=16, help="prefill length")
    parser.add_argument("--repeat", type=int, default=300)
    parser.add_argument("--kinds", nargs="+", default=["mha", "dcmha"], choices=["mha", "dcmha"])
    parser.add_argument("--stub-kernels", action="store_true",
                        help="no-op the fused DCMHA kernels' launches (always on for the CPU)")
    args = parser.parse_args(argv)
    for name in ("dim", "heads", "tokens", "repeat"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} is {getattr(args, name)}: expected a positive number")
    if args.dim % args.heads or args.dim // args.heads < 16:
        raise ValueError(f"--dim {args.dim} over --heads {args.heads}: expected a head dim of at least 16 that divides")

    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    stub = args.stub_kernels or device.type == "cpu"
    if stub:
        os.environ["TRITON_INTERPRET"] = "1"  # the triton backend accepts CPU tensors; its launches are stubbed
        from headmix.ops.triton import launch, rows

        kernels = [(launch, "_fwd_kernel"), (launch, "_one_query_kernel"), (launch, "_split_sum_kernel"),
                   (rows, "_rows_kernel")]
        real = {(module, name): getattr(module, name) for module, name in kernels}
        for module, name in kernels:
            setattr(module, name, _NoLaunch())
        try:
            return _table(args, device, stub)
        finally:  # (a caller in the same process, a test, gets the kernels back)
            for (module, name), kernel in real.items():
                setattr(module, name, kernel)
    return _table(args, device, stub)


def _table(args, device, stub: bool) -> int:
    import torch

    from headmix import DCMHA, MultiHeadAttention
    from headmix.layers.cache import StaticLayerCache

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn) -> tuple[float, float]:
        for _ in range(20):
            fn()
        times = []
        for _ in range(args.repeat):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return min(times) * 1e6, statistics.median(times) * 1e6

    print(f"# host time per eager layer call: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"{datetime.date.today()}, torch {torch.__version__}, dim {args.dim}, {args.heads} heads, "
          f"prefill {args.tokens} tokens, {args.repeat} calls, DCMHA kernels {'stubbed' if stub else 'launched'}")
    print("| layer | prefill µs (fastest) | prefill µs (median) | step µs (fastest) | step µs (median) |")
    print("|---|---|---|---|---|")
    torch.manual_seed(0)
    options = dict(dim=args.dim, num_heads=args.heads, rotary=True)
    layers = {"mha": lambda: MultiHeadAttention(**options),
              "dcmha": lambda: DCMHA(**options, static=False, backend="triton")}
    for kind in args.kinds:
        layer = layers[kind]().to(device).eval()
        x = torch.randn(1, args.tokens, args.dim, device=device)
        x1 = torch.randn(1, 1, args.dim, device=device)
        step_position = torch.tensor([args.tokens], device=device)
        cache = StaticLayerCache(args.tokens + args.repeat + 20)  # room for every timed step after the prefill

        def prefill():
            cache.reset()
            layer(x, cache=cache)

        def step():  # one new token against the cache (every slot attended, as in a static-cache step)
            layer(x1, positions=step_position, cache=cache)

        with torch.no_grad():
            prefill_fast, prefill_median = timed(prefill)
            prefill()
            step_fast, step_median = timed(step)
        print(f"| {kind} | {prefill_fast:,.0f} | {prefill_median:,.0f} | {step_fast:,.0f} | {step_median:,.0f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except ValueError as error:  # bad input: one clear line
        print(f"host_overhead: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
