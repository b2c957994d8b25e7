"""Registers, spills and shared memory of the fused DCMHA kernels, compiled offline for a GPU target.

No GPU needed: Triton compiles each kernel (forward, the two query-side backward stages, the key-side
backward) for ``--arch`` (default sm_90, H100/H200) with the tile shapes of
``headmix.ops.triton.TILES``, and ``cuobjdump`` (shipped with Triton's NVIDIA backend) reads the
registers per thread and the local-memory stack (spills) of the compiled binary; shared memory is
Triton's own figure. Use it to check a kernel change for spills or for more shared memory than the
device has (H100: 227 KB per block) before spending GPU time. Figures are for the local Triton
version, which may lay out shared memory differently from the GPU machine's.

    python benchmarks/kernel_resources.py --head-dim 64 128
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WEIGHTS = tuple(f"{c}_{t}" for c in ("pre", "post") for t in ("w", "q1", "q2", "k1", "k2", "qg", "kg"))


def compile_kernel(fn, constants: dict, pointers: dict, warps: int, arch: int, divisible=(),
                   maxnreg: int | None = None, stages: int = 1) -> dict:
    """Compile ``fn`` for ``sm_{arch}``: registers, spill bytes, shared memory and a PTX hash. ``divisible``: the
    arguments (pointers, integers) to compile as multiples of 16, as Triton's launcher specialises them when they are
    at run time; the layouts Triton picks follow them (docs/kernels_log.md, "Third pass"), so name those of the launch
    being studied (``"all"``: every pointer and integer argument the kernel does not mark ``do_not_specialize``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constants = {k: v for k, v in constants.items() if k in fn.arg_names}
    signature = {name: "constexpr" if name in constants else pointers.get(name, "fp32" if name == "scale" else "i32")
                 for name in fn.arg_names}
    fixed = {fn.arg_names[i] if isinstance(i, int) else i for i in getattr(fn, "do_not_specialize", ())}
    div = {name for name, kind in signature.items() if kind != "constexpr" and kind != "fp32"
           and (name not in fixed if divisible == "all" else name in divisible)}
    source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in constants.items()},
                       attrs={(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in div})
    options = dict(num_warps=warps, num_stages=stages, **({} if maxnreg is None else dict(maxnreg=maxnreg)))
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        binary = Path(tmp) / "kernel.cubin"
        binary.write_bytes(kernel.asm["cubin"])
        text = subprocess.run([str(tool), "--dump-resource-usage", str(binary)], capture_output=True, text=True,
                              check=True).stdout
    registers = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    code = kernel.asm["ptx"].split(".section")[0]  # the debug sections follow; below, line info and comments dropped
    # ...and the `$L__tmpN:` labels, which only the debug line table refers to (an inlined helper adds some, so a
    # refactor into @triton.jit helpers would change the hash with the same instructions)
    code = "\n".join(line for line in code.splitlines() if not line.strip().startswith(("//", ".loc", ".file"))
                     and not re.fullmatch(r"\$L__tmp\d+:", line.strip()))
    return dict(registers=int(registers.group(1)) if registers else None, spill=int(stack.group(1)) if stack else None,
                shared=kernel.metadata.shared, ptx=hashlib.sha256(code.encode()).hexdigest()[:16])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--heads", type=int, default=16, help="heads per group (default: %(default)s)")
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (default: %(default)s)")
    parser.add_argument("--kernels", nargs="+", default=["fwd", "bwd1", "bwd2", "bwd_key"],
                        choices=["fwd", "fwd_split1", "fwd_split2", "one_query1", "one_query2", "bwd1", "bwd2",
                                 "bwd_key"],
                        help="fwd_split1/2: the two launches of the split-key (decoding) forward; one_query1/2: "
                             "those of the one-query decode kernel (launch.DECODE_KERNEL='one_query')")
    parser.add_argument("--no-static", action="store_true", help="no static head mix (dcmha_static=False)")
    parser.add_argument("--tiles", nargs="+", default=None, metavar="BMxBNxWARPS",
                        help="tile shapes to compile instead of TILES, e.g. 32x16x8 64x32x8")
    parser.add_argument("--form", default="auto", choices=["auto", "matrix", "rank"],
                        help="the Compose's form in the kernels: as launch.py picks it for --heads (auto), "
                             "per-position matrices with whole head dims in the forward (matrix: the kernels up to 16 "
                             "heads per group), or the rank-R form with launch.head_dim_chunks' chunks (rank)")
    parser.add_argument("--blockwise", action="store_true",
                        help="the blockwise training path's kernels instead (blockwise.TILES or --tiles "
                             "BMxBNxWARPSxVEC), every pointer and integer argument but L a multiple of 16 as at the "
                             "benchmark shapes; head dims do not enter them")
    parser.add_argument("--projected", action="store_true",
                        help="the projected forward's and backward's kernels instead (their TILES, or --tiles "
                             "BMxBNxWARPSxSTAGES for every kernel)")
    parser.add_argument("--ptx-hash", action="store_true",
                        help="one more column: a hash of the PTX without line numbers, to check that a change leaves a "
                             "kernel's code as it was (compare the column before and after)")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # compile for real, not for the interpreter
    if args.blockwise:
        return blockwise_table(args)
    if args.projected:
        return projected_table(args)
    import torch
    import triton

    from headmix.ops.triton import backward, forward
    from headmix.ops.triton import launch as K

    ptr = "*" + args.dtype
    weights = {name: "*fp32" for name in WEIGHTS}
    fp32 = args.dtype == "fp32"
    mix = K.mix_precision({"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype])
    MP = K.padded_heads(args.heads)
    print(f"# DCMHA kernels compiled for sm_{args.arch} with triton {triton.__version__}: {args.heads} heads per group, "
          f"rank {args.rank}, {args.dtype}, {'no static mix' if args.no_static else 'all Compose terms'}, causal, "
          f"Compose form: {args.form}")
    extra = " PTX hash |" if args.ptx_hash else ""
    print("| kernel | head dim | BLOCK_M x BLOCK_N | warps | registers/thread | spill bytes/thread | shared KB |" + extra)
    print("|---|---|---|---|---|---|---|" + ("---|" if args.ptx_hash else ""))
    for dim in args.head_dim:
        D = K.next_pow2(dim)  # head dims that are no power of two (80, 96) are padded inside the kernels
        # the padded heads per group whose form and chunks launch.py would give: --heads, or a stand-in
        like = {"auto": MP, "matrix": K.MATRIX_FORM_HEADS, "rank": 2 * K.MATRIX_FORM_HEADS}[args.form]
        DCK, DCV = K.head_dim_chunks("bwd", like, D, D)
        DCS, DCO = K.head_dim_chunks("fwd", like, D, D)
        flags = 126 if args.no_static else 127  # every Compose term (bit 0: the static mix)
        common = dict(G=1, M=args.heads, MP=MP, R=args.rank, RP=K.next_pow2(args.rank), RANKR=K.rank_form("bwd", like),
                      DK=D, DV=D, DCK=DCK, DCV=DCV, PRE=flags, POST=flags,
                      CAUSAL=True, WINDOW=0, HAS_MASK=False, PREC="ieee" if fp32 else "tf32",
                      MIX_PRE=mix["pre"], MIX_POST=mix["post"])
        fwd = dict(q_ptr=ptr, k_ptr=ptr, v_ptr=ptr, o_ptr=ptr, lse_ptr="*fp32", mask_ptr="*u8", **weights)
        one_bn, one_dc, one_warps = K.one_query_tile(D)
        one_sc = K.SPLITS_READ
        one = dict(q_ptr=ptr, k_ptr=ptr, v_ptr=ptr, parts_ptr="*fp32", stats_ptr="*fp32", scores_ptr="*fp32",
                   mask_ptr="*u8", **weights)
        query = dict(q_ptr=ptr, k_ptr=ptr, v_ptr=ptr, do_ptr=ptr, lse_ptr="*fp32", delta_ptr="*fp32", mask_ptr="*u8",
                     dq_ptr=ptr, d_q1="*fp32", d_q2="*fp32", d_qg="*fp32", dw_part="*fp32", **weights)
        key = dict(q_ptr=ptr, k_ptr=ptr, v_ptr=ptr, do_ptr=ptr, lse_ptr="*fp32", delta_ptr="*fp32", mask_ptr="*u8",
                   dk_ptr=ptr, dv_ptr=ptr, **{f"d{c}_{t}": "*fp32" for c in ("pre", "post") for t in ("k1", "k2", "kg")},
                   **weights)
        fwd_c = dict(RELOAD=D >= 128, RANKR=K.rank_form("fwd", like), DCS=DCS)
        plans = dict(fwd=(forward._fwd_kernel, "fwd", dict(fwd_c, PHASE=0, DCV=DCO), fwd),
                     fwd_split1=(forward._fwd_kernel, "fwd", dict(fwd_c, PHASE=1, DCV=D), fwd),
                     fwd_split2=(forward._fwd_kernel, "fwd", dict(fwd_c, PHASE=2, DCV=D), fwd),
                     one_query1=(forward._one_query_kernel, "one_query", dict(PHASE=1, DC=one_dc, SC=one_sc), one),
                     one_query2=(forward._one_query_kernel, "one_query", dict(PHASE=2, DC=one_dc, SC=one_sc), one),
                     bwd1=(backward._bwd_query_kernel, "bwd", dict(STAGE=1), query),
                     bwd2=(backward._bwd_query_kernel, "bwd", dict(STAGE=2), query),
                     bwd_key=(backward._bwd_key_kernel, "bwd", dict(DK_STORE=D, DV_STORE=D), key))
        for name in args.kernels:
            fn, phase, extra, pointers = plans[name]
            if phase == "one_query":  # (heads x keys) tiles: no query rows; the warps launch.py gives it
                shapes = [(1, one_bn, one_warps)]
            else:
                shapes = ([tuple(int(x) for x in t.split("x")) for t in args.tiles] if args.tiles
                          else [K.tile_shape(phase, MP, D)[:3]])
            for BM, BN, warps in shapes:
                try:
                    r = compile_kernel(fn, dict(common, BM=BM, BN=BN, **extra), pointers, warps, args.arch)
                except Exception as error:  # e.g. out of shared memory at compile time
                    print(f"| {name} | {dim} | {BM} x {BN} | {warps} | failed: {type(error).__name__} | | |",
                          flush=True)
                    continue
                print(f"| {name} | {dim} | {BM} x {BN} | {warps} | {r['registers']} | {r['spill']} | "
                      f"{r['shared'] / 1024:.0f} |" + (f" {r['ptx']} |" if args.ptx_hash else ""), flush=True)
    return 0


def blockwise_table(args) -> int:
    """``--blockwise``: registers, spills and shared memory of the blockwise kernels, one row per (kernel, tile)."""
    import triton

    from headmix.ops.triton import blockwise_kernels as bk
    from headmix.ops.triton.blockwise import registers, tile
    from headmix.ops.triton.launch import padded_heads

    fields = {"q1", "q2", "k1", "k2", "qg", "kg", "pdelta", "pq1", "pq2", "pqg", "pk1", "pk2", "pkg", "pw"}
    low = "*" + args.dtype
    MP = padded_heads(args.heads)
    flags = 126 if args.no_static else 127
    common = dict(G=1, M=args.heads, MP=MP, R=args.rank, RP=max(2, triton.next_power_of_2(args.rank)), FLAGS=flags,
                  PRE_FLAGS=flags, CAUSAL=True, WINDOW=0, HAS_MASK=False)
    plans = dict(pre=(bk._pre_kernel, "pre", {}, ()), post=(bk._post_kernel, "post", dict(FROM_S=False), ("out_ptr",)),
                 post_from_s=(bk._post_kernel, "post", dict(FROM_S=True), ("out_ptr",)),
                 adjoint_post=(bk._adjoint_kernel, "adjoint", dict(PRE_SIDE=False, ATOMIC=True), ()),
                 adjoint_pre=(bk._adjoint_kernel, "adjoint", dict(PRE_SIDE=True, ATOMIC=True), ("out_ptr",)))
    print(f"# blockwise kernels compiled for sm_{args.arch} with triton {triton.__version__}: {args.heads} heads per "
          f"group, rank {args.rank}, {args.dtype} P'/dS, {'no static mix' if args.no_static else 'all Compose terms'}, "
          "causal, arguments but L specialised as multiples of 16 (the launcher's choice at the benchmark shapes)")
    print("| kernel | BLOCK_M x BLOCK_N | warps | VEC | registers/thread (cap: blockwise.REGISTERS) "
          "| spill bytes/thread | shared KB |")
    print("|---|---|---|---|---|---|---|")
    for name, (fn, kind, extra, low_ptrs) in plans.items():
        shapes = ([tuple(int(x) for x in t.split("x")) for t in args.tiles] if args.tiles else [tile(MP, kind)])
        pointers = {n: "*u8" if n == "mask_ptr" else low if n in low_ptrs else "*fp32" for n in fn.arg_names
                    if n.endswith("_ptr") or n in fields}
        if name != "pre" and name != "post":  # P as the backward keeps it for half inputs (blockwise.PROBS_DTYPE)
            pointers["sp_ptr" if name == "post_from_s" else "p_ptr"] = "*fp16"
        for BM, BN, warps, vec in shapes:
            try:
                r = compile_kernel(fn, dict(common, BM=BM, BN=BN, VEC=vec, **extra), pointers, warps, args.arch,
                                   divisible="all", maxnreg=registers(MP, kind))
            except Exception as error:  # noqa: BLE001  (a row saying so; the table goes on)
                print(f"| {name} | {BM} x {BN} | {warps} | {vec} | failed: {type(error).__name__} | | |", flush=True)
                continue
            print(f"| {name} | {BM} x {BN} | {warps} | {vec} | {r['registers']} | {r['spill']} | "
                  f"{r['shared'] / 1024:.0f} |", flush=True)
    return 0


def projected_table(args) -> int:
    """``--projected``: registers, spills and shared memory of the projected forward's and backward's kernels, one row
    per (kernel, tile, head dim), the sums in float16 (``projected.SUMS_DTYPE`` for half inputs)."""
    import triton

    from headmix.ops.triton import projected as pj
    from headmix.ops.triton import projected_backward as pb

    low = "*" + args.dtype
    flags = 126  # every dynamic term (the projected kernels take no static mix)
    kernels = dict(pre_sums=pj._pre_sums_kernel, stats=pj._stats_kernel, post_sums=pj._post_sums_kernel,
                   out=pj._out_kernel, dz_sums=pb._dz_sums_kernel, post_rows=pb._post_rows_kernel,
                   dy_sums=pb._dy_sums_kernel, dq=pb._dq_kernel, dkv=pb._dkv_kernel)
    tiles = dict(pj.TILES, **pb.TILES)
    fp32 = {"lse_ptr", "delta_ptr", "dk_ptr", "dv_ptr", "gw1", "gw2", "gg", "gpw1", "gpw2", "gpg"}
    print(f"# projected forward and backward kernels compiled for sm_{args.arch} with triton {triton.__version__}: "
          f"{args.heads} heads per group, rank {args.rank}, {args.dtype} inputs, float16 sums, causal, every argument "
          "specialised as a multiple of 16")
    print("| kernel | head dim | BLOCK_M x BLOCK_N | warps | stages | registers/thread | spill bytes/thread "
          "| shared KB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, fn in kernels.items():
        shapes = ([tuple(int(x) for x in t.split("x")) for t in args.tiles] if args.tiles else [tiles[name]])
        pointers = {n: ("*u8" if n == "mask_ptr" else "*fp16" if n in ("uv_ptr", "pv_ptr", "dc_ptr", "dh_ptr")
                        else "*fp32" if n in fp32 else low) for n in fn.arg_names
                    if n.endswith("_ptr") or n in fp32 or n in ("q1", "q2", "k1", "k2", "qg", "kg", "p1", "p2", "pk1",
                                                                "pk2", "pqg", "pkg")}
        for head_dim in args.head_dim:
            for BM, BN, warps, stages in shapes:
                consts = dict(G=1, M=args.heads, R=args.rank, DP=max(16, triton.next_power_of_2(head_dim)),
                              DVP=max(16, triton.next_power_of_2(head_dim)), BM=BM, BN=BN, FLAGS=flags,
                              POST_FLAGS=flags, CAUSAL=True, WINDOW=0, HAS_MASK=False, IEEE=args.dtype == "fp32")
                try:
                    r = compile_kernel(fn, consts, pointers, warps, args.arch, divisible="all", stages=stages)
                except Exception as error:  # noqa: BLE001  (a row saying so; the table goes on)
                    print(f"| {name} | {head_dim} | {BM} x {BN} | {warps} | {stages} | failed: "
                          f"{type(error).__name__} | | |", flush=True)
                    continue
                print(f"| {name} | {head_dim} | {BM} x {BN} | {warps} | {stages} | {r['registers']} | {r['spill']} | "
                      f"{r['shared'] / 1024:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
