"""A layer-level probe: in-context recall tasks at 2 layers, accuracy against model width and number of pairs,
for MHA, talking-heads, DCMHA and collaborative attention (3 seeds each).

Tasks (tokens: 0 unused, keys / second keys / values from disjoint ranges of the vocabulary):

* ``mqar`` -- multi-query associative recall, as in Zoology (Arora et al., 2023): ``P`` key-value pairs
  ``k1 v1 ... kP vP``, then every key again in a random order, each followed by its value; the model must
  predict each value after its key. 2 layers suffice for it (a previous-token head, then a matching head).
* ``two_key`` -- conjunctive recall: ``P`` triples ``x y v`` in which every ``x`` and every ``y`` occurs in two
  triples (with different partners), so only the pair ``(x, y)`` names a value; then every ``x y`` again,
  each followed by its value. A head that matches ``x`` alone is right half the time. Matching both is a sum
  of two match scores: one head can hold both (its head dimension permitting), or two heads can each hold one
  and be composed -- what DCMHA's pre-softmax composition (and talking-heads' static mix) can do and plain MHA
  cannot. That is why this task is here.

Every model is a 2-block Transformer++ (:class:`headmix.DCFormerForCausalLM`, ``attention`` = the kind,
``num_attention_heads`` fixed, so the head dimension grows with the width), trained on fresh random sequences
every step (AdamW, linear warm-up, cosine decay), loss on the answer positions only; accuracy is the share of
answers predicted exactly (argmax) on ``--eval`` fresh sequences. The grid is a width sweep at ``--pairs-at``
pairs and a pairs sweep at ``--width-at`` width.

    # CPU, the smallest size (about 25 minutes on one thread): table on stdout, JSON + PNG under docs/probe
    python benchmarks/probe.py --device cpu --threads 1 --out docs/probe
    # GPU sweep: 24 processes over the visible GPUs; rerun the same command to finish runs cut by the budget
    python benchmarks/probe.py --device cuda --size gpu-short --workers 24 --budget-minutes 4 --out docs/probe_gpu
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import functools
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scaling import machine_name, run_once, run_path  # noqa: E402

from headmix.models import DCFormerConfig, DCFormerForCausalLM  # noqa: E402

KINDS = ("mha", "talking_heads", "dcmha", "collaborative")
TASKS = ("mqar", "two_key")
# size -> (widths, width_at, pairs, pairs_at, heads, steps, batch, eval sequences)
SIZES = {
    "tiny": ([16], 16, [4], 4, 4, 4, 8, 16),  # the test's: seconds
    "cpu": ([32, 64], 64, [4, 8], 4, 4, 200, 32, 256),  # ~25 min on 1 thread of a shared 2-core CPU
    "gpu": ([32, 64, 128, 256], 128, [8, 16, 32, 64], 32, 8, 4000, 128, 2048),
    # the gpu grid less its two largest points (width 256, 64 pairs), half the steps: 120 runs that fit in one
    # device call of a few minutes (docs/probe.md has the estimate)
    "gpu-short": ([32, 64, 128], 128, [8, 16, 32], 32, 8, 2000, 128, 2048),
}


# -- tasks ---------------------------------------------------------------------------------------------------
def vocabulary(pairs: int) -> tuple[int, int]:
    """(tokens per role, vocabulary size): keys, second keys and values each draw from ``4 * pairs`` tokens."""
    per_role = max(16, 4 * pairs)
    return per_role, 1 + 3 * per_role


def make_batch(task: str, pairs: int, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)`` of ``batch`` sequences; labels are ``-100`` except where an answer is due."""
    n, _ = vocabulary(pairs)
    keys = 1 + torch.argsort(torch.rand(batch, n, generator=generator), dim=1)[:, :pairs]  # distinct per sequence
    values = 1 + 2 * n + torch.randint(0, n, (batch, pairs), generator=generator)
    order = torch.argsort(torch.rand(batch, pairs, generator=generator), dim=1)
    if task == "mqar":
        context = torch.stack([keys, values], dim=2).flatten(1)
        queries = torch.stack([keys.gather(1, order), values.gather(1, order)], dim=2).flatten(1)
        width = 2
    elif task == "two_key":
        if pairs < 4 or pairs % 2:
            raise ValueError(f"pairs={pairs} is not allowed for two_key: expected an even number >= 4")
        half = pairs // 2
        second = 1 + n + torch.argsort(torch.rand(batch, n, generator=generator), dim=1)[:, :half]
        x = torch.cat([keys[:, :half], keys[:, :half]], dim=1)  # each x twice ...
        y = torch.cat([second, second.roll(1, dims=1)], dim=1)  # ... with two different y; each y twice
        shuffle = torch.argsort(torch.rand(batch, pairs, generator=generator), dim=1)
        x, y, values = x.gather(1, shuffle), y.gather(1, shuffle), values
        context = torch.stack([x, y, values], dim=2).flatten(1)
        queries = torch.stack([x.gather(1, order), y.gather(1, order), values.gather(1, order)], dim=2).flatten(1)
        width = 3
    else:
        raise ValueError(f"task={task!r} is not allowed: expected one of {TASKS}")
    ids = torch.cat([context, queries], dim=1)
    labels = torch.full_like(ids, -100)
    answer = torch.arange(context.shape[1] + width - 1, ids.shape[1], width)  # the answer tokens' positions
    labels[:, answer - 1] = ids[:, answer]  # predicted one position earlier
    return ids, labels


# -- one run -------------------------------------------------------------------------------------------------
def build_model(kind: str, width: int, heads: int, pairs: int, task: str) -> DCFormerForCausalLM:
    _, vocab = vocabulary(pairs)
    seq = pairs * (4 if task == "mqar" else 6)
    config = DCFormerConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=2, num_attention_heads=heads,
                            intermediate_size=2 * width, max_position_embeddings=max(seq, 16), attention=kind)
    return DCFormerForCausalLM(config)


def train_step(model, optimizer, task: str, pairs: int, batch: int, data: torch.Generator, device) -> torch.Tensor:
    """One optimiser step on a fresh batch drawn from ``data``; returns the loss."""
    ids, labels = (t.to(device) for t in make_batch(task, pairs, batch, data))
    logits = model(input_ids=ids).logits
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss


def step_cost(args: argparse.Namespace) -> str:
    """Markdown: milliseconds per training step of each kind at the grid's largest point (largest width, most
    pairs) for each task, median of ``--step-cost`` steps after a first untimed one, and the ratio to MHA."""
    width, pairs = max([*args.widths, args.width_at]), max([*args.pairs, args.pairs_at])
    lines = [f"step cost at width {width}, {pairs} pairs, batch {args.batch}, {args.heads} heads ({args.device})", "",
             "| task | " + " | ".join(args.kinds) + " |", "|---|" + "---|" * len(args.kinds)]
    for task in args.tasks:
        cells = []
        for kind in args.kinds:
            torch.manual_seed(0)
            model = build_model(kind, width, args.heads, pairs, task).to(args.device)
            optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
            data, times = torch.Generator().manual_seed(0), []
            for _ in range(args.step_cost + 1):
                started = time.perf_counter()
                train_step(model, optimizer, task, pairs, args.batch, data, args.device)
                if str(args.device).startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - started)
            times = sorted(times[1:])
            cells.append(times[len(times) // 2])
        lines.append(f"| {task} | " + " | ".join(f"{1000 * t:.1f} ms ({t / cells[0]:.2f}x)" for t in cells) + " |")
    return "\n".join(lines)


def run(task: str, kind: str, width: int, pairs: int, seed: int, args: argparse.Namespace) -> dict:
    """Train and test one model. Everything random is drawn from ``seed`` alone (the initialisation from the
    global generator, re-seeded here; the sequences from generators of their own), so a run's result does not
    depend on which runs came before it in the same process."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    model = build_model(kind, width, args.heads, pairs, task).to(args.device)
    data = torch.Generator().manual_seed(10_000 + seed)  # the same sequences for every kind at a seed
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.1)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, 0.1 + 0.45 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - warmup) / max(1, args.steps - warmup))))))
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(args.steps):
        loss = train_step(model, optimizer, task, pairs, args.batch, data, args.device)
        schedule.step()
    model.eval()
    test = torch.Generator().manual_seed(999)  # one test set for every run
    correct = total = 0
    with torch.no_grad():
        for start in range(0, args.eval, args.batch):
            ids, labels = (t.to(args.device) for t in make_batch(task, pairs, min(args.batch, args.eval - start), test))
            predicted = model(input_ids=ids).logits.argmax(-1)
            due = labels != -100
            correct += int((predicted[due] == labels[due]).sum())
            total += int(due.sum())
    return dict(task=task, kind=kind, width=width, pairs=pairs, seed=seed, accuracy=correct / total,
                final_loss=loss.item(), parameters=sum(p.numel() for p in model.parameters()),
                seconds=round(time.perf_counter() - started, 2), settings=settings(args), device=str(args.device),
                device_name=machine_name(args.device))


def settings(args: argparse.Namespace) -> dict:
    """What a run's result depends on besides its grid point: a cached run is reused only if these match."""
    return dict(heads=args.heads, steps=args.steps, batch=args.batch, eval=args.eval, lr=args.lr)


def run_name(task: str, kind: str, width: int, pairs: int, seed: int) -> str:
    return f"{task}-{kind}-w{width}-p{pairs}-s{seed}"


# -- many runs: in this process or in worker processes, each result cached on disk ----------------------------
_WORKER_DEVICE: str | None = None  # set in each worker process by _start_worker


def _start_worker(devices, threads: int) -> None:
    """Worker initialiser: one CPU thread (or ``--threads``) and the next device of the round-robin queue."""
    global _WORKER_DEVICE
    torch.set_num_threads(threads)
    _WORKER_DEVICE = devices.get()
    if _WORKER_DEVICE.startswith("cuda"):
        torch.cuda.set_device(_WORKER_DEVICE)


def job(point: tuple[str, str, int, int, int], args: argparse.Namespace) -> dict:
    """One run (:func:`run`) of grid ``point``; with ``--out``, written to ``OUT/runs/<name>.json`` as soon as it
    finishes (:func:`scaling.run_once`)."""
    if _WORKER_DEVICE is not None:
        args = argparse.Namespace(**{**vars(args), "device": _WORKER_DEVICE})
    train = functools.partial(run, *point, args)
    return run_once(run_name(*point), Path(args.out), train) if args.out else train()


def worker_devices(device: str, workers: int) -> list[str]:
    """Each worker's device: the visible CUDA devices round-robin for ``--device cuda``, else ``device``."""
    if device == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise SystemExit("--device cuda: no CUDA device is visible")
        return [f"cuda:{i % count}" for i in range(workers)]
    return [device] * workers


def run_grid(points: list[tuple], args: argparse.Namespace) -> dict[tuple, dict]:
    """The results of ``points`` that are cached or finish within ``--budget-minutes``, by point. Cached runs
    (``OUT/runs``) are read back, not trained; the rest run in ``--workers`` processes (1: in this one), each
    printing one line when it finishes; no new run starts after the budget."""
    results: dict[tuple, dict] = {}
    todo = []  # run seed by seed: a call cut by its budget leaves whole seeds of every grid point
    for point in sorted(points, key=lambda p: args.seeds.index(p[4])):
        path = run_path(Path(args.out), run_name(*point)) if args.out else None
        if path is not None and path.is_file():
            r = json.loads(path.read_text())
            if r.get("settings") != settings(args):
                raise SystemExit(f"{path} was run with {r.get('settings')}, not {settings(args)}: "
                                 f"use another --out or delete it")
            results[point] = r
        else:
            todo.append(point)
    if len(results):
        print(f"# {len(results)} of {len(points)} runs done earlier (in {Path(args.out) / 'runs'}), "
              f"{len(todo)} to run", flush=True)
    started = time.perf_counter()

    def over_budget() -> bool:
        return args.budget_minutes is not None and (time.perf_counter() - started) / 60 > args.budget_minutes

    def finished(point: tuple, r: dict) -> None:
        results[point] = r
        print(f"  [{len(results)}/{len(points)}, {time.perf_counter() - started:.0f} s] {run_name(*point)}: "
              f"accuracy {r['accuracy']:.3f} (loss {r['final_loss']:.3f}, {r['seconds']} s)", flush=True)

    if args.workers == 1:
        for point in todo:
            if over_budget():
                break
            finished(point, job(point, args))
    else:
        import torch.multiprocessing as mp

        context = mp.get_context("spawn")  # CUDA cannot be used in a forked child
        devices = context.Queue()
        for device in worker_devices(args.device, args.workers):
            devices.put(device)
        with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=context, initializer=_start_worker,
                                                    initargs=(devices, args.threads or 1)) as pool:
            queue = iter(todo)
            running = {}
            while True:
                while len(running) < args.workers and not over_budget():
                    point = next(queue, None)
                    if point is None:
                        break
                    running[pool.submit(job, point, args)] = point
                if not running:
                    break
                done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    finished(running.pop(future), future.result())
    left = len(points) - len(results)
    if left:
        print(f"# budget of {args.budget_minutes} minutes spent: {left} runs left for the next call "
              f"(same command)", flush=True)
    return results


# -- report --------------------------------------------------------------------------------------------------
def summarise(results: list[dict]) -> dict[tuple, tuple[float, float, int]]:
    """(task, kind, width, pairs) -> (mean accuracy, sd over seeds, seeds)."""
    groups: dict[tuple, list[float]] = {}
    for r in results:
        groups.setdefault((r["task"], r["kind"], r["width"], r["pairs"]), []).append(r["accuracy"])
    return {k: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)) for k, v in groups.items()}


def table(results: list[dict], kinds: list[str], points: list[tuple] | None = None, seeds: int = 0) -> str:
    """Markdown: a row per ``(task, width, pairs)`` of ``points`` (default: those in ``results``), a column per kind;
    a cell with fewer than ``seeds`` results says how many it has (``n/seeds``), one with none is ``-``."""
    summary = summarise(results)
    points = points or sorted({(t, w, p) for t, _, w, p in summary})
    lines = ["| task | width | pairs | " + " | ".join(kinds) + " |", "|---|---|---|" + "---|" * len(kinds)]
    for task, width, pairs in points:
        cells = []
        for kind in kinds:
            mean, sd, n = summary.get((task, kind, width, pairs), (float("nan"), 0.0, 0))
            cell = f"{100 * mean:.1f} ± {100 * sd:.1f}" if n else "-"
            cells.append(cell + (f" ({n}/{seeds})" if 0 < n < seeds else ""))
        lines.append(f"| {task} | {width} | {pairs} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(results)
    fig, axes = plt.subplots(len(args.tasks), 2, figsize=(10, 3.6 * len(args.tasks)), squeeze=False)
    for row, task in enumerate(args.tasks):
        for col, (axis_name, values, fixed) in enumerate([("width", args.widths, ("pairs", args.pairs_at)),
                                                          ("pairs", args.pairs, ("width", args.width_at))]):
            ax = axes[row][col]
            for kind in args.kinds:
                xs, ys, es = [], [], []
                for v in values:
                    key = (task, kind, v, fixed[1]) if axis_name == "width" else (task, kind, fixed[1], v)
                    if key in summary:
                        xs.append(v)
                        ys.append(100 * summary[key][0])
                        es.append(100 * summary[key][1])
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=kind)
            ax.set_xscale("log", base=2)
            ax.set_xlabel(f"model {axis_name}" if axis_name == "width" else "key-value pairs")
            ax.set_ylabel("accuracy (%)")
            ax.set_ylim(0, 102)
            ax.set_title(f"{task}: {fixed[0]} = {fixed[1]}")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"2-layer probe, {args.heads} heads, {args.steps} steps x {args.batch}, mean ± sd over "
                 f"{len(args.seeds)} seeds ({', '.join(trained_on(results)) or args.device})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="cpu", help="the grid and budget (default: %(default)s)")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--widths", nargs="+", type=int, help="(default: the size's)")
    parser.add_argument("--pairs", nargs="+", type=int, help="(default: the size's)")
    parser.add_argument("--width-at", type=int, help="width of the pairs sweep (default: the size's)")
    parser.add_argument("--pairs-at", type=int, help="pairs of the width sweep (default: the size's)")
    parser.add_argument("--heads", type=int, help="attention heads (default: the size's)")
    parser.add_argument("--steps", type=int, help="training steps (default: the size's)")
    parser.add_argument("--batch", type=int, help="sequences per step (default: the size's)")
    parser.add_argument("--eval", type=int, help="test sequences (default: the size's)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: %(default)s)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 in each worker)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes running the grid's runs at once (spawned; with --device cuda each takes the "
                             "next visible GPU, round-robin); same results as 1 (default: %(default)s)")
    parser.add_argument("--budget-minutes", type=float,
                        help="start no new run after this many minutes; finished runs are kept in OUT/runs and "
                             "skipped by the next call (default: no limit)")
    parser.add_argument("--step-cost", type=int, metavar="STEPS",
                        help="only time STEPS training steps of each kind at the grid's largest point and print the "
                             "milliseconds per step and the ratio to the first kind")
    parser.add_argument("--out", help="folder for probe.json and probe.png (default: print only)")
    args = parser.parse_args(argv)
    widths, width_at, pairs, pairs_at, heads, steps, batch, evaluate = SIZES[args.size]
    for name, default in dict(widths=widths, width_at=width_at, pairs=pairs, pairs_at=pairs_at, heads=heads,
                              steps=steps, batch=batch, eval=evaluate).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.workers < 1:
        parser.error(f"--workers={args.workers} is not allowed: expected a positive integer")
    for width in {*args.widths, args.width_at}:
        if width % args.heads:
            parser.error(f"width {width} is not divisible by --heads {args.heads}")
    return args


def trained_on(results: list[dict]) -> list[str]:
    """Where the runs trained: their devices' names (older runs recorded only ``cuda:N`` / ``cpu``: the kind)."""
    return sorted({r.get("device_name", str(r["device"]).split(":")[0]) for r in results})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.step_cost:
        print(step_cost(args))
        return 0
    grid = sorted({(w, args.pairs_at) for w in args.widths} | {(args.width_at, p) for p in args.pairs})
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"# probe: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
          f"device {args.device} ({device}), {args.steps} steps x {args.batch}, heads {args.heads}, lr {args.lr}, "
          f"seeds {args.seeds}")
    print("# command: python benchmarks/probe.py " + " ".join(sys.argv[1:] if argv is None else argv), flush=True)
    points = [(task, kind, width, pairs, seed) for task in args.tasks for width, pairs in grid
              for kind in args.kinds for seed in args.seeds]
    started = time.perf_counter()
    done = run_grid(points, args)
    results = [done[p] for p in points if p in done]  # grid order, whichever process finished first
    missing = [run_name(*p) for p in points if p not in done]
    if args.out:  # written first, so the table is the last thing printed
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
                    torch=torch.__version__, device=args.device, device_name=device,
                    # where the runs trained (this call may only have read them back from runs/)
                    runs_trained_on=trained_on(results),
                    settings={k: v for k, v in vars(args).items() if k != "out"})
        (out / "probe.json").write_text(json.dumps(dict(meta=meta, results=results, missing=missing), indent=1) + "\n")
        plot(results, args, out / "probe.png")
        print(f"\nwrote {out / 'probe.json'} and {out / 'probe.png'}")
    gaps = (f"; {len(missing)} of {len(points)} runs missing (a cell 'n/{len(args.seeds)}' has n seeds, '-' none)"
            if missing else "")
    print(f"\naccuracy (%), mean ± sd over {len(args.seeds)} seeds; {time.perf_counter() - started:.0f} s in all, "
          f"{args.workers} worker(s){gaps}\n")
    print(table(results, args.kinds, [(t, w, p) for t in args.tasks for w, p in grid], len(args.seeds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
