"""The command line, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "headmix.cli", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_subcommands():
    result = run("--help")
    assert result.returncode == 0 and "demo" in result.stdout


def test_demo_runs_and_shows_equivalence():
    result = run("demo", "--dim", "64", "--heads", "4", "--seq", "40", "--batch", "1")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0] + " " + line.split()[1]: line.split() for line in result.stdout.splitlines()[2:8]}
    assert float(rows["DCMHA (chunked)"][-2]) <= 1e-6
    assert float(rows["CollaborativeAttention (exact)"][-2]) <= 1e-6


def test_demo_bad_argument_gives_clear_error():
    result = run("demo", "--dim", "50", "--heads", "4")
    assert result.returncode == 2
    assert "dim=50 must be divisible by num_heads=4" in result.stderr and "Traceback" not in result.stderr
