"""Every pointer into the repository's own `docs/` resolves (issue 14, "every pointer resolves").

Comments, docstrings, the README and the notebooks cite facts as `docs/<page>.md#<anchor>`; the docs pages
link to each other as `(<page>.md#<anchor>)`. Each cited page must exist and each anchor must be the
GitHub slug of one of its headings. No file may point at a fact document that is not in the repository.
The README is the front page: every docs page can be reached from it by links, every relative link in it
and in the docs resolves, and its file map's line counts stay near the files' own.
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


def anchors(page, folder=DOCS):
    """The anchors of a page's headings (outside code fences), duplicates numbered as GitHub does."""
    seen, fenced = {}, False
    with open(os.path.join(folder, page), encoding="utf-8") as f:
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


README = os.path.join(ROOT, "README.md")
LINK = re.compile(r"\]\(([^)\s]+)\)|<img src=\"([^\"]+)\"")


def relative_links(path):
    """(target path or None for the page itself, anchor or None) of every relative link in a Markdown file."""
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)   # code blocks hold no links
    out = []
    for a, b in LINK.findall(text):
        link = a or b
        if re.match(r"[a-z]+:", link):
            continue
        target, _, anchor = link.partition("#")
        out.append((os.path.normpath(os.path.join(os.path.dirname(path), target)) if target else path, anchor or None))
    return out


def front_page_and_docs():
    return [README] + sorted(os.path.join(DOCS, p) for p in os.listdir(DOCS) if p.endswith(".md"))


@pytest.mark.parametrize("path", front_page_and_docs(), ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_of_the_readme_and_the_docs_resolves_anchors_included(path):
    bad = []
    for target, anchor in relative_links(path):
        if not os.path.exists(target):
            bad.append(f"{os.path.relpath(target, ROOT)} does not exist")
        elif anchor and target.endswith(".md") and anchor not in anchors(os.path.basename(target),
                                                                          os.path.dirname(target)):
            bad.append(f"{os.path.relpath(target, ROOT)}#{anchor}: no heading has that anchor")
    assert not bad, f"{os.path.relpath(path, ROOT)}:\n" + "\n".join(bad)


def test_every_docs_page_is_reached_from_the_readme_through_links():
    reached, todo = set(), [README]
    while todo:
        page = todo.pop()
        for target, _ in relative_links(page):
            if target.endswith(".md") and os.path.isfile(target) and target not in reached:
                reached.add(target)
                todo.append(target)
    pages = {os.path.join(DOCS, p) for p in os.listdir(DOCS) if p.endswith(".md")}
    assert not pages - reached, "docs pages no link from the README leads to: " + \
        ", ".join(sorted(os.path.relpath(p, ROOT) for p in pages - reached))


def python_lines(path):
    files = [os.path.join(path, f) for f in os.listdir(path) if f.endswith(".py")] if os.path.isdir(path) else [path]
    return sum(sum(1 for _ in open(f, encoding="utf-8")) for f in files)


def file_map():
    """{path: lines stated} from the README's tables whose second column is a line count."""
    stated = {}
    with open(README, encoding="utf-8") as f:
        for name, lines in re.findall(r"^\| `([\w./]+)` \| (\d+) \|", f.read(), flags=re.M):
            inside = os.path.join(ROOT, "nanopali", name.rstrip("/"))
            stated[inside if os.path.exists(inside) else os.path.join(ROOT, name)] = int(lines)
    return stated


def test_the_readme_file_map_lists_every_paper_file_folder_and_script_with_its_size_near_the_truth():
    stated = file_map()
    package = os.path.join(ROOT, "nanopali")
    expected = {os.path.join(package, f) for f in os.listdir(package) if f.endswith(".py") and f != "__init__.py"}
    expected |= {os.path.join(package, d) for d in os.listdir(package)
                 if os.path.isfile(os.path.join(package, d, "__init__.py"))}
    expected |= {os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith(".py") and f != "setup.py"}
    missing = sorted(os.path.relpath(p, ROOT) for p in expected - set(stated))
    gone = sorted(os.path.relpath(p, ROOT) for p in set(stated) if not os.path.exists(p))
    assert not missing and not gone, f"not in the README's file map: {missing}; listed but absent: {gone}"
    # Loose on purpose: code is edited every day; a count more than 20 % (and 15 lines) off is stale.
    stale = {os.path.relpath(p, ROOT): (n, python_lines(p)) for p, n in stated.items()
             if abs(python_lines(p) - n) > max(15, 0.2 * python_lines(p))}
    assert not stale, "README file map line counts to update, {path: (stated, actual)}: " + repr(stale)
