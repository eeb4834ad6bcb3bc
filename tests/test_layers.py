"""fedssd's imports go one way, down the layers the README lists ("Where things are"), and no
module keeps mutable state.

Every import counts: at the top of a module, inside a function and under ``TYPE_CHECKING``, since
each one is an arrow a reader has to follow, and a local import that closes a cycle only hides it.
The checks are run on a small made-up package as well, so that they are seen to fail.
"""

from __future__ import annotations

import ast
import re
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "fedssd"
README = ROOT / "README.md"

# Module-level caches that are state on purpose, with the reason.
ALLOWED_CACHES = {
    # A Flower node process keeps its experiment (the data, above all) between messages.
    ("fedssd.flower.client_app", "_experiment"),
    # The privacy accountant's answers, pure functions of hashable charges: seconds each, and a
    # run asks the same calibration and the same epsilon several times.
    ("fedssd.federation.accounting", "_ledger_epsilon"),
    ("fedssd.federation.accounting", "_calibrate_noise"),
}


def modules(source: Path) -> dict[str, Path]:
    """Every module of the package in ``source``, by dotted name (a package by its own name)."""
    found = {}
    for path in sorted(source.rglob("*.py")):
        parts = path.relative_to(source.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(source: Path) -> dict[str, set[str]]:
    """Each module's imports of its own package's modules, wherever in the module they are."""
    known = modules(source)
    package = source.name
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join([*parent, *([base] if base else [])])
                for alias in node.names:
                    # `from a import b`: the module a.b if there is one, else a name in a.
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in known else base)
        graph[name] = {
            _owner(t, known) for t in targets if t == package or t.startswith(package + ".")
        } - {name}
    return graph


def _owner(target: str, known: Mapping[str, Path]) -> str:
    """The module ``target`` names: itself, or the closest package above it that exists."""
    while target not in known:
        target = target.rpartition(".")[0]
    return target


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph`` (its strongly connected components of two or more
    modules), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def documented_layers(readme: str, source: Path) -> list[list[str]]:
    """The layers, lowest first: one per entry of the README's "Where things are" block (an
    entry names one or more modules or packages of ``source``); folders without Python code
    (the shipped configs) are left out. The package root comes last: it is the public face."""
    block = readme.split("## Where things are", 1)[1].split("```")[1]
    package = source.name
    layers = []
    for line in block.splitlines():
        entry = re.match(r"^  ([a-z_]+(?:\.py|/)(?:, [a-z_]+(?:\.py|/))*)(?:\s|$)", line)
        if entry is None:
            continue
        layer = []
        for item in entry.group(1).split(", "):
            path = source / item
            if item.endswith("/") and not any(path.rglob("*.py")):
                continue
            layer.append(f"{package}.{item.removesuffix('/').removesuffix('.py')}")
        if layer:
            layers.append(layer)
    return [*layers, [package]]


def layer_of(module: str, layers: Sequence[Sequence[str]]) -> int | None:
    """The index of the layer that lists ``module`` or a package holding it (the closest; the
    package root holds only itself)."""
    best: tuple[int, int] | None = None
    for position, layer in enumerate(layers):
        for name in layer:
            if module == name or ("." in name and module.startswith(name + ".")):
                depth = name.count(".")
                if best is None or depth > best[1]:
                    best = (position, depth)
    return None if best is None else best[0]


def layer_problems(graph: Mapping[str, set[str]], layers: Sequence[Sequence[str]]) -> list[str]:
    """Modules the layers do not place, names the layers list that do not exist, and every
    import of a later layer, in words."""
    problems = [f"{m} is in no layer of the README" for m in graph if layer_of(m, layers) is None]
    problems += [
        f"the README lists {name}, which does not exist"
        for layer in layers
        for name in layer
        if name not in graph
    ]
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            own, other = layer_of(module, layers), layer_of(target, layers)
            if own is not None and other is not None and other > own:
                problems.append(f"{module} imports {target}, which is in a later layer")
    return problems


def state_problems(source: Path) -> list[str]:
    """Module-level mutable state: a ``global`` statement, a lower-case module name bound to a
    list, dict or set, or a cached function (``functools.cache``/``lru_cache``) not allowed in
    :data:`ALLOWED_CACHES`."""
    problems = []
    mutable = (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)
    for name, path in modules(source).items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Global):
                problems.append(f"{name} rebinds the module-level {', '.join(node.names)}")
        for node in tree.body:
            targets: Iterable[ast.expr] = ()
            if isinstance(node, ast.Assign) and isinstance(node.value, mutable):
                targets = node.targets
            elif isinstance(node, ast.AnnAssign) and isinstance(node.value, mutable):
                targets = [node.target]
            for target in targets:
                if isinstance(target, ast.Name) and not re.fullmatch(
                    r"_*[A-Z0-9_]+|__\w+__", target.id
                ):
                    problems.append(f"{name} keeps the mutable {target.id} at module level")
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                cached = any("cache" in ast.unparse(decorator) for decorator in node.decorator_list)
                if cached and (name, node.name) not in ALLOWED_CACHES:
                    problems.append(f"{name}.{node.name} is a module-level cache")
    return problems


def test_imports_go_down_the_documented_layers_without_cycles() -> None:
    graph = imports(SOURCE)
    assert cycles(graph) == []
    layers = documented_layers(README.read_text(encoding="utf-8"), SOURCE)
    assert layer_problems(graph, layers) == []


def test_no_module_keeps_mutable_state() -> None:
    assert state_problems(SOURCE) == []


def _package(root: Path, files: Mapping[str, str]) -> Path:
    source = root / "pkg"
    for relative, text in files.items():
        path = source / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return source


def test_the_checks_find_hidden_cycles_upward_imports_and_state(tmp_path: Path) -> None:
    source = _package(
        tmp_path,
        {
            "__init__.py": "",
            "low.py": """\
                from typing import TYPE_CHECKING

                if TYPE_CHECKING:
                    from pkg.high import thing
            """,
            "high.py": "from pkg import low\n",
            "stray.py": "",
            "core/__init__.py": "",
            "core/base.py": """\
                seen = []


                def f():
                    from .. import top

                    return top
            """,
            "top.py": """\
                import functools

                from pkg.core import base


                @functools.lru_cache
                def g():
                    global base
            """,
        },
    )
    graph = imports(source)
    assert graph["pkg.core.base"] == {"pkg.top"}
    assert sorted(cycles(graph)) == [["pkg.core.base", "pkg.top"], ["pkg.high", "pkg.low"]]
    readme = (
        "## Where things are\n\n```\npkg/\n  low.py     the bottom\n  core/\n"
        "  top.py, gone.py\n                 a description\n  high.py\n```\n"
    )
    layers = documented_layers(readme, source)
    assert layers == [["pkg.low"], ["pkg.core"], ["pkg.top", "pkg.gone"], ["pkg.high"], ["pkg"]]
    assert layer_problems(graph, layers) == [
        "pkg.stray is in no layer of the README",
        "the README lists pkg.gone, which does not exist",
        "pkg.core.base imports pkg.top, which is in a later layer",
        "pkg.low imports pkg.high, which is in a later layer",
    ]
    assert state_problems(source) == [
        "pkg.core.base keeps the mutable seen at module level",
        "pkg.top rebinds the module-level base",
        "pkg.top.g is a module-level cache",
    ]
