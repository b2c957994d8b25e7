"""The command line, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys

from helpers import run_in_process


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "headmix.cli", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_subcommands():
    result = run("--help")
    assert result.returncode == 0 and "demo" in result.stdout


def test_demo_runs_and_shows_equivalence():
    result = run_in_process("headmix", "demo", "--dim", "64", "--heads", "4", "--seq", "40", "--batch", "1")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0] + " " + line.split()[1]: line.split() for line in result.stdout.splitlines()[2:8]}
    assert float(rows["DCMHA (chunked)"][-2]) <= 1e-6
    assert float(rows["CollaborativeAttention (exact)"][-2]) <= 1e-6


def test_demo_bad_argument_gives_clear_error():
    result = run_in_process("headmix", "demo", "--dim", "50", "--heads", "4")
    assert result.returncode == 2
    assert "dim=50 must be divisible by num_heads=4" in result.stderr and "Traceback" not in result.stderr


# -- a tiny saved model, for generate --------------------------------------------------------------
import pytest  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from headmix.models import DCFormerConfig, DCFormerForCausalLM
    from headmix.training.data import train_tokenizer

    lines = ["ROMEO: But soft, what light through yonder window breaks?", "JULIET: O Romeo, Romeo!"] * 20
    tokenizer = train_tokenizer(iter(lines), vocab_size=300)
    config = DCFormerConfig.from_preset("tiny-dcformer++", vocab_size=len(tokenizer), num_hidden_layers=1,
                                        hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                        max_position_embeddings=64)
    out = tmp_path_factory.mktemp("tiny") / "model"
    DCFormerForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(*args: str) -> int:
    from headmix.cli import main as cli_main

    return cli_main(list(args))


def test_generate_samples_as_the_readme_shows(tiny_model_dir, capsys):
    # the README's sampling line crashed: do_sample was passed twice to generate()
    assert main("generate", str(tiny_model_dir), "--prompt", "ROMEO:", "--max-new-tokens", "8") == 0
    assert capsys.readouterr().out.startswith("ROMEO:")
    assert main("generate", str(tiny_model_dir), "--prompt", "ROMEO:", "--max-new-tokens", "8", "--greedy") == 0


def test_generate_past_the_model_positions_is_refused_before_generating(tiny_model_dir, capsys):
    assert main("generate", str(tiny_model_dir), "--prompt", "ROMEO:", "--max-new-tokens", "100") == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing was generated
    assert "--max-new-tokens=100" in captured.err and "takes at most 64" in captured.err
    assert main("generate", str(tiny_model_dir), "--prompt", "ROMEO:", "--temperature", "0") == 2
    assert "--temperature=0.0 is not allowed" in capsys.readouterr().err


def test_train_option_style_gets_a_field_value_hint(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main("train", "--max-steps", "10")
    assert exit_info.value.code == 2
    assert "`headmix train max_steps=10`" in capsys.readouterr().err


def test_unknown_field_suggests_the_nearest(capsys):
    assert main("train", "max_step=10", "--show-config") == 2
    assert "'max_step': did you mean 'max_steps'?" in capsys.readouterr().err


def test_ctrl_c_during_training_says_what_was_kept_in_one_line(tmp_path, monkeypatch, capsys):
    import headmix.training.run as run

    def interrupted(config):
        (tmp_path / "tiny-dcformer++" / "checkpoint-60").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "run_training", interrupted)
    assert main("train", f"output_dir={tmp_path}") == 130
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert f"tiny-dcformer++ at {tmp_path / 'tiny-dcformer++' / 'checkpoint-60'}" in err
    assert "Run the same command to resume" in err


def test_generate_compile_flag_decodes_the_same_text(tiny_model_dir, capsys, monkeypatch):
    """``--compile`` (default on CUDA, off on the CPU) generates with the static cache through generate()'s
    compiled step; the greedy text equals the eager dynamic-cache text. The compile backend is swapped for
    dynamo's "eager" one (the captured graph run as is: inductor would take minutes on the CI machine)."""
    import transformers

    real = transformers.CompileConfig

    def cheap(*args, **kwargs):
        config = real(backend="eager", fullgraph=True)
        config._compile_all_devices = True
        return config

    monkeypatch.setattr(transformers, "CompileConfig", cheap)
    seen = {}
    from headmix.models import DCFormerForCausalLM

    original = DCFormerForCausalLM.generate

    def recording(self, *args, **kwargs):
        seen.update(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DCFormerForCausalLM, "generate", recording)
    common = ("generate", str(tiny_model_dir), "--prompt", "ROMEO:", "--max-new-tokens", "8", "--greedy")
    assert main(*common, "--no-compile") == 0
    eager = capsys.readouterr().out
    assert "cache_implementation" not in seen
    assert main(*common, "--compile") == 0
    assert seen["cache_implementation"] == "static" and seen["compile_config"].fullgraph
    assert capsys.readouterr().out == eager
