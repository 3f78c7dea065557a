"""The package's layout: its modules' imports go one way (docs/ARCHITECTURE.md)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hpc_kd"


def _imports(path: Path, all_levels: bool) -> set[str]:
    """The hpc_kd modules ``path`` imports: at module level, or anywhere (function-level too)."""
    tree = ast.parse(path.read_text())
    nodes = ast.walk(tree) if all_levels else tree.body
    out = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found = []
    for start in sorted(graph):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph.get(node, ())):
                if nxt == start:
                    found.append(path + [start])
                elif nxt not in path:
                    stack.append((nxt, path + [nxt]))
    return found


def test_no_module_imports_itself_round_a_circle():
    """Not even through a function-level import (issue 17: losses <-> sparse was one)."""
    graph = {p.stem: _imports(p, all_levels=True) - {p.stem} for p in PACKAGE.glob("*.py")}
    assert _cycles(graph) == []


def test_the_leaves_import_nothing_of_hpc_kd():
    for leaf in ("config", "divergences", "policies", "sources", "metrics", "models"):
        assert _imports(PACKAGE / f"{leaf}.py", all_levels=True) == set(), leaf
