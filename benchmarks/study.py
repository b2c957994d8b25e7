"""Does composing heads help? Issue 18 §2's controlled study: DCFormer++ against Transformer++ at one small shape.

The paper's 405M recipe scaled down: LLaMA blocks, head dim 64, AdamW (0.9, 0.95), weight decay 0.1, clipping 1,
warm-up 2 %, cosine decay to 10 %; every run trains on the same packed sequences **in the same order** (data seed
0) and an arm's seed draws only its initialisation. Arms (``--arms``):

* ``transformer++``  — MHA in every layer (the baseline; ``--seeds`` seeds, and the token ladder below);
* ``dcformer++``     — DCMHA without the static mix (as released), window ``--window`` in every other layer
  (``LG``), QK-norm (``--seeds`` seeds);
* ``dcformer``       — DCMHA in every layer, global, no QK-norm (one seed);
* ``control``        — Transformer++ with DCFormer++'s windows and QK-norm (one seed): what the windows and
  QK-norm do without composition;
* ``talking-heads``  — the static head mix only (one seed).

**Learning rate**: each arm first runs a short probe (``--probe-fraction`` of the tokens) at every rate of
``--lrs``; its main runs use the rate with the lowest probe loss (short probes favour larger rates: said, not
corrected); ``--rate ARM=LR`` trains an arm's main runs at a given rate instead (named ``ARM-lrLR-seedN``), for
when the probes' choice proved unstable over a full run — the replaced runs stay on disk and in the table, marked,
and are left out of the analysis). **Compute multiplier**: Transformer++ also trains at ``--ladder`` multiples of the tokens (seed 0);
a power law ``log L = a + b log C`` through its final losses (mean over seeds at 1x) against training FLOPs
(``DCFormerConfig.flops_per_token``: weights, attention products and DCMHA's Compose arithmetic, 3x forward)
gives the compute Transformer++ needs for DCFormer++'s loss, divided by DCFormer++'s own compute; its 1-sd range
moves DCFormer++'s loss by the pooled seed-to-seed standard deviation ``σ`` of the two arms (from two seeds each:
a rough ``σ``). **Verdict**, fixed before any number (issue 18): *reproduced* if DCFormer++ beats Transformer++
by at least max(3σ, 0.01 nats), also beats the control, and the multiplier's 1-sd lower bound is above 1.2x;
*not reproduced at this scale* when |Δ| < 2σ; *direction only* when the multiplier is 1.1–1.5x otherwise;
anything else is named as it is. **Diagnostics** that DCMHA is in use: the norm of every layer's composition
weights, and DCFormer++'s validation loss with its composition switched off (those weights zeroed: plain MHA).

Resumable: each finished run is written to ``OUT/runs/<name>.json`` and skipped when the script runs again, so
the study can be spread over sessions (``--budget-minutes`` stops starting new runs after that long).

    # once, on a CPU: the corpus (Debian documentation + Shakespeare, ~28M tokens of BPE 16k: docs/data.md)
    headmix data data/corpus
    # GPU (about 30 minutes on one H200 at the default shape, 8 x 512, 8 heads x 64, seq 1024, 30M tokens a run)
    python benchmarks/study.py --corpus data/corpus --out docs/evidence
    # tiny CPU smoke run on a real play (the test does this)
    python benchmarks/study.py --size tiny --data play.txt --device cpu --out /tmp/study
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scaling import (  # noqa: E402
    fit_power_law, machine_name, prepare, run_once, run_path, train_run, validation_loss)

from headmix.models import DCFormerConfig  # noqa: E402

ARMS = ("transformer++", "dcformer++", "dcformer", "control", "talking-heads")
# (layers, width, heads, seq, batch, tokens per run, window, validation sequences)
SIZES = {
    "gpu": dict(layers=8, width=512, heads=8, seq=1024, batch=32, tokens=30_000_000, window=256, val=256),
    "tiny": dict(layers=2, width=64, heads=2, seq=64, batch=4, tokens=4_096, window=16, val=8),
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj", "q_norm", "k_norm", "rotary")


def arm_config(arm: str, size: dict, vocab: int) -> DCFormerConfig:
    """The model of an arm at ``size``: the released 405M recipe's fields (init std 0.006, eps 1e-5, MLP 2.75x)."""
    if arm not in ARMS:
        raise ValueError(f"arm {arm!r} is not known: expected one of {list(ARMS)}")
    fields = dict(hidden_size=size["width"], num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
                  num_key_value_heads=size["heads"], intermediate_size=int(2.75 * size["width"]),
                  vocab_size=vocab, max_position_embeddings=size["seq"])
    local = dict(window_size=size["window"], window_pattern="LG", qk_norm=True)
    if arm == "transformer++":
        return DCFormerConfig.from_preset("transformer++-405m", **fields)
    if arm == "control":
        return DCFormerConfig.from_preset("transformer++-405m", **fields, **local)
    if arm == "talking-heads":
        return DCFormerConfig.from_preset("transformer++-405m", **fields, attention="talking_heads")
    if arm == "dcformer++":
        return DCFormerConfig.from_preset("dcformer++-405m", **fields, **local)
    return DCFormerConfig.from_preset("dcformer++-405m", **fields, window_size=None, window_pattern=None,
                                      qk_norm=False)


def composition_modules(model) -> list[tuple[int, torch.nn.Module]]:
    """``(layer index, attention module)`` of every layer whose attention composes heads."""
    found = []
    for i, layer in enumerate(model.model.layers):
        attention = next((m for m in layer.modules() if type(m).__name__ in ("DCMHA", "TalkingHeadsAttention")), None)
        if attention is not None:
            found.append((i, attention))
    return found


def composition_parameters(attention: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Every parameter of a composing attention that is not a projection, norm or rotary table."""
    return {n: p for n, p in attention.named_parameters() if n.split(".")[0] not in PROJECTIONS}


def diagnostics(model, data: dict, args, device) -> dict:
    """Norms of each layer's composition weights, and the validation loss with them zeroed (plain MHA)."""
    norms = {str(i): {n: p.detach().float().norm().item() for n, p in composition_parameters(a).items()}
             for i, a in composition_modules(model)}
    bf16 = device.type == "cuda"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    with_composition = validation_loss(model, data["validation"], args.batch, device, autocast)
    with torch.no_grad():
        for _, attention in composition_modules(model):
            for p in composition_parameters(attention).values():
                p.zero_()
    without = validation_loss(model, data["validation"], args.batch, device, autocast)
    return {"composition_norms": norms, "validation_loss": with_composition,
            "validation_loss_composition_off": without}


def plan(args) -> list[tuple[str, str, int, float | None, str]]:
    """``(name, arm, seed, token multiple, kind)`` in running order: probes first, then main runs, the ladder."""
    runs = []
    for arm in args.arms:
        for lr in args.lrs:
            runs.append((f"probe-{arm}-lr{lr:g}", arm, 0, args.probe_fraction, f"probe:{lr:g}"))
    for arm in args.arms:
        for seed in range(args.seeds if arm in ("transformer++", "dcformer++") else 1):
            runs.append((f"{main_prefix(arm, args)}{seed}", arm, seed, 1.0, "main"))
    if "transformer++" in args.arms:
        for multiple in args.ladder:
            if multiple != 1.0:
                runs.append((f"transformer++-x{multiple:g}", "transformer++", 0, multiple, "ladder"))
    return runs


def main_prefix(arm: str, args) -> str:
    """Name of an arm's main runs up to the seed: ``ARM-seed`` at the probes' best rate, ``ARM-lrLR-seed`` at a
    rate given by ``--rate ARM=LR`` (so a run at the probes' choice and one at the given rate are both kept)."""
    return f"{arm}-lr{args.rate[arm]:g}-seed" if arm in args.rate else f"{arm}-seed"


def best_rate(results: dict, arm: str, rates: list[float]) -> float:
    """The probe rate with the lowest validation loss (the first rate when the arm had no probe)."""
    probes = [(results[f"probe-{arm}-lr{lr:g}"]["validation_loss"], lr) for lr in rates
              if f"probe-{arm}-lr{lr:g}" in results]
    return min(probes)[1] if probes else rates[0]


# -- analysis --------------------------------------------------------------------------------------
def analyse(results: dict, args) -> dict:
    """Per-arm losses, the multiplier with its 1-sd range, and the verdict."""
    arms = {}
    for arm in args.arms:
        runs = [r for n, r in results.items() if n.startswith(main_prefix(arm, args))]
        if runs:
            losses = [r["validation_loss"] for r in runs]
            arms[arm] = {"losses": losses, "mean": statistics.fmean(losses),
                         "sd": statistics.stdev(losses) if len(losses) > 1 else None,
                         "flops": runs[0]["flops"], "tokens": runs[0]["tokens"],
                         "learning_rate": runs[0]["learning_rate"], "tokens_per_s": statistics.fmean(
                             r["tokens_per_s"] for r in runs)}
    analysis: dict = {"arms": arms}
    base, dcf = arms.get("transformer++"), arms.get("dcformer++")
    if not (base and dcf):
        return analysis
    sds = [a["sd"] for a in (base, dcf) if a["sd"] is not None]
    sigma = math.sqrt(statistics.fmean(s * s for s in sds)) if sds else None
    delta = base["mean"] - dcf["mean"]  # > 0: DCFormer++ is better
    analysis.update(sigma=sigma, delta=delta)
    ladder = [(base["flops"], base["mean"])] + [
        (r["flops"], r["validation_loss"]) for n, r in results.items() if n.startswith("transformer++-x")]
    if len(ladder) >= 2:
        a, b, rms = fit_power_law(ladder)

        def multiplier(loss: float) -> float:
            return math.exp((math.log(loss) - a) / b) / dcf["flops"]

        analysis.update(fit={"a": a, "b": b, "rms": rms, "points": ladder}, multiplier=multiplier(dcf["mean"]))
        if sigma is not None:
            analysis["multiplier_range"] = sorted((multiplier(dcf["mean"] + sigma), multiplier(dcf["mean"] - sigma)))
    analysis["verdict"] = verdict(analysis, arms)
    return analysis


def verdict(analysis: dict, arms: dict) -> str:
    """Issue 18's rule, in its order; says what is missing when it cannot be applied."""
    sigma, delta = analysis.get("sigma"), analysis["delta"]
    if sigma is None:
        return "no verdict: one seed per arm gives no seed-to-seed spread"
    if abs(delta) < 2 * sigma:
        return f"not reproduced at this scale (|Δ| = {abs(delta):.4f} < 2σ = {2 * sigma:.4f})"
    control = arms.get("control")
    beats_control = control is not None and arms["dcformer++"]["mean"] < control["mean"]
    low = analysis.get("multiplier_range", [None])[0]
    if delta >= max(3 * sigma, 0.01) and beats_control and low is not None and low > 1.2:
        return f"reproduced (Δ = {delta:.4f} nats, multiplier {analysis['multiplier']:.2f}x, 1-sd low {low:.2f}x)"
    mult = analysis.get("multiplier")
    if mult is not None and 1.1 <= mult <= 1.5:
        return f"direction only (multiplier {mult:.2f}x)"
    if delta < 0:
        return f"DCFormer++ worse at this scale (Δ = {delta:.4f} nats, {abs(delta) / sigma:.1f}σ)"
    multiplier = "no multiplier" if mult is None else f"multiplier {mult:.2f}x"
    return (f"better but short of 'reproduced' (Δ = {delta:.4f} nats, {delta / sigma:.1f}σ, {multiplier}, "
            f"control {'beaten' if beats_control else 'not beaten or absent'})")


def table(results: dict, analysis: dict, header: str, replaced: dict | None = None) -> str:
    lines = [header, "", "| arm | seeds | learning rate | tokens | validation loss (mean ± sd) | ÷ Transformer++ compute "
             "per token | tokens/s |", "|---|---|---|---|---|---|---|"]
    base = analysis["arms"].get("transformer++")
    for arm, a in analysis["arms"].items():
        sd = f" ± {a['sd']:.4f}" if a["sd"] is not None else ""
        ratio = f"{a['flops'] / base['flops']:.3f}" if base else "-"
        lines.append(f"| {arm} | {len(a['losses'])} | {a['learning_rate']:g} | {a['tokens']:,} | {a['mean']:.4f}{sd} | "
                     f"{ratio} | {a['tokens_per_s']:,.0f} |")
    for n, r in results.items():
        if n.startswith("transformer++-x"):
            lines.append(f"| {n} (ladder) | 1 | {r['learning_rate']:g} | {r['tokens']:,} | {r['validation_loss']:.4f} | "
                         f"1.000 | {r['tokens_per_s']:,.0f} |")
    for n, r in (replaced or {}).items():
        lines.append(f"| {n} (the probes' rate; replaced by --rate {r['arm']}=...) | 1 | {r['learning_rate']:g} | "
                     f"{r['tokens']:,} | {r['validation_loss']:.4f} | - | {r['tokens_per_s']:,.0f} |")
    if "multiplier" in analysis:
        rng = analysis.get("multiplier_range")
        lines += ["", f"DCFormer++ compute multiplier: **{analysis['multiplier']:.2f}x**"
                  + (f" (1-sd range {rng[0]:.2f}–{rng[1]:.2f}x)" if rng else "")]
    if "delta" in analysis:
        sigma = analysis["sigma"]
        lines.append(f"Δ (Transformer++ − DCFormer++) = {analysis['delta']:.4f} nats"
                     + (f", σ = {sigma:.4f}" if sigma is not None else ""))
        lines.append(f"Verdict: **{analysis['verdict']}**")
    diag = next((r["diagnostics"] for n, r in results.items() if n == "dcformer++-seed0" and "diagnostics" in r), None)
    if diag:
        lines += ["", f"DCFormer++ (seed 0) validation loss {diag['validation_loss']:.4f}; with its composition "
                      f"switched off {diag['validation_loss_composition_off']:.4f}", "",
                  "| layer | composition weight norms |", "|---|---|"]
        for layer, norms in diag["composition_norms"].items():
            lines.append(f"| {layer} | " + ", ".join(f"{n} {v:.3f}" for n, v in norms.items()) + " |")
    return "\n".join(lines)


def plot(results: dict, analysis: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, ax, path: Path) -> Path:
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n, r in results.items():
        if n.startswith("probe-") or not r.get("curve"):
            continue
        ax.plot([p["flops"] / r["flops"] * r["tokens"] for p in r["curve"]],
                [p["validation_loss"] for p in r["curve"]], label=n, marker=".")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss")
    ax.set_title("validation loss against tokens (each run's own cosine schedule)")
    paths.append(save(fig, ax, out / "study_curves.png"))
    if "fit" in analysis:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        points = analysis["fit"]["points"]
        xs = [c for c, _ in points]
        ax.scatter(xs, [loss for _, loss in points], label="Transformer++ (ladder)")
        grid = [min(xs) / 1.2 * (max(xs) * 1.44 / min(xs)) ** (k / 50) for k in range(51)]
        a, b = analysis["fit"]["a"], analysis["fit"]["b"]
        ax.plot(grid, [math.exp(a + b * math.log(c)) for c in grid], "--", label="power-law fit")
        for arm, v in analysis["arms"].items():
            if arm != "transformer++":
                ax.errorbar([v["flops"]], [v["mean"]], yerr=[v["sd"] or 0], fmt="o", label=arm)
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel("final validation loss")
        paths.append(save(fig, ax, out / "study_flops.png"))
    return paths


# -- command line ----------------------------------------------------------------------------------
def load_data(args) -> dict:
    if args.corpus:
        from headmix.training.corpus import load_sequences

        manifest = Path(args.corpus) / "manifest.json"
        vocab = json.loads(manifest.read_text())["settings"]["vocab_size"] if manifest.is_file() else None
        train = load_sequences(args.corpus, "train", args.seq)
        validation = load_sequences(args.corpus, "validation", args.seq)[: args.val]
        vocab = vocab or int(max(train.max(), validation.max())) + 1
        return {"train": train, "validation": validation, "vocab_size": vocab, "description": f"corpus {args.corpus}"}
    if not args.data:
        raise ValueError("no data: give --corpus DIR (built by `headmix data DIR`) or --data FILES")
    data = prepare(args.seq, args.vocab, args.data, args.cache_dir)
    data["validation"] = data["validation"][: args.val]
    return data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="gpu", help="shape, run length, window (see SIZES)")
    for field in ("layers", "width", "heads", "seq", "batch", "tokens", "window", "val"):
        parser.add_argument(f"--{field}", type=int, help=f"override the size's {field}")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), help=f"of {list(ARMS)}")
    parser.add_argument("--seeds", type=int, default=2, help="seeds of Transformer++ and DCFormer++ (others: one)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3], help="probed peak rates")
    parser.add_argument("--probe-fraction", type=float, default=0.25, help="probe length, a fraction of the tokens")
    parser.add_argument("--rate", nargs="*", default=[], metavar="ARM=LR",
                        help="train ARM's main runs at LR instead of its best probe rate (e.g. when the probes' choice "
                             "proved unstable over a full run); runs named ARM-lrLR-seedN, the others kept and shown")
    parser.add_argument("--ladder", type=float, nargs="*", default=[1.0, 1.5, 2.0],
                        help="Transformer++ token multiples for the compute fit")
    parser.add_argument("--evals", type=int, default=8, help="validation evaluations per run")
    parser.add_argument("--corpus", help="a `headmix data` folder (train.npy, validation.npy)")
    parser.add_argument("--data", nargs="*", default=[], help="text files instead (tokenised here, --vocab)")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--cache-dir", default="")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget-minutes", type=float, default=float("inf"),
                        help="start no new run after this long (finished runs are kept; run again to go on)")
    parser.add_argument("--out", required=True, help="folder: runs/*.json, study.json, study_table.md, PNGs")
    args = parser.parse_args(argv)
    size = dict(SIZES[args.size])
    size.update({k: getattr(args, k) for k in size if getattr(args, k) is not None})
    for k, v in size.items():
        setattr(args, k, v)
        if v < 1:
            parser.error(f"--{k}={v} is not allowed: expected a positive integer")
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        parser.error(f"arm(s) {unknown} not known: expected some of {list(ARMS)}")
    if not all(lr > 0 for lr in args.lrs) or not 0 < args.probe_fraction <= 1:
        parser.error("--lrs must be positive and --probe-fraction in (0, 1]")
    rates = {}
    for item in args.rate:
        arm, _, lr = item.partition("=")
        try:
            rates[arm] = float(lr)
        except ValueError:
            rates[arm] = -1.0
        if arm not in ARMS or not rates[arm] > 0:
            parser.error(f"--rate {item!r} is not allowed: expected ARM=LR with ARM one of {list(ARMS)} and LR > 0")
    args.rate = rates
    if args.heads < 1 or args.width % args.heads:
        parser.error(f"--width={args.width} must be a multiple of --heads={args.heads}")
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data: dict = {}

    def loaded() -> dict:  # the data, loaded (tokenised) only when a run is left to train
        if not data:
            try:
                data.update(load_data(args))
            except ValueError as error:
                parser.error(str(error))
            (out / "data.json").write_text(json.dumps({"description": data["description"],
                                                       "vocab_size": data["vocab_size"]}))
        return data
    steps_per_run = max(1, args.tokens // (args.batch * args.seq))
    train_args = SimpleNamespace(batch=args.batch, seq=args.seq, evals=args.evals, lr=args.lrs[0], epochs=None)
    started = time.time()
    results: dict = {}
    for name, arm, seed, multiple, kind in plan(args):
        if not run_path(out, name).is_file() and (time.time() - started) / 60 > args.budget_minutes:
            print(f"budget of {args.budget_minutes} minutes spent: {name} and later runs left for the next call",
                  file=sys.stderr)
            break

        def train() -> dict:  # called by run_once, in this iteration, only if the run is not on disk yet
            config = arm_config(arm, size, loaded()["vocab_size"])
            lr = (float(kind.split(":")[1]) if kind.startswith("probe")
                  else args.rate[arm] if kind == "main" and arm in args.rate else best_rate(results, arm, args.lrs))
            steps = max(1, round(steps_per_run * multiple))
            result = train_run(config, data, train_args, seed, device, name, steps=steps, lr=lr, data_seed=0,
                               warmup=0.02, keep_model=arm == "dcformer++" and kind == "main" and seed == 0)
            model = result.pop("model", None)
            if model is not None:
                result["diagnostics"] = diagnostics(model, data, train_args, device)
            result.update(arm=arm, kind=kind, device=machine_name(device), torch=torch.__version__,
                          date=str(datetime.date.today()))
            return result

        results[name] = run_once(name, out, train)
    analysis = analyse(results, args)
    described = json.loads((out / "data.json").read_text())["description"] if (out / "data.json").is_file() else "-"
    # where the runs trained (recorded by each run since 2026-11-30; the earlier ones say nothing) and where
    # this table was put together from them
    trained = sorted({f"{r['device']}, torch {r['torch']}" for r in results.values() if "device" in r})
    unrecorded = sum("device" not in r for r in results.values())
    where = "; ".join(trained + ([f"{unrecorded} run(s) without a record of it"] if unrecorded else []))
    header = (f"# headmix study (issue 18 §2): runs trained on {where}; table assembled on {machine_name(device)}, "
              f"{datetime.date.today()}, torch {torch.__version__}; {args.layers} layers x {args.width}, "
              f"{args.heads} heads x {args.width // args.heads}, seq {args.seq}, batch {args.batch}, "
              f"{steps_per_run * args.batch * args.seq:,} tokens a run; data: {described}\n"
              f"# command: python benchmarks/study.py {shlex.join(sys.argv[1:] if argv is None else argv)}")
    # main runs made at the probes' rate before a --rate replaced it: shown, not analysed
    replaced = {f"{arm}-seed{seed}": json.loads(run_path(out, f"{arm}-seed{seed}").read_text())
                for arm in args.rate if arm in args.arms for seed in range(args.seeds)
                if run_path(out, f"{arm}-seed{seed}").is_file()}
    text = table(results, analysis, header, replaced)
    print(text)
    (out / "study_table.md").write_text(text + "\n")
    (out / "study.json").write_text(json.dumps({"header": header, "size": size, "runs": results,
                                                "analysis": analysis}, indent=1))
    plot(results, analysis, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
