"""The README is the front door: short, the two commands at its top, every doc linked, no broken link."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(path: Path) -> set[str]:
    """GitHub-style anchors of a Markdown file's headings (fenced code skipped)."""
    anchors, fenced = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            title = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower())
            anchors.add(title.replace(" ", "-"))
    return anchors


def test_readme_is_short_with_the_two_commands_at_its_top():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250
    top = "\n".join(lines[:20])
    assert "| set-up + serve the aligned model on the embedded default | `make serve` |" in top
    assert "| set-up + run the tests | `make test` |" in top


def test_readme_links_every_doc():
    text = README.read_text()
    assert DOCS
    for doc in DOCS:
        assert f"](docs/{doc.name})" in text, doc.name


def test_relative_links_resolve():
    broken = []
    for source in [README, *DOCS]:
        for target in LINK.findall(source.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (source.parent / path).resolve() if path else source
            if not dest.is_relative_to(ROOT):
                continue  # outside the repository (the design notes beside it)
            if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in _anchors(dest)):
                broken.append(f"{source.relative_to(ROOT)}: {target}")
    assert not broken, broken
