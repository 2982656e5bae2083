"""The documentation holds together: every relative link in the README, CHANGELOG, DEVELOPERS.md, docs/ and the
results log points at a file that exists (and, for a `#anchor` into a markdown file, at a heading that exists), and
docs/architecture.svg is what docs/architecture_figure.py draws."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "DEVELOPERS.md", ROOT / "benchmarks" / "RESULTS.md",
               *(ROOT / "docs").glob("*.md")])
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (letters, digits, `-`, `_` and spaces kept),
    spaces to hyphens."""
    text = re.sub(r"`", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)  # no headings inside code blocks
    out: set[str] = set()
    for h in re.findall(r"^#{1,6} (.+)$", text, re.M):
        s, n = slug(h), 1
        while s in out:  # repeated headings get -1, -2, ...
            s, n = f"{slug(h)}-{n}", n + 1
        out.add(s)
    return out


def links(path: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)  # links inside code blocks are code
    text = re.sub(r"`[^`\n]*`", "", text)  # and so are links inside inline code (a link's `text` goes with them)
    return [m.group(1) for m in LINK.finditer(text)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc: Path) -> None:
    assert doc.is_file(), f"{doc} is missing"
    bad = []
    for target in links(doc):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ... are not relative links
            continue
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target} (no heading #{anchor} in {dest.relative_to(ROOT)})")
    assert not bad, f"{doc.relative_to(ROOT)}: links that point nowhere: {bad}"


def test_link_checker_catches_a_dead_link(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# Title\n\n[ok](a.md#title) [gone](b.md) [anchor](a.md#nope) `[code](x.md)`\n")
    found = links(tmp_path / "a.md")
    assert found == ["a.md#title", "b.md", "a.md#nope"]
    assert anchors(tmp_path / "a.md") == {"title"}
    assert slug("2026-11-30 · CPU threads, and `memkit plan`") == "2026-11-30--cpu-threads-and-memkit-plan"


def _figure_module():  # docs/ is not a package: load the script by path
    spec = importlib.util.spec_from_file_location("architecture_figure", ROOT / "docs" / "architecture_figure.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_architecture_figure_is_what_its_script_draws(tmp_path: Path) -> None:
    """Redraw the picture; the committed SVG has the same labels (byte for byte when the matplotlib that drew it is
    the one installed). `make docs` rewrites it."""
    pytest.importorskip("matplotlib")
    import matplotlib

    fig = _figure_module()
    fresh = fig.draw(tmp_path / "architecture.svg").read_text()
    committed = (ROOT / "docs" / "architecture.svg").read_text()
    labels = fig.labels(fresh)
    assert "MemoryBank" in labels and "K/V store" in labels and len(labels) > 30
    assert fig.labels(committed) == labels, "docs/architecture.svg is stale: run `make docs`"
    if f"Matplotlib v{matplotlib.__version__}" in committed:
        assert committed == fresh, "docs/architecture.svg is stale: run `make docs`"
    assert "architecture.svg" in (ROOT / "README.md").read_text()
    assert "architecture.svg" in (ROOT / "docs" / "architecture.md").read_text()


def test_version_is_the_changelogs_latest_release() -> None:
    """pyproject's version, memkit.__version__ and the newest numbered CHANGELOG entry agree; [Unreleased] is on
    top."""
    import memkit

    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)  # type: ignore[union-attr]
    releases = re.findall(r"^## \[([^\]]+)\]", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert releases[0] == "Unreleased"
    assert releases[1] == version == memkit.__version__
