"""The import graph of the project, read from every module's AST (function-level imports
included): no circle anywhere, and the layers import one way (docs/architecture.md).

    ascend_patches  <-  recipes (model <- data <- train | infer, the commands on top)  <-  converters

``recipes.model`` is the floor (shapes and model building, process groups, the checkpoint and
LoRA formats); ``recipes.train``, ``recipes.infer`` and ``converters`` stand on it as siblings:
none of infer and converters imports train.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from tests.helpers.launch import ROOT

PACKAGES = ("ascend_patches", "recipes", "converters")
PROJECT = (*PACKAGES, "bench")
SHARED = {"recipes.errors", "recipes.progress"}
COMMANDS = {"recipes.pretrain", "recipes.generate", "recipes.evaluate", "recipes.preprocess_data",
            "recipes.compare_loss", "recipes.demo", "recipes.memory_plan", "recipes.serve"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict:
    modules = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = defaultdict(set)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules:  # a name inside a module: the module
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
        graph.setdefault(name, set())
    return graph


def _cycles(graph: dict) -> list:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def _layer(module: str) -> str:
    if module in COMMANDS:
        return "commands"
    for layer in ("recipes.model", "recipes.data", "recipes.train", "recipes.infer"):
        if module == layer or module.startswith(layer + "."):
            return layer
    return "recipes.shared" if module in SHARED or module == "recipes" else module.split(".")[0]


# which layer may import which (besides itself)
ALLOWED = {
    "ascend_patches": set(),
    "recipes.shared": {"ascend_patches"},
    "recipes.model": {"recipes.shared", "ascend_patches"},
    "recipes.data": {"recipes.model", "recipes.shared", "ascend_patches"},
    "recipes.train": {"recipes.data", "recipes.model", "recipes.shared", "ascend_patches"},
    "recipes.infer": {"recipes.data", "recipes.model", "recipes.shared", "ascend_patches"},
    "commands": {"recipes.infer", "recipes.train", "recipes.data", "recipes.model", "recipes.shared", "ascend_patches"},
    "converters": {"recipes.data", "recipes.model", "recipes.shared", "ascend_patches"},
}


def test_no_import_circle_in_the_project():
    graph = import_graph()
    assert "recipes.train.run_settings" in graph and graph["recipes.train.trainer"], "the walk found nothing"
    assert _cycles(graph) == []


def test_layers_import_one_way():
    graph = import_graph()
    wrong = sorted(f"{a} imports {b}" for a, deps in graph.items() for b in deps
                   if _layer(a) != _layer(b) and _layer(b) not in ALLOWED[_layer(a)])
    assert wrong == []


def test_infer_and_converters_never_import_train():
    """The checkpoint and LoRA formats are the floor's: reading a checkpoint is not training."""
    graph = import_graph()
    sideways = sorted(f"{a} imports {b}" for a, deps in graph.items() for b in deps
                      if (a.startswith(("recipes.infer", "converters"))) and b.startswith("recipes.train"))
    assert sideways == []


def test_one_module_knows_the_lora_file_format():
    """Its per-rank file name and adapter tensor names: written and read in recipes.model.lora
    alone (converters.merge_lora reads through it)."""
    for path in [*(ROOT / "recipes").rglob("*.py"), *(ROOT / "converters").rglob("*.py")]:
        if path == ROOT / "recipes" / "model" / "lora.py":
            continue
        text = path.read_text()
        for mark in ("lora_A", "lora_B", "lora_([AB])", "rank_file(", '["adapters"]'):
            assert mark not in text, (path, mark)


def test_the_circle_check_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_commands_are_thin_entry_modules():
    """``python -m recipes.<command>`` keeps working: each top-level command module only hands
    over to the subpackage that holds it."""
    for cmd in COMMANDS - {"recipes.demo"}:
        path = ROOT / (cmd.replace(".", "/") + ".py")
        tree = ast.parse(path.read_text())
        imports = [n for n in tree.body if isinstance(n, ast.ImportFrom)]
        assert len(imports) == 1 and imports[0].names[0].name == "main", cmd
        assert len(path.read_text().splitlines()) <= 10, cmd


def test_inference_takes_typed_settings_not_the_namespace():
    """Generation, chat, evaluation and the checkpoint front end take recipes.infer.settings'
    frozen objects: only the commands' main() and settings.py itself read the parsed flags."""
    from recipes.infer import settings

    for name in ("Checkpoint", "Decoding", "Generate", "Evaluate"):
        assert getattr(settings, name).__dataclass_params__.frozen, name
    for module in ("generate", "evaluate", "inference", "decoding"):
        tree = ast.parse((ROOT / "recipes" / "infer" / f"{module}.py").read_text())
        for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
            if fn.name not in ("main", "build_parser", "add_checkpoint_flags"):
                assert "args" not in [a.arg for a in fn.args.args], f"recipes.infer.{module}.{fn.name} takes args"


def _package(module: str, sources: dict) -> str:
    return module if sources.get(module, ("", False))[1] else module.rpartition(".")[0]


def private_crossings(sources: dict) -> list:
    """``{module: (source, is_package)}`` -> each use of a private name (``_x``, not dunder) of a
    project module by a module of another package: ``from m import _x`` or ``m._x`` read or set
    through an imported module."""
    def private(dotted: str) -> bool:
        return any(part.startswith("_") and not part.startswith("__") for part in dotted.split("."))

    out = []
    for name, (text, _) in sources.items():
        here = _package(name, sources)
        modules = {}  # local name -> the project module it is bound to
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] in PROJECT:
                        modules[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
                        if private(a.name) and _package(a.name, sources) != here:
                            out.append(f"{name}: import {a.name}")
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level \
                    and node.module.split(".")[0] in PROJECT:
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    if full in sources:
                        modules[a.asname or a.name] = full
                    if private(full) and _package(node.module, sources) != here:
                        out.append(f"{name}: from {node.module} import {a.name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules \
                    and private(node.attr) and _package(modules[node.value.id], sources) != here:
                out.append(f"{name}: {node.value.id}.{node.attr}")
    return sorted(set(out))


def test_no_private_name_crosses_a_package():
    """What one package needs of another is public (ascend_patches.configure, keep_freed_memory,
    gradient_accumulation_fusion_available): the recipes, converters and benches never reach
    into a private name, so the patch layer can change its insides."""
    sources = {_module_name(p): (p.read_text(), p.name == "__init__.py")
               for pkg in PROJECT for p in (ROOT / pkg).rglob("*.py")}
    assert "recipes.train.trainer" in sources
    assert private_crossings(sources) == []


def test_the_private_name_check_finds_one():
    sources = {"ascend_patches": ("_state = 1", True),
               "ascend_patches.device": ("def _heap(): pass", False),
               "ascend_patches.registry": ("from ascend_patches.device import _heap", False),
               "ascend_patches._config": ("", False),
               "bench": ("", True),
               "bench.b": ("import ascend_patches\nascend_patches._state = 2\n"
                           "from ascend_patches.device import _heap\nfrom ascend_patches import device as d\nd._heap()\n"
                           "from ascend_patches import _config\nimport ascend_patches._config", False)}
    assert private_crossings(sources) == [
        "bench.b: ascend_patches._state", "bench.b: d._heap", "bench.b: from ascend_patches import _config",
        "bench.b: from ascend_patches.device import _heap", "bench.b: import ascend_patches._config"]
