"""The package's layout, as a reader relies on it: no import cycles, and inference imports only inference."""
import ast
import os
import subprocess
import sys

import nanopali

ROOT = os.path.dirname(nanopali.__file__)


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports when it is imported (module-level statements only:
    an import inside a function runs on use and cannot form an import-time cycle)."""
    modules = {}
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                modules[_module_name(os.path.join(folder, f))] = os.path.join(folder, f)
    graph = {}
    for name, path in modules.items():
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        deps = set()
        for node in ast.parse(open(path).read()).body:
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
                candidates = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            deps |= {c for c in candidates if c in modules and c != name}
        graph[name] = deps
    return graph


def test_the_package_has_no_import_cycles():
    graph = _import_graph()
    assert len(graph) > 30
    state, cycles = {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(" → ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    # A package's __init__ importing its own submodules is not a cycle unless a submodule imports it back.
    assert cycles == []


def test_inference_imports_nothing_from_the_extras():
    """import nanopali + load + generate on a PaliGemma checkpoint touch only the paper's files and formats/."""
    code = (
        "import sys, os, nanopali\n"
        "d = os.path.join(os.path.dirname(nanopali.__file__), 'assets')\n"
        "m, p = nanopali.load(os.path.join(d, 'tiny-shapes'))\n"
        "print(nanopali.generate(m, p, [os.path.join(d, 'images', 'shapes_1.png')], ['count shapes'])[0])\n"
        "print(' '.join(sorted(k for k in sys.modules if k.startswith('nanopali'))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "3"
    loaded = out[1].split()
    extras = [m for m in loaded if m.split(".")[1:2] and m.split(".")[1] in
              ("siglip", "train", "shapes", "tasks", "kernels", "quant")]
    assert extras == [] and "nanopali.formats.bigvision" not in loaded, loaded

