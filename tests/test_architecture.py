"""The package's floors: every import points down (docs/ARCHITECTURE.md), read from the source with ast.

Every module of ``ca2vdm`` is assigned a floor by its top-level name; a module may import only
modules on its own floor or below, imports within a floor form no cycle, nothing imports the CLI,
and the model knows nothing of step caching. Imports inside functions count too.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ca2vdm"

FLOORS = {
    # 0 — leaves: the paper's ideas and the library's plumbing, each on its own
    "assets": 0, "config": 0, "layout": 0, "cache": 0, "positions": 0, "diffusion": 0, "conditioning": 0,
    "layers": 0, "text": 0, "video": 0, "autoencoder": 0, "wan_vae": 0, "data": 0, "metrics": 0, "safefile": 0,
    # 1 — the models and their files on disk
    "backbone": 0,
    "model": 1, "checkpoint": 1, "wan": 1, "wan_weights": 1, "causal_wan": 1, "pipeline": 1,
    # 2 — what runs the model: streams and generation, step caching, training (and the coming
    #     few-step distillation and serving)
    "stepcache": 2, "stream": 2, "wan_stream": 2, "generate": 2, "training": 2, "distill": 2, "serve": 2,
    # 3 — measuring: evaluations and benchmarks
    "eval": 3, "bench": 3,
    # 4 — the command line
    "cli": 4,
}


def _modules():
    """(dotted name, path) of every module of the package."""
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _imports(name: str, path: Path) -> set[str]:
    """Dotted ca2vdm modules imported anywhere in the file (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "ca2vdm"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "ca2vdm":
                continue
            if target == "ca2vdm" or not node.module:  # from . import x: x is a module
                out |= {f"{target}.{a.name}" for a in node.names}
            else:
                out.add(target)
    return out


def _component(dotted: str) -> str | None:
    """ca2vdm.data.digits -> data; ca2vdm -> None (the package facade)."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else None


def _graph():
    return {name: _imports(name, path) for name, path in _modules()}


def test_every_module_has_a_floor():
    missing = sorted({_component(n) for n, _ in _modules()} - set(FLOORS) - {None})
    assert not missing, f"modules without a floor (add them to FLOORS and docs/ARCHITECTURE.md): {missing}"


def test_imports_point_down():
    wrong = []
    for name, targets in _graph().items():
        here = _component(name)
        if here is None:  # ca2vdm/__init__.py: the public API, may gather from any floor but the CLI
            continue
        for t in targets:
            there = _component(t)
            if there is None:
                wrong.append(f"{name} imports the package facade ca2vdm (import the module itself)")
            elif FLOORS[there] > FLOORS[here]:
                wrong.append(f"{name} (floor {FLOORS[here]}) imports {t} (floor {FLOORS[there]})")
    assert not wrong, "\n".join(wrong)


def test_no_cycles_between_components():
    edges = {}
    for name, targets in _graph().items():
        a = _component(name)
        for t in targets:
            b = _component(t)
            if a and b and a != b:
                edges.setdefault(a, set()).add(b)

    def visit(node, path):
        if node in path:
            return path[path.index(node):] + [node]
        for nxt in sorted(edges.get(node, ())):
            cycle = visit(nxt, path + [node])
            if cycle:
                return cycle
        return None

    for start in sorted(edges):
        cycle = visit(start, [])
        assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_nothing_imports_the_cli():
    users = [name for name, targets in _graph().items() if any(t == "ca2vdm.cli" for t in targets)]
    assert users == []


def test_model_knows_nothing_of_step_caching():
    path = PACKAGE / "model.py"
    assert not any(t.startswith("ca2vdm.stepcache") for t in _imports("ca2vdm.model", path))
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    assert not [n for n in names if "step_cache" in n.lower() or "stepcache" in n.lower()]


@pytest.mark.parametrize("source, expected", [
    ("from ..generate import generate\n", {"ca2vdm.generate"}),
    ("def f():\n    from ..cli import main\n", {"ca2vdm.cli"}),
    ("from . import digits\n", {"ca2vdm.metrics.digits"}),
    ("import ca2vdm.model as m\n", {"ca2vdm.model"}),
])
def test_the_reader_sees_relative_and_lazy_imports(tmp_path, source, expected):
    """The checker itself: a lazy import inside a function and relative imports are resolved (a
    checker that missed them would pass a package whose floors are broken)."""
    path = tmp_path / "fvd.py"
    path.write_text(source)
    assert _imports("ca2vdm.metrics.fvd", path) == expected


BACKBONES = {"ca2vdm.model", "ca2vdm.wan", "ca2vdm.causal_wan", "ca2vdm.layers"}
BACKBONE_CLASSES = {"CausalVideoDiT", "WanTransformer", "CausalWan"}
ENGINE = ("ca2vdm.stream", "ca2vdm.stepcache", "ca2vdm.cache", "ca2vdm.generate", "ca2vdm.backbone",
          "ca2vdm.training.losses", "ca2vdm.training.trainer", "ca2vdm.training.optim",
          "ca2vdm.training.parallel", "ca2vdm.training.memory", "ca2vdm.distill.dmd",
          "ca2vdm.distill.ode", "ca2vdm.distill.video", "ca2vdm.distill.run")


def test_the_engine_reaches_backbones_only_through_the_interface():
    """The engine's modules (streams, generation, step caching, the cache, training, distillation)
    import no concrete backbone (nor its layers) and never name one of its classes (no isinstance
    test, no type hint): they talk to ``backbone.Backbone`` and build networks through
    ``checkpoint.build_model``. Break tried: ``from .model import CausalVideoDiT`` back in stream.py."""
    graph, wrong = _graph(), []
    for name, path in _modules():
        if name not in ENGINE:
            continue
        wrong += [f"{name} imports {t}" for t in graph[name] if t in BACKBONES]
        named = {n.id for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Name)}
        wrong += [f"{name} names {c}" for c in sorted(named & BACKBONE_CLASSES)]
    assert not wrong, "\n".join(wrong)
