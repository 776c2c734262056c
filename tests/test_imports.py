"""The package's modules import each other without a cycle (docs/ARCHITECTURE.md draws the graph).

Read from the source with `ast`, nothing imported: an edge is a glassgpt import at a module's top
level (imports inside functions, and those under `if TYPE_CHECKING:`, run later or never, so they
cannot close a cycle at import time).
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "glassgpt"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def run_at_import(node: ast.AST):
    """The import statements Python runs while importing the module `node` belongs to."""
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
    elif isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
        yield from (n for child in node.orelse for n in run_at_import(child))
    elif not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
        yield from (n for child in ast.iter_child_nodes(node) for n in run_at_import(child))


def top_level_imports(path: Path, modules: set[str]) -> set[str]:
    """The glassgpt modules that `path` imports when it is itself imported."""
    name, is_package = module_name(path), path.name == "__init__.py"
    found = set()
    for node in run_at_import(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:  # relative: from the package that holds this module
            package = name if is_package else name.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}".rstrip(".")
        # `from glassgpt import lora` imports the submodule glassgpt.lora
        found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): top_level_imports(p, modules) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None: a depth-first search for an edge back into the path."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        for target in sorted(graph[module]):
            cycle = visit(target, path + [module])
            if cycle:
                return cycle
        done.add(module)
        return None

    for module in sorted(graph):
        cycle = visit(module, [])
        if cycle:
            return cycle
    return None


def test_the_import_graph_is_read_from_the_source():
    graph = import_graph()
    assert {"glassgpt.model", "glassgpt.config", "glassgpt.serve.app"} <= set(graph)
    assert "glassgpt.config" in graph["glassgpt.model"]
    assert graph["glassgpt.config"] == set()  # the bottom of the picture
    assert "glassgpt.hub" not in graph["glassgpt.model"]  # from_pretrained imports it when called


def test_no_module_level_import_cycle():
    assert find_cycle(import_graph()) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
