"""The package's shape, from its import graph (grimp, import-linter's graph library).

The layers themselves are import-linter's contract in pyproject.toml (`lint-imports`, run by
scripts/test.sh). These tests add what a layers contract does not check: no import cycle
between vnpd's modules, no module over MAX_LINES lines (the guide is about 400), and no chain
of module imports longer than MAX_CHAIN modules (e.g. cli -> daemon.app -> ... -> compute).
Imports inside functions count: they run too, only later. Imports under
``if TYPE_CHECKING:`` never run, so they count for cycles (a cycle of annotations is still a
tangle) but not for the chain of imports that loading a module sets off.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import grimp
import pytest

PACKAGE = "vnpd"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
MAX_LINES = 450
GUIDE_LINES = 400
MAX_CHAIN = 8


def _imports(exclude_type_checking: bool) -> dict[str, set[str]]:
    """module -> the vnpd modules it imports directly."""
    g = grimp.build_graph(PACKAGE, cache_dir=None,
                          exclude_type_checking_imports=exclude_type_checking)
    return {m: set(g.find_modules_directly_imported_by(m)) for m in g.modules}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    """Every import, annotations-only ones included."""
    return _imports(exclude_type_checking=False)


@pytest.fixture(scope="module")
def runtime_graph() -> dict[str, set[str]]:
    """The imports that run when a module is loaded or its functions are called."""
    return _imports(exclude_type_checking=True)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components of more than one module, or of one that imports itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # the graph is ~50 modules: recursion is fine
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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def longest_chain(graph: dict[str, set[str]]) -> list[str]:
    """The longest path of imports, as the modules along it (the graph must be acyclic)."""
    @functools.cache
    def from_(v: str) -> tuple[str, ...]:
        tails = [from_(w) for w in sorted(graph[v])]
        return (v, *max(tails, key=len, default=()))

    return list(max((from_(v) for v in sorted(graph)), key=len))


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    cycles = strongly_connected(graph)
    assert not cycles, "modules that import each other, directly or through others: " + \
        "; ".join(" <-> ".join(c) for c in cycles)


def test_no_module_is_too_long() -> None:
    lengths = {str(p.relative_to(ROOT.parent)): len(p.read_text().splitlines())
               for p in sorted(ROOT.rglob("*.py"))}
    over_guide = {p: n for p, n in lengths.items() if GUIDE_LINES < n <= MAX_LINES}
    if over_guide:
        warnings.warn(f"modules over the ~{GUIDE_LINES}-line guide: {over_guide}", stacklevel=1)
    too_long = {p: n for p, n in lengths.items() if n > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"


def test_longest_import_chain(runtime_graph: dict[str, set[str]]) -> None:
    if strongly_connected(runtime_graph):
        pytest.skip("the graph has cycles (test_no_import_cycles): no longest chain")
    chain = longest_chain(runtime_graph)
    assert len(chain) <= MAX_CHAIN, (f"a chain of {len(chain)} module imports, over "
                                     f"{MAX_CHAIN}: " + " -> ".join(chain))
