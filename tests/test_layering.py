"""Imports only go down the layers, and no modules import each other in a circle.

    files, kernels                 (nothing of ours)
    config                         <- files
    batch                          <- config
    parallel                       <- config, kernels          (never the model)
    data                           <- config, batch
    model                          <- config, batch, kernels, parallel
    checkpoint                     <- model, parallel, data (and what they build on)
    train                          <- checkpoint and everything below
    cli, benchmarks                <- anything below (nothing imports them)

Every import counts, lazy ones inside functions included; imports under `if TYPE_CHECKING:`
are annotations, not dependencies, and are skipped.
"""
from __future__ import annotations

import ast
import os
from typing import Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BASE = {"files", "config"}
ALLOWED: dict[str, set[str]] = {
    "files": set(),
    "kernels": set(),
    "config": {"files"},
    "batch": BASE,
    "parallel": BASE | {"kernels"},
    "data": BASE | {"batch"},
    "model": BASE | {"batch", "kernels", "parallel"},
    "checkpoint": BASE | {"batch", "kernels", "parallel", "model", "data"},
    "train": BASE | {"batch", "kernels", "parallel", "model", "data", "checkpoint"},
    "cli": BASE | {"batch", "kernels", "parallel", "model", "data", "checkpoint", "train"},
    "benchmarks": BASE | {"batch", "kernels", "parallel", "model", "data", "checkpoint", "train"},
    "package": set(),  # megatron_style/__init__.py
}


def project_modules(root: str = ROOT) -> dict[str, str]:
    """Module name -> source, for megatron_style/ and kernels/."""
    out = {}
    for top in ("megatron_style", "kernels"):
        for folder, _, files in os.walk(os.path.join(root, top)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(folder, f)
                    name = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                    name = name[:-len(".__init__")] if name.endswith(".__init__") else name
                    with open(path, encoding="utf-8") as fh:
                        out[name] = fh.read()
    return out


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "kernels":
        return "kernels"
    return "package" if len(parts) == 1 else parts[1]


def imports_of(source: str) -> Iterator[tuple[str, int]]:
    """(imported project module, line) for every import, lazy ones included."""
    tree = ast.parse(source)
    annotations_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            annotations_only.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in annotations_only:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            if n.split(".")[0] in ("megatron_style", "kernels"):
                yield n, node.lineno


def upward_imports(modules: dict[str, str]) -> list[str]:
    bad = []
    for m, src in modules.items():
        for target, line in imports_of(src):
            if target not in modules:  # `from pkg import name`: the name is not a module
                continue
            a, b = layer_of(m), layer_of(target)
            if a != b and b not in ALLOWED[a]:
                bad.append(f"{m}:{line} imports {target} ({a} may import only "
                           f"{sorted(ALLOWED[a]) or 'nothing of ours'})")
    return sorted(set(bad))


def cycles(modules: dict[str, str]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    graph = {m: sorted({t for t, _ in imports_of(src) if t in modules and t != m})
             for m, src in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_every_import_goes_down_the_layers():
    modules = project_modules()
    assert {layer_of(m) for m in modules} <= set(ALLOWED), \
        f"a folder without a layer: {sorted({layer_of(m) for m in modules} - set(ALLOWED))}"
    assert upward_imports(modules) == []


def test_no_import_cycles():
    assert cycles(project_modules()) == []


def test_an_upward_import_and_a_cycle_are_caught():
    modules = project_modules()
    # A lazy import, as the ones this test exists to catch usually are.
    modules["megatron_style.data.upward"] = (
        "def f():\n    from megatron_style.model.transformer import MultiwayTransformer\n")
    modules["megatron_style.parallel.uses_model"] = "import megatron_style.model.flops\n"
    modules["megatron_style.data.ring_a"] = "from megatron_style.data import ring_b\n"
    modules["megatron_style.data.ring_b"] = "import megatron_style.data.ring_a\n"
    # Annotations only: not a dependency.
    modules["megatron_style.batch.annotated"] = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        "    from megatron_style.model import MultiwayTransformer\n")
    bad = upward_imports(modules)
    assert [b.split(" ")[0] for b in bad] == ["megatron_style.data.upward:2",
                                              "megatron_style.parallel.uses_model:1"], bad
    assert ["megatron_style.data.ring_a", "megatron_style.data.ring_b"] in cycles(modules)
