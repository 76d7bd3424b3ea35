"""Imports point one way: from the command line down to the models (issue 12, item 4).

The layers are data (:data:`LAYERS`, bottom first). A static scan of every ``import`` in
``sense_jax/`` (function-local ones and ``TYPE_CHECKING`` blocks included) checks that no module
imports a module of a higher layer: step 1 (extraction) never imports step 3 (distillation), the
library never imports the CLI, conversion and the LoRA merge share the checkpoint readers below
them. A new module must be given a layer here.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sense_jax"

# Bottom first. An entry names a module or a package (and everything under it; the root package
# ``sense_jax``, whose __init__ resolves its API lazily, only itself); the longest entry that
# matches a module decides its layer. Imports within a layer are free.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("sense_jax", "sense_jax.errors", "sense_jax.io_utils", "sense_jax.provenance",
              "sense_jax.compile_cache", "sense_jax.config", "sense_jax.multiprocess", "sense_jax.batching",
              "sense_jax.senses_numpy")),
    ("models", ("sense_jax.models", "sense_jax.pooling", "sense_jax.sharding", "sense_jax.fingerprints")),
    ("checkpoint files", ("sense_jax.hf_checkpoint",)),
    ("conversion", ("sense_jax.lora", "sense_jax.convert", "sense_jax.loading")),
    ("export", ("sense_jax.hf_export",)),
    ("data", ("sense_jax.sampling", "sense_jax.store", "sense_jax.corpus", "sense_jax.tokenizing",
              "sense_jax.wordnet", "sense_jax.labelled", "sense_jax.tasks", "sense_jax.glue_metrics")),
    ("step 1: extraction", ("sense_jax.extract_job", "sense_jax.extract_forward", "sense_jax.extract")),
    ("step 2: sense dictionary", ("sense_jax.kmeans", "sense_jax.sense_dict", "sense_jax.sense_builder")),
    ("step 3: distillation", ("sense_jax.losses", "sense_jax.students", "sense_jax.distill",
                              "sense_jax.training", "sense_jax.trainer", "sense_jax.task_losses",
                              "sense_jax.task_train", "sense_jax.teacher_cache")),
    ("evaluation and the whole job", ("sense_jax.evaluation", "sense_jax.report", "sense_jax.inspection",
                                      "sense_jax.benchmarks", "sense_jax.pipeline", "sense_jax.task_pipeline")),
    ("command line", ("sense_jax.commands", "sense_jax.cli")),
]

# Upward imports allowed, each with its reason (kept function-local, so that importing the lower
# module does not import the higher one).
ALLOWED_UPWARD = {
    ("sense_jax.tasks", "sense_jax.benchmarks.wic"):
        "the WiC task reads the official WiC files with the benchmark's own reader (one format, one reader)",
}


def layer_of(module: str) -> int:
    best = None
    for i, (_, entries) in enumerate(LAYERS):
        for e in entries:
            inside = module.startswith(e + ".") and e != "sense_jax"
            if (module == e or inside) and (best is None or len(e) > len(best[1])):
                best = (i, e)
    if best is None:
        raise AssertionError(f"{module} has no layer in tests/test_layers.py LAYERS")
    return best[0]


def module_files() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _api() -> dict[str, str]:
    """The lazily exported names of ``sense_jax`` -> their modules (read statically)."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
            if isinstance(target, ast.Name) and target.id == "_API":
                return ast.literal_eval(node.value)
    return {}


def _nodes(tree: ast.AST, top_level_only: bool):
    """Every node of ``tree``; with ``top_level_only``, none inside a function."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if top_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        todo.extend(ast.iter_child_nodes(node))


def imports_of(module: str, path: Path, modules: dict[str, Path],
               top_level_only: bool = False) -> list[tuple[str, int]]:
    """``(imported sense_jax module, line)`` for every import statement in ``path``, wherever it is
    (with ``top_level_only``: those that run when the module is imported).

    ``from P import name`` counts as importing ``P.name`` when that is a module, the module a
    lazily exported name of ``sense_jax`` comes from, else ``P``."""
    api = _api()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in _nodes(ast.parse(path.read_text(encoding="utf-8"), str(path)), top_level_only):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "sense_jax"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "sense_jax":
                continue
            for a in node.names:
                if f"{source}.{a.name}" in modules:
                    found.append((f"{source}.{a.name}", node.lineno))
                elif source == "sense_jax" and a.name in api:
                    found.append((api[a.name], node.lineno))
                else:
                    found.append((source, node.lineno))
    return found


def upward_imports(modules: dict[str, Path]) -> list[str]:
    bad = []
    for module, path in modules.items():
        here = layer_of(module)
        for target, line in imports_of(module, path, modules):
            if layer_of(target) > here and (module, target) not in ALLOWED_UPWARD:
                bad.append(f"{path}:{line}: {module} ({LAYERS[here][0]}) imports "
                           f"{target} ({LAYERS[layer_of(target)][0]})")
    return sorted(set(bad))


def test_every_module_has_a_layer():
    for module in module_files():
        layer_of(module)
    with pytest.raises(AssertionError, match="no layer"):
        layer_of("sense_jax.new_module")


def test_no_module_imports_a_higher_layer():
    bad = upward_imports(module_files())
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def import_cycles(modules: dict[str, Path]) -> list[list[str]]:
    """The import cycles among ``modules`` (strongly connected components of more than one module;
    a package importing its own submodules, as a registry does, is not counted)."""
    graph = {m: sorted({t for t, _ in imports_of(m, p, modules) if t in modules and t != m
                        and not t.startswith(m + ".")}) for m, p in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                cycles.append(sorted(component))

    for m in graph:
        if m not in index:
            visit(m)
    return cycles


def test_no_import_cycles():
    """E.g. conversion and the LoRA merge both read checkpoints through sense_jax.hf_checkpoint
    instead of importing each other."""
    assert import_cycles(module_files()) == []


def test_the_scan_sees_function_local_and_relative_imports(tmp_path):
    """The check itself: a deliberately wrong import, hidden in a function, is caught."""
    modules = module_files()
    fake = tmp_path / "extract_job.py"
    fake.write_text("def f():\n    from sense_jax.training import step\n"
                    "def g():\n    from . import cli\n", encoding="utf-8")
    bad = upward_imports({**modules, "sense_jax.extract_job": fake})
    assert any("sense_jax.extract_job (step 1: extraction) imports sense_jax.training.step" in b for b in bad), bad
    assert any("imports sense_jax.cli (command line)" in b for b in bad), bad
    lora = tmp_path / "lora.py"
    lora.write_text("def f():\n    from sense_jax.convert import params_to_hf\n", encoding="utf-8")
    assert ["sense_jax.convert", "sense_jax.lora"] in import_cycles({**modules, "sense_jax.lora": lora})


def test_allowed_upward_imports_stay_function_local():
    """An allowed upward import must not run when the lower module is imported."""
    modules = module_files()
    for low, high in ALLOWED_UPWARD:
        assert high in {m for m, _ in imports_of(low, modules[low], modules)}, (low, high, "no longer needed")
        top = {m for m, _ in imports_of(low, modules[low], modules, top_level_only=True)}
        assert high not in top, f"{low} imports {high} at its top"


HEAVY = ("jax", "flax", "transformers", "torch", "optax", "orbax")


@pytest.mark.parametrize("code", [
    "import sense_jax",
    "import sense_jax; sense_jax.__all__; dir(sense_jax)",
    "from sense_jax import cli; cli.build_parser()",  # what `sense-jax --help` imports
])
def test_the_top_imports_no_heavy_library(code):
    probe = (f"{code}\nimport sys\n"
             f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         cwd=ROOT, env=env).stdout
    assert out.strip() == "[]", out


def test_the_lazy_api_resolves_every_name():
    import sense_jax
    from sense_jax import loading, sense_builder

    assert set(sense_jax.__all__) <= set(dir(sense_jax))
    assert sense_jax.load_model is loading.load_model
    assert sense_jax.build_sense_dictionary is sense_builder.build_sense_dictionary
    for name in sense_jax.__all__:
        assert getattr(sense_jax, name) is not None
    with pytest.raises(AttributeError):
        sense_jax.no_such_name


def test_no_library_module_shadows_the_standard_library():
    """``sense_jax/inspect.py`` became ``inspection.py``: a script run from inside the package (its
    directory first on sys.path) imported it for the standard library's ``inspect``. The
    subcommands' modules keep their subcommand's name (imported by full name only)."""
    clash = sorted(str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")
                   if p.stem in sys.stdlib_module_names and p.parent.name != "commands")
    assert clash == []


def test_old_import_paths_reexport_the_moved_names():
    """``sense_jax.distill`` (split into losses, students, hf_export) and the names that moved
    out of ``sense_jax.convert`` keep working, as the same objects."""
    from sense_jax import convert, distill, fingerprints, hf_checkpoint, hf_export, losses, students

    assert distill.skd_loss is losses.skd_loss and distill.distill_losses is losses.distill_losses
    assert distill.truncated_student is students.truncated_student
    assert distill.check_sense_dict is students.check_sense_dict
    assert distill.export_hf is hf_export.export_hf and distill.load_adaptor is hf_export.load_adaptor
    assert distill.teacher_fingerprint is fingerprints.teacher_fingerprint
    assert convert.read_hf_state_dict is hf_checkpoint.read_hf_state_dict
    assert set(distill.__all__) <= set(dir(distill))


def test_store_occurrences_are_the_counts_file(tmp_path):
    """``Store.occurrences`` (the glossary's term) reads ``counts.npy``, the file's name of
    version 1, unchanged; ``Store.counts`` stays an alias."""
    import numpy as np

    from sense_jax.store import open_store, write_store

    occurrences = np.array([0, 7, 2], np.int64)
    path = write_store(tmp_path / "s", np.ones((3, 2), np.float32), [0, 0, 2, 3], occurrences,
                       np.zeros((3, 2)), {"teacher": "synthetic"})
    np.testing.assert_array_equal(np.load(path / "counts.npy"), occurrences)
    store = open_store(path)
    np.testing.assert_array_equal(store.occurrences, occurrences)
    assert store.counts is store.occurrences


def test_counting_pass_keeps_its_file_names(tmp_path):
    """A work directory saved before ``Counted.counts`` became ``occurrences`` still resumes:
    the file is ``counts.npy`` either way."""
    import numpy as np

    from sense_jax.extract_job import Counted, load_counted, save_counted

    c = Counted(np.array([3, 0, 1], np.int64), np.array([0, 2], np.int32), np.array([0, 1], np.int64),
                np.array([1, 4], np.int32), np.array([5, 6], np.int32), {"passages": 2})
    save_counted(tmp_path / "counted", c)
    assert sorted(p.name for p in (tmp_path / "counted").iterdir()) == [
        "counts.npy", "lengths.npy", "passage.npy", "position.npy", "stats.json", "tok.npy"]
    back = load_counted(tmp_path / "counted")
    np.testing.assert_array_equal(back.occurrences, c.occurrences)
    assert back.stats == {"passages": 2}
