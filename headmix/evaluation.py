"""Validation loss and perplexity of a saved model on any text files."""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from .training.config import TrainConfig
from .training.data import collate, load_documents, pack, resolve_data_files


def evaluate_files(
    model_dir: str | Path, files: list[str], seq_len: int = TrainConfig.seq_len, batch_size: int = 8,
    text_field: str = TrainConfig.text_field,
    max_sequences: int | None = None,
) -> dict[str, float]:
    """Mean next-token loss (nats/token) and perplexity of the model in ``model_dir`` on ``files``.

    The text is tokenised with the model directory's tokenizer and packed into ``seq_len``-token
    sequences, as in training.

    Raises:
        ValueError: for a missing model directory, bad data files, or data shorter than ``seq_len``.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"model directory {model_dir} does not exist or has no config.json")
    fmt, paths = resolve_data_files(files)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    if seq_len > model.config.max_position_embeddings:
        raise ValueError(f"seq_len={seq_len} is longer than the model takes "
                         f"(max_position_embeddings={model.config.max_position_embeddings})")
    sequences = pack(load_documents(fmt, paths, text_field), tokenizer, seq_len, num_proc=1, streaming=False)
    if max_sequences is not None:
        sequences = sequences.select(range(min(max_sequences, len(sequences))))
    if len(sequences) == 0:
        raise ValueError(f"the data ({len(paths)} file(s)) holds fewer than seq_len={seq_len} tokens")
    total, count = 0.0, 0
    with torch.no_grad():
        for start in tqdm(range(0, len(sequences), batch_size), desc="evaluating"):
            batch = collate([sequences[i] for i in range(start, min(start + batch_size, len(sequences)))])
            loss = model(**batch).loss
            n = batch["input_ids"].numel() - batch["input_ids"].shape[0]  # predicted tokens
            total += loss.item() * n
            count += n
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count, "sequences": len(sequences)}


@functools.lru_cache(maxsize=8)
def _task_manager(include_path: str | None):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def task_manager(include_path: str | os.PathLike | None = None):
    """lm-eval's ``TaskManager`` over its own tasks and those in ``include_path``, built once per path in a process:
    indexing the harness's task files takes ~15 s (lm-eval 0.4, one CPU), so repeated evaluations reuse it. Task
    files added to ``include_path`` later in the same process are not seen."""
    return _task_manager(None if include_path is None else str(include_path))


def evaluate_tasks(
    model_dir: str | Path, tasks: list[str], *, num_fewshot: int | None = None, batch_size: int = 8,
    limit: float | None = None, include_path: str | None = None, device: str = "cpu",
) -> dict:
    """Score the model in ``model_dir`` on EleutherAI lm-eval harness tasks (``lm_eval.simple_evaluate`` with its
    ordinary ``hf`` model type, after headmix registered its classes: no ``trust_remote_code``).

    Args:
        model_dir: a directory written by ``save_pretrained`` (with its tokenizer).
        tasks: task names as the ``lm_eval`` command line takes them (``--tasks``).
        num_fewshot, batch_size, limit, device: as ``lm_eval``'s options of the same names.
        include_path: a folder of task YAML files of your own (``lm_eval --include_path``).

    Returns:
        lm_eval's result dict (``"results"``, ``"configs"``, ``"versions"``, ...), as ``simple_evaluate`` returns it.

    Raises:
        ValueError: for a missing model directory or an unknown task.
        ImportError: when lm-eval is not installed (``pip install lm-eval``).
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"model directory {model_dir} does not exist or has no config.json")
    try:
        import lm_eval
    except ImportError as error:
        raise ImportError("headmix eval --tasks needs EleutherAI's harness: pip install lm-eval") from error
    import headmix.models  # noqa: F401  (registers the Auto classes, so the "hf" model type loads ours)

    manager = task_manager(include_path)
    unknown = [task for task in tasks if not manager.match_tasks([task])]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {unknown}: see `lm_eval ls tasks`"
                         + ("" if include_path else ", or give your own task files with --include-path"))
    return lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=tasks, num_fewshot=num_fewshot,
        batch_size=batch_size, limit=limit, device=device, task_manager=manager,
    )
