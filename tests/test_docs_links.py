"""The README and the docs/ pages point at what exists: every relative markdown link resolves to a
file or folder of the repository (and its ``#anchor`` to a heading of the page it names), and every
repository path written in backticks (``geocap/...``, ``kernels/...``, ...) exists."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))
LINK = re.compile(r"\]\(([^)\s]+)\)")
REPO_PATH = re.compile(r"`((?:geocap|kernels|analysis|bench|tests|docs|\.ci)/[\w./-]*)`")


def anchors(page: Path) -> set:
    """GitHub's anchors of a markdown page's headings: lower case, punctuation but '-' dropped,
    spaces as '-'."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(encoding="utf-8"), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def broken_links(page: Path) -> list:
    """``page``'s relative links whose file, or whose anchor in that file, does not exist."""
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):            # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in anchors(file)):
            broken.append(target)
    return broken


def test_docs_pages_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    assert {"README.md", "docs/README.md", "docs/study.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_docs_links_resolve(page):
    assert broken_links(page) == [], f"{page.relative_to(ROOT)}: broken links"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_docs_repository_paths_exist(page):
    missing = [p for p in REPO_PATH.findall(page.read_text(encoding="utf-8")) if not (ROOT / p).exists()]
    assert missing == [], f"{page.relative_to(ROOT)}: paths that do not exist"


def test_a_broken_link_or_anchor_is_caught(tmp_path):
    (tmp_path / "there.md").write_text("# A heading, with punctuation\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md) [ok](there.md#a-heading-with-punctuation) [web](https://example.org)\n"
                    "[gone](missing.md) [bad anchor](there.md#no-such-heading)\n", encoding="utf-8")
    assert broken_links(page) == ["missing.md", "there.md#no-such-heading"]
