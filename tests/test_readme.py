"""The README's own command lines, run: every line of its ``bash`` blocks.

Set-up lines (``pip install``) and the test command are what ``.ci/run`` executes, so they are not
repeated here. The main job (``headmix train`` with no arguments) runs for real but shrunk: a tiny
model, a few steps, on one play; the other ``headmix train`` lines are resolved and validated with
``--show-config`` (they name GPU-sized runs); ``torchrun ... -m headmix.cli`` lines are checked the
same way. Every other ``headmix`` line runs as written, in a folder that holds what the README
assumes (``runs/default`` from the main job, ``more_text/``, ``corpus/``). A README line of a kind
this file does not know fails the test, so new lines cannot go untested.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

from headmix.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"
TINY = [
    "model_overrides={num_hidden_layers: 1, hidden_size: 32, num_attention_heads: 2, intermediate_size: 64}",
    "seq_len=32", "batch_size=2", "vocab_size=300", "max_steps=2", "eval_every=2", "log_every=1", "save_every=2",
    "max_validation_sequences=2", "num_proc=1", "validation_fraction=0.1",
]


def readme_commands() -> list[list[str]]:
    """Each command of the README's bash blocks as argv (continuations joined, comments dropped, ``&&`` split)."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                commands.append(words[:cut])
                words = words[cut + 1:]
    return commands


def as_headmix_argv(words: list[str]) -> tuple[str, list[str]] | None:
    """(how, argv for ``headmix.cli.main``), or None for a line ``.ci/run`` runs; fails on an unknown kind."""
    if words[0] == "pip" or words[:3] == ["python", "-m", "pytest"]:
        return None
    if words[0] == "torchrun":
        assert words[words.index("-m") + 1] == "headmix.cli", words
        return "config", words[words.index("-m") + 2:] + ["--show-config"]
    assert words[0] == "headmix", f"README line {' '.join(words)!r}: teach tests/test_readme.py how to run it"
    argv = words[1:]
    if argv[0] == "train":
        if argv == ["train"]:
            return "run", argv
        return "config", argv if "--show-config" in argv else argv + ["--show-config"]
    if argv[0] == "demo":
        return "run", argv + ["--dim", "32", "--heads", "2", "--seq", "16", "--batch", "1"]
    known = {"eval", "generate", "presets", ("convert", "upcycle")}
    assert argv[0] in known or tuple(argv[:2]) in known, f"README line {' '.join(words)!r}: add it to this test"
    return "run", argv


def test_readme_command_lines_run(tmp_path, monkeypatch, capsys):
    from headmix.training.data import default_corpus

    commands = [c for c in map(as_headmix_argv, readme_commands()) if c]
    assert sum(argv == ["train"] for _, argv in commands) >= 1 and len(commands) >= 10
    play = default_corpus(tmp_path / "cache")[0]
    text = "\n".join(play.read_text(encoding="utf-8").split("\n")[:1500])
    for folder in ("corpus", "more_text", "one_play"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "play.txt").write_text(text, encoding="utf-8")
    shutil.copytree(README.parent / "configs", tmp_path / "configs")  # the README names them from the clone's root
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the main job first: the later lines use what it writes under runs/default
    commands.sort(key=lambda c: c[1] != ["train"])
    for how, argv in commands:
        if argv == ["train"]:
            argv = argv + ["data=[one_play]", f"cache_dir={tmp_path / 'cache'}", *TINY]
        code = main(argv)
        out, err = capsys.readouterr()
        assert code == 0, f"headmix {' '.join(argv)}: exit {code}\n{err[-2000:]}"
        if argv[:1] == ["generate"]:
            assert out.startswith("ROMEO:") and len(out) > len("ROMEO:")
    assert (tmp_path / "runs" / "default" / "results.md").is_file()
    assert (tmp_path / "upcycled" / "config.json").is_file()
    shutil.rmtree(tmp_path / "runs")
