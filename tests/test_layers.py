"""The layer order of the `swarm` package: every import (module-level, function-local, ``if TYPE_CHECKING:``,
relative or absolute) points to the module's own package or to a lower layer, never up.

The order is written here, in `LAYERS`, and stated in docs/architecture.md (the fenced block after
"## Layers"); `test_doc_states_the_same_order` fails when the two differ.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "swarm"
ARCHITECTURE_DOC = ROOT / "docs" / "architecture.md"

# Bottom to top. Entries on one line share a layer (they may import each other).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("swarm.errors", "swarm.configs"),
    ("swarm.p2p",),
    ("swarm.compression",),
    ("swarm.dht",),
    ("swarm.averaging",),
    ("swarm.verification",),
    ("swarm.run",),
    ("swarm.model",),
    ("swarm.data",),
    ("swarm.training",),
    ("swarm.testing",),
    ("swarm.observe",),
    ("swarm.node",),
    ("swarm.local",),
    ("swarm.cli",),
)


def module_name(path: Path) -> str:
    """``swarm/dht/node.py`` -> ``swarm.dht.node``; ``swarm/dht/__init__.py`` -> ``swarm.dht``."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int | None:
    """The layer index of a ``swarm.*`` module (None: ``swarm`` itself or a module no layer names)."""
    for index, members in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in members):
            return index
    return None


def unit_of(module: str) -> str:
    """The layer entry (package or top module) that holds ``module``."""
    for members in LAYERS:
        for m in members:
            if module == m or module.startswith(m + "."):
                return m
    return module


def imported_modules(path: Path, module: str, known: set[str]) -> list[tuple[int, str]]:
    """Every project module ``path`` imports, anywhere in the file, as (line, absolute module name)."""
    is_package = path.name == "__init__.py"
    package_parts = module.split(".") if is_package else module.split(".")[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level - 1 > len(package_parts):
                    raise AssertionError(f"{path}:{node.lineno}: relative import above the package root")
                base = package_parts[: len(package_parts) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            for alias in node.names:  # `from swarm import dht` imports the module swarm.dht
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if sub in known else target))
    return [(line, name) for line, name in found if name == "swarm" or name.startswith("swarm.")]


def test_every_module_belongs_to_a_layer():
    unplaced = [m for m in all_modules() if m != "swarm" and layer_of(m) is None]
    assert not unplaced, f"modules no layer names (add them to LAYERS and docs/architecture.md): {unplaced}"


def test_no_import_points_up():
    modules = all_modules()
    known = set(modules)
    upward = []
    for module, path in modules.items():
        if module == "swarm":
            continue
        own = layer_of(module)
        assert own is not None
        for line, target in imported_modules(path, module, known):
            if target == "swarm":
                continue  # the top-level package imports nothing (test_top_level_package_imports_nothing)
            theirs = layer_of(target)
            if theirs is None or theirs > own:
                upward.append(f"{path.relative_to(ROOT)}:{line}: {module} ({unit_of(module)}) imports {target}")
    assert not upward, "imports that point up the layer order:\n" + "\n".join(dict.fromkeys(upward))


def test_top_level_package_imports_nothing():
    init = PACKAGE / "__init__.py"
    imports = [n for n in ast.walk(ast.parse(init.read_text())) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not [ast.unparse(n) for n in imports if not (isinstance(n, ast.ImportFrom) and n.module == "__future__")]


def test_checker_sees_local_type_checking_and_relative_imports(tmp_path):
    """The scan itself: imports inside functions, under ``if TYPE_CHECKING:``, and relative ones are found."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import routing\n"
        "from ..errors import SwarmError\n"
        "if TYPE_CHECKING:\n"
        "    from swarm.training.trainer import TrainingRole\n"
        "def f():\n"
        "    import swarm.cli.node\n"
        "    from ..verification import receipts\n"
    )
    path = tmp_path / "probe.py"
    path.write_text(source)
    known = {"swarm.dht.routing", "swarm.verification.receipts"}
    found = sorted(name for _, name in imported_modules(path, "swarm.dht.probe", known))
    assert found == sorted(
        ["swarm.dht.routing", "swarm.errors", "swarm.training.trainer", "swarm.cli.node", "swarm.verification.receipts"]
    )
    own = layer_of("swarm.dht.probe")
    assert own is not None
    upward = sorted(n for n in found if (layer_of(n) or 0) > own)
    assert upward == ["swarm.cli.node", "swarm.training.trainer", "swarm.verification.receipts"]


def doc_layers() -> tuple[tuple[str, ...], ...]:
    """The order as docs/architecture.md states it: the first fenced block after '## Layers', one layer a line,
    bottom first, members separated by commas, paths as written in the doc (``swarm/dht/``, ``swarm/errors.py``)."""
    section = re.search(r"^## Layers.*?(?=^## |\Z)", ARCHITECTURE_DOC.read_text(), flags=re.S | re.M)
    assert section, "docs/architecture.md has no '## Layers' section"
    match = re.search(r"^```[a-z]*\n(.*?)^```", section.group(0), flags=re.S | re.M)
    assert match, "docs/architecture.md has no fenced layer list after '## Layers'"
    layers = []
    for raw in match.group(1).splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            members = [m.strip().removesuffix("/").removesuffix(".py").replace("/", ".") for m in line.split(",")]
            layers.append(tuple(members))
    return tuple(layers)


def test_doc_states_the_same_order():
    assert doc_layers() == LAYERS
