"""Measure tile shapes and mixing precision of the fused DCMHA kernels on this GPU.

For each candidate (BLOCK_M, BLOCK_N, num_warps, num_stages) of ``headmix.ops.triton.TILES``,
separately for the forward and the backward kernels, and each ``--mix`` precision of the Compose's
head-mixing products (``MIX_PRECISION``), times the DCMHA attention core (every Compose term on,
rank 2, causal, bf16) and prints a table with the relative error of the output (forward) or of the
worst gradient (backward) against the same kernels in exact float32. A candidate that does not fit
the GPU (out of shared memory or registers) is reported so.

    python benchmarks/tune_triton.py --seq 2048 --heads 16 --head-dim 64
    python benchmarks/tune_triton.py --fwd 16,16,8,1 16,16,4,1 --bwd 16,16,8,1 --mix tf32,bf16 tf32,tf32
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

from headmix.masks import attention_mask  # noqa: E402
from headmix.masks import MaskSpec  # noqa: E402
from headmix.ops import triton as triton_dcmha  # noqa: E402
from headmix.ops.chunked import chunked_composed_attention  # noqa: E402
from headmix.reference import ComposeWeights  # noqa: E402

FWD = ["16,16,8,1", "16,16,4,1", "16,16,16,1", "32,16,8,1", "16,32,8,1"]
BWD = ["16,16,8,1", "16,16,4,1", "16,16,16,1"]


def _tile(text: str) -> tuple[int, int, int, int]:
    parts = tuple(int(x) for x in text.split(","))
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"tile {text!r}: expected BLOCK_M,BLOCK_N,num_warps,num_stages")
    return parts  # type: ignore[return-value]


def _mix(text: str) -> dict[str, str]:
    parts = text.split(",")
    if len(parts) != 2 or any(p not in ("bf16", "tf32") for p in parts):
        raise argparse.ArgumentTypeError(f"mix {text!r}: expected PRE,POST with each bf16 or tf32")
    return dict(pre=parts[0], post=parts[1])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--fwd", type=_tile, nargs="*", default=[_tile(t) for t in FWD])
    parser.add_argument("--bwd", type=_tile, nargs="*", default=[_tile(t) for t in BWD])
    parser.add_argument("--mix", type=_mix, nargs="+", default=[dict(triton_dcmha.MIX_PRECISION[torch.bfloat16])],
                        help="PRE,POST mixing precisions of bf16 inputs, each bf16 or tf32 (default: the module's)")
    parser.add_argument("--no-static", action="store_true", help="no static head mix (dcmha_static=False)")
    args = parser.parse_args(argv)
    device, dtype = torch.device("cuda"), torch.bfloat16
    g = torch.Generator().manual_seed(0)
    B, H, T, D = args.batch, args.heads, args.seq, args.head_dim
    q, k, v = (torch.randn(B, H, T, D, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    w = composition(B, T, H, 2, True, device, dtype, g)
    if args.no_static:
        for c in w.values():
            c.static = None
    leaves = [q, k, v] + [t for c in w.values() for t in vars(c).values() if t is not None]
    padded_heads = triton_dcmha.padded_heads(H)

    def split(ls):
        it = iter(ls[3:])
        return [ComposeWeights(**{f: next(it) if t is not None else None for f, t in vars(w[c]).items()})
                for c in ("pre", "post")]

    def run(ls):
        pre, post = split(ls)
        return triton_dcmha.triton_composed_attention(*ls[:3], scale=D**-0.5, pre=pre, post=post,
                                                      mask=MaskSpec(causal=True))

    exact = [t.detach().float().requires_grad_() for t in leaves]  # float32 on the chunked PyTorch path
    pos = torch.arange(T, device=device)
    mask = attention_mask(pos, pos, causal=True, window=None, key_padding=None)
    pre32, post32 = split(exact)
    ref_out = chunked_composed_attention(*exact[:3], scale=D**-0.5, mask=mask, pre=pre32, post=post32, groups=1,
                                         chunk_size=256)
    do = torch.randn(ref_out.shape, generator=g).to(device)
    ref_grads = torch.autograd.grad(ref_out, exact, do)

    print(f"# {torch.cuda.get_device_name()}, {datetime.date.today()}, torch {torch.__version__}, "
          f"B={B} H={H} T={T} D={D} bf16{', no static mix' if args.no_static else ''}; "
          f"error: relative to float32 on the chunked path (worst gradient for bwd)")
    print("| phase | BLOCK_M | BLOCK_N | warps | stages | mix (pre,post) | ms | rel. error |")
    print("|---|---|---|---|---|---|---|---|")
    default = dict(triton_dcmha.TILES)
    default_mix = dict(triton_dcmha.MIX_PRECISION[torch.bfloat16])
    for mix in args.mix:
        for phase, candidates in (("fwd", args.fwd), ("bwd", args.bwd)):
            for cand in candidates:
                triton_dcmha.TILES.clear()
                triton_dcmha.TILES.update(default)
                triton_dcmha.TILES[triton_dcmha.tile_key(phase, padded_heads, args.head_dim)] = cand
                triton_dcmha.MIX_PRECISION[torch.bfloat16].update(mix)
                try:
                    out = run(leaves)
                    dob = do.to(dtype)
                    if phase == "fwd":
                        err = _rel(out, ref_out)
                        ms = timed(lambda: run(leaves), args.repeat, device) * 1e3
                    else:
                        grads = torch.autograd.grad(out, leaves, dob, retain_graph=True)
                        err = max(_rel(a, b) for a, b in zip(grads, ref_grads))
                        ms = timed(lambda: torch.autograd.grad(out, leaves, dob, retain_graph=True), args.repeat,
                                   device) * 1e3
                    result = f"{ms:.2f} | {err:.1e}"
                except Exception as error:  # does not fit this GPU
                    result = f"{type(error).__name__} | -"
                row = [phase, *cand, f"{mix['pre']},{mix['post']}"]
                print("| " + " | ".join(str(x) for x in row) + f" | {result} |", flush=True)
    triton_dcmha.TILES.clear()
    triton_dcmha.TILES.update(default)
    triton_dcmha.MIX_PRECISION[torch.bfloat16].update(default_mix)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
