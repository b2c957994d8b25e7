"""Decoding step of the DCMHA attention core: SDPA vs the materialised path vs the fused kernel's
split-key path at several split targets (``headmix.ops.triton.launch.SPLIT_TARGET_PROGRAMS``). With the default
one-query decode kernel the target is only a cap (in 8-warp programs): it takes about sqrt(cache) splits below it
(twice the cap from 2048 keys on; ``launch._decode_splits``); the tile kernel (``DECODE_KERNEL = "tiles"``) splits up to
the target. ``--tiles`` tries other tiles of the one-query kernel (``launch.ONE_QUERY_TILES``) at each target.

One query against a ``--cache``-token cache, all Compose terms on (rank 2), no gradients; prints a
table (ms per step, mean of ``--repeat`` after one warm-up) with device, date and versions.

    python benchmarks/decode_splits.py                   # GPU
    python benchmarks/decode_splits.py --graph           # GPU, each step replayed from a CUDA graph
    python benchmarks/decode_splits.py --graph --no-static --no-materialised --cache 640 --head-dim 64 \
        --targets 128 256 --tiles 16x32x8 32x32x4                # one-query tiles x split caps
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from headmix.ops import resolve_backend  # noqa: E402
from headmix.reference import ComposeWeights  # noqa: E402


def timed(fn, repeat: int) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat * 1e3


def weights(B: int, S: int, H: int, R: int, device, dtype, static: bool = True) -> ComposeWeights:
    def rnd(*shape):
        return torch.randn(*shape, device=device, dtype=dtype) * 0.1

    return ComposeWeights(static=rnd(1, H, H) if static else None, query_w1=rnd(B, 1, 1, R, H),
                          query_w2=rnd(B, 1, 1, R, H), key_w1=rnd(B, S, 1, R, H), key_w2=rnd(B, S, 1, R, H),
                          query_gate=rnd(B, 1, 1, H), key_gate=rnd(B, S, 1, H))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--targets", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--graph", action="store_true",
                        help="replay each step from a CUDA graph (the materialised path compiled by inductor first)")
    parser.add_argument("--no-materialised", action="store_true", help="leave the materialised path out")
    parser.add_argument("--no-static", action="store_true", help="no static head mix (the released models' setting)")
    parser.add_argument("--tiles", nargs="+", default=None, metavar="KEYSxCHUNKxWARPS",
                        help="one-query kernel tiles to try (launch.ONE_QUERY_TILES: keys per tile, head-dim chunk, "
                             "warps), each at every --targets; default: the table's")
    args = parser.parse_args(argv)
    try:
        tiles = [None] if args.tiles is None else [tuple(int(n) for n in t.split("x")) for t in args.tiles]
    except ValueError:
        parser.error(f"--tiles {' '.join(args.tiles)}: expected KEYSxCHUNKxWARPS, e.g. 32x32x4")
    if any(t is not None and len(t) != 3 for t in tiles):
        parser.error(f"--tiles {' '.join(args.tiles)}: expected three numbers each, KEYSxCHUNKxWARPS")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    from headmix.masks import MaskSpec
    from headmix.ops import triton as triton_dcmha
    from headmix.ops.triton import launch

    import triton

    device, dtype, H, S = torch.device("cuda"), torch.bfloat16, args.heads, args.cache
    from attention import graph_timed  # benchmarks/attention.py, beside this script

    def measure(fn, compile=False):
        if not args.graph:
            return timed(fn, args.repeat)
        if compile:
            torch._dynamo.reset()
            fn = torch.compile(fn, fullgraph=True, dynamic=False)
        return graph_timed(fn, args.repeat) * 1e3

    print(f"# decode step: {torch.cuda.get_device_name(device)}, {datetime.date.today()}, torch {torch.__version__}, "
          f"triton {triton.__version__}, bf16, {H} heads, cache {S}, ms per step, "
          f"{'replayed from a CUDA graph' if args.graph else 'eager'}{', no static mix' if args.no_static else ''}")
    print(f"# command: python benchmarks/decode_splits.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    columns = [(tile, target) for tile in tiles for target in args.targets]
    print("| head dim | batch | sdpa | materialised | " + " | ".join(
        ("" if tile is None else "tiles {}x{}x{}, ".format(*tile)) + f"split target {target}"
        for tile, target in columns) + " |")
    print("|---" * (4 + len(columns)) + "|")
    reference = resolve_backend("reference", 1, 128)
    default, table = launch.SPLIT_TARGET_PROGRAMS, dict(launch.ONE_QUERY_TILES)
    for D in args.head_dim:
        for B in args.batches:
            q = torch.randn(B, H, 1, D, device=device, dtype=dtype)
            k, v = (torch.randn(B, H, S, D, device=device, dtype=dtype) for _ in range(2))
            pre, post = (weights(B, S, H, 2, device, dtype, not args.no_static) for _ in range(2))
            common = dict(scale=D**-0.5, pre=pre, post=post, mask=MaskSpec(causal=True))
            with torch.no_grad():
                cells = [measure(lambda: F.scaled_dot_product_attention(q, k, v)),
                         float("nan") if args.no_materialised else
                         measure(lambda: reference(q, k, v, groups=1, **common), compile=True)]
                for tile, target in columns:  # both read when the step is called (or captured)
                    launch.SPLIT_TARGET_PROGRAMS = target
                    if tile is not None:
                        launch.ONE_QUERY_TILES[64 if D <= 64 else 128] = tile
                    cells.append(measure(lambda: triton_dcmha.triton_composed_attention(q, k, v, **common)))
                    launch.ONE_QUERY_TILES.update(table)
                launch.SPLIT_TARGET_PROGRAMS = default
            print(f"| {D} | {B} | " + " | ".join(f"{c:.3f}" for c in cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
