"""Quality per compute: validation loss against training FLOPs, Transformer++ at several sizes vs DCFormer++.

Every run trains on the same packed sequences in the same order (a permutation drawn from
``--seed``), with the same tokenizer, schedule (AdamW, linear warm-up, cosine decay to 10%) and
hyper-parameters; only the model differs. Training FLOPs are
``DCFormerConfig.flops_per_token(seq) * tokens`` (3 x forward; weights, attention products and the
DCMHA Compose arithmetic all counted; see that method). The Transformer++ points (mean over
seeds) are fitted by a power law ``log L = a + b log C`` (least squares); DCFormer++'s **compute
multiplier** is the compute the fit needs to reach DCFormer++'s loss divided by DCFormer++'s own
compute. Its uncertainty combines the seed-to-seed spread of the final loss (``--seeds`` runs of
the smallest size trained as both) with the scatter of the Transformer++ points about the fit.

Sizes are ``name`` (see ``SIZES``) or ``layers,width,heads``; DCFormer++ is the Transformer++ shape
with DCMHA, QK-norm and local/global layers (``LG``, window ``seq/8``, as the paper's 256 of 2048).

    # 1. CPU, once: tokenise the corpus (needs the `datasets` package; the GPU machine may lack it)
    python benchmarks/scaling.py --prepare .corpus/scaling.pt
    # 2. GPU: the study (table on stdout, JSON and PNG under --out)
    python benchmarks/scaling.py --tokens-file .corpus/scaling.pt --out docs/scaling
    # tiny CPU run (the test does this)
    python benchmarks/scaling.py --transformer 1,32,2 1,48,2 1,64,2 --dcformer 1,32,2 --seq 64 --batch 4 \\
        --epochs 0.02 --device cpu --vocab 512 --data some.txt
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from headmix.models import DCFormerConfig, DCFormerForCausalLM  # noqa: E402

# (layers, width, heads): head dim 32, so even the smallest model composes 4 heads
SIZES = {"xxs": (3, 128, 4), "xs": (4, 192, 6), "s": (6, 256, 8), "m": (8, 384, 12), "l": (10, 512, 16)}
KINDS = ("transformer++", "dcformer++", "dcformer")


def parse_size(text: str) -> tuple[int, int, int]:
    if text in SIZES:
        return SIZES[text]
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(
            f"size {text!r} is not known: expected one of {sorted(SIZES)} or layers,width,heads (e.g. 4,192,6)")
    layers, width, heads = (int(p) for p in parts)
    if width % heads:
        raise argparse.ArgumentTypeError(f"size {text!r}: width {width} is not a multiple of heads {heads}")
    return layers, width, heads


def model_config(kind: str, size: tuple[int, int, int], vocab: int, seq: int) -> DCFormerConfig:
    layers, width, heads = size
    fields = dict(backbone="llama", num_hidden_layers=layers, hidden_size=width, num_attention_heads=heads,
                  vocab_size=vocab, max_position_embeddings=seq)
    if kind == "dcformer++":
        fields.update(attention="dcmha", qk_norm=True, window_size=max(1, seq // 8), window_pattern="LG")
    elif kind == "dcformer":
        fields.update(attention="dcmha")
    return DCFormerConfig(**fields)


def learning_rate(base: float, width: int) -> float:
    """``base`` up to width 256, then ``base * 256 / width`` (wider models need smaller steps); the same
    for every architecture at one size."""
    return base * min(1.0, 256 / width)


# -- data ----------------------------------------------------------------------------------------
def prepare(seq: int, vocab: int, data: list[str], cache_dir: str = "") -> dict:
    """Tokenise and pack with the training pipeline: ``{"train": (N, seq), "validation": (M, seq), ...}``."""
    from headmix.training.config import TrainConfig
    from headmix.training.data import prepare_data

    config = TrainConfig(seq_len=seq, vocab_size=vocab, data=data, validation_fraction=0.05,
                         max_validation_sequences=10**9, cache_dir=cache_dir)
    prepared = prepare_data(config)
    def tensor(ds) -> torch.Tensor:
        return torch.stack([row["input_ids"] for row in ds]).to(torch.int32)

    return {"train": tensor(prepared.train), "validation": tensor(prepared.validation),
            "description": prepared.description, "vocab_size": vocab, "seq_len": seq}


# -- training ------------------------------------------------------------------------------------
@torch.no_grad()
def validation_loss(model, sequences, batch, device, autocast) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(sequences), batch):
        ids = sequences[i : i + batch].to(device=device, dtype=torch.long)
        with autocast():
            loss = model(input_ids=ids, labels=ids).loss
        total += loss.item() * len(ids)
        count += len(ids)
    model.train()
    return total / count


def train_run(config: DCFormerConfig, data: dict, args, seed: int, device, label: str, *, steps: int | None = None,
              lr: float | None = None, data_seed: int | None = None, warmup: float = 0.05,
              keep_model: bool = False) -> dict:
    """Train one model; returns its loss curve against FLOPs and its speed.

    ``seed`` draws the initialisation; the data order comes from ``data_seed`` (default ``seed``). ``steps``
    (default ``--epochs`` passes), ``lr`` (default :func:`learning_rate` of ``--lr``) and the ``warmup``
    fraction of the steps override this script's defaults (benchmarks/study.py uses them); ``keep_model``
    returns the trained model under ``"model"``."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    torch.manual_seed(seed)
    model = DCFormerForCausalLM(config).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    lr = learning_rate(args.lr, config.hidden_size) if lr is None else lr
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    train = data["train"]
    steps = max(1, round(args.epochs * len(train) / args.batch)) if steps is None else steps
    schedule = get_cosine_with_min_lr_schedule_with_warmup(opt, max(1, round(steps * warmup)), steps, min_lr_rate=0.1)
    data_seed = seed if data_seed is None else data_seed
    order = torch.cat([torch.randperm(len(train), generator=torch.Generator().manual_seed(data_seed + epoch))
                       for epoch in range(math.ceil(steps * args.batch / len(train)))])
    bf16 = device.type == "cuda"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    per_token = config.flops_per_token(args.seq)
    tokens_per_step = args.batch * args.seq
    evals = sorted({max(1, round(steps * k / args.evals)) for k in range(1, args.evals + 1)})
    curve, train_time = [], 0.0
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        ids = train[order[(step - 1) * args.batch : step * args.batch]].to(device=device, dtype=torch.long)
        with autocast():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_time += time.perf_counter() - t0
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"{label}: training loss is {loss.item()} at step {step}")
        if step in evals:
            val = validation_loss(model, data["validation"], args.batch, device, autocast)
            curve.append({"step": step, "flops": per_token * tokens_per_step * step, "validation_loss": val})
            print(f"  {label} step {step}/{steps}: validation loss {val:.4f}", file=sys.stderr, flush=True)
    non_embedding = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    result = {"label": label, "seed": seed, "parameters": non_embedding, "steps": steps,
              "tokens": steps * tokens_per_step, "flops": per_token * tokens_per_step * steps,
              "validation_loss": curve[-1]["validation_loss"], "curve": curve,
              "tokens_per_s": steps * tokens_per_step / train_time, "seconds": train_time, "learning_rate": lr}
    if keep_model:
        result["model"] = model
    return result


# -- runs, cached on disk (benchmarks/study.py and benchmarks/probe.py) ---------------------------
def machine_name(device: torch.device | str) -> str:
    """The accelerator's name for a result's record or a table's header (``CPU`` for the CPU)."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def run_path(out: Path, name: str) -> Path:
    """Where run ``name``'s result is kept."""
    return out / "runs" / f"{name}.json"


def run_once(name: str, out: Path, train: Callable[[], dict]) -> dict:
    """The cached result of run ``name`` (:func:`run_path`), training it first if absent."""
    path = run_path(out, name)
    if path.is_file():
        print(f"{name}: done earlier ({path})", file=sys.stderr, flush=True)
        return json.loads(path.read_text())
    result = train()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".part")  # renamed when complete: a run killed while writing leaves no result
    partial.write_text(json.dumps(result, indent=1))
    partial.replace(path)
    return result


# -- analysis ------------------------------------------------------------------------------------
def fit_power_law(points: list[tuple[float, float]]) -> tuple[float, float, float]:
    """Least squares ``log L = a + b log C``: ``(a, b, rms residual in log L)``."""
    xs = torch.tensor([math.log(c) for c, _ in points], dtype=torch.float64)
    ys = torch.tensor([math.log(loss) for _, loss in points], dtype=torch.float64)
    design = torch.stack([torch.ones_like(xs), xs], dim=1)
    solution = torch.linalg.lstsq(design, ys[:, None]).solution[:, 0]
    residual = ys - design @ solution
    dof = max(1, len(points) - 2)
    return solution[0].item(), solution[1].item(), math.sqrt((residual**2).sum().item() / dof)


def analyse(runs: list[dict]) -> dict:
    """Mean losses per model, the Transformer++ fit, and each DCFormer++ size's compute multiplier."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run["label"], []).append(run)
    means = {label: {"flops": rs[0]["flops"], "loss": sum(r["validation_loss"] for r in rs) / len(rs),
                     "seeds": len(rs), "parameters": rs[0]["parameters"]} for label, rs in groups.items()}
    spreads = [stdev([r["validation_loss"] for r in rs]) for rs in groups.values() if len(rs) > 1]
    seed_sd = max(spreads) if spreads else float("nan")
    baseline = sorted((m["flops"], m["loss"]) for label, m in means.items() if label.startswith("transformer++"))
    # a bigger model whose loss is no better than a smaller one's is past what this token budget can train:
    # the fit keeps the compute-efficient part, up to the lowest loss
    if baseline:
        best = min(range(len(baseline)), key=lambda i: baseline[i][1])
        excluded = [label for label, m in means.items() if label.startswith("transformer++") and m["flops"] >
                    baseline[best][0]]
        baseline = baseline[: best + 1]
    else:
        excluded = []
    result = {"means": means, "seed_sd": seed_sd, "multipliers": {}, "excluded_from_fit": excluded}
    if len(baseline) < 2:
        return result
    a, b, scatter = fit_power_law(baseline)
    result["fit"] = {"a": a, "b": b, "rms_log_residual": scatter}
    lo_loss, hi_loss = min(loss for _, loss in baseline), max(loss for _, loss in baseline)
    for label, m in means.items():
        if label.startswith("transformer++"):
            continue

        def multiplier(log_loss: float) -> float:
            return math.exp((log_loss - a) / b) / m["flops"]

        # one standard deviation in log L: the DCFormer++ mean's seed noise and the fit's scatter
        sd = scatter if math.isnan(seed_sd) else math.sqrt((seed_sd / m["loss"]) ** 2 / max(1, m["seeds"]) + scatter**2)
        centre = multiplier(math.log(m["loss"]))
        bounds = sorted([multiplier(math.log(m["loss"]) - sd), multiplier(math.log(m["loss"]) + sd)])
        result["multipliers"][label] = {"multiplier": centre, "low": bounds[0], "high": bounds[1],
                                        "extrapolated": not lo_loss <= m["loss"] <= hi_loss}
    return result


def stdev(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def table(runs: list[dict], analysis: dict, header: str) -> str:
    lines = [header, "", "| model | parameters (no embedding) | seed | tokens | training FLOPs | validation loss | tokens/s |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['label']} | {r['parameters'] / 1e6:.2f}M | {r['seed']} | {r['tokens'] / 1e6:.2f}M | "
                     f"{r['flops']:.3e} | {r['validation_loss']:.4f} | {r['tokens_per_s']:,.0f} |")
    fit = analysis.get("fit")
    lines.append("")
    if fit:
        lines.append(f"Transformer++ fit: log L = {fit['a']:.4f} {fit['b']:+.4f} log C "
                     f"(rms residual {fit['rms_log_residual']:.4f} in log L); seed-to-seed sd of the final loss: "
                     f"{analysis['seed_sd']:.4f}")
        if analysis["excluded_from_fit"]:
            lines.append(f"Left out of the fit (more compute, no lower loss at this token budget): "
                         f"{', '.join(analysis['excluded_from_fit'])}")
        lines += ["", "| model | loss | compute multiplier | 1-sd range | inside the fitted range |",
                  "|---|---|---|---|---|"]
        for label, m in analysis["multipliers"].items():
            lines.append(f"| {label} | {analysis['means'][label]['loss']:.4f} | {m['multiplier']:.2f}x | "
                         f"{m['low']:.2f}-{m['high']:.2f}x | {'no (extrapolated)' if m['extrapolated'] else 'yes'} |")
    else:
        lines.append("(fewer than two Transformer++ sizes: no fit, no multiplier)")
    return "\n".join(lines)


def plot(runs: list[dict], analysis: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {}
    for r in runs:
        colour = colours.setdefault(r["label"], f"C{len(colours)}")
        style = "-" if r["label"].startswith("transformer++") else "--"
        xs = [p["flops"] for p in r["curve"]]
        ys = [p["validation_loss"] for p in r["curve"]]
        ax.plot(xs, ys, style, color=colour, alpha=0.6, label=r["label"] if r["seed"] == runs[0]["seed"] else None)
        ax.plot(xs[-1:], ys[-1:], "o" if style == "-" else "s", color=colour)
    fit = analysis.get("fit")
    if fit:
        cs = [m["flops"] for m in analysis["means"].values()]
        grid = torch.logspace(math.log10(min(cs) / 2), math.log10(max(cs) * 2), 50).tolist()
        ax.plot(grid, [math.exp(fit["a"] + fit["b"] * math.log(c)) for c in grid], ":", color="black",
                label=f"Transformer++ fit (slope {fit['b']:.3f})")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss")
    ax.set_title("Validation loss against training compute")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transformer", nargs="*", type=parse_size, default=["xxs", "xs", "s", "m"],
                        help="Transformer++ sizes (names or layers,width,heads)")
    parser.add_argument("--dcformer", nargs="+", type=parse_size, default=["xs", "s"], help="DCFormer++ sizes")
    parser.add_argument("--dcformer-global", nargs="*", type=parse_size, default=[],
                        help="DCFormer sizes (DCMHA, every layer global, no QK-norm): separates DCMHA from DCFormer++'s "
                             "local layers and QK-norm")
    parser.add_argument("--seeds", type=int, default=2, help="seeds of the smallest pair (other runs: one seed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--epochs", type=float, default=4.0, help="passes over the training sequences")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate up to width 256 (see learning_rate)")
    parser.add_argument("--evals", type=int, default=8, help="validation evaluations per run")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--data", nargs="*", default=[], help="text files (default: the embedded corpus)")
    parser.add_argument("--tokens-file", help="tokenised data written by --prepare")
    parser.add_argument("--prepare", metavar="PATH", help="only tokenise the data and save it to PATH")
    parser.add_argument("--cache-dir", default="")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="directory for scaling.json, scaling_table.md and scaling.png")
    parser.add_argument("--from-json", metavar="PATH", nargs="+", help="no training: redo the analysis, table and "
                        "plot of one or more scaling.json files, merged (written to --out)")
    args = parser.parse_args(argv)
    if args.from_json:
        saved = []
        for path in args.from_json:
            try:
                saved.append(json.loads(Path(path).read_text()))
            except (OSError, ValueError) as error:
                parser.error(f"--from-json {path}: not a readable scaling.json ({error})")
            if not isinstance(saved[-1], dict) or "runs" not in saved[-1] or "header" not in saved[-1]:
                parser.error(f"--from-json {path}: expected a scaling.json written by this script (runs, header)")
        runs = [run for part in saved for run in part["runs"]]
        header = "\n\n".join(dict.fromkeys(part["header"] for part in saved))
        analysis = analyse(runs)
        text = table(runs, analysis, header)
        print(text)
        write_outputs(Path(args.out) if args.out else Path(args.from_json[0]).parent, runs, analysis, text, header)
        return 0
    args.transformer = [parse_size(s) if isinstance(s, str) else s for s in args.transformer]
    args.dcformer = [parse_size(s) if isinstance(s, str) else s for s in args.dcformer]
    args.dcformer_global = [parse_size(s) if isinstance(s, str) else s for s in args.dcformer_global]

    if args.tokens_file:
        data = torch.load(args.tokens_file)
        if data["seq_len"] != args.seq or data["vocab_size"] != args.vocab:
            parser.error(f"{args.tokens_file} holds seq {data['seq_len']} / vocab {data['vocab_size']}, "
                         f"not --seq {args.seq} / --vocab {args.vocab}")
    else:
        data = prepare(args.seq, args.vocab, args.data, args.cache_dir)
    if args.prepare:
        Path(args.prepare).parent.mkdir(parents=True, exist_ok=True)
        torch.save(data, args.prepare)
        print(f"saved {len(data['train'])} training and {len(data['validation'])} validation sequences of "
              f"{args.seq} tokens ({data['description']}) to {args.prepare}")
        return 0

    device = torch.device(args.device)
    plan = ([("transformer++", s) for s in args.transformer] + [("dcformer++", s) for s in args.dcformer]
            + [("dcformer", s) for s in args.dcformer_global])
    paired = [s for s in args.dcformer if s in args.transformer] or args.transformer + args.dcformer
    smallest = min(paired, key=lambda s: model_config("transformer++", s, args.vocab, args.seq).flops_per_token(args.seq))
    versions = f"torch {torch.__version__}"
    try:
        import triton

        versions += f", triton {triton.__version__}"
    except ImportError:
        pass
    name = machine_name(device)
    header = (f"Device: {name}; {datetime.date.today().isoformat()}; {versions}\n"
              f"Data: {data['description']}, {len(data['train'])} training / {len(data['validation'])} validation "
              f"sequences of {args.seq} tokens, vocab {args.vocab}; {args.epochs:g} epochs, batch {args.batch}, "
              f"lr {args.lr:g} (x 256/width above width 256)\nCommand: python benchmarks/scaling.py {shlex.join(sys.argv[1:] if argv is None else argv)}")
    runs = []
    for kind, size in plan:
        seeds = range(args.seed, args.seed + (args.seeds if size == smallest else 1))
        for seed in seeds:
            label = f"{kind} {size[0]}x{size[1]}/{size[2]}h"
            runs.append(train_run(model_config(kind, size, args.vocab, args.seq), data, args, seed, device, label))
            if args.out:  # a run cut short keeps the finished runs (redo the table with --from-json)
                Path(args.out).mkdir(parents=True, exist_ok=True)
                (Path(args.out) / "scaling.json").write_text(json.dumps({"header": header, "runs": runs}, indent=1))
    analysis = analyse(runs)
    text = table(runs, analysis, header)
    print(text)
    if args.out:
        write_outputs(Path(args.out), runs, analysis, text, header)
    return 0


def write_outputs(out: Path, runs: list[dict], analysis: dict, text: str, header: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps({"header": header, "runs": runs, "analysis": analysis}, indent=1))
    (out / "scaling_table.md").write_text(text + "\n")
    plot(runs, analysis, out / "scaling.png")


if __name__ == "__main__":
    sys.exit(main())
