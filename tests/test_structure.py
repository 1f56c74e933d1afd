"""The package's structure, read from its source: no module reaches into another's private names, no
import cycle inside ``daunce/``, and the notebooks use public names only."""

import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "daunce"


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_modules(pkg: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` file under the package folder ``pkg``."""
    return {_module_name(p, pkg.parent): p for p in sorted(pkg.rglob("*.py"))}


MODULES = package_modules(PKG)


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute module named by ``from <level dots><name> import ...`` inside ``module``."""
    if level == 0:
        return name or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _imports(module: str, path: Path, modules: dict[str, Path]):
    """``(imported module, names, line)`` for every import of a module of ``module``'s own package, at any
    depth (lazy imports inside functions count too)."""
    top = module.split(".")[0]
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == top:
                    yield a.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node.level, node.module)
            if target.split(".")[0] != top:
                continue
            names = [a.name for a in node.names]
            # "from . import x" imports the submodule x when there is one
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            yield target, [n for n in names if f"{target}.{n}" not in modules], node.lineno
            for s in subs:
                yield s, [], node.lineno


def _graph(modules: dict[str, Path] = MODULES) -> dict[str, set[str]]:
    graph = {m: set() for m in modules}
    for m, path in modules.items():
        for target, _names, _line in _imports(m, path, modules):
            if target in modules and target != m:
                graph[m].add(target)
    return graph


def private_imports(modules: dict[str, Path], root: Path = ROOT) -> list[str]:
    """``"file:line imports _name from module"`` for every import of another module's private name."""
    bad = []
    for m, path in modules.items():
        for target, names, line in _imports(m, path, modules):
            bad += [f"{path.relative_to(root)}:{line} imports {n} from {target}" for n in names
                    if n.startswith("_") and not n.startswith("__") and target != m]
    return bad


def import_cycles(modules: dict[str, Path]) -> list[list[str]]:
    """Every import cycle found by a depth-first walk, each as ``[a, b, ..., a]``. A package importing its own
    submodules to re-export them is not a cycle of concepts: those edges are left out."""
    graph = _graph(modules)

    def edges(m):
        return {t for t in graph[m] if not (modules[m].name == "__init__.py" and t.startswith(m + "."))}

    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    stack: list[str] = []
    cycles = []

    def visit(m):
        colour[m] = GREY
        stack.append(m)
        for t in sorted(edges(m)):
            if colour[t] == GREY:
                cycles.append(stack[stack.index(t):] + [t])
            elif colour[t] == WHITE:
                visit(t)
        stack.pop()
        colour[m] = BLACK

    for m in sorted(graph):
        if colour[m] == WHITE:
            visit(m)
    return cycles


def test_no_module_imports_a_private_name_of_another():
    bad = private_imports(MODULES)
    assert not bad, "\n".join(bad)


#: third-party internals patched on purpose, with the reason
THIRD_PARTY_PATCHES = {
    ("daunce/experiments/textdata.py", "_get_sentence_tokenizer"):
        "IFEval's checkers load nltk's punkt tokenizer from the network; the patch loads it offline",
}


def private_attributes(modules: dict[str, Path], root: Path = ROOT) -> list[str]:
    """``"file:line touches ._name"`` for every private attribute read or written on anything but ``self`` /
    ``cls`` (the third-party patches listed above excepted)."""
    bad = []
    for path in modules.values():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value
                if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                    continue
                if (str(path.relative_to(root)), node.attr) in THIRD_PARTY_PATCHES:
                    continue
                bad.append(f"{path.relative_to(root)}:{node.lineno} touches .{node.attr}")
    return bad


def test_no_private_attribute_of_another_object_is_touched():
    """``x._name`` is allowed only on ``self`` / ``cls`` (an object's own state); never on a parameter,
    another object or another module (third-party patches listed above excepted)."""
    bad = private_attributes(MODULES)
    assert not bad, "\n".join(bad)


def test_no_import_cycle_inside_the_package():
    cycles = import_cycles(MODULES)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_method_core_imports_no_experiment_code():
    core = [m for m in MODULES if not m.startswith(("daunce.experiments", "daunce.llm", "daunce.blackbox"))]
    graph = _graph()
    bad = [f"{m} -> {t}" for m in core for t in graph[m] if t.startswith("daunce.experiments")]
    assert not bad, bad


@pytest.mark.parametrize("notebook", sorted((ROOT / "notebooks").glob("[0-9]*.ipynb")), ids=lambda p: p.stem)
def test_notebooks_use_public_names_only(notebook):
    nb = json.loads(notebook.read_text())
    bad = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"])
        bad += [f"cell {i}: {m}" for m in re.findall(r"\w\._[A-Za-z]\w*", src)]
    assert not bad, bad


def test_relative_imports_resolve_and_the_notebook_pattern_finds_private_names():
    """The pieces the checks stand on: relative imports resolve to the module they name, and the notebooks' pattern
    finds a private name (the planted packages below test the checks themselves)."""
    src = "from .b import _hidden\n"
    tree = ast.parse(src)
    node = tree.body[0]
    assert _resolve("daunce.a", False, node.level, node.module) == "daunce.b"
    assert _resolve("daunce.engines", True, 1, "context") == "daunce.engines.context"
    assert _resolve("daunce.engines.vmap", False, 2, "config") == "daunce.config"
    assert re.findall(r"\w\._[A-Za-z]\w*", "d._signals_now(x)") == ["d._signals_now"]


def _write_package(root: Path, files: dict[str, str]) -> dict[str, Path]:
    """A package ``toy`` under ``root`` with the given ``{relative path: source}``; its modules."""
    for rel, src in files.items():
        (root / "toy" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "toy" / rel).write_text(src)
    return package_modules(root / "toy")


#: a clean package: ``__init__`` re-exports its submodules (not a cycle), ``b`` imports ``a`` lazily, and a module
#: uses its own private name
CLEAN = {"__init__.py": "from . import a, b\nfrom .a import helper\n",
         "a.py": "def helper():\n    return _own()\n\n\ndef _own():\n    return 1\n",
         "b.py": "def g():\n    from toy.a import helper\n    return helper()\n",
         "sub/__init__.py": "", "sub/c.py": "from ..b import g\n"}


def test_the_cycle_check_finds_a_planted_cycle(tmp_path):
    """A cycle through a lazy import (a -> b at the top, b -> a inside a function) and one across a subpackage
    (b -> sub.c -> b) are found; the clean package, whose __init__ re-exports its submodules, has none."""
    clean = _write_package(tmp_path / "clean", CLEAN)
    assert set(clean) == {"toy", "toy.a", "toy.b", "toy.sub", "toy.sub.c"}
    assert _graph(clean)["toy.sub.c"] == {"toy.b"} and _graph(clean)["toy.b"] == {"toy.a"}
    assert import_cycles(clean) == []
    cyclic = _write_package(tmp_path / "cyclic", {**CLEAN, "a.py": "from .b import g\n\n\ndef helper():\n"
                                                                     "    return g\n"})
    assert import_cycles(cyclic) == [["toy.a", "toy.b", "toy.a"]]
    across = _write_package(tmp_path / "across", {**CLEAN, "b.py": "import toy.sub.c\n"})
    assert import_cycles(across) == [["toy.b", "toy.sub.c", "toy.b"]]


def test_the_private_import_check_finds_a_planted_private_import(tmp_path):
    """``from .a import _own`` in another module and ``from toy.a import _own as o`` inside a function are each
    flagged with file, line and name; the clean package (``a`` using its own ``_own``) is not."""
    clean = _write_package(tmp_path / "clean", CLEAN)
    assert private_imports(clean, tmp_path / "clean") == []
    planted = _write_package(tmp_path / "planted", {
        **CLEAN, "b.py": "from .a import helper, _own\n",
        "sub/c.py": "def f():\n    from toy.a import _own as o\n    return o()\n"})
    assert private_imports(planted, tmp_path / "planted") == [
        "toy/b.py:1 imports _own from toy.a", "toy/sub/c.py:2 imports _own from toy.a"]


def test_the_private_attribute_check_finds_a_planted_access(tmp_path):
    """``other._x`` on a parameter and ``a._own`` on a module are flagged; ``self._x`` is not."""
    planted = _write_package(tmp_path, {
        **CLEAN, "b.py": "from . import a\n\n\nclass B:\n    def __init__(self, other):\n        self._x = other._x\n"
                         "        a._own()\n"})
    assert private_attributes(planted, tmp_path) == ["toy/b.py:6 touches ._x", "toy/b.py:7 touches ._own"]
