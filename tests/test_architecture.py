"""The layout stays as ARCHITECTURE.md draws it: imports point only downward, no module
imports another that (directly or not) imports it back, and no module grows past the
size limit without saying why.

Every ``import`` statement counts, at module level or inside a function: a lazy import
still ties the two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lacuna"

#: Layer of each top-level part of the package, lowest first. A module may import its
#: own layer and the layers below. ``lacuna.io`` and ``lacuna`` itself are the public
#: facades (lazy exports of names defined below them).
LAYERS = {
    "_version": 0,
    "_lazy": 0,
    "data": 0,
    "core": 0,
    "formats": 1,
    "net": 1,
    "resources": 2,
    "analysis": 3,
    "bids": 4,
    "workflows": 5,
    "cli": 6,
    "io": 7,
    "__init__": 8,
    "__main__": 8,
}

#: Lines above which a module must say at its top why it is that long.
MAX_LINES = 600
REASON_MARKER = "Length:"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Lacuna modules imported anywhere in ``path`` (``from a import b`` counts ``a.b``
    when that is a module, else ``a``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found.update(name for name in names if name.split(".")[0] == "lacuna")
    return {name for name in found if name in known}


def layer_of(module: str) -> int:
    parts = module.split(".")
    return LAYERS["__init__"] if len(parts) == 1 else LAYERS[parts[1]]


def import_graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imported_modules(path, known) - {name} for name, path in found.items()}


def test_every_part_of_the_package_has_a_layer():
    unknown = {name.split(".")[1] for name in modules() if "." in name} - set(LAYERS)
    assert not unknown, f"add these packages to LAYERS (and ARCHITECTURE.md): {sorted(unknown)}"


def test_every_folder_of_code_is_a_regular_package():
    """A folder without ``__init__.py`` works in an editable install but is left out of
    a wheel (``packages.find``), so the container would miss it."""
    missing = [
        str(folder.relative_to(PACKAGE.parent))
        for folder in sorted({path.parent for path in PACKAGE.rglob("*.py")})
        if not (folder / "__init__.py").is_file()
    ]
    assert not missing, f"add an __init__.py to: {missing}"


def test_imports_point_downward():
    upward = [
        f"{importer} (layer {layer_of(importer)}) imports {imported} (layer {layer_of(imported)})"
        for importer, imported_set in import_graph().items()
        for imported in sorted(imported_set)
        if layer_of(imported) > layer_of(importer)
    ]
    assert not upward, "imports pointing upward:\n" + "\n".join(upward)


def _parents(module: str) -> list[str]:
    """Packages a module's import runs first (``a.b.c`` runs ``a`` and ``a.b``)."""
    parts = module.split(".")
    return [".".join(parts[:end]) for end in range(1, len(parts))]


def test_no_import_cycles():
    graph = import_graph()
    # A package's __init__ running its submodules is not a cycle with them.
    edges = {name: {m for m in targets if name not in _parents(m)} for name, targets in graph.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


@pytest.mark.parametrize("name", sorted(modules()))
def test_long_modules_say_why(name):
    path = modules()[name]
    text = path.read_text(encoding="utf-8")
    if text.count("\n") <= MAX_LINES:
        return
    docstring = ast.get_docstring(ast.parse(text)) or ""
    assert REASON_MARKER in docstring, (
        f"{path.relative_to(PACKAGE.parent)} has {text.count(chr(10))} lines (> {MAX_LINES}): split it, "
        f"or say why not in its docstring ('{REASON_MARKER} ...')"
    )


def test_the_checks_catch_an_upward_import(tmp_path):
    """The rule itself: a core module importing the CLI is reported."""
    package = tmp_path / "lacuna"
    (package / "core").mkdir(parents=True)
    (package / "cli").mkdir()
    for init in (package / "__init__.py", package / "core" / "__init__.py", package / "cli" / "__init__.py"):
        init.write_text("")
    (package / "core" / "low.py").write_text("from lacuna.cli import high\n")
    (package / "cli" / "high.py").write_text("import lacuna.core.low\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, package
    try:
        with pytest.raises(AssertionError, match="lacuna.core.low .*imports lacuna.cli.high"):
            test_imports_point_downward()
        with pytest.raises(AssertionError, match="import cycles"):
            test_no_import_cycles()
    finally:
        PACKAGE = saved
