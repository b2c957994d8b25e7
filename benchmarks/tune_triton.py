"""Measure tile shapes of the fused DCMHA kernels (headmix.ops.triton_dcmha.TILES) on this GPU.

For each candidate (BLOCK_M, BLOCK_N, num_warps, num_stages), separately for the forward and the
backward kernels, times the DCMHA attention core (every Compose term on, rank 2, causal) and prints
a table; a candidate that does not fit the GPU (out of shared memory or registers) is reported so.

    python benchmarks/tune_triton.py --seq 2048 --heads 16 --head-dim 64
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attention import composition, timed  # noqa: E402

from headmix.ops import triton_dcmha  # noqa: E402

FWD = [(16, 16, 8, 1), (16, 16, 4, 1), (16, 16, 16, 1), (32, 16, 8, 1), (16, 32, 8, 1), (32, 32, 8, 1), (16, 16, 8, 2)]
BWD = [(16, 16, 8, 1), (16, 16, 4, 1), (16, 16, 16, 1), (32, 16, 8, 1), (16, 32, 8, 1), (32, 32, 16, 1)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    device, dtype = torch.device("cuda"), torch.bfloat16
    g = torch.Generator().manual_seed(0)
    B, H, T, D = args.batch, args.heads, args.seq, args.head_dim
    q, k, v = (torch.randn(B, H, T, D, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    w = composition(B, T, H, 2, True, device, dtype, g)
    leaves = [q, k, v] + [t for c in w.values() for t in vars(c).values() if t is not None]
    key = (H & (H - 1) == 0 and H >= 16) or H > 16  # padded heads per group >= 16

    def fn():
        return triton_dcmha.triton_composed_attention(q, k, v, scale=D**-0.5, pre=w["pre"], post=w["post"], causal=True)

    print(f"# {torch.cuda.get_device_name()}, {datetime.date.today()}, torch {torch.__version__}, "
          f"B={B} H={H} T={T} D={D} bf16")
    print("| phase | BLOCK_M | BLOCK_N | warps | stages | ms |")
    print("|---|---|---|---|---|---|")
    default = dict(triton_dcmha.TILES)
    for phase, candidates in (("fwd", FWD), ("bwd", BWD)):
        for cand in candidates:
            triton_dcmha.TILES.clear()
            triton_dcmha.TILES.update(default)
            triton_dcmha.TILES[(phase, key)] = cand
            try:
                out = fn()
                do = torch.randn_like(out)
                if phase == "fwd":
                    ms = timed(fn, args.repeat, device) * 1e3
                else:
                    torch.autograd.grad(out, leaves, do, retain_graph=True)
                    ms = timed(lambda: torch.autograd.grad(out, leaves, do, retain_graph=True), args.repeat,
                               device) * 1e3
                result = f"{ms:.2f}"
            except Exception as error:  # does not fit this GPU
                result = f"{type(error).__name__}"
            print(f"| {phase} | {cand[0]} | {cand[1]} | {cand[2]} | {cand[3]} | {result} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
