"""The package reads as its architecture: imports flow one way (analysis -> instruments -> engine -> kernels ->
model), with no import cycle, also not one hidden in a function body, and no module longer than 600 lines."""

import ast
from pathlib import Path

import smallthinker_lab as sl

PKG = Path(sl.__file__).resolve().parent
LAYERS = ["model", "kernels", "engine", "instruments", "analysis"]  # lowest first
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module of the package that ``name`` imports, at module level or inside a function."""
    found = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name and not name.startswith(t + ".")}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state:
                cycle = visit(w)
                if cycle:
                    return cycle
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state:
            cycle = visit(v)
            assert cycle is None, " -> ".join(cycle)


def test_imports_flow_down_the_layers():
    rank = {layer: i for i, layer in enumerate(LAYERS)}

    def layer(module: str) -> str | None:
        parts = module.split(".")
        return parts[1] if len(parts) > 1 and parts[1] in rank else None

    wrong = []
    for src, targets in _graph().items():
        a = layer(src)
        for dst in targets:
            b = layer(dst)
            if a is not None and b is not None and rank[b] > rank[a]:
                wrong.append(f"{src} imports {dst}")
    assert not wrong, wrong


def test_no_module_is_longer_than_600_lines():
    long = {name: n for name, path in _modules().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, long


def test_the_package_root_exports_what_a_user_needs():
    for name in ("load_model", "load_tokenizer", "SmallThinkerConfig", "generate", "Engine", "EngineOptions",
                 "convert", "record", "profile", "Recording", "kv_cache_bytes"):
        assert name in sl.__all__ and hasattr(sl, name), name
    for sub in ("plots", "tables", "widgets", "report", "metrics"):
        assert getattr(sl, sub).__name__.startswith("smallthinker_lab."), sub
