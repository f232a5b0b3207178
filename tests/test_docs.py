"""The README stays short and every relative link in README.md and docs/ points at something that exists."""

import os
import re

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DOCS = ["README.md"] + sorted(os.path.join("docs", name) for name in os.listdir(os.path.join(ROOT, "docs"))
                              if name.endswith(".md"))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(path: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation other than '-' and '_' dropped, spaces -> '-'."""
    text = open(path, encoding="utf-8").read()
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", text, flags=re.S), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_readme_fits_on_a_few_screens():
    lines = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().count("\n")
    assert lines <= 160, f"README.md has {lines} lines; move detail into docs/"


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_resolve(doc):
    source = os.path.join(ROOT, doc)
    broken = []
    for target in LINK.findall(open(source, encoding="utf-8").read()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s) and other schemes are not checked here
        file_part, _, anchor = target.partition("#")
        path = os.path.normpath(os.path.join(os.path.dirname(source), file_part)) if file_part else source
        if not os.path.exists(path):
            broken.append(target)
        elif anchor and path.endswith(".md") and anchor not in _anchors(path):
            broken.append(target)
    assert not broken, f"{doc}: broken links {broken}"
