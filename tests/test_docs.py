"""The documentation holds together: every relative link in README.md and docs/*.md resolves to a file or folder
of the repository (and an anchor to a heading of the markdown file it names), and README.md stays short."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_LINES = 200

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation but hyphens dropped, spaces as hyphens."""
    text = re.sub(r"[*_`]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """The anchors of a markdown text's headings (outside code blocks)."""
    text = FENCE.sub("", markdown)
    return {anchor(match) for match in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.MULTILINE)}


def broken_links(markdown: str, directory: Path) -> list[str]:
    """The relative links of a markdown text, read from ``directory``, that resolve to nothing: a missing file or
    folder, or an anchor that is no heading of the markdown file it points into. Links inside code are not links;
    links with a scheme (https:, mailto:) are not checked."""
    text = INLINE_CODE.sub("", FENCE.sub("", markdown))
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
            continue
        path, _, fragment = target.partition("#")
        resolved = (directory / path).resolve() if path else None
        if resolved is not None and not resolved.exists():
            broken.append(f"{target}: no such file or folder")
            continue
        if fragment:
            source = markdown if resolved is None else resolved.read_text() if resolved.suffix == ".md" else None
            if source is None:
                broken.append(f"{target}: an anchor into a file that is not markdown")
            elif fragment not in anchors(source):
                broken.append(f"{target}: no heading with the anchor #{fragment}")
    return broken


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_resolves(document):
    assert broken_links(document.read_text(), document.parent) == []


def test_the_documents_are_there_and_link_to_each_other():
    names = {path.name for path in DOCUMENTS}
    assert {"README.md", "results.md", "methods.md", "usage.md"} <= names
    readme = (ROOT / "README.md").read_text()
    assert all(f"(docs/{path.name})" in readme for path in DOCUMENTS if path.parent.name == "docs")


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < README_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_the_check_finds_broken_links_and_skips_code_and_urls(tmp_path):
    (tmp_path / "there.md").write_text("# A title\n\n## Second part: the end\n\ntext\n")
    (tmp_path / "folder").mkdir()
    markdown = """# Here
[ok](there.md) [ok](folder/) [ok](there.md#a-title) [ok](there.md#second-part-the-end) [ok](#here)
[gone](missing.md) [bad anchor](there.md#no-such-part) [bad own anchor](#nowhere)
[anchor into a folder](folder#x) [web](https://example.org/missing.md) ![image](missing.png)
`[in code](missing-in-code.md)`
```
[in a block](missing-in-block.md)
```"""
    assert broken_links(markdown, tmp_path) == [
        "missing.md: no such file or folder",
        "there.md#no-such-part: no heading with the anchor #no-such-part",
        "#nowhere: no heading with the anchor #nowhere",
        "folder#x: an anchor into a file that is not markdown",
    ]


def test_anchor_follows_github():
    assert anchor("What an export holds") == "what-an-export-holds"
    assert anchor("Reliability: bad input, interruptions, and what is never lost") == (
        "reliability-bad-input-interruptions-and-what-is-never-lost")
    assert anchor("Search: one segment or several") == "search-one-segment-or-several"
