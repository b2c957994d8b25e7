"""Speed and memory of the attention core: SDPA MHA, talking-heads and DCMHA on every backend.

For each sequence length and head dim, times forward, backward and forward+backward (median of
``--repeat`` CUDA-event timings after warm-up) and the peak extra memory of forward+backward, for:

* ``sdpa``: plain MHA through ``F.scaled_dot_product_attention`` (FlashAttention on H100/H200);
* ``talking_heads/<backend>``: Compose with the static head mix only, before and after the softmax;
* ``dcmha/<backend>``: full DCMHA Compose (static mix, query- and key-wise rank-R terms, both gates,
  pre and post), the paper's setting.

Backends: ``reference`` (materialised), ``chunked`` (query blocks + checkpointing), ``triton``.
A decode step (one query against a cache of ``--decode-cache`` keys) is timed too.

FLOPs counted (the same for every variant, so TFLOP/s compares speed directly): the two attention
matmuls, ``4 * B * H * D * (pairs)`` for the forward, with ``pairs = T (T + 1) / 2`` under a causal
mask, and 2.5x that for the backward (the FlashAttention convention). Compose arithmetic is *not*
counted: DCMHA's TFLOP/s is "MHA-equivalent" throughput.

    python benchmarks/attention.py                                  # GPU: the full table and plot
    python benchmarks/attention.py --seq 1024 4096 --head-dim 64    # a subset
    python benchmarks/attention.py --device cpu --seq 64 --heads 4 --head-dim 16 --repeat 1   # CPU smoke run

Prints a markdown table with device, date and versions; ``--plot FILE.png`` also draws time
against sequence length.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from headmix.masks import MaskSpec  # noqa: E402
from headmix.ops import available_backends, resolve_backend  # noqa: E402
from headmix.reference import ComposeWeights  # noqa: E402


def composition(B: int, T: int, H: int, R: int, full: bool, device, dtype, generator) -> dict[str, ComposeWeights]:
    """Random Compose weights (small, so the softmax stays sane) for ``pre`` and ``post``."""
    def rnd(*shape):
        return (0.1 * torch.randn(*shape, generator=generator)).to(device, dtype).requires_grad_()

    out = {}
    for c in ("pre", "post"):
        if full:
            out[c] = ComposeWeights(static=rnd(1, H, H), query_w1=rnd(B, T, 1, R, H), query_w2=rnd(B, T, 1, R, H),
                                    key_w1=rnd(B, T, 1, R, H), key_w2=rnd(B, T, 1, R, H),
                                    query_gate=rnd(B, T, 1, H), key_gate=rnd(B, T, 1, H))
        else:
            out[c] = ComposeWeights(static=rnd(1, H, H))
    return out


def timed(fn, repeat: int, device) -> float:
    """Median seconds of ``fn()``."""
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def variant_fn(name: str, q, k, v, weights, scale: float, mask, chunk_size: int):
    if name == "sdpa":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    kind, backend = name.split("/")
    core = resolve_backend(backend, q.shape[-2], chunk_size, q)
    return lambda: core(q, k, v, scale=scale, mask=MaskSpec(causal=True), pre=weights[kind]["pre"],
                        post=weights[kind]["post"], groups=1, chunk_size=chunk_size)


def measure(name, B, H, T, D, dtype, device, repeat, chunk_size, R, generator):
    q, k, v = (torch.randn(B, H, T, D, generator=generator).to(device, dtype).requires_grad_() for _ in range(3))
    weights = {"dcmha": composition(B, T, H, R, True, device, dtype, generator),
               "talking_heads": composition(B, T, H, R, False, device, dtype, generator)}
    mask = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]
    fn = variant_fn(name, q, k, v, weights, D**-0.5, mask, chunk_size)
    leaves = [q, k, v] + [t for c in weights.get(name.split("/")[0], {}).values() for t in vars(c).values()
                          if t is not None]
    result = {}
    try:
        out = fn()  # warm-up (compiles kernels)
        do = torch.randn_like(out)
        torch.autograd.grad(out, leaves, do)
        if device.type == "cuda":
            torch.cuda.synchronize()
        result["fwd"] = timed(lambda: fn(), repeat, device)
        out = fn()
        result["bwd"] = timed(lambda: torch.autograd.grad(out, leaves, do, retain_graph=True), repeat, device)
        del out
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        result["fwdbwd"] = timed(lambda: torch.autograd.grad(fn(), leaves, do), repeat, device)
        if device.type == "cuda":
            result["peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    except torch.OutOfMemoryError:
        result = {"oom": True}
    except Exception as error:  # a kernel that does not fit this shape: report it in the table, go on
        result = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"}
    finally:
        del q, k, v, weights
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def decode_step(name, B, H, S, D, dtype, device, repeat, R, generator):
    """One new query against ``S`` cached keys (inference, no grad)."""
    with torch.no_grad():
        q = torch.randn(B, H, 1, D, generator=generator).to(device, dtype)
        k, v = (torch.randn(B, H, S, D, generator=generator).to(device, dtype) for _ in range(2))
        if name == "sdpa":
            fn = lambda: F.scaled_dot_product_attention(q, k, v, scale=D**-0.5)  # noqa: E731
        else:
            kind, backend = name.split("/")
            weights = composition(B, S, H, R, kind == "dcmha", device, dtype, generator)
            for c in weights.values():
                for f in ("query_w1", "query_w2", "query_gate"):
                    if getattr(c, f) is not None:
                        setattr(c, f, getattr(c, f)[:, -1:].detach())
            core = resolve_backend(backend, 1, 128, q)
            fn = lambda: core(q, k, v, scale=D**-0.5, mask=MaskSpec(causal=True), pre=weights["pre"],  # noqa: E731
                              post=weights["post"], groups=1, chunk_size=128)
        fn()
        return timed(fn, repeat, device)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--variants", nargs="+", default=None,
                        help="default: sdpa, talking_heads/{chunked,triton}, dcmha/{reference,chunked,triton}")
    parser.add_argument("--max-reference-seq", type=int, default=8192, help="skip the materialised path above this")
    parser.add_argument("--max-chunked-seq", type=int, default=8192, help="skip the chunked path above this")
    parser.add_argument("--decode-cache", type=int, default=4096)
    parser.add_argument("--decode-only", action="store_true", help="only the decode-step table")
    parser.add_argument("--plot", default=None, help="write a PNG of forward+backward time against sequence length")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    triton_ok = "triton" in available_backends() and (device.type == "cuda" or __import__("os").environ.get(
        "TRITON_INTERPRET") == "1")
    variants = args.variants or ["sdpa", "talking_heads/chunked", "dcmha/reference", "dcmha/chunked"] + (
        ["talking_heads/triton", "dcmha/triton"] if triton_ok else [])
    generator = torch.Generator().manual_seed(0)
    versions = f"torch {torch.__version__}"
    try:
        import triton

        versions += f", triton {triton.__version__}"
    except ImportError:
        pass
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# attention core: {name}, {datetime.date.today()}, {versions}, {args.dtype}, batch {args.batch}, "
          f"{args.heads} heads, rank {args.rank}, causal")
    print(f"# command: python benchmarks/attention.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print("| head dim | seq | variant | fwd ms | bwd ms | fwd+bwd ms | fwd+bwd TFLOP/s | peak extra GiB | "
          "vs sdpa (fwd+bwd) |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for D in args.head_dim if not args.decode_only else []:
        for T in args.seq:
            base = None
            for variant in variants:
                limit = {"reference": args.max_reference_seq, "chunked": args.max_chunked_seq}.get(
                    variant.split("/")[-1], 1 << 30)
                if T > limit:
                    continue
                r = measure(variant, args.batch, args.heads, T, D, dtype, device, args.repeat, args.chunk_size,
                            args.rank, generator)
                if r.get("oom") or r.get("error"):
                    print(f"| {D} | {T} | {variant} | {r.get('error', 'OOM')} | | | | | |", flush=True)
                    rows.append((D, T, variant, None))
                    continue
                flops = 4 * args.batch * args.heads * D * T * (T + 1) / 2 * 3.5
                base = r["fwdbwd"] if variant == "sdpa" else base
                ratio = f"{r['fwdbwd'] / base:.2f}x" if base else "-"
                peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else "-"
                print(f"| {D} | {T} | {variant} | {r['fwd'] * 1e3:.2f} | {r['bwd'] * 1e3:.2f} | "
                      f"{r['fwdbwd'] * 1e3:.2f} | {flops / r['fwdbwd'] / 1e12:.1f} | {peak} | {ratio} |", flush=True)
                rows.append((D, T, variant, r["fwdbwd"]))
    print(f"\n# decode step: 1 query, cache {args.decode_cache}, batch 1 and 16")
    print("| head dim | batch | variant | ms | vs sdpa |")
    print("|---|---|---|---|---|")
    for D in args.head_dim:
        for B in (1, 16):
            base = None
            for variant in [v for v in variants if v.split("/")[-1] != "reference"]:
                t = decode_step(variant, B, args.heads, args.decode_cache, D, dtype, device, args.repeat, args.rank,
                                generator)
                base = t if variant == "sdpa" else base
                print(f"| {D} | {B} | {variant} | {t * 1e3:.3f} | {t / base:.2f}x |", flush=True)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(args.head_dim), figsize=(6 * len(args.head_dim), 4.5), squeeze=False)
        for ax, D in zip(axes[0], args.head_dim):
            for variant in variants:
                pts = [(T, t * 1e3) for d, T, v, t in rows if d == D and v == variant and t is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=variant)
            ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="forward+backward ms",
                   title=f"head dim {D}, {args.heads} heads, {name}")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"\nwrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
