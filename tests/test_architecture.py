"""The import picture of src/hpcstage has no circle, and every long module says why it is long.

The scan reads the source with `ast` (nothing is imported): module-level and function-level imports,
`if TYPE_CHECKING:` blocks, relative and absolute forms. An import hidden in a function still ties the two
modules together (each needs the other to work), so it counts. `from pkg import name` is an edge to
`pkg.name` when that is a module, else to `pkg`. An edge from a module to one of its own ancestor packages
is not counted: Python imports every parent package before the module anyway, so that edge is not a choice
(`from hpcstage import __version__` in a submodule, for instance).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
LONG = 500  # lines
MARKER = re.compile(r"^Why one module of about [0-9,]+ lines:", re.M)  # the paragraph that says why
# Long modules whose docstring does not say why yet: each names who adds it. The test fails when one of them
# no longer needs its place here (shrunk or explained), so the list only shrinks.
PENDING: dict[str, str] = {}


def modules(src: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package's __init__) for every .py under `src`."""
    out = {}
    for path in sorted(src.rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def import_graph(src: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same tree it imports, anywhere in its file."""
    mods = modules(src)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, (path, is_package) in mods.items():
        package = name.split(".") if is_package else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in mods else origin for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in mods:  # `import a.b.c` of a module a.b: the module
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as one circle's path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(_path(graph, sorted(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _path(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A closed walk through the component, from its first module back to it: what the failure names."""
    inside = set(component)
    start = component[0]
    seen = {start: [start]}
    todo = [start]
    while todo:  # breadth first: the shortest way back to `start`
        v = todo.pop(0)
        for w in sorted(graph[v] & inside):
            if w == start:
                return seen[v] + [start]
            if w not in seen:
                seen[w] = seen[v] + [w]
                todo.append(w)
    return component


def test_no_import_circle_in_hpcstage():
    found = circles(import_graph(SRC))
    assert not found, "import circles (move the shared piece to the module that owns it): " + "; ".join(
        " -> ".join(c) for c in found
    )


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize(
    "files, circle",
    [
        # a function-level relative import closes the circle
        (
            {"p/__init__.py": "", "p/a.py": "from p import b\n", "p/b.py": "def f():\n    from . import a\n"},
            ["p.a", "p.b", "p.a"],
        ),
        # an absolute `import x.y` inside TYPE_CHECKING, and a `from x.y import name` (a name, not a module)
        (
            {
                "p/__init__.py": "",
                "p/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import p.sub.c\n",
                "p/sub/__init__.py": "",
                "p/sub/c.py": "from p.a import thing\n",
            },
            ["p.a", "p.sub.c", "p.a"],
        ),
        # three modules round
        (
            {"p/__init__.py": "", "p/a.py": "import p.b\n", "p/b.py": "from .c import x\n", "p/c.py": "from .a import y\n"},
            ["p.a", "p.b", "p.c", "p.a"],
        ),
    ],
)
def test_the_scan_finds_a_circle_however_it_is_imported(tmp_path, files, circle):
    assert circles(import_graph(_write(tmp_path, files))) == [circle]


def test_the_scan_does_not_count_a_submodule_importing_its_own_package(tmp_path):
    root = _write(tmp_path, {"p/__init__.py": "from p import a\n__version__ = '1'\n", "p/a.py": "from p import __version__\n"})
    assert import_graph(root)["p.a"] == set()
    assert circles(import_graph(root)) == []


def _long_modules() -> dict[str, str | None]:
    """Dotted name -> module docstring, for every module over LONG lines."""
    out = {}
    for name, (path, _) in modules(SRC).items():
        text = path.read_text()
        if text.count("\n") > LONG:
            out[name] = ast.get_docstring(ast.parse(text))
    return out


def test_every_long_module_has_a_docstring_that_says_why_it_is_long():
    long = _long_modules()
    assert "hpcstage.hub.engine" in long or "hpcstage.testing.hub" in long  # the check has something to check
    missing = [name for name, doc in long.items() if not doc]
    assert not missing, f"modules over {LONG} lines without a module docstring: {', '.join(missing)}"
    unexplained = [name for name, doc in long.items() if not MARKER.search(doc or "") and name not in PENDING]
    assert not unexplained, (
        f"modules over {LONG} lines whose docstring does not say why (a 'Why one module of about N lines:' paragraph): {', '.join(unexplained)}"
    )


def test_pending_long_modules_are_still_long_and_unexplained():
    """An entry of PENDING that is no longer needed is taken out, so the list only shrinks."""
    long = _long_modules()
    stale = [name for name in PENDING if name not in long or MARKER.search(long[name] or "")]
    assert not stale, f"take these out of PENDING in {__file__}: {', '.join(stale)}"
