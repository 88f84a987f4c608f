"""Every pointer into the repository's own `docs/` resolves (issue 14, "every pointer resolves").

Comments, docstrings, the README and the notebooks cite facts as `docs/<page>.md#<anchor>`; the docs pages
link to each other as `(<page>.md#<anchor>)`. Each cited page must exist and each anchor must be the
GitHub slug of one of its headings. No file may point at a fact document that is not in the repository.
"""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
SKIP_DIRS = {"__pycache__", "build", "dist", "node_modules"}
POINTER = re.compile(r"docs/([\w.-]+\.md)(?:#([\w-]+))?")
DOCS_LINK = re.compile(r"\]\(([\w.-]+\.md)?(?:#([\w-]+))?\)")
OUTSIDE = re.compile(r"spec\s*§|\.\./(?:shared)/|/work/(?:shared)|(?<![\w/.-])(?:shared)/|\banchors\.md|research/\w+\.md", re.I)


def repository_files():
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS
                       and not d.endswith(".egg-info")]
        for name in filenames:
            if name.endswith((".py", ".md", ".ipynb")):
                yield os.path.join(dirpath, name)


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page):
    """The anchors of a docs page's headings (outside code fences), duplicates numbered as GitHub does."""
    seen, fenced = {}, False
    with open(os.path.join(DOCS, page), encoding="utf-8") as f:
        for line in f:
            if line.startswith("```"):
                fenced = not fenced
            elif not fenced and re.match(r"#{1,6} ", line):
                s = slug(line.lstrip("#"))
                seen[s if s not in seen else f"{s}-{seen[s]}"] = 0
                seen[s] = seen.get(s, 0) + 1
    return set(seen)


def cited():
    """(file, page, anchor or None) for every docs pointer in the repository."""
    out = []
    for path in repository_files():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        rel = os.path.relpath(path, ROOT)
        out += [(rel, page, anchor) for page, anchor in POINTER.findall(text)]
        if os.path.dirname(path) == DOCS:
            own = os.path.basename(path)
            out += [(rel, page or own, anchor) for page, anchor in DOCS_LINK.findall(text) if page or anchor]
    return [(rel, page, anchor or None) for rel, page, anchor in out]


def test_the_code_cites_the_docs_pages():
    assert len({page for _, page, _ in cited()}) >= 5


@pytest.mark.parametrize("rel, page, anchor", cited())
def test_docs_pointer_resolves_to_a_page_and_heading(rel, page, anchor):
    assert os.path.isfile(os.path.join(DOCS, page)), f"{rel} cites docs/{page}, which does not exist"
    if anchor is not None:
        assert anchor in anchors(page), f"{rel} cites docs/{page}#{anchor}: no heading has that anchor"


def test_no_file_points_at_a_fact_document_outside_the_repository():
    offenders = []
    for path in repository_files():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for m in OUTSIDE.finditer(text):  # on the whole text: a pointer may be split over two lines
            number = text.count("\n", 0, m.start()) + 1
            offenders.append(f"{os.path.relpath(path, ROOT)}:{number}: {m.group(0)!r}")
    assert not offenders, "pointers that do not resolve in a clone:\n" + "\n".join(offenders)
