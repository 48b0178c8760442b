"""No two modules of the trainer import each other, at the top or inside a function (a circle hides which one
is the lower layer: update.py states what it needs of a policy as a Protocol instead of importing policy.py)."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

TRAINER = Path(__file__).resolve().parents[2] / "services" / "trainer"


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "opd.trainer":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("opd.trainer."):
            found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[2] for a in node.names if a.name.startswith("opd.trainer.")}
    return found - {path.stem}


def test_no_two_trainer_modules_import_each_other() -> None:
    graph = {path.stem: imports(path) for path in TRAINER.glob("*.py")}
    assert {"policy", "update", "distributed", "parallel", "ranks"} <= graph.keys()
    assert "policy" in graph["ranks"] and "parallel" in graph["policy"], "the scan sees imports inside functions too"
    circles = [(a, b) for a, b in itertools.combinations(sorted(graph), 2) if b in graph[a] and a in graph[b]]
    assert circles == []


def test_the_policy_and_the_update_never_ask_which_parallelism() -> None:
    """One process or N is a `Parallel` they receive (parallel.py): neither reaches for the process group."""
    for name in ("policy", "update"):
        tree = ast.parse((TRAINER / f"{name}.py").read_text())
        assert "distributed" not in imports(TRAINER / f"{name}.py"), name
        asked = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "group"
                 and isinstance(n.value, ast.Name) and n.value.id in ("self", "policy")]
        assert asked == [], f"{name}.py asks for the process group at lines {asked}"
