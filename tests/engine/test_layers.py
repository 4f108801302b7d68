"""The package's structure (docs/architecture.md), read from the source with ``ast``.

- no import circle between adapterkit's modules, counting imports inside functions and leaving
  out what only a type checker runs (``if TYPE_CHECKING:``);
- the engine never imports ``adapterkit.integrations`` or ``adapterkit.apps`` (only they, and
  ``python -m adapterkit``'s ``__main__``, do);
- at most 16 modules directly in ``adapterkit/`` besides ``__init__`` and ``__main__``;
- every exception class of the library is defined in ``adapterkit/errors.py`` and exported;
- the verbs ``plan``, ``freeze``, ``merge`` and ``average`` are functions with no submodule of
  the same name.

The last tests plant each fault in a small package under ``tmp_path``, so that every check is
seen failing.
"""

from __future__ import annotations

import ast
import builtins
import importlib.util
import inspect
from pathlib import Path

import adapterkit

PACKAGE = Path(adapterkit.__file__).resolve().parent
OUTER = ("integrations", "apps")  # may import the engine; the engine never imports them
ENTRY_POINTS = {"__main__"}  # python -m adapterkit: the command line's own entry
MAX_TOP_MODULES = 16


def module_names(root: Path) -> dict[str, Path]:
    """Every module of the package at ``root``, by dotted name (a package by its own)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST):
    """Every node, at any depth, except the bodies of ``if TYPE_CHECKING:`` (their ``else``
    runs, and is kept)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that module ``name`` imports: absolute and relative, at the top
    and inside functions. ``from X import y`` counts as importing ``X.y`` when that is a module,
    else ``X``. A parent package's ``__init__``, which Python runs on the way, is not counted:
    every submodule would then import ``adapterkit/__init__.py``."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                here = name.split(".") if is_package else name.split(".")[:-1]
                base_parts = here[:len(here) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # import a.b.c: the deepest known module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = module_names(root)
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def outer_imports(graph: dict[str, set[str]], package: str) -> list[str]:
    """``module -> target`` for each import of integrations/ or apps/ from anywhere else."""
    outer = tuple(f"{package}.{p}" for p in OUTER)

    def inside(name: str) -> bool:
        return any(name == o or name.startswith(o + ".") for o in outer)

    entries = {f"{package}.{e}" for e in ENTRY_POINTS}
    return sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                  if inside(t) and not inside(m) and m not in entries)


def top_modules(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("*.py") if p.stem not in ("__init__", "__main__"))


BUILTIN_EXCEPTIONS = {n for n, v in vars(builtins).items()
                      if isinstance(v, type) and issubclass(v, BaseException)}


def exception_classes(root: Path) -> dict[str, str]:
    """Class name -> file (relative to ``root``) of every class under ``root``, outside apps/,
    that derives from a built-in exception directly or through another class found here."""
    classes = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("apps/"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                bases = {b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", None)
                         for b in node.bases}
                classes.append((node.name, rel, bases))
    found: dict[str, str] = {}
    known = set(BUILTIN_EXCEPTIONS)
    changed = True
    while changed:  # until no class is added: subclasses of subclasses
        changed = False
        for name, rel, bases in classes:
            if name not in found and bases & known:
                found[name], changed = rel, True
                known.add(name)
    return found


def misplaced_exceptions(root: Path, exported: list[str]) -> list[str]:
    return sorted(f"{name} in {rel}" + ("" if name in exported else ", not in __all__")
                  for name, rel in exception_classes(root).items()
                  if rel != "errors.py" or name not in exported)


# -- adapterkit itself ----------------------------------------------------------------------------


def test_the_parser_sees_the_imports_it_should() -> None:
    graph = import_graph(PACKAGE)
    assert len(graph) == len(list(PACKAGE.rglob("*.py")))
    assert "adapterkit.compose.fusion" in graph["adapterkit.compose"]  # from .fusion import ...
    assert "adapterkit.lifecycle" in graph["adapterkit.fx"]  # from ..lifecycle import ...
    assert "adapterkit.state" not in graph["adapterkit.slot"]  # only under TYPE_CHECKING
    assert "adapterkit.apps.cli" in graph["adapterkit.__main__"]


def test_no_import_circle() -> None:
    cycle = find_cycle(import_graph(PACKAGE))
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_engine_never_imports_integrations_or_apps() -> None:
    upward = outer_imports(import_graph(PACKAGE), "adapterkit")
    assert not upward, "the engine imports integrations/ or apps/: " + ", ".join(upward)


def test_at_most_16_modules_directly_in_the_package() -> None:
    modules = top_modules(PACKAGE)
    assert len(modules) <= MAX_TOP_MODULES, (len(modules), modules)


def test_every_exception_class_is_in_errors_and_exported() -> None:
    found = exception_classes(PACKAGE)
    assert "AdapterFileError" in found and "UsageError" not in found  # apps/ left out
    misplaced = misplaced_exceptions(PACKAGE, adapterkit.__all__)
    assert not misplaced, "exception classes outside errors.py or __all__: " + ", ".join(misplaced)
    for name in found:  # what the source says is what Python built
        cls = getattr(adapterkit, name)
        assert issubclass(cls, Exception) and cls.__module__ == "adapterkit.errors", name


def test_verbs_are_functions_not_modules() -> None:
    for verb in ["plan", "freeze", "merge", "average"]:
        assert inspect.isfunction(getattr(adapterkit, verb)), verb
        assert importlib.util.find_spec(f"adapterkit.{verb}") is None, f"adapterkit/{verb}"


# -- every check fails on a package that breaks it ------------------------------------------------


def write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_a_lazy_circle_and_an_upward_import_are_found(tmp_path) -> None:
    pkg = write(tmp_path / "pkg", {
        "__init__.py": "from .core import f\n",
        "core.py": "from typing import TYPE_CHECKING\n"
                   "if TYPE_CHECKING:\n    from .verbs import g\n"
                   "def f():\n    return 1\n",
        "verbs.py": "import pkg.core\n",
        "io/__init__.py": "",
        "io/files.py": "from .. import verbs\n",
        "apps/__init__.py": "",
        "apps/cli.py": "from ..io.files import verbs\n",
    })
    graph = import_graph(pkg)
    assert graph["pkg.io.files"] == {"pkg.verbs"} and graph["pkg.verbs"] == {"pkg.core"}
    assert find_cycle(graph) is None and outer_imports(graph, "pkg") == []
    (pkg / "core.py").write_text("def f():\n    from .io import files\n    return files\n")
    assert find_cycle(import_graph(pkg)) == ["pkg.core", "pkg.io.files", "pkg.verbs", "pkg.core"]
    (pkg / "core.py").write_text("def f():\n    import pkg.apps.cli\n")
    assert outer_imports(import_graph(pkg), "pkg") == ["pkg.core -> pkg.apps.cli"]


def test_too_many_modules_and_a_stray_exception_are_found(tmp_path) -> None:
    pkg = write(tmp_path / "pkg", {
        "__init__.py": "", "__main__.py": "",
        **{f"m{i}.py": "" for i in range(MAX_TOP_MODULES)},
        "errors.py": "class PkgError(ValueError):\n    pass\n",
        "apps/cli.py": "class UsageError(Exception):\n    pass\n",
    })
    assert len(top_modules(pkg)) == MAX_TOP_MODULES + 1
    assert misplaced_exceptions(pkg, ["PkgError"]) == []
    assert misplaced_exceptions(pkg, []) == ["PkgError in errors.py, not in __all__"]
    write(pkg, {"m0.py": "import errors\nclass Late(errors.PkgError):\n    pass\n"})
    assert misplaced_exceptions(pkg, ["PkgError", "Late"]) == ["Late in m0.py"]
