"""The packages depend one way, as a tree::

    rigshift_cli  (the ``rigshift`` command: assembles the command groups)
      -> harness  (not product code: the local fleet, the demo, test fixtures)
      -> broker, worker_agent, client  (never import each other)
      -> rigshift  (the shared base: units, catalogue, archive, ...; imports none of them)

Read from the source with ``ast`` (nothing is imported): every ``import``, every
``from … import`` (relative ones resolved) and every string that is exactly the dotted
name of one of the repository's modules (what ``importlib.import_module`` would be given),
at any depth (inside functions and ``TYPE_CHECKING`` blocks too). Each package may import
only the packages below it; ``rigshift_cli`` is the one place that imports all three
products.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCTS = ("broker", "worker_agent", "client")
SHARED = "rigshift"
#: The ``rigshift`` command; nothing imports it.
ASSEMBLY = "rigshift_cli"
#: Not product code (the local fleet, the demo, test fixtures): it imports the products,
#: they never import it.
HARNESS = "harness"

#: Edges allowed besides the assembly: none. (file, imported module) pairs.
ALLOWED: frozenset[tuple[str, str]] = frozenset()


_MODULE_NAME = re.compile(r"[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)+")


def _imports(source: str, package: str) -> set[str]:
    """Every module ``source`` imports, by absolute dotted name (the deepest one that exists:
    ``from client.errors import RigshiftError`` is ``client.errors``); ``package`` is the
    package the module is in, for relative imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(_existing(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            # ``from broker import store`` imports the module broker.store.
            found.update(_existing(f"{module}.{alias.name}") for alias in node.names)
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and _MODULE_NAME.fullmatch(node.value)
            and _existing(node.value) == node.value
            and "." in node.value
        ):
            # A string that names one of our modules is an import by name
            # (``importlib.import_module(name)``, a plug-in table): it counts too.
            found.add(node.value)
    return found


def _existing(module: str) -> str:
    """The longest prefix of ``module`` that is a module or package of this repository
    (``module`` itself when none is: third-party and standard library names)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ROOT.joinpath(*parts[:n])
        if candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file():
            return ".".join(parts[:n])
    return module


def _modules(path: Path) -> set[str]:
    """Every module the file at ``path`` imports."""
    package = ".".join(path.relative_to(ROOT).parts[:-1])
    return _imports(path.read_text(), package)


#: What each package may import of the repository's packages (besides itself).
MAY_IMPORT: dict[str, frozenset[str]] = {
    **{product: frozenset({SHARED}) for product in PRODUCTS},
    SHARED: frozenset(),
    HARNESS: frozenset({*PRODUCTS, SHARED}),
    ASSEMBLY: frozenset({*PRODUCTS, SHARED, HARNESS}),
}
OURS = frozenset(MAY_IMPORT)


def _sources() -> list[Path]:
    files = []
    for top in MAY_IMPORT:
        files.extend(sorted((ROOT / top).rglob("*.py")))
    return files


def _edges() -> set[tuple[str, str]]:
    """(file, imported module) for every import that breaks the tree."""
    bad: set[tuple[str, str]] = set()
    for path in _sources():
        name = path.relative_to(ROOT).as_posix()
        top = name.split("/", 1)[0]
        for module in _modules(path):
            target = module.split(".", 1)[0]
            if target in OURS and target != top and target not in MAY_IMPORT[top]:
                bad.add((name, module))
    return bad


def test_products_and_the_shared_package_do_not_import_each_other() -> None:
    crossing = sorted(_edges() - ALLOWED)
    assert crossing == [], "imports against the package tree:\n" + (
        "\n".join(f"  {f} -> {m}" for f, m in crossing)
    )


def test_allow_list_holds_only_edges_that_still_exist() -> None:
    stale = sorted(ALLOWED - _edges())
    assert stale == [], f"these edges are gone; remove them from ALLOWED: {stale}"


@pytest.mark.parametrize(
    "path",
    sorted((ROOT / SHARED).glob("*.py")),
    ids=lambda p: p.name,
)
def test_shared_modules_need_only_the_standard_library(path: Path) -> None:
    """``rigshift/*.py`` (not the generated ``rigshift/v1``) load no third-party package, so
    a job may copy ``rigshift/checkpoint.py`` and the agent's CLI stays light."""
    outside = sorted(
        m
        for m in _modules(path)
        if m.split(".", 1)[0] not in (*sys.stdlib_module_names, SHARED, "__future__")
    )
    assert outside == []


def test_the_scan_sees_every_kind_of_import() -> None:
    """The parser itself: absolute, relative, nested and importlib imports are all found."""
    source = (
        "import worker_agent.gpu\n"
        "from . import errors\n"
        "from .sdk import Client\n"
        "from rigshift.units import format_usd\n"
        "if TYPE_CHECKING:\n"
        "    from broker.core import BrokerCore\n"
        "def f():\n"
        "    from broker.store import Store\n"
        "    importlib.import_module('broker.cli')\n"
        "ATTACH = [('worker_agent.cli', 'agent_group')]\n"
        "NOT_A_MODULE = 'broker.nothing_here'\n"
    )
    assert _imports(source, "client") == {
        "worker_agent.gpu",
        "client.errors",
        "client.sdk",
        "rigshift.units",
        "broker.core",
        "broker.store",
        "broker.cli",
        "worker_agent.cli",
    }
