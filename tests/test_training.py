"""Training, evaluation and generation through the ``headmix`` command line, on the real packaged corpus."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from headmix.training.config import TrainConfig, load_config
from headmix.training.data import default_corpus, prepare_data

from helpers import run_in_process

# a small model and run: two layers, width 64, on a slice of Shakespeare
SMALL = [
    "model_overrides={num_hidden_layers: 2, hidden_size: 64, num_attention_heads: 4, intermediate_size: 128}",
    "seq_len=64", "batch_size=4", "vocab_size=512", "eval_every=4", "log_every=2", "save_every=4",
    "max_validation_sequences=8", "num_proc=1", "validation_fraction=0.1",
]


@pytest.fixture(scope="session")
def corpus_slice(tmp_path_factory) -> Path:
    """Three real plays from the packaged corpus."""
    root = tmp_path_factory.mktemp("corpus")
    files = default_corpus(tmp_path_factory.mktemp("cache"))
    for f in files[:3]:
        shutil.copy(f, root / f.name)
    return root


def headmix(*args: str, cache: Path, timeout: int = 600, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "headmix.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, **popen)


def train_args(corpus: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return ["train", f"data=[{corpus}]", f"output_dir={out}", f"cache_dir={cache}", *SMALL, *extra]


@pytest.mark.slow
def test_train_then_eval_then_generate(corpus_slice, tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    result = headmix(*train_args(corpus_slice, out, cache, "max_steps=8"), cache=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    table = (out / "results.md").read_text()
    assert "| tiny-dcformer++ |" in table and "| tiny-transformer++ |" in table
    assert (out / "validation_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("tiny-dcformer++", "tiny-transformer++"):
        stored = json.loads((out / name / "final" / "result.json").read_text())
        assert stored["validation_loss"] < 6.2  # ln(512) = 6.24 is a uniform guess: it learned something
    model_dir = out / "tiny-dcformer++" / "final"
    # the first run above went through a fresh interpreter; the rest run the same command line in this process
    evaluated = run_in_process("headmix", "eval", str(model_dir), "--data", str(corpus_slice), "--seq-len", "64",
                               "--max-sequences", "16")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "perplexity" in evaluated.stdout
    generated = run_in_process("headmix", "generate", str(model_dir), "--prompt", "ROMEO:", "--max-new-tokens", "12",
                               "--greedy")
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert generated.stdout.startswith("ROMEO:") and len(generated.stdout) > len("ROMEO:")
    again = run_in_process("headmix", *train_args(corpus_slice, out, cache, "max_steps=8"))  # finished: reused
    assert again.returncode == 0 and table == (out / "results.md").read_text().replace(
        (out / "results.md").read_text().splitlines()[0], table.splitlines()[0])


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(corpus_slice, tmp_path):
    cache = tmp_path / "cache"
    common = ["models=[tiny-dcformer++]", "max_steps=48"]  # long enough that the kill lands mid-run
    reference = headmix(*train_args(corpus_slice, tmp_path / "straight", cache, *common), cache=cache)
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "killed"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen([sys.executable, "-m", "headmix.cli", *train_args(corpus_slice, out, cache, *common)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    checkpoint = out / "tiny-dcformer++" / "checkpoint-8"
    deadline = time.time() + 300
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.05)  # just after step 8: mid-step, mid-eval or mid-save
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "tiny-dcformer++" / "final").exists(), "the run finished before it could be killed"
    resumed = headmix(*train_args(corpus_slice, out, cache, *common), cache=cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "tiny-dcformer++: resuming from" in resumed.stdout and "checkpoint-" in resumed.stdout
    assert not (out / "tiny-dcformer++" / ".staging").exists()  # no empty staging folder left behind

    a = json.loads((tmp_path / "straight" / "tiny-dcformer++" / "final" / "result.json").read_text())
    b = json.loads((out / "tiny-dcformer++" / "final" / "result.json").read_text())
    assert a["validation_loss"] == b["validation_loss"]  # bitwise on the CPU
    from safetensors.torch import load_file

    wa = load_file(tmp_path / "straight" / "tiny-dcformer++" / "final" / "model.safetensors")
    wb = load_file(out / "tiny-dcformer++" / "final" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_deterministic_runs_under_torch_deterministic_mode(tmp_path, monkeypatch):
    """``deterministic=true`` (on the command line: a string) reaches transformers' ``full_determinism``, under which
    the Trainer switches on ``torch.use_deterministic_algorithms`` (what the DCMHA kernels read); a run may resume
    with it changed (it does not change what is computed)."""
    from headmix.training.engine import NON_DEFINING, training_arguments

    config = load_config(None, ["deterministic=true", f"output_dir={tmp_path}"])
    assert config.deterministic is True and "deterministic" in NON_DEFINING
    args = training_arguments(config, tmp_path)
    assert args.full_determinism is True
    assert training_arguments(TrainConfig(output_dir=str(tmp_path)), tmp_path).full_determinism is False
    from transformers.trainer_utils import enable_full_determinism

    for name in ("CUBLAS_WORKSPACE_CONFIG", "CUDA_LAUNCH_BLOCKING", "ASCEND_LAUNCH_BLOCKING", "HCCL_DETERMINISTIC",
                 "FLASH_ATTENTION_DETERMINISTIC"):
        monkeypatch.delenv(name, raising=False)  # what it sets is restored after the test, as is the torch flag
    before = torch.are_deterministic_algorithms_enabled()
    try:
        enable_full_determinism(args.seed)  # what Trainer.__init__ calls when full_determinism is set
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before)
        torch.backends.cudnn.deterministic = False


def test_changed_settings_in_a_used_output_dir_are_refused_not_reused(corpus_slice, tmp_path, capsys):
    """A 2-step run, then 3 steps into the same directory: that used to reuse the 2-step model and write a
    table saying "3 steps". Now it stops naming the field; the same settings reuse; overwrite=true retrains."""
    from headmix.cli import main

    out, cache = tmp_path / "run", tmp_path / "cache"
    common = [*train_args(corpus_slice, out, cache, "models=[tiny-transformer++]", "save_every=2", "eval_every=2",
                          "max_validation_sequences=2")][1:]
    assert main(["train", *common, "max_steps=2"]) == 0
    table = (out / "results.md").read_text()
    assert "2 steps" in table and not (out / "tiny-transformer++" / ".staging").exists()
    capsys.readouterr()
    assert main(["train", *common, "max_steps=3"]) == 2
    err = capsys.readouterr().err
    assert "max_steps=2 there, 3 now" in err and "output_dir" in err and "overwrite=true" in err
    assert (out / "results.md").read_text() == table
    assert main(["train", *common, "max_steps=2", "keep_last=3"]) == 0  # same run: reused, not retrained
    assert "reusing the finished model" in capsys.readouterr().out
    assert main(["train", *common, "max_steps=3", "overwrite=true"]) == 0
    assert "3 steps" in (out / "results.md").read_text()
    stored = json.loads((out / "tiny-transformer++" / "final" / "result.json").read_text())
    assert stored["tokens"] == 3 * 4 * 64


def test_output_dir_without_recorded_settings_is_refused(tmp_path):
    from headmix.training.engine import claim_output_dir

    (tmp_path / "tiny-dcformer++" / "final").mkdir(parents=True)
    config = TrainConfig(output_dir=str(tmp_path), models=["tiny-dcformer++"])
    with pytest.raises(ValueError, match=r"settings were not recorded.*overwrite=true"):
        claim_output_dir("tiny-dcformer++", config)
    claim_output_dir("tiny-dcformer++", TrainConfig(output_dir=str(tmp_path), overwrite=True))
    assert sorted(p.name for p in (tmp_path / "tiny-dcformer++").iterdir()) == ["run.json"]


@pytest.mark.slow
def test_ddp_two_processes_match_gradient_accumulation(corpus_slice, tmp_path):
    """torchrun, 2 CPU processes (gloo) vs 1 process with grad_accum=2: the same sequences per step.

    Tolerance 1e-4 relative on the final validation loss: only the order of gradient sums differs.
    """
    cache = tmp_path / "cache"
    common = ["models=[tiny-transformer++]", "max_steps=8"]
    # the one-process run in this process (a fresh interpreter costs ~10 s of imports; the comparison has a tolerance)
    single = run_in_process("headmix", *train_args(corpus_slice, tmp_path / "single", cache, *common, "grad_accum=2"))
    assert single.returncode == 0, single.stderr[-3000:]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", "-m",
         "headmix.cli", *train_args(corpus_slice, tmp_path / "ddp", cache, *common)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a = json.loads((tmp_path / "single" / "tiny-transformer++" / "final" / "result.json").read_text())
    b = json.loads((tmp_path / "ddp" / "tiny-transformer++" / "final" / "result.json").read_text())
    assert a["tokens"] == b["tokens"]
    assert abs(a["validation_loss"] - b["validation_loss"]) <= 1e-4 * a["validation_loss"]


def test_non_finite_loss_stops_with_the_step_and_saves_last_good_state(corpus_slice, tmp_path, monkeypatch):
    from headmix.models import DCFormerForCausalLM
    from headmix.training import engine

    config = load_config(None, [f"data=[{corpus_slice}]", f"output_dir={tmp_path}", f"cache_dir={tmp_path / 'c'}",
                                "models=[tiny-transformer++]", "max_steps=10", *SMALL])
    data = prepare_data(config)
    original = DCFormerForCausalLM.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 3:  # the third optimizer step
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(DCFormerForCausalLM, "forward", forward)
    with pytest.raises(engine.TrainingDiverged, match=r"loss is nan at step 3: .*\(after step 2\)"):
        engine.train_one("tiny-transformer++", config, data)
    saved = engine.checkpoints(tmp_path / "tiny-transformer++")
    assert [p.name for p in saved][-1] == "checkpoint-2"
    assert (saved[-1] / "model.safetensors").is_file() and (saved[-1] / "optimizer.pt").is_file()


def test_streaming_pipeline_yields_packed_sequences(corpus_slice, tmp_path):
    config = load_config(None, [f"data=[{corpus_slice}]", f"cache_dir={tmp_path}", "streaming=true", *SMALL])
    data = prepare_data(config)
    first = next(iter(data.train))
    assert first["input_ids"].shape == (64,)
    assert len(data.validation) == 8


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda d: [str(d / "missing.txt")], r"data path .*missing.txt does not exist"),
        (lambda d: [str(_write(d / "empty.txt", b""))], r"data file .*empty.txt is empty"),
        (lambda d: [str(_write(d / "bad.txt", b"hello \xff\xfe world"))], r"data file .*bad.txt is not UTF-8 text: undecodable byte at offset 6"),
        (lambda d: [str(_write(d / "x.csv", b"a,b"))], r"data file .*x.csv has suffix '.csv'"),
    ],
)
def test_bad_data_is_named(tmp_path, make, message):
    result = run_in_process("headmix", "train", f"data={make(tmp_path)}", f"cache_dir={tmp_path / 'c'}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert __import__("re").search(message, result.stderr), result.stderr


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_sequence_length_the_model_cannot_take(corpus_slice, tmp_path):
    result = run_in_process("headmix", "train", f"data=[{corpus_slice}]", f"cache_dir={tmp_path}", "seq_len=4096",
                            "num_proc=1")
    assert result.returncode == 2
    assert "seq_len=4096 is longer than model 'tiny-dcformer++' takes (max_position_embeddings=512)" in result.stderr


@pytest.mark.parametrize("text,value", [("1e-4", 1e-4), ("3e-4", 3e-4), ("0.001", 1e-3), ("2", 2.0), ("1E-3", 1e-3)])
def test_learning_rate_in_any_number_format(text, value, tmp_path):
    # YAML reads `1e-4` (no dot) as a string: it crashed validation with a TypeError
    assert load_config(None, [f"learning_rate={text}"]).learning_rate == value
    (tmp_path / "c.yaml").write_text(f"learning_rate: {text}\nmax_steps: 1e2\n")
    loaded = load_config(tmp_path / "c.yaml")
    assert loaded.learning_rate == value and loaded.max_steps == 100 and isinstance(loaded.max_steps, int)
    assert TrainConfig(learning_rate=text).learning_rate == value


def test_non_numbers_for_numeric_fields_are_named():
    with pytest.raises(ValueError, match=r"learning_rate='fast' is not allowed: expected a number"):
        load_config(None, ["learning_rate=fast"])
    with pytest.raises(ValueError, match=r"max_steps=2.5 is not allowed: expected an integer"):
        load_config(None, ["max_steps=2.5"])
    with pytest.raises(ValueError, match=r"compile='yes please' is not allowed: expected true or false"):
        load_config(None, ["compile=yes please"])


def test_config_errors():
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['max_step'\]"):
        load_config(None, ["max_step=3"])
    with pytest.raises(ValueError, match=r"override 'max_steps' is not allowed: expected field=value"):
        load_config(None, ["max_steps"])
    with pytest.raises(ValueError, match=r"models='gpt-5' is not allowed"):
        load_config(None, ["models=gpt-5"])
    with pytest.raises(ValueError, match=r"precision='fp8' is not allowed"):
        TrainConfig(precision="fp8")


def test_show_config_and_yaml(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("max_steps: 7\nmodels: tiny-pythia\n")
    result = run_in_process("headmix", "train", "--config", str(file), "seq_len=32", "--show-config")
    assert result.returncode == 0, result.stderr
    assert "max_steps: 7" in result.stdout and "- tiny-pythia" in result.stdout and "seq_len: 32" in result.stdout


def test_fsdp2_on_cpu_is_refused_not_silently_replaced(corpus_slice, tmp_path, monkeypatch):
    """accelerate (under Trainer) applies FSDP only on accelerators (its MULTI_CPU mode is excluded), so
    FSDP2 cannot train on the CPU here; headmix says so instead of falling back to DDP unannounced.
    In this process with torchrun's environment for rank 0 of 2 (the refusal comes before any process group;
    a real torchrun launch cost 16 s of CI for it; test_ddp_two_processes_match_gradient_accumulation keeps one).
    FSDP2 itself is exercised on GPUs by test_fsdp2_trains_on_two_gpus."""
    for name, value in dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2").items():
        monkeypatch.setenv(name, value)
    result = run_in_process("headmix", *train_args(corpus_slice, tmp_path / "fsdp", tmp_path / "cache",
                                                   "distributed=fsdp2"))
    assert result.returncode != 0
    assert "distributed='fsdp2' needs CUDA devices" in result.stderr


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP2 through Trainer needs 2 CUDA devices")
def test_fsdp2_trains_on_two_gpus(corpus_slice, tmp_path):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29521", "-m",
         "headmix.cli", *train_args(corpus_slice, tmp_path / "fsdp", tmp_path / "cache", "distributed=fsdp2",
                                    "models=[tiny-dcformer++]", "max_steps=8")],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    stored = json.loads((tmp_path / "fsdp" / "tiny-dcformer++" / "final" / "result.json").read_text())
    assert stored["validation_loss"] < 6.2


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml")))
def test_shipped_configs_load(path):
    assert load_config(path).models


def test_loading_local_files_shows_no_download_bar(corpus_slice, tmp_path, capsys):
    import datasets

    from headmix.training.data import load_documents, resolve_data_files

    fmt, files = resolve_data_files([str(corpus_slice)])
    load_documents(fmt, files, cache_dir=tmp_path)
    captured = capsys.readouterr()
    assert "Downloading data" not in captured.err + captured.out
    assert not datasets.utils.are_progress_bars_disabled()  # the other bars are left on
