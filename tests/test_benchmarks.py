"""Benchmark scripts run end to end at tiny sizes on the CPU, so they cannot rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_lm_speed_script_prints_both_tables():
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "lm_speed.py"), "--variants", "tiny-transformer++", "tiny-dcformer++:global",
         "--device", "cpu", "--seq", "32", "--train-batch", "2", "--steps", "1", "--warmup", "1", "--prompt", "8",
         "--new-tokens", "4", "--batches", "1"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    train = [line for line in done.stdout.splitlines() if line.startswith("| tiny-") and "%" in line]
    generate = [line for line in done.stdout.splitlines() if line.startswith("| tiny-") and "%" not in line]
    assert len(train) == 2 and len(generate) == 2
    assert all(float(row.split("|")[3].replace(",", "")) > 0 for row in train)  # tokens/s measured


def test_lm_speed_rejects_an_unknown_variant_option():
    done = subprocess.run([sys.executable, str(BENCHMARKS / "lm_speed.py"), "--variants", "tiny-dcformer++:local",
                           "--device", "cpu", "--skip-generate"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "variant option 'local' is not known" in done.stderr
    assert "Traceback" not in done.stderr
