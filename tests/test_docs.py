"""The documentation: every relative link resolves, the README stays the short user's path, and CI runs the README's
test command exactly. Pure text, no imports of dpokit: a broken link or a drifted command fails here in milliseconds.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOC_FILES = [README, REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 250

FENCE = re.compile(r"^\s*(```|~~~)")
# [text](target) and ![alt](target); the target ends at whitespace (a title may follow) or the closing parenthesis.
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks: what GitHub renders as Markdown."""
    out, fenced = [], None
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m:
            if fenced is None:
                fenced = m.group(1)
            elif m.group(1) == fenced:
                fenced = None
            continue
        if fenced is None:
            out.append((number, line))
    return out


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: its text without markup, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"<[^>]+>", "", text)
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w keeps letters, digits and '_' (GitHub keeps underscores)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        slug = github_anchor(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")  # GitHub numbers repeated headings
    return out


def links(path: Path) -> list[tuple[int, str]]:
    out = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        for m in LINK.finditer(INLINE_CODE.sub("", line)):
            out.append((number, m.group(1)))
    return out


def is_external(target: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target))  # http:, https:, mailto:, ...


def test_the_documentation_files_exist():
    assert README.is_file() and (REPO / "CONTRIBUTING.md").is_file()
    assert len(DOC_FILES) > 2, "docs/ holds no pages"


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(doc):
    broken = []
    for number, target in links(doc):
        if is_external(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        where = f"{doc.relative_to(REPO)}:{number}: {target}"
        if not dest.exists():
            broken.append(f"{where} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{where} (no heading gives #{anchor})")
        elif anchor and dest.suffix != ".md":
            broken.append(f"{where} (an anchor into a file that is not Markdown)")
    assert not broken, "broken links:\n" + "\n".join(broken)


@pytest.mark.parametrize("doc", [p for p in DOC_FILES if p.parent == REPO / "docs"], ids=lambda p: p.name)
def test_every_docs_page_links_back_to_the_readme(doc):
    assert any((doc.parent / t.partition("#")[0]).resolve() == README.resolve() for _, t in links(doc)), \
        f"{doc.relative_to(REPO)} does not link back to the README"


def test_the_readme_is_at_most_250_lines():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move detail into docs/ (at most {README_MAX_LINES})"


def fresh_machine_commands() -> list[str]:
    """The bash blocks of the README's "Fresh machine" section, in order."""
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^## Fresh machine.*?$(.*?)^## ", text, re.S | re.M)
    assert section, "README.md has no '## Fresh machine' section"
    return [b.strip() for b in re.findall(r"^```bash\n(.*?)^```", section.group(1), re.S | re.M)]


def test_ci_runs_the_readmes_test_command_exactly():
    demo, tests = fresh_machine_commands()
    assert demo.endswith("&& dpokit demo") and tests.endswith("&& python -m pytest -q")
    # .ci/run spells `pip install` as `python -m pip install -q` (quiet, and the venv's own pip); otherwise each step
    # of the README's command is one of its lines, in the same order, and its last command is the test run itself.
    ci = [line.strip().replace("python -m pip install -q ", "pip install ")
          for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    steps = tests.split(" && ")
    positions = [ci.index(step) if step in ci else -1 for step in steps]
    missing = [step for step, pos in zip(steps, positions) if pos < 0]
    assert not missing, f".ci/run does not run these steps of the README's test command: {missing}"
    assert positions == sorted(positions), ".ci/run runs the README's steps in another order"
    assert ci[-1] == steps[-1], f".ci/run ends with {ci[-1]!r}, not the README's {steps[-1]!r}"
    # The demo command installs dpokit the same way, without the test extras.
    assert demo.split(" && ")[:3] == steps[:3]
