"""Speed and memory of the attention core: SDPA MHA, talking-heads and DCMHA on every backend.

For each sequence length and head dim, times forward, backward and forward+backward (median of
``--repeat`` CUDA-event timings after warm-up) and the peak extra memory of forward+backward, for:

* ``sdpa``: plain MHA through ``F.scaled_dot_product_attention`` (FlashAttention on H100/H200);
* ``talking_heads/<backend>``: Compose with the static head mix only, before and after the softmax;
* ``dcmha/<backend>``: full DCMHA Compose (static mix, query- and key-wise rank-R terms, both gates,
  pre and post), the paper's setting; ``--no-static`` drops the static mix (the released models' setting).

Backends: ``reference`` (materialised), ``chunked`` (query blocks + checkpointing), ``triton``.
A decode step (one query against a cache of ``--decode-cache`` keys) is timed too.

``--layers`` times whole layers instead (projections, rotary, attention, output projection; ``dim =
heads x head_dim``): ``MultiHeadAttention`` and ``DCMHA`` at the paper's released shapes (``--shapes``,
default 16x64, 16x128, 32x80, 32x128), global and with a 256-key window, ``--tokens`` tokens per
batch, forward+backward, and the DCMHA / MHA ratio. ``--compile`` runs each timed callable (the core, or
the layer) through ``torch.compile`` first.

FLOPs counted (the same for every variant, so TFLOP/s compares speed directly): the two attention
matmuls, ``4 * B * H * D * (pairs)`` for the forward, with ``pairs = T (T + 1) / 2`` under a causal
mask, and 2.5x that for the backward (the FlashAttention convention). Compose arithmetic is *not*
counted: DCMHA's TFLOP/s is "MHA-equivalent" throughput.

    python benchmarks/attention.py                                  # GPU: the full table and plot
    python benchmarks/attention.py --seq 1024 4096 --head-dim 64    # a subset
    python benchmarks/attention.py --device cpu --seq 64 --heads 4 --head-dim 16 --repeat 1   # CPU smoke run
    python benchmarks/attention.py --layers                         # GPU: released shapes, one layer each
    python benchmarks/attention.py --layers --compile --shapes 32x80 --windows 256
    python benchmarks/attention.py --decode-only --decode-graph --variants sdpa dcmha/reference dcmha/triton

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
from headmix import DCMHA, MultiHeadAttention  # noqa: E402
from headmix.ops import available_backends, resolve_backend  # noqa: E402
from headmix.reference import ComposeWeights  # noqa: E402

RELEASED_SHAPES = ("16x64", "16x128", "32x80", "32x128")
"""(heads x head dim) of the paper's released models: 405M/1.4B-like 16x64 and 16x128, DCFormer-2.8B 32x80,
DCFormer-6.9B / DCPythia-6.9B 32x128."""


def composition(B: int, T: int, H: int, R: int, full: bool, device, dtype, generator,
                static: bool = True) -> dict[str, ComposeWeights]:
    """Random Compose weights (small, so the softmax stays sane) for ``pre`` and ``post``; ``full``: every term
    (without the static mix unless ``static``), else the static mix alone (talking-heads)."""
    def rnd(*shape):
        return (0.1 * torch.randn(*shape, generator=generator)).to(device, dtype).requires_grad_()

    out = {}
    for c in ("pre", "post"):
        if full:
            out[c] = ComposeWeights(static=rnd(1, H, H) if static else None, query_w1=rnd(B, T, 1, R, H),
                                    query_w2=rnd(B, T, 1, R, H),
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


def measure(name, B, H, T, D, dtype, device, repeat, chunk_size, R, generator, compile=False, static=True):
    q, k, v = (torch.randn(B, H, T, D, generator=generator).to(device, dtype).requires_grad_() for _ in range(3))
    weights = {"dcmha": composition(B, T, H, R, True, device, dtype, generator, static),
               "talking_heads": composition(B, T, H, R, False, device, dtype, generator)}
    mask = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]
    fn = variant_fn(name, q, k, v, weights, D**-0.5, mask, chunk_size)
    fn = torch.compile(fn) if compile else fn
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


def parse_shape(text: str) -> tuple[int, int]:
    """``"32x80"`` -> ``(32, 80)`` (heads, head dim)."""
    heads, _, head_dim = text.partition("x")
    if not (heads.isdigit() and head_dim.isdigit() and int(heads) > 0 and int(head_dim) > 0):
        raise ValueError(f"shape {text!r} is not known: expected HEADSxHEAD_DIM, e.g. 16x64")
    return int(heads), int(head_dim)


def build_layer(kind: str, heads: int, head_dim: int, window: int | None, device, dtype, static: bool = True):
    """One attention layer as the models build it (rotary, causal; DCFormer++ adds QK-norm to both kinds alike)."""
    dim = heads * head_dim
    common = dict(causal=True, window=window, rotary=True)
    if kind == "mha":
        layer = MultiHeadAttention(dim, heads, **common)
    elif kind == "dcmha":
        layer = DCMHA(dim, heads, static=static, **common)
    else:
        raise ValueError(f"layer kind {kind!r} is not known: expected 'mha' or 'dcmha'")
    return layer.to(device=device, dtype=dtype)


def layer_time(kind: str, heads: int, head_dim: int, seq: int, tokens: int, window: int | None, dtype, device,
               repeat: int, compile: bool = False, padding: bool = False, static: bool = True) -> dict:
    """Median forward+backward seconds (and forward alone) of one layer on ``tokens // seq`` sequences of ``seq``
    tokens; ``padding``: a padding mask with the first eighth of every other sequence padded. Errors and
    out-of-memory are returned in the dict, not raised (one table row each)."""
    torch.manual_seed(0)
    layer = build_layer(kind, heads, head_dim, window, device, dtype, static)
    batch = max(1, tokens // seq)
    x = torch.randn(batch, seq, heads * head_dim, device=device, dtype=dtype, requires_grad=True)
    mask = None
    if padding:
        mask = torch.ones(batch, seq, dtype=torch.bool, device=device)
        mask[::2, : seq // 8] = False
    run = torch.compile(layer) if compile else layer
    leaves = [x, *layer.parameters()]
    try:
        grad_out = torch.randn_like(x)
        for _ in range(2):  # warm-up: kernels compiled, autotuned, block masks cached
            torch.autograd.grad(run(x, padding_mask=mask), leaves, grad_out)
            with torch.no_grad():
                run(x, padding_mask=mask)
        if device.type == "cuda":
            torch.cuda.synchronize()
        with torch.no_grad():
            fwd = timed(lambda: run(x, padding_mask=mask), repeat, device)
        fwdbwd = timed(lambda: torch.autograd.grad(run(x, padding_mask=mask), leaves, grad_out), repeat, device)
        return {"fwd": fwd, "fwdbwd": fwdbwd}
    except torch.OutOfMemoryError:
        return {"error": "OOM"}
    except Exception as error:  # a shape a path refuses: a row saying so, and go on
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"}
    finally:
        del layer, x
        if device.type == "cuda":
            torch.cuda.empty_cache()


def layer_table(shapes, windows, seq, tokens, dtype, device, repeat, compile=False, kinds=("mha", "dcmha"),
                static=True, out=print) -> list[dict]:
    """Print (through ``out``) and return one row per (shape, window, kind): fwd and fwd+bwd ms, DCMHA / MHA."""
    out(f"\n# one layer, fwd+bwd: seq {seq}, {tokens} tokens per batch (batch {max(1, tokens // seq)}), "
        f"{'compiled' if compile else 'eager'}, DCMHA static mix {'on' if static else 'off'}")
    out("| shape (heads x head dim) | window | layer | fwd ms | fwd+bwd ms | vs MHA (fwd+bwd) |")
    out("|---|---|---|---|---|---|")
    rows = []
    for shape in shapes:
        heads, head_dim = parse_shape(shape)
        for window in windows:
            base = None
            for kind in kinds:
                r = layer_time(kind, heads, head_dim, seq, tokens, window, dtype, device, repeat, compile,
                               static=static)
                row = dict(shape=shape, window=window, kind=kind, **r)
                if "error" in r:
                    out(f"| {shape} | {window or 'global'} | {kind} | {r['error']} | | |")
                else:
                    base = r["fwdbwd"] if kind == "mha" else base
                    row["ratio"] = r["fwdbwd"] / base if base else None
                    ratio = f"{row['ratio']:.2f}x" if base else "-"
                    out(f"| {shape} | {window or 'global'} | {kind} | {r['fwd'] * 1e3:.2f} | "
                        f"{r['fwdbwd'] * 1e3:.2f} | {ratio} |")
                rows.append(row)
    return rows


def graph_timed(fn, repeat: int, replays: int = 20) -> float:
    """Median seconds of one call of ``fn`` replayed from a CUDA graph (``replays`` replays per timing): what a
    compiled decoding step with CUDA graphs pays for it, without Python or launch overhead."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture: compilation, autotuning, allocations
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / replays)
    return statistics.median(times)


def decode_step(name, B, H, S, D, dtype, device, repeat, R, generator, graph: bool = False, static: bool = True):
    """One new query against ``S`` cached keys (inference, no grad). ``graph``: replayed from a CUDA graph, the
    materialised path (``dcmha/reference``) compiled by inductor first, as in a compiled decoding step."""
    with torch.no_grad():
        q = torch.randn(B, H, 1, D, generator=generator).to(device, dtype)
        k, v = (torch.randn(B, H, S, D, generator=generator).to(device, dtype) for _ in range(2))
        if name == "sdpa":
            fn = lambda: F.scaled_dot_product_attention(q, k, v, scale=D**-0.5)  # noqa: E731
        else:
            kind, backend = name.split("/")
            weights = composition(B, S, H, R, kind == "dcmha", device, dtype, generator, static)
            for c in weights.values():
                for f in ("query_w1", "query_w2", "query_gate"):
                    if getattr(c, f) is not None:
                        setattr(c, f, getattr(c, f)[:, -1:].detach())
            core = resolve_backend(backend, 1, 128, q)
            fn = lambda: core(q, k, v, scale=D**-0.5, mask=MaskSpec(causal=True), pre=weights["pre"],  # noqa: E731
                              post=weights["post"], groups=1, chunk_size=128)
            if graph and backend == "reference":
                torch._dynamo.reset()
                fn = torch.compile(fn, fullgraph=True, dynamic=False)
        if graph:
            return graph_timed(fn, repeat)
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
    parser.add_argument("--decode-kernel", default=None, choices=["tiles", "one_query"],
                        help="the kernel dcmha/triton decodes one query with (sets headmix.ops.triton.launch."
                             "DECODE_KERNEL; default: its value)")
    parser.add_argument("--decode-graph", action="store_true",
                        help="time each decode step replayed from a CUDA graph (CUDA only; dcmha/reference compiled by "
                             "inductor first), as a compiled decoding step runs it")
    parser.add_argument("--plot", default=None, help="write a PNG of forward+backward time against sequence length")
    parser.add_argument("--compile", action="store_true", help="torch.compile each timed callable (core or layer)")
    parser.add_argument("--layers", action="store_true",
                        help="time whole MHA and DCMHA layers at --shapes (instead of the attention core)")
    parser.add_argument("--shapes", nargs="+", default=list(RELEASED_SHAPES), help="HEADSxHEAD_DIM, for --layers")
    parser.add_argument("--windows", nargs="+", default=["global", "256"], help="for --layers: 'global' or a size")
    parser.add_argument("--layer-seq", type=int, default=2048, help="for --layers")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per batch, for --layers")
    parser.add_argument("--no-static", action="store_true",
                        help="DCMHA without the static mix (the released models' setting), core and --layers")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.decode_graph and device.type != "cuda":
        raise ValueError("--decode-graph needs a CUDA device (it replays CUDA graphs)")
    if args.layers:
        for shape in args.shapes:
            parse_shape(shape)
        windows = [None if w == "global" else int(w) for w in args.windows]
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
        print(f"# attention layers: {name}, {datetime.date.today()}, torch {torch.__version__}, {args.dtype}")
        print(f"# command: python benchmarks/attention.py {' '.join(sys.argv[1:] if argv is None else argv)}")
        layer_table(args.shapes, windows, args.layer_seq, args.tokens, dtype, device, args.repeat, args.compile,
                    static=not args.no_static)
        return 0
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
          f"{args.heads} heads, rank {args.rank}, causal, DCMHA static mix {'off' if args.no_static else 'on'}")
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
                            args.rank, generator, args.compile, static=not args.no_static)
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
    how = ("replayed from a CUDA graph (dcmha/reference compiled by inductor)" if args.decode_graph
           else "eager")
    if triton_ok:
        from headmix.ops.triton import launch

        launch.DECODE_KERNEL = args.decode_kernel or launch.DECODE_KERNEL
        how += f", dcmha/triton decodes with the {launch.DECODE_KERNEL!r} kernel"
    print(f"\n# decode step: 1 query, cache {args.decode_cache}, batch 1 and 16, {how}")
    print("| head dim | batch | variant | ms | vs sdpa |")
    print("|---|---|---|---|---|")
    for D in args.head_dim:
        for B in (1, 16):
            base = None
            # the materialised path is in the decode table only compiled (eagerly it is the slowest, by far)
            for variant in [v for v in variants if args.decode_graph or v.split("/")[-1] != "reference"]:
                t = decode_step(variant, B, args.heads, args.decode_cache, D, dtype, device, args.repeat, args.rank,
                                generator, graph=args.decode_graph, static=not args.no_static)
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
    try:
        raise SystemExit(main())
    except ValueError as error:  # bad input: one clear line
        print(f"attention: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
