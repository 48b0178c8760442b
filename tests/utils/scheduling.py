"""How `make test` hands the suite to its pytest-xdist workers (tests/conftest.py uses this).

- A unit of work is a module: its module-scoped engines and services start on one worker, once.
- The tests/trainer modules on the shared vLLM teacher and student (tests/trainer/conftest.py `services`, and
  `make_config` built on it) are one unit together: that pair starts once per run, and one run at a time trains
  against it (two runs at once would publish their versions to the same student).
- Units go out in collection order (tests/conftest.py sorts it: the shared unit, then modules that start
  engines or services, then the quick ones), not xdist's default of most tests first.

Why a scheduler of our own: xdist's `--dist loadgroup` marks a group by rewriting each test's node id, which
pytest 9.2's structured node ids ignore, so it silently handed out single tests (pytest-xdist issue 1386):
both workers then started the same module's engines. The controller sees node ids only, so the shared
modules are found from the source: a test or fixture that takes `services` or `make_config`, in a module
without a `services` of its own.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

SHARED = "trainer-services"
TAKES = {"services", "make_config"}


@lru_cache
def shared_modules(root: Path) -> frozenset[str]:
    """The rootdir-relative paths (posix) of the tests/trainer modules on the shared services."""
    out = set()
    for path in sorted((root / "tests" / "trainer").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        own = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
        functions = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
        if "services" not in own and any(TAKES & {arg.arg for arg in fn.args.args} for fn in functions):
            out.add(path.relative_to(root).as_posix())
    return frozenset(out)


def unit_of(nodeid: str, root: Path) -> str:
    """The unit of work a test belongs to: SHARED, or its module's path."""
    path = nodeid.split("::", 1)[0]
    return SHARED if path in shared_modules(root) else path


def make_scheduler(config, log):
    """xdist's scope scheduler with our units, in collection order."""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid, config.rootpath)

    config.option.loadscopereorder = False
    return ModuleScheduling(config, log)
