"""The main job: train each configured model on the same tokens, then a table and a plot.

``headmix train`` with no arguments runs this on the embedded default (a tiny DCFormer++ and a
tiny Transformer++ on Shakespeare's plays).
"""

from __future__ import annotations

import datetime
import platform
from pathlib import Path

import torch

from .config import TrainConfig
from .data import prepare_data
from .engine import (METRICS, ModelResult, claim_output_dir, model_config, read_metrics, train_one,
                     training_arguments)

PLOT = "validation_loss.png"
TABLE = "results.md"


def run_training(config: TrainConfig) -> list[ModelResult]:
    """Prepare the data once, train every model of ``config.models`` on it, write the table and plot."""
    from accelerate import PartialState

    for name in config.models:  # fail on a bad model or run setting before any data work
        model_config(name, config)
    training_arguments(config, Path(config.output_dir))
    state = PartialState()
    with state.main_process_first():  # rank 0 trains the tokenizer, tokenises and claims the directories
        data = prepare_data(config)  # bad data fails first, before anything is written
        for name in config.models:
            claim_output_dir(name, config, write=state.is_main_process)
    if state.is_main_process:
        print(f"data: {data.description}; {len(data.validation)} validation sequences of {config.seq_len} tokens; "
              f"vocabulary {len(data.tokenizer)}")
    results = [train_one(name, config, data) for name in config.models]
    if state.is_main_process:
        table = results_table(results, config)
        output = Path(config.output_dir)
        (output / TABLE).write_text(table + "\n")
        plot_validation_curves(results, output / PLOT)
        print("\n" + table)
        print(f"\nplot: {output / PLOT}\ntable: {output / TABLE}")
    return results


def results_table(results: list[ModelResult], config: TrainConfig) -> str:
    """A markdown table with the device, date and versions it was measured with."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    lines = [
        f"Measured {datetime.date.today().isoformat()} on {device}, torch {torch.__version__}; "
        f"{config.max_steps} steps x {config.batch_size * config.grad_accum} sequences x {config.seq_len} tokens each.",
        "",
        "| model | parameters | validation loss | perplexity | tokens/s (training) | processes | tokens/s per process | peak GPU memory |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        memory = f"{r.peak_memory_gib:.1f} GiB" if r.peak_memory_gib is not None else "-"
        lines.append(f"| {r.name} | {r.parameters / 1e6:.2f}M | {r.validation_loss:.4f} | {r.perplexity:.2f} | "
                     f"{r.tokens_per_second:,.0f} | {r.world_size} | {r.tokens_per_second / r.world_size:,.0f} | {memory} |")
    return "\n".join(lines)


def plot_validation_curves(results: list[ModelResult], path: Path) -> None:
    """Validation loss against tokens seen, one line per model (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        rows = [row for row in read_metrics(r.output_dir / METRICS) if row.get("eval_loss")]
        points = sorted({int(row["tokens"]): float(row["eval_loss"]) for row in rows}.items())
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{r.name} ({r.parameters / 1e6:.1f}M)")
    ax.set_xlabel("training tokens seen")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
