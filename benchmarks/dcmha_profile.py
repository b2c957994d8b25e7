"""Per-kernel time and tensor-core throughput of the fused DCMHA kernels against SDPA (one GPU).

For the attention core (batch ``--batch``, ``--heads`` heads x ``--head-dim``, causal, rank 2, every
Compose term on unless ``--no-static``), prints the forward / backward / forward+backward time of the
triton backend and of SDPA, then each CUDA kernel's time from the PyTorch profiler with the FLOPs it
does on tensor cores (its recomputation and head-mixing products included) and the TFLOP/s that gives.

    python benchmarks/dcmha_profile.py --seq 4096 --heads 16 --head-dim 64
    python benchmarks/dcmha_profile.py --heads 32 --head-dim 128 --seq 2048 --batch 8 --no-static --backend chunked
    ncu --clock-control none -k regex:'_kernel' python benchmarks/dcmha_profile.py --ncu   # one launch each
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from headmix.masks import MaskSpec  # noqa: E402
from headmix.ops import resolve_backend  # noqa: E402
from headmix.ops.triton import tensor_core_flops  # noqa: E402
from headmix.reference import ComposeWeights  # noqa: E402


def weights(B, T, G, M, R, static, device, dtype, gen):
    def rnd(*shape):
        return (0.1 * torch.randn(*shape, generator=gen)).to(device, dtype).requires_grad_()

    return ComposeWeights(static=rnd(G, M, M) if static else None, query_w1=rnd(B, T, G, R, M),
                          query_w2=rnd(B, T, G, R, M), key_w1=rnd(B, T, G, R, M), key_w2=rnd(B, T, G, R, M),
                          query_gate=rnd(B, T, G, M), key_gate=rnd(B, T, G, M))


def bench(fn, repeat=10):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=50, rep=repeat * 20, return_mode="median")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--groups", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--rank", type=int, default=2)
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--no-static", action="store_true", help="static head mix off (dcmha_static=False)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--ncu", action="store_true", help="one forward+backward only (for ncu)")
    p.add_argument("--backend", default="triton", choices=["triton", "chunked"],
                   help="the DCMHA path to time (chunked: the PyTorch fallback, for comparison)")
    p.add_argument("--forward-form", default=None, choices=["rank", "matrix"],
                   help="the Compose's form in the forward kernel of groups wider than 16 heads "
                        "(headmix.ops.triton.launch.WIDE_FORMS['fwd']; default: as set there)")
    args = p.parse_args()
    dev, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    B, H, T, D, G, R = args.batch, args.heads, args.seq, args.head_dim, args.groups, args.rank
    Hk = args.kv_heads or H
    M = H // G
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, T, D, generator=gen).to(dev, dtype).requires_grad_()
    k, v = (torch.randn(B, Hk, T, D, generator=gen).to(dev, dtype).requires_grad_() for _ in range(2))
    pre, post = (weights(B, T, G, M, R, not args.no_static, dev, dtype, gen) for _ in range(2))
    leaves = [q, k, v] + [t for w in (pre, post) for t in vars(w).values() if t is not None]
    if args.forward_form:
        from headmix.ops.triton import launch

        launch.WIDE_FORMS["fwd"] = args.forward_form
    core = resolve_backend(args.backend, T, 128, q)
    mk = dict(mask=MaskSpec(causal=True, window=args.window))

    def fwd():
        return core(q, k, v, scale=D**-0.5, pre=pre, post=post, groups=G, **mk)

    out = fwd()
    do = torch.randn_like(out)
    torch.autograd.grad(out, leaves, do)
    torch.cuda.synchronize()
    if args.ncu:
        torch.cuda.cudart().cudaProfilerStart()
        torch.autograd.grad(fwd(), leaves, do)
        torch.cuda.synchronize()
        return
    t_fwd = bench(lambda: fwd())
    t_all = bench(lambda: torch.autograd.grad(fwd(), leaves, do))
    qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))
    kk = ks if Hk == H else ks.repeat_interleave(H // Hk, 1)
    vv = vs if Hk == H else vs.repeat_interleave(H // Hk, 1)
    sd = lambda: F.scaled_dot_product_attention(qs, kk, vv, is_causal=True)  # noqa: E731
    so = sd()
    s_fwd = bench(sd)
    s_all = bench(lambda: torch.autograd.grad(sd(), (qs, ks, vs), so))

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            torch.autograd.grad(fwd(), leaves, do)
        torch.cuda.synchronize()
    kern = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" and e.count:
            kern[e.key] = (e.device_time_total / 1e3 / 5, e.count // 5)
    pairs = B * H * (T * (T + 1) / 2 if args.window is None else sum(min(i + 1, args.window) for i in range(T)))
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  {datetime.datetime.now():%Y-%m-%d %H:%M}")
    print(f"# {' '.join(sys.argv)}  (backend {args.backend})")
    print(f"# pairs (query,key,head) {pairs:.3g}; attention-matmul FLOPs fwd {4 * D * pairs / 1e9:.1f} G")
    print("| what | ms | TFLOP/s (FlashAttention count) |\n|---|---|---|")
    fa = 4 * D * pairs
    for name, t, f in ((f"{args.backend} fwd", t_fwd, fa), (f"{args.backend} fwd+bwd", t_all, 3.5 * fa),
                       ("sdpa fwd", s_fwd, fa), ("sdpa fwd+bwd", s_all, 3.5 * fa)):
        print(f"| {name} | {t:.3f} | {f / t / 1e9:.1f} |")
    print(f"| ratio fwd+bwd {args.backend} / sdpa | {t_all / s_all:.1f}x | |")
    print("\n| kernel | calls | ms | TC GFLOP (est.) | TFLOP/s |\n|---|---|---|---|---|")
    tc = tensor_core_flops(D, M, pairs)
    for key, (ms, n) in sorted(kern.items(), key=lambda kv: -kv[1][0])[:12]:
        f = next((v for k_, v in tc.items() if k_ in key), None)
        print(f"| {key[:60]} | {n} | {ms:.3f} | {'' if f is None else f'{f / 1e9:.1f}'} | "
              f"{'' if f is None else f'{f / ms / 1e9:.1f}'} |")


if __name__ == "__main__":
    main()
