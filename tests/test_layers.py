"""The package's imports point one way: data -> models -> engine -> compress -> deploy -> studies,
with config, errors and tracking below everything and the notebook runner and CLI on top."""

from __future__ import annotations

import ast
from pathlib import Path

import segstudy

PACKAGE = Path(segstudy.__file__).parent
# lower number = lower layer; a module may import its own layer and the ones below it
LAYERS = {"errors": 0, "interrupts": 0, "files": 0, "config": 0, "config_paths": 0, "config_profiles": 0,
          "config_schema": 0, "tracking": 0, "data": 1, "models": 2, "engine": 3, "compress": 4, "deploy": 5,
          "studies": 6, "notebook_runner": 7, "cli": 7, "__main__": 7, "__init__": 7}


def layer_of(module: str) -> tuple[str, int]:
    """'segstudy.engine.training' -> ('engine', 3)."""
    top = module.split(".")[1] if module.count(".") else "__init__"
    if top not in LAYERS:
        raise AssertionError(f"segstudy.{top} has no layer: add it to LAYERS in {__file__}")
    return top, LAYERS[top]


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every segstudy import in the file, function bodies included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "segstudy":
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "segstudy"]
    return found


def backward_edges(package: Path = PACKAGE) -> list[str]:
    edges = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent)
        top, level = layer_of(".".join(rel.with_suffix("").parts))
        for line, target in imports(path):
            target_top, target_level = layer_of(target)
            if target_level > level:
                edges.append(f"{rel}:{line} ({top}, layer {level}) imports {target} "
                             f"({target_top}, layer {target_level})")
    return edges


def test_imports_point_down_the_pipeline():
    assert backward_edges() == []


def test_the_check_sees_a_backward_import_in_a_function(tmp_path):
    (tmp_path / "segstudy" / "data").mkdir(parents=True)
    (tmp_path / "segstudy" / "data" / "probe.py").write_text("def f():\n    from segstudy.deploy import serving\n")
    (tmp_path / "segstudy" / "cli.py").write_text("from segstudy.data import probe\n")  # downward: fine
    edges = backward_edges(tmp_path / "segstudy")
    assert len(edges) == 1 and "probe.py:2" in edges[0] and "segstudy.deploy.serving" in edges[0]


def test_every_subpackage_has_a_layer():
    for path in PACKAGE.iterdir():
        if path.is_dir() and (path / "__init__.py").is_file():
            assert path.name in LAYERS, path
        elif path.suffix == ".py":
            assert path.stem in LAYERS, path


def module_cycles(package: Path = PACKAGE) -> list[list[str]]:
    """Import cycles between the package's modules (function bodies included: a lazy import that
    breaks a cycle at import time is still one), each as the modules that go round."""
    modules = {".".join(p.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in package.rglob("*.py")}
    graph = {m: {t for _, target in imports(p) for t in (target, target.rsplit(".", 1)[0]) if t in modules and t != m}
             for m, p in modules.items()}
    cycles, done = [], set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycles.append(path[path.index(module):])
            return
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    return cycles


def test_no_two_modules_import_each_other():
    assert module_cycles() == []
