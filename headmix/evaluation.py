"""Validation loss and perplexity of a saved model on any text files."""

from __future__ import annotations

import math
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
