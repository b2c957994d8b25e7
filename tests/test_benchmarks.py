"""Benchmark scripts run end to end at tiny sizes on the CPU, so they cannot rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_in_process

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_lm_speed_script_prints_both_tables():
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "lm_speed.py"), "--variants", "tiny-transformer++", "tiny-dcformer++:global",
         "--device", "cpu", "--seq", "32", "--train-batch", "2", "--steps", "1", "--warmup", "1", "--prompt", "8",
         "--new-tokens", "4", "--batches", "1", "--num-layers", "2", "--profile", "1", "--profile-top", "5"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    # --profile: a table per variant of the ops with the most self time per step, largest first
    headers = [line for line in done.stdout.splitlines() if line.startswith("# tiny-") and "top 5" in line]
    assert [h.split(": ")[0] for h in headers] == ["# tiny-transformer++", "# tiny-dcformer++:global"]
    profiled = [line for line in done.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    times = [float(line.split("|")[1]) for line in profiled]
    assert len(times) == 10 and times[:5] == sorted(times[:5], reverse=True) and min(times) > 0
    train = [line for line in done.stdout.splitlines() if line.startswith("| tiny-") and "%" in line]
    generate = [line for line in done.stdout.splitlines() if line.startswith("| tiny-") and "%" not in line]
    assert len(train) == 2 and len(generate) == 2
    assert all(float(row.split("|")[3].replace(",", "")) > 0 for row in train)  # tokens/s measured
    assert all("(2 of 4 layers)" in row for row in train)
    ratios = [[float(cell) for cell in row.split("|")[5:7]] for row in generate]  # prefill, decode ÷ the first row's
    assert ratios[0] == [1.0, 1.0] and all(r > 0 for r in ratios[1])
    tokens = [[float(cell.replace(",", "")) for cell in row.split("|")[3:5]] for row in generate]
    assert all(abs(ratios[1][i] - tokens[1][i] / tokens[0][i]) < 0.011 for i in (0, 1))  # cells are rounded
    for row, (prefill, decode) in zip(generate, tokens):  # the range over the timed calls holds the median
        ranges = [[float(x.replace(",", "")) for x in part.split("–")] for part in row.split("|")[8].split(";")]
        assert ranges[0][0] <= prefill * 1.001 and prefill <= ranges[0][1] * 1.001, row
        assert ranges[1][0] <= decode * 1.001 and decode <= ranges[1][1] * 1.001, row


def test_lm_speed_isolate_measures_each_generation_row_in_its_own_process():
    """Each row from a child process; a child's failure is a row naming it, and the table goes on."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "lm_speed.py"), "--variants", "tiny-transformer++:bogus", "tiny-dcformer++",
         "--device", "cpu", "--skip-train", "--prompt", "8", "--new-tokens", "4", "--batches", "1", "--num-layers", "2",
         "--isolate"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = [line.split("|") for line in done.stdout.splitlines() if line.startswith("| tiny-")]
    assert [row[1].strip() for row in rows] == ["tiny-transformer++:bogus", "tiny-dcformer++"]
    assert "isolated run failed" in rows[0][3] and "'bogus'" in rows[0][3]
    assert float(rows[1][4].replace(",", "")) > 0  # decode tokens/s, measured by the child
    assert float(rows[1][6]) == 1.0  # ratios against the first row that was measured
    assert not any(line.startswith("ROW ") for line in done.stdout.splitlines())  # the children's lines stay theirs


def test_lm_speed_rounds_take_turns_and_pool_their_calls(monkeypatch):
    """``--rounds``: every row is warmed first, then the rows take turns round after round; each row's figures are
    medians over rounds x repeats calls, inside their printed range; ``--rounds`` with ``--isolate`` is refused."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lm_speed_rounds", BENCHMARKS / "lm_speed.py")
    lm_speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lm_speed)
    order = []
    warm, sample = lm_speed.GenerationTimer.warm, lm_speed.GenerationTimer.sample
    monkeypatch.setattr(lm_speed.GenerationTimer, "warm", lambda self: order.append(("warm", self.batch)) or warm(self))
    monkeypatch.setattr(lm_speed.GenerationTimer, "sample",
                        lambda self, n: order.append(("sample", self.batch)) or sample(self, n))
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        lm_speed.main(["--variants", "tiny-transformer++", "tiny-dcformer++", "--device", "cpu", "--skip-train",
                       "--prompt", "8", "--new-tokens", "4", "--batches", "1", "2", "--num-layers", "1",
                       "--rounds", "3", "--repeats", "2"])
    assert order[:4] == [("warm", 1), ("warm", 2)] * 2 and order[4:] == [("sample", 1), ("sample", 2)] * 6
    table = [line for line in out.getvalue().splitlines() if line.startswith("| tiny-")]
    assert len(table) == 4 and "range over 6 calls" in out.getvalue()
    for row in table:
        cells = row.split("|")
        decode = float(cells[4].replace(",", ""))
        low, high = (float(x.replace(",", "")) for x in cells[8].split(";")[1].split("–"))
        assert low <= decode * 1.001 and decode <= high * 1.001
    with pytest.raises(ValueError, match="--rounds is 2"):
        lm_speed.main(["--rounds", "2", "--isolate", "--skip-train", "--device", "cpu"])


def test_speed_report_runs_every_section_and_ends_with_the_summary():
    """benchmarks/speed_report.py at its CPU smoke size: every section prints, the summary table comes last with
    one measured row per item (compiled runs are left to the GPU: compiling on a 2-core CPU takes minutes)."""
    # in this process (a fresh interpreter costs ~10 s of imports; lm_speed.py and attention.py keep subprocess tests)
    done = run_in_process(str(BENCHMARKS / "speed_report.py"), "--size", "tiny", "--device", "cpu", "--skip-compile")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "torch " in out.splitlines()[0] and "transformers " in out.splitlines()[0]
    for heading in ("## MultiHeadAttention", "# one layer", "## attention core", "## training, small models",
                    "## training, big models", "## summary"):
        assert heading in out, heading
    summary = out[out.index("## summary"):].splitlines()[3:]
    assert [row.split("|")[1].split(",")[0].strip() for row in summary] == [
        "MHA window 40 / global", "one layer DCMHA / MHA", "core DCMHA / SDPA",
        "train tiny-dcformer++ / tiny-transformer++", "train tiny-dcpythia / tiny-pythia"]
    ratios = [float(row.split("|")[2].strip().split("x")[0].split("/")[0]) for row in summary]
    assert all(r > 0 for r in ratios)
    assert "| tiny-dcpythia | 1 of 4 |" in out  # reduced blocks are said


def test_attention_script_times_layers_at_given_shapes():
    # in this process: tests/test_triton.py::test_attention_benchmark_script_runs_at_a_tiny_size runs attention.py
    # in a fresh interpreter
    done = run_in_process(str(BENCHMARKS / "attention.py"), "--layers", "--device", "cpu", "--dtype", "float32",
                          "--shapes", "2x16", "--layer-seq", "64", "--tokens", "128", "--windows", "global", "16",
                          "--repeat", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|") for line in done.stdout.splitlines() if line.startswith("| 2x16 |")]
    assert [(r[2].strip(), r[3].strip()) for r in rows] == [("global", "mha"), ("global", "dcmha"), ("16", "mha"),
                                                            ("16", "dcmha")]
    assert all(float(r[5]) > 0 for r in rows) and rows[0][6].strip() == "1.00x"
    bad = run_in_process(str(BENCHMARKS / "attention.py"), "--layers", "--shapes", "16by64", "--device", "cpu")
    assert bad.returncode == 2 and "shape '16by64' is not known" in bad.stderr and "Traceback" not in bad.stderr


def test_lm_speed_rejects_an_unknown_variant_option():
    done = run_in_process(str(BENCHMARKS / "lm_speed.py"), "--variants", "tiny-dcformer++:local", "--device", "cpu",
                          "--skip-generate")
    assert done.returncode == 2 and "variant option 'local' is not known" in done.stderr
    assert "Traceback" not in done.stderr


def test_scaling_script_fits_and_reports_a_multiplier(tmp_path):
    """A tiny quality-per-compute study end to end: tokenise a real play, train 3 + 1 models (2 seeds for
    the smallest pair), fit, report the multiplier, write JSON/table/PNG; then redo the analysis from JSON."""
    from headmix.training.data import default_corpus

    play = default_corpus(tmp_path / "cache")[0]
    out = tmp_path / "out"
    done = run_in_process(  # in this process: a fresh interpreter costs ~10 s of imports
        str(BENCHMARKS / "scaling.py"), "--transformer", "1,16,2", "1,32,2", "1,48,2",
        "--dcformer", "1,16,2", "--seq", "32", "--batch", "4", "--epochs", "0.15", "--evals", "2", "--vocab", "300",
        "--device", "cpu", "--data", str(play), "--cache-dir", str(tmp_path / "cache"), "--out", str(out))
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| transformer++") or
            line.startswith("| dcformer++ 1x16/2h | 0.")]
    assert len(rows) == 4 + 2  # 3 sizes + a second seed of the smallest; 2 DCFormer++ seeds
    multiplier = [line for line in done.stdout.splitlines() if line.startswith("| dcformer++") and "x |" in line]
    assert len(multiplier) == 1 and float(multiplier[0].split("|")[3].strip().rstrip("x")) > 0
    assert {p.name for p in out.iterdir()} == {"scaling.json", "scaling_table.md", "scaling.png"}
    again = run_in_process(str(BENCHMARKS / "scaling.py"), "--from-json", str(out / "scaling.json"),
                           "--out", str(tmp_path / "again"))
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again" / "scaling_table.md").read_text() == (out / "scaling_table.md").read_text()


def test_scaling_script_rejects_a_bad_size():
    done = run_in_process(str(BENCHMARKS / "scaling.py"), "--transformer", "huge")
    assert done.returncode == 2 and "size 'huge' is not known" in done.stderr and "Traceback" not in done.stderr


def test_kernel_resources_compiles_a_kernel_for_sm90_without_a_gpu():
    """benchmarks/kernel_resources.py: Triton compiles the forward kernel offline and cuobjdump reads it (head dim 24,
    padded to 32 inside the kernel, at an explicit tile shape, without the static mix); the two launches of the
    split-key (decoding) forward and of the one-query decode kernel compile too (the interpreter runs code that
    Triton's compiler refuses, e.g. a name given two types in one kernel)."""
    import pytest

    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").is_file():
        pytest.skip("this triton build ships no NVIDIA tools")
    done = subprocess.run([sys.executable, str(BENCHMARKS / "kernel_resources.py"), "--head-dim", "24", "--heads", "4",
                           "--kernels", "fwd", "fwd_split1", "fwd_split2", "one_query1", "one_query2", "--tiles", "16x16x4",
                           "--no-static"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no static mix" in done.stdout
    row = next(line for line in done.stdout.splitlines() if line.startswith("| fwd |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:4] == ["24", "16 x 16", "4"], cells
    registers, spill, shared = int(cells[4]), int(cells[5]), float(cells[6])
    assert 0 < registers <= 255 and spill >= 0 and 0 < shared <= 1024
    assert "failed" not in done.stdout, done.stdout
    assert all(f"| {name} | 24 | 16 x 16 | 4 | " in done.stdout for name in ("fwd_split1", "fwd_split2")), done.stdout
    from headmix.ops.triton.launch import one_query_tile

    BN, _, warps = one_query_tile(32)
    assert all(f"| {name} | 24 | 1 x {BN} | {warps} | " in done.stdout for name in ("one_query1", "one_query2")), \
        done.stdout


@pytest.mark.parametrize("heads", [16, 32])
def test_blockwise_kernels_compile_for_sm90_at_their_tiles(heads):
    """``kernel_resources.py --blockwise``: the blockwise kernels at ``blockwise.TILES`` (their ``VEC`` included)
    compile offline for sm_90 with every argument but ``L`` specialised as a multiple of 16, as the launcher does at the
    benchmark shapes, within 255 registers and at most 512 bytes of spills (the interpreter runs code that Triton's
    compiler refuses; the tiles compile at 0-120 bytes with triton 3.9)."""
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").is_file():
        pytest.skip("this triton build ships no NVIDIA tools")
    done = subprocess.run([sys.executable, str(BENCHMARKS / "kernel_resources.py"), "--blockwise", "--heads",
                           str(heads), "--no-static"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in done.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| kernel")]
    assert [r[0] for r in rows] == ["pre", "post", "post_from_s", "adjoint_post", "adjoint_pre"], done.stdout
    for row in rows:
        assert 0 < int(row[4]) <= 255 and 0 <= int(row[5]) <= 512, row


def test_projected_kernels_compile_for_sm90_at_their_tiles():
    """``kernel_resources.py --projected``: the projected forward's and backward's kernels at their ``TILES`` (pipeline
    stages included) compile offline for sm_90 at head dim 80 (padded to 128: the most shared memory) within the H200's
    shared memory (227 KB) and at most 512 bytes of spills (the post sums kernel spills 352 bytes with triton 3.9, the
    backward's none)."""
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").is_file():
        pytest.skip("this triton build ships no NVIDIA tools")
    done = subprocess.run([sys.executable, str(BENCHMARKS / "kernel_resources.py"), "--projected", "--head-dim", "80"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in done.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| kernel")]
    kernels = ("pre_sums", "stats", "post_sums", "out", "dz_sums", "post_rows", "dy_sums", "dq", "dkv")
    assert [(r[0], r[1]) for r in rows] == [(k, "80") for k in kernels], done.stdout
    for row in rows:
        assert 0 < int(row[5]) <= 255 and 0 <= int(row[6]) <= 512 and 0 < int(row[7]) <= 227, row


def test_probe_runs_every_kind_and_task_and_writes_table_json_and_plot(tmp_path, capsys):
    """benchmarks/probe.py at its tiny size, in process (seconds): a row per task, a column per kind, the JSON
    holds one result per run with an accuracy in [0, 1], and the PNG is written."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("probe", BENCHMARKS / "probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    ids, labels = probe.make_batch("two_key", 4, 3, __import__("torch").Generator().manual_seed(0))
    assert ids.shape == (3, 24) and (labels != -100).sum() == 3 * 4
    due = (labels != -100).nonzero()
    assert (labels[due[:, 0], due[:, 1]] == ids[due[:, 0], due[:, 1] + 1]).all()  # the next token is the answer
    threads = __import__("torch").get_num_threads()
    try:  # one thread: a tiny model on a shared 2-core machine is slower with two
        assert probe.main(["--size", "tiny", "--seeds", "0", "--steps", "1", "--batch", "4", "--eval", "4",
                           "--threads", "1", "--out", str(tmp_path)]) == 0
    finally:
        __import__("torch").set_num_threads(threads)
    out = capsys.readouterr().out
    assert "| task | width | pairs | mha | talking_heads | dcmha | collaborative |" in out
    assert [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| m") or line.startswith("| t")
            ][-2:] == ["mqar", "two_key"]
    results = json.loads((tmp_path / "probe.json").read_text())["results"]
    assert len(results) == 2 * 4 and all(0.0 <= r["accuracy"] <= 1.0 for r in results)
    assert (tmp_path / "probe.png").stat().st_size > 1000
    assert probe.main(["--size", "tiny", "--tasks", "mqar", "--kinds", "mha", "dcmha", "--step-cost", "1"]) == 0
    out = capsys.readouterr().out  # --step-cost: only the timing table, no runs
    row = next(line for line in out.splitlines() if line.startswith("| mqar |"))
    assert "step cost at width 16, 4 pairs" in out and " ms (1.00x) | " in row and "runs" not in out


def test_probe_workers_give_the_sequential_results_and_a_second_call_skips_finished_runs(tmp_path, capsys):
    """benchmarks/probe.py --workers 2 (spawned processes) trains every run to the same accuracy and final loss,
    bit for bit, as the sequential run (each run's data and initialisation depend on its seed alone, not on which
    runs came before it in a process); each finished run is on disk, and a second call reads them back and trains
    only the one that was deleted; --budget-minutes 0 starts no run and the table says what is missing."""
    import importlib.util
    import json

    import torch

    spec = importlib.util.spec_from_file_location("probe", BENCHMARKS / "probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    common = ["--size", "tiny", "--kinds", "mha", "dcmha", "--seeds", "0", "1", "--steps", "2", "--batch", "4",
              "--eval", "8", "--threads", "1"]  # 8 runs; one thread in each worker too (the default)
    threads = torch.get_num_threads()
    try:  # sequential, in process
        assert probe.main(common + ["--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    done = subprocess.run([sys.executable, str(BENCHMARKS / "probe.py"), *common, "--workers", "2",
                           "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("] two_key-dcmha-w16-p4-s1: accuracy") == 1  # one line per finished run

    def results(folder: str) -> list[tuple]:
        runs = json.loads((tmp_path / folder / "probe.json").read_text())["results"]
        return [(r["task"], r["kind"], r["seed"], r["accuracy"], r["final_loss"]) for r in runs]

    one = results("one")
    assert len(one) == 8 and len({r[4] for r in one}) > 2  # distinct runs, distinct losses
    assert results("two") == one
    assert all(json.loads(p.read_text())["seconds"] > 0 for p in (tmp_path / "two" / "runs").glob("*.json"))
    assert len(list((tmp_path / "two" / "runs").glob("*.json"))) == 8
    (tmp_path / "two" / "runs" / "mqar-dcmha-w16-p4-s0.json").unlink()
    capsys.readouterr()
    try:  # again: 7 runs read back, only the deleted one trained
        assert probe.main(common + ["--out", str(tmp_path / "two")]) == 0
        out = capsys.readouterr().out
        assert "# 7 of 8 runs done earlier" in out and out.count("] ") == 1 and "] mqar-dcmha-w16-p4-s0:" in out
        assert results("two") == one
        assert probe.main(common + ["--out", str(tmp_path / "none"), "--budget-minutes", "0"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "8 of 8 runs missing" in out and "| mqar | 16 | 4 | - | - |" in out
    assert len(json.loads((tmp_path / "none" / "probe.json").read_text())["missing"]) == 8


def test_study_script_runs_every_step_and_resumes(tmp_path):
    """benchmarks/study.py (issue 18 §2) on a real play at a tiny size: probes, two seeds of each main arm, the
    control, the Transformer++ token ladder, the multiplier, the verdict, diagnostics and plots; run again, every
    finished run is read back instead of trained (the study spreads over sessions)."""
    from headmix.training.data import default_corpus

    play = default_corpus(tmp_path / "cache")[0]
    args = ["--size", "tiny", "--tokens", "1024", "--evals", "2", "--data", str(play), "--vocab", "300", "--device", "cpu",
            "--arms", "transformer++", "dcformer++", "control", "--lrs", "3e-3", "--cache-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "out")]
    done = run_in_process(str(BENCHMARKS / "study.py"), *args)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "out" / "study_table.md").read_text()
    assert "| transformer++ | 2 | 0.003 | 1,024 |" in table and "| dcformer++ | 2 |" in table and "| control | 1 |" in table
    assert "| transformer++-x2 (ladder) | 1 | 0.003 | 2,048 |" in table
    assert "DCFormer++ compute multiplier: **" in table and "Verdict: **" in table
    assert "with its composition switched off" in table and "| 1 | dynamic.hidden" in table
    runs = sorted(p.name for p in (tmp_path / "out" / "runs").iterdir())
    assert len(runs) == 3 + 5 + 2  # probes, main runs, ladder
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"study.json", "study_curves.png", "study_flops.png",
                                                              "data.json"}
    again = run_in_process(str(BENCHMARKS / "study.py"), *args)
    assert again.returncode == 0 and "done earlier" in again.stderr and "step " not in again.stderr
    assert (tmp_path / "out" / "study_table.md").read_text().splitlines()[2:] == table.splitlines()[2:]
    rated = run_in_process(str(BENCHMARKS / "study.py"), *args, "--rate", "control=1e-3")  # trains one run only
    assert rated.returncode == 0, rated.stderr[-3000:]
    assert rated.stderr.count("step ") and "control-lr0.001-seed0" in rated.stderr
    table = (tmp_path / "out" / "study_table.md").read_text()
    assert "| control | 1 | 0.001 | 1,024 |" in table
    assert "| control-seed0 (the probes' rate; replaced by --rate control=...) | 1 | 0.003 |" in table
    bad = run_in_process(str(BENCHMARKS / "study.py"), "--arms", "gpt", "--data", str(play), "--out", str(tmp_path))
    assert bad.returncode == 2 and "arm(s) ['gpt'] not known" in bad.stderr
    bad = run_in_process(str(BENCHMARKS / "study.py"), "--rate", "control=fast", "--data", str(play), "--out",
                         str(tmp_path))
    assert bad.returncode == 2 and "--rate 'control=fast' is not allowed" in bad.stderr


def test_host_overhead_script_times_both_layers_and_restores_the_kernels():
    from headmix.ops.triton import launch

    kernel = launch._fwd_kernel
    done = run_in_process(str(BENCHMARKS / "host_overhead.py"), "--device", "cpu", "--dim", "64", "--heads", "4",
                          "--tokens", "4", "--repeat", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|") for line in done.stdout.splitlines() if line.startswith(("| mha", "| dcmha"))]
    assert [r[1].strip() for r in rows] == ["mha", "dcmha"]
    assert all(float(cell.replace(",", "")) > 0 for r in rows for cell in r[2:6])
    assert "stubbed" in done.stdout.splitlines()[0] and launch._fwd_kernel is kernel
    bad = run_in_process(str(BENCHMARKS / "host_overhead.py"), "--dim", "100", "--heads", "16")
    assert bad.returncode == 2 and "--dim 100 over --heads 16" in bad.stderr and "Traceback" not in bad.stderr


def test_training_paths_script_times_the_paths_and_they_agree():
    """benchmarks/training_paths.py at a tiny size on the CPU (kernels interpreted): a row per shape, window and path,
    and in float32 the blockwise path's output and gradients equal the tile kernels' to float32 rounding. (One window,
    so that the interpreter runs each path once per shape: the kernels' own tests cover global attention.) With
    ``--paths ... auto`` a third row per shape, named by what auto runs, as close: the tile kernels at head dim 16,
    the projected forward and backward at head dim 80 (a windowed layer whose backward would be the blockwise one)."""
    done = run_in_process(str(BENCHMARKS / "training_paths.py"), "--device", "cpu", "--batch", "1", "--seq", "24",
                          "--shapes", "4x16", "4x80", "--windows", "8", "--dtype", "float32", "--paths", "tiles",
                          "blockwise", "auto")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith(("| 4x16 |", "| 4x80 |"))]
    assert len(rows) == 6 and all("error" not in row for row in rows), rows
    assert sum("auto (projected forward, projected backward)" in row for row in rows) == 1  # (head dim 80)
    assert sum("auto (tiles forward, tiles backward)" in row for row in rows) == 1  # (head dim 16 with a window)
    apart = [row.split("|")[8] for row in rows if "blockwise" in row or "auto" in row]
    assert len(apart) == 4
    for cell in apart:  # "out 1.4e-07, grads ≤ 2.9e-07" (auto's: "from tiles: out ..., grads ≤ ...")
        values = [float(part.split()[-1]) for part in cell.split(",")]
        assert all(v < 1e-5 for v in values), cell  # (a NaN fails; max() would pass over one)
    assert "torch " in done.stdout and "# command:" in done.stdout


def test_training_paths_inference_times_both_forwards_and_names_autos_path(capsys, monkeypatch):
    """``--inference``: a row per path with the forward's time without gradients; the paths agree in float32, and the
    tile row names the path backend="auto" takes there (the tile forward at 4 x 16: ``op.inference_kernels``); a
    training-only switch with it is refused in one line. (24 queries, with ``op.BLOCKWISE_MIN_QUERIES`` lowered to 8
    so that auto weighs the other forwards, as from 128 queries on by default: fewer programs to interpret.)"""
    from headmix.ops.triton import op

    monkeypatch.setattr(op, "BLOCKWISE_MIN_QUERIES", 8)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import training_paths
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert training_paths.main(["--device", "cpu", "--batch", "1", "--seq", "24", "--shapes", "4x16", "--windows",
                                "9", "--dtype", "float32", "--inference"]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| 4x16 |")]
    assert [row[3].strip() for row in rows] == ["tiles", "blockwise"]
    assert all(float(row[4]) > 0 for row in rows)
    assert rows[0][5].strip() == "auto: tiles"
    assert float(rows[1][5].split()[-1]) < 1e-5  # "out 1.6e-07" (a NaN fails the comparison)
    with pytest.raises(SystemExit):
        training_paths.main(["--inference", "--sweep-tiles"])
    assert "--inference times the paths' forwards only" in capsys.readouterr().err


def test_training_paths_sweep_varies_one_kernel_tile_at_a_time(monkeypatch, capsys):
    """``--sweep-tiles``: the blockwise row with the chosen tiles, then one row per other candidate of each kernel (the
    script's candidates cut to one other per kernel here: every row interprets every kernel on the CPU)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import training_paths

    from headmix.ops.triton.blockwise import TILES

    chosen = dict(TILES[16])
    small = {16: {kernel: [chosen[kernel], next(t for t in ts if t != chosen[kernel])]
                  for kernel, ts in training_paths.SWEEP[16].items()}}
    monkeypatch.setattr(training_paths, "SWEEP", small)
    assert training_paths.main(["--device", "cpu", "--batch", "1", "--seq", "20", "--shapes", "4x16", "--paths",
                                "blockwise", "--sweep-tiles", "--dtype", "float32"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 4x16 |")]
    labels = [line.split("|")[3].strip() for line in rows]
    assert labels == ["blockwise"] + [f"blockwise, {kernel} {ts[1]}" for kernel, ts in small[16].items()]
    assert all("error" not in row for row in rows), rows
    assert TILES[16] == chosen  # the script puts the chosen tiles back


def test_norm_script_times_both_norms_at_every_shape():
    done = subprocess.run([sys.executable, str(BENCHMARKS / "norm.py"), "--device", "cpu", "--small", "--repeats", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| QK-norm") or line.startswith("| factor")]
    assert len(rows) == 2
    assert all(float(cell) > 0 for row in rows for cell in row.split("|")[5:9])  # four timings, each measured


def test_decode_profile_script_lists_a_decoding_steps_operators():
    """On the CPU the decode profile counts a decoding step's aten operators (the smoke run of the GPU's kernel
    profile): a row per variant and batch, the DCMHA model's step busier than the Transformer's."""
    done = run_in_process(str(BENCHMARKS / "decode_profile.py"), "--variants", "tiny-transformer++", "tiny-dcformer++",
                          "--batches", "2", "--prompt", "8", "--new-tokens", "3", "--device", "cpu", "--dtype",
                          "float32", "--top", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    heads = [line for line in done.stdout.splitlines() if line.startswith("## ")]
    assert [h.split(",")[0] for h in heads] == ["## tiny-transformer++", "## tiny-dcformer++"], done.stdout
    counts = [float(h.split(": ")[1].split(" ")[0]) for h in heads]
    assert 0 < counts[0] < counts[1]
    assert done.stdout.count("| us per step | per step | aten op |") == 2
    bad = run_in_process(str(BENCHMARKS / "decode_profile.py"), "--new-tokens", "1", "--device", "cpu")
    assert bad.returncode == 2 and "--new-tokens 1" in bad.stderr


def test_decode_splits_script_names_a_bad_tile():
    """The split/tile sweep of the decode step (GPU only) refuses a malformed ``--tiles`` with a message, before it
    looks for a GPU."""
    bad = run_in_process(str(BENCHMARKS / "decode_splits.py"), "--tiles", "32x32")
    assert bad.returncode == 2 and "--tiles 32x32: expected three numbers each" in bad.stderr
    bad = run_in_process(str(BENCHMARKS / "decode_splits.py"), "--tiles", "32xbx4")
    assert bad.returncode == 2 and "expected KEYSxCHUNKxWARPS" in bad.stderr
