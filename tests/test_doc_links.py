"""Every docs page and heading cited in code and docs exists, so a renamed heading breaks the build,
not a reader's trail. Both citation styles are checked: `docs/page.md#anchor` (and relative links
`(page.md#anchor)` inside docs/) and `docs/page.md, "Heading"` in docstrings and comments."""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CODE_SUFFIXES = {".py", ".toml", ".service", ".sh", ".html", ".js", ".conf", ".example", ".md", ""}

ANCHOR_LINK = re.compile(r"(?<![\w/.-])((?:docs/)?[\w-]+\.md)#([\w-]+)")
QUOTED = re.compile(r"docs/([\w-]+\.md),? \"([^\"]+)\"")
FENCE = re.compile(r"^(```|~~~)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@cache
def headings(page: Path) -> tuple[list[str], set[str]]:
    """The page's headings (text) and their anchors, duplicates numbered as GitHub does."""
    texts, anchors, seen = [], set(), {}
    in_fence = False
    for line in page.read_text().splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        if in_fence or not line.startswith("#"):
            continue
        text = line.lstrip("#").strip()
        texts.append(text)
        base = slug(text)
        n = seen.get(base, 0)
        anchors.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return texts, anchors


def tracked_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    files = [ROOT / n for n in names.split()]
    untracked = subprocess.run(
        ["git", "ls-files", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    files += [ROOT / n for n in untracked.split()]
    this = Path(__file__).resolve()
    return [
        f
        for f in files
        if f.is_file() and f.suffix in CODE_SUFFIXES and "vendor" not in f.parts and f != this
    ]


def citations() -> list[tuple[str, Path, str, str | None, str | None]]:
    """(where, page, raw, anchor, quoted heading) for every citation in the tree."""
    found = []
    for path in tracked_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        rel = path.relative_to(ROOT)
        for lineno, line in enumerate(text.splitlines(), 1):
            where = f"{rel}:{lineno}"
            for m in ANCHOR_LINK.finditer(line):
                target, anchor = m.group(1), m.group(2)
                if target.startswith("docs/"):
                    page = ROOT / target
                elif path.parent == DOCS or path == ROOT / "README.md":
                    page = path.parent / target
                else:
                    continue  # a bare name outside docs/ is not a link we can resolve
                found.append((where, page, m.group(0), anchor, None))
            for m in QUOTED.finditer(line):
                found.append((where, DOCS / m.group(1), m.group(0), None, m.group(2)))
    return found


def test_there_are_citations_to_check():
    kinds = {(a is not None, q is not None) for _, _, _, a, q in citations()}
    assert (True, False) in kinds and (False, True) in kinds


def test_every_cited_page_and_heading_exists():
    broken = []
    for where, page, raw, anchor, quoted in citations():
        if not page.is_file():
            broken.append(f"{where}: {raw}: no such page")
            continue
        texts, anchors = headings(page)
        if anchor is not None and anchor not in anchors:
            broken.append(f"{where}: {raw}: no heading with that anchor")
        if quoted is not None and not any(t.lower().startswith(quoted.lower()) for t in texts):
            broken.append(f"{where}: {raw}: no heading starting so")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Failover across accelerators", "failover-across-accelerators"),
        ("MQTT 3.1.1 brokers", "mqtt-311-brokers"),
        ("`edge-agent models`: the repository", "edge-agent-models-the-repository"),
    ],
)
def test_slug_follows_github(heading, anchor):
    assert slug(heading) == anchor


def test_code_map_names_every_module_and_test_file():
    """docs/development.md is where a new maintainer starts: every module and test file is on its map."""
    text = (DOCS / "development.md").read_text()
    missing = []
    for package in ("agent", "backends", "cloud_console", "bench", "tests"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name in ("__init__.py", "__main__.py", "conftest.py") or "samples" in path.parts:
                continue
            rel = str(path.relative_to(ROOT))
            # The name on its own (not inside `tenant_failover.py`), or its path from the root.
            if not re.search(rf"(?<![\w/.]){re.escape(path.name)}", text) and rel not in text:
                missing.append(rel)
    assert not missing, "name these in docs/development.md: " + ", ".join(missing)
