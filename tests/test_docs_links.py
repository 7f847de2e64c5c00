"""Every relative link in the README, CONTRIBUTING.md, BENCHMARKS.md and docs/
leads somewhere: to a file or folder that exists and, where it names a
#heading, to a heading of that file.

Headings become anchors by GitHub's rule: lowercase, punctuation dropped
except `-` and `_`, each space a `-`, and `-1`, `-2`, ... added to repeats.
Links inside code (fenced blocks and inline spans) are not links.
"""

import glob
import os
import re

import pytest

from conftest import REPO_ROOT

PAGES = sorted(
    [os.path.join(REPO_ROOT, name) for name in ("README.md", "CONTRIBUTING.md", "BENCHMARKS.md")]
    + glob.glob(os.path.join(REPO_ROOT, "docs", "*.md")))

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)


def _prose_lines(path):
    """The lines of a Markdown file outside fenced code blocks."""
    lines, fenced = [], False
    with open(path, encoding="utf-8") as file:
        for line in file:
            if FENCE.match(line):
                fenced = not fenced
            elif not fenced:
                lines.append(line.rstrip("\n"))
    return lines


def slug(heading):
    """GitHub's anchor for a heading's text (without its repeat suffix)."""
    text = INLINE_CODE.sub(lambda code: code.group(0)[1:-1], heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    """Every anchor the headings of a Markdown file make."""
    made, seen = set(), {}
    for line in _prose_lines(path):
        heading = HEADING.match(line)
        if heading:
            base = slug(heading.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            made.add(base if count == 0 else f"{base}-{count}")
    return made


def relative_links(path):
    """The target of each link in a file's prose that has no scheme (http:,
    mailto:, ...). A link's text may run over two lines."""
    prose = INLINE_CODE.sub("", "\n".join(_prose_lines(path)))
    return [target for target in LINK.findall(prose) if not SCHEME.match(target)]


def broken_links(path):
    """What is wrong with each relative link of a Markdown file, as text."""
    problems = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        linked = (os.path.normpath(os.path.join(os.path.dirname(path), file_part))
                  if file_part else path)
        if not os.path.exists(linked):
            problems.append(f"{target}: no such file")
        elif anchor and (not linked.endswith(".md") or anchor not in anchors(linked)):
            shown = os.path.relpath(linked, REPO_ROOT)
            problems.append(f"{target}: no heading #{anchor} in {shown}")
    return problems


@pytest.mark.parametrize("heading, anchor", [
    ("Defaults by dataset size", "defaults-by-dataset-size"),
    ("`serving_default`", "serving_default"),
    ("Self-training: arm (d)", "self-training-arm-d"),
    ("How the fine-tuning recipe was chosen: an ablation at N=100",
     "how-the-fine-tuning-recipe-was-chosen-an-ablation-at-n100"),
    ("Training from scratch, and seeding one run with another",
     "training-from-scratch-and-seeding-one-run-with-another"),
])
def test_headings_make_githubs_anchors(heading, anchor):
    assert slug(heading) == anchor


def test_a_repeated_heading_gets_a_numbered_anchor(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Notes\n\n## Setup\n\n```bash\n# not a heading\n```\n\n## Setup\n")
    assert anchors(str(page)) == {"notes", "setup", "setup-1"}


def test_a_missing_file_or_heading_is_reported_and_code_is_not_a_link(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[fine](other.md#other-page) [here](#page) [web](https://example.com/x)\n"
        "[over two\nlines](missing-too.md)\n"
        "[gone](missing.md) [no heading](other.md#nothing) [nor here](#nowhere)\n"
        "`[not a link](missing.md)`\n\n```python\nsignatures[\"x\"](images=y)\n```\n")
    assert broken_links(str(page)) == [
        "missing-too.md: no such file",
        "missing.md: no such file",
        "other.md#nothing: no heading #nothing in " + os.path.relpath(
            str(tmp_path / "other.md"), REPO_ROOT),
        "#nowhere: no heading #nowhere in " + os.path.relpath(str(page), REPO_ROOT),
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: os.path.relpath(page, REPO_ROOT))
def test_every_relative_link_resolves(page):
    assert relative_links(page), "no relative links found: is the link pattern still right?"
    problems = broken_links(page)
    assert not problems, "broken links:\n" + "\n".join(problems)
