"""The training paths of the fused DCMHA kernels side by side: the tile kernels, the blockwise path, and ``auto``.

For each shape (``HEADSxHEAD_DIM``, optionally ``:GROUPS``) and window, times the forward (which stores the row
log-sum-exp) and the backward of ``launch.TRAINING_KERNELS = "tiles"`` and ``"blockwise"`` (each with its own forward)
and, with ``--paths ... projected auto``, of ``"projected"`` and ``"auto"`` (the projected kernels where they apply,
``op.training_choice``) (medians of ``triton.testing.do_bench``), the backward's peak extra memory, and how far the
two paths' bf16 results are apart (relative norms: output, largest gradient). Causal, rank 2, every dynamic Compose
term, Compose weights 0.1 randn; ``--static`` adds the static mix. Prints a markdown table with the device, date and
versions::

    python benchmarks/training_paths.py --shapes 16x64 16x128 32x80:1 32x128:1 --windows 0 256
    python benchmarks/training_paths.py --device cpu --batch 1 --seq 32 --shapes 4x16 --dtype float32   # interpreter

``--sweep-tiles`` adds, for the blockwise path, one row per candidate tile of one kernel (the others at
``blockwise.TILES``), as chosen for ``blockwise.TILES``::

    python benchmarks/training_paths.py --shapes 16x64 32x128:1 --paths blockwise --sweep-tiles

``--sweep-registers`` does the same for the kernels' register caps (``blockwise.REGISTERS``).

``--paths tiles blockwise auto`` adds the row of what ``backend="auto"`` trains on::

    python benchmarks/training_paths.py --shapes 16x64 16x128 32x80:1 32x128:1 --windows 0 256 \
        --paths tiles blockwise auto

``--inference`` times the forward without gradients instead (``op.inference_forward``: a prefill, an evaluation) on
each path, and names the path ``backend="auto"`` takes there (``op.inference_kernels``)::

    python benchmarks/training_paths.py --inference --batch 16 --seq 512 --shapes 16x64 16x128 --windows 0 256
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# Candidate (query rows, keys, warps, VEC) per kernel, by padded heads per group, for --sweep-tiles (the sweep behind
# headmix.ops.triton.blockwise.TILES). The last two adjoint tiles at 16 heads are not yet timed: offline (sm_90, triton
# 3.9, `kernel_resources.py --blockwise --heads 16 --no-static --tiles ...`) they compile to 177 and 190-192 registers
# without spills, where the chosen (2, 32, 1, 4) takes 255 and spills 112-120 bytes per thread (its occupancy on the
# H200: 11.5-12.2%, Nsight Compute, 2026-12-01).
SWEEP = {16: dict(pre=[(4, 32, 2, 4), (8, 16, 4, 16), (2, 32, 2, 4), (8, 32, 4, 2)],
                  post=[(4, 32, 2, 4), (8, 16, 4, 16), (2, 32, 2, 4), (2, 64, 2, 4), (8, 32, 4, 2), (2, 16, 1, 1)],
                  adjoint=[(4, 32, 2, 4), (16, 16, 4, 16), (2, 32, 2, 4), (2, 32, 1, 4), (4, 16, 1, 4), (2, 64, 2, 4),
                           (2, 16, 1, 4), (1, 32, 1, 4)]),
         32: dict(pre=[(2, 32, 4, 2), (2, 32, 4, 16), (2, 32, 2, 4)],
                  post=[(4, 32, 4, 2), (2, 32, 4, 16), (2, 32, 2, 4), (2, 32, 2, 2), (2, 32, 4, 2)],
                  adjoint=[(2, 32, 2, 4), (4, 32, 4, 16), (1, 32, 1, 4), (2, 16, 1, 4), (2, 16, 2, 4)])}


# Candidate register caps per kernel (None: no cap), for --sweep-registers (the sweep behind blockwise.REGISTERS).
SWEEP_REGISTERS = dict(pre=[168], post=[None, 128, 144, 192, 208], adjoint=[168])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu (kernels interpreted)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--shapes", nargs="+", default=["16x64", "16x128", "32x80:1", "32x128:1"],
                        help="HEADSxHEAD_DIM[:GROUPS] (default groups: 1)")
    parser.add_argument("--windows", type=int, nargs="+", default=[0], help="0: global (causal) attention")
    parser.add_argument("--static", action="store_true", help="with the static head mix")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--paths", nargs="+", default=["tiles", "blockwise"],
                        choices=["tiles", "blockwise", "projected", "auto"],
                        help="auto: what backend='auto' trains on (op.training_choice: the projected kernels where "
                             "they apply); projected: the projected forward and backward, forced")
    parser.add_argument("--deterministic", action="store_true",
                        help="under torch.use_deterministic_algorithms(True): the blockwise path's key-side weight "
                             "gradients as partial sums added in a fixed order, not atomic adds")
    parser.add_argument("--sweep-tiles", action="store_true",
                        help="blockwise path: also each candidate tile of each kernel (SWEEP), one kernel at a time")
    parser.add_argument("--sweep-registers", action="store_true",
                        help="blockwise path: also each candidate register cap of each kernel (SWEEP_REGISTERS)")
    parser.add_argument("--inference", action="store_true",
                        help="time the forward without gradients (a prefill) on each path instead of training")
    args = parser.parse_args(argv)
    if args.inference and (args.sweep_tiles or args.sweep_registers or args.deterministic):
        parser.error("--inference times the paths' forwards only: no --sweep-tiles, --sweep-registers or "
                     "--deterministic with it")

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    from headmix.ops.triton import blockwise, launch, op
    from headmix.reference import ComposeWeights

    dtype = getattr(torch, args.dtype)
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    def timed(fn) -> float:
        if device == "cpu":
            import time

            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        import triton.testing

        return triton.testing.do_bench(fn, warmup=5, rep=60, return_mode="median")

    def inputs(H, D, G, seed=0):
        gen = torch.Generator().manual_seed(seed)
        B, T, M, R = args.batch, args.seq, H // G, 2

        def rnd(*shape, scale=1.0):
            return (scale * torch.randn(*shape, generator=gen)).to(device, dtype)

        def compose():
            return ComposeWeights(static=rnd(G, M, M, scale=0.1) if args.static else None,
                                  query_w1=rnd(B, T, G, R, M, scale=0.1), query_w2=rnd(B, T, G, R, M, scale=0.1),
                                  key_w1=rnd(B, T, G, R, M, scale=0.1), key_w2=rnd(B, T, G, R, M, scale=0.1),
                                  query_gate=rnd(B, T, G, M, scale=0.1), key_gate=rnd(B, T, G, M, scale=0.1))

        return rnd(B, H, T, D), rnd(B, H, T, D), rnd(B, H, T, D), compose(), compose(), rnd(B, H, T, D)

    def rel(a, b) -> float:
        return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()

    rows = []
    for spec in args.shapes:
        heads, _, groups = spec.partition(":")
        H, D = (int(x) for x in heads.split("x"))
        G = int(groups or 1)
        for window in args.windows:
            q, k, v, pre, post, do = inputs(H, D, G)
            call = (D ** -0.5, None, pre, post, G, True, window, 0)
            results = {}
            key = 16 if H // G <= 16 else 32
            default, caps = dict(blockwise.TILES[key]), dict(blockwise.REGISTERS[key])
            runs = [(path, None) for path in args.paths]
            if args.sweep_tiles and "blockwise" in args.paths:
                runs += [("blockwise", (kernel, t)) for kernel, ts in SWEEP[key].items() for t in ts if t != default[kernel]]
            if args.sweep_registers and "blockwise" in args.paths:
                runs += [("blockwise", (kernel, ("registers", r))) for kernel, rs in SWEEP_REGISTERS.items() for r in rs
                         if r != caps.get(kernel)]
            if args.inference:  # the path backend="auto" takes without gradients
                launch.TRAINING_KERNELS = "auto"
                auto = op.inference_choice(q, k, v, G, pre, post, window)
            for path, variant in runs:
                launch.TRAINING_KERNELS = path
                tiles = variant  # (a tile or register-cap variant)
                cap = tiles is not None and isinstance(tiles[1][0], str)
                blockwise.TILES[key] = dict(default, **dict([tiles])) if tiles and not cap else default
                blockwise.REGISTERS[key] = ({k: r for k, r in dict(caps, **{tiles[0]: tiles[1][1]}).items()
                                             if r is not None} if cap else caps)
                choice = (op.inference_choice(q, k, v, G, pre, post, window) if args.inference
                          else " forward, ".join(op.training_choice(q, k, v, G, pre, post, window)) + " backward")
                label = ((f"auto ({choice})" if path == "auto" else path) if variant is None
                         else f"{path}, {variant[0]} registers {variant[1][1] or 'uncapped'}" if cap
                         else f"{path}, {variant[0]} {variant[1]}")
                try:
                    if args.inference:
                        with torch.no_grad():
                            out = op.inference_forward(q, k, v, *call)
                            fwd = timed(lambda: op.inference_forward(q, k, v, *call))
                        if variant is None and path != "auto":
                            results[path] = [out]
                            row_of_default = len(rows)
                        rows.append([spec, str(window or "global"), label, f"{fwd:.3f}", "", "", "",
                                     f"auto: {auto}" if path == "tiles" else ""])
                    else:
                        out, lse = op.train_forward(q, k, v, *call)
                        if device == "cuda":
                            torch.cuda.synchronize()
                            torch.cuda.reset_peak_memory_stats()
                            base = torch.cuda.memory_allocated()
                        grads = op.train_backward(do, q, k, v, lse, *call)
                        peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device == "cuda" else float("nan")
                        fwd = timed(lambda: op.train_forward(q, k, v, *call))
                        bwd = timed(lambda: op.train_backward(do, q, k, v, lse, *call))
                        flat = [out, *grads[:3], *grads[3].values(), *grads[4].values()]
                        if variant is None and path != "auto":
                            results[path] = flat
                            row_of_default = len(rows)
                        rows.append([spec, str(window or "global"), label, f"{fwd:.2f}", f"{bwd:.2f}",
                                     f"{fwd + bwd:.2f}", f"{peak:.2f}"])
                        if path == "auto" and results:  # (the same math: how far from the first path in this dtype)
                            name, ref = next(iter(results.items()))
                            worst = max(rel(x, y) for x, y in zip(flat[1:], ref[1:]))
                            rows[-1].append(f"from {name}: out {rel(flat[0], ref[0]):.1e}, grads ≤ {worst:.1e}")
                except Exception as error:  # noqa: BLE001  (one failing path must not hide the others' rows)
                    rows.append([spec, str(window or "global"), label, "error", type(error).__name__, str(error)[:60],
                                 ""])
                print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
            blockwise.TILES[key], blockwise.REGISTERS[key] = default, caps
            if len(results) == 2 and args.inference:
                a, b = results.values()
                note = rows[row_of_default][-1]
                rows[row_of_default][-1] = (f"{note}; " if note else "") + f"out {rel(a[0], b[0]):.1e}"
            elif len(results) == 2:
                a, b = results.values()
                apart = max((rel(x, y) for x, y in zip(a[1:], b[1:])), key=lambda e: e if e == e else float("inf"))
                # (the key: a NaN shows as the largest, where plain max() passes over one)
                rows[row_of_default].append(f"out {rel(a[0], b[0]):.1e}, grads ≤ {apart:.1e}")
    launch.TRAINING_KERNELS = "auto"

    import triton

    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (TRITON_INTERPRET=1)"
    print(f"# {name}, torch {torch.__version__}, triton {triton.__version__}, {args.dtype}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"# command: python benchmarks/training_paths.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"# batch {args.batch} x {args.seq}, causal, rank 2, static mix {'on' if args.static else 'off'}"
          f"{', deterministic algorithms' if args.deterministic else ''}")
    if args.inference:
        print("# without gradients (op.inference_forward); auto: the path backend='auto' takes there")
        print("| shape | window | path | fwd ms | paths apart (relative), auto's path |\n|---|---|---|---|---|")
        for row in rows:  # (an error row: the error's name and message in the middle columns)
            row = row + [""] * (8 - len(row))
            print(f"| {row[0]} | {row[1]} | {row[2]} | {row[3]} | {' '.join(c for c in (*row[4:6], row[7]) if c)} |")
        return 0
    print("| shape | window | path | fwd ms | bwd ms | fwd+bwd ms | bwd peak extra GiB | paths apart (relative) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row + [""] * (8 - len(row))) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
