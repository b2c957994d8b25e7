"""Cross-references into the docs resolve: where code or a page names a section of a page in ``docs/`` by its title
(``docs/kernels_log.md, "Third pass"``, ``[results.md](results.md), "Generation"``), that page has a heading or a bold
paragraph lead starting with those words. Measurements are cited this way throughout the code's comments, so a section
renamed or moved to another page would otherwise leave the citation pointing nowhere."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# a page's name (bare, with docs/, or as a Markdown link, in backticks or not), then within a few characters (a comma,
# a parenthesis, a line break with a comment's "#"; not a quote: the page's name closing a string literal) a quoted
# title
REFERENCE = re.compile(r"([A-Za-z_]+\.md)(?:`{0,2}|\]\([A-Za-z_]+\.md\))(?=[,() \t\n])"
                       r"\)?,?[ \t]*(?:\n[ \t]*#?[ \t]*)?\(?\"([^\"]{3,90})\"")


def sections(page: Path) -> list[str]:
    """The titles of a page: its headings and its paragraphs' bold leads."""
    text = page.read_text()
    return ([re.sub(r"^#+\s*", "", line).strip() for line in text.splitlines() if line.startswith("#")]
            + re.findall(r"^\*\*([^*]+)", text, flags=re.M))


def references() -> list[tuple[str, int, str, str]]:
    """``(file, line, page, title)`` of every section reference in the repository's Python and Markdown files."""
    found = []
    files = [*ROOT.glob("*.md"), *DOCS.glob("*.md"), *(p for d in ("headmix", "benchmarks", "tests")
                                                        for p in (ROOT / d).rglob("*.py"))]
    for path in files:
        text = path.read_text()
        for match in REFERENCE.finditer(text):
            page, title = match.groups()
            if (DOCS / page).is_file():
                title = " ".join(re.sub(r"\s*#\s*", " ", title).split())
                found.append((str(path.relative_to(ROOT)), text.count("\n", 0, match.start()) + 1, page, title))
    return found


def test_section_references_name_sections_that_exist():
    refs = references()
    assert len(refs) > 40  # the pattern still finds the citations (48 when this test was written)
    titles = {}
    missing = []
    for where, line, page, title in refs:
        known = titles.setdefault(page, sections(DOCS / page))
        if not any(t.startswith(title) for t in known):
            missing.append(f"{where}:{line}: {page} has no section {title!r}")
    assert not missing, "\n".join(missing)


def test_a_reference_to_a_missing_section_is_caught(tmp_path):
    """The checker itself: a title no page has is reported, one it has is not."""
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n## Third pass (2026-12-01)\n\n**A bold lead.** text\n")
    known = sections(page)
    assert any(t.startswith("Third pass") for t in known) and any(t.startswith("A bold lead") for t in known)
    assert not any(t.startswith("Fourth pass") for t in known)
    text = 'see docs/page.md, "Third pass" and [page.md](page.md), "A bold lead", and ``docs/page.md``,\n# "Fourth'
    assert [m.group(2) for m in REFERENCE.finditer(text + ' pass"')] == ["Third pass", "A bold lead", "Fourth pass"]
