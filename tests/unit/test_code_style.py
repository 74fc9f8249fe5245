"""The shape of the code: imports point down the layers drawn in README.md (no cycles, no private names across
modules), the configuration layer and the preprocessing path import no torch, ruff and shellcheck pass."""

import ast
import glob
import os
import re

import pytest

from helpers import PYTHON, ROOT, ensure_programs, run

# Lowest first: a module imports only from its own layer or the ones before it (README.md, "Layout"). The layers
# are the package's folders; checkpoint.layout (file and directory names, no torch) sits with the configuration
# because plans and run checks read checkpoint directories on login nodes.
LAYERS = [
    ("errors", ["errors"]),
    ("compat", ["compat.*"]),
    ("config", ["config.*", "checkpoint.layout"]),
    ("data", ["data.*"]),
    ("method", ["method.*"]),
    ("distributed", ["distributed.*"]),
    ("checkpoint", ["checkpoint.*"]),
    ("training", ["training.*"]),
    ("evaluation and interop", ["evaluation.*", "interop.*"]),
    ("experiments", ["experiments.*"]),
    ("entry points", ["cli.*"]),
]
PACKAGE = os.path.join(ROOT, "megatron_patch")


def _modules():
    for path in sorted(glob.glob(f"{PACKAGE}/**/*.py", recursive=True)):
        name = os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".")
        if not name.endswith("__init__"):
            yield name, path


def _layer(module: str) -> int:
    for index, (_, patterns) in enumerate(LAYERS):
        if any(module == p or (p.endswith(".*") and module.startswith(p[:-1])) for p in patterns):
            return index
    raise AssertionError(f"megatron_patch.{module} is in no layer of LAYERS: add it")


def _imports(path: str):
    """(imported megatron_patch module, imported names) for every import in the file, function-level included."""
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("megatron_patch"):
            names = [a.name for a in node.names]
            package = node.module[len("megatron_patch."):]
            # `from megatron_patch.checkpoint import layout` imports the module checkpoint.layout
            if os.path.isdir(os.path.join(PACKAGE, *package.split("."))):
                yield from (((f"{package}." if package else "") + name, []) for name in names)
            else:
                yield package, names
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("megatron_patch."):
                    yield alias.name[len("megatron_patch."):], []


def test_imports_point_down_the_layers_and_name_nothing_private():
    problems = []
    for module, path in _modules():
        for imported, names in _imports(path):
            if _layer(imported) > _layer(module):
                problems.append(f"{module} ({LAYERS[_layer(module)][0]}) imports {imported} "
                                f"({LAYERS[_layer(imported)][0]})")
            problems += [f"{module} imports private {imported}.{n}" for n in names if n.startswith("_")]
    assert not problems, "\n".join(problems)


def test_the_folders_are_the_layers():
    """Every module lives in a layer's folder; the package's top level keeps at most a handful of modules."""
    top_level = [name for name, _ in _modules() if "." not in name]
    assert len(top_level) <= 6, top_level
    folders = {name.split(".")[0] for name, _ in _modules() if "." in name}
    assert folders == {p.split(".")[0] for _, patterns in LAYERS for p in patterns if p.endswith(".*")}


def test_no_import_cycles():
    graph = {module: {imported for imported, _ in _imports(path)} for module, path in _modules()}
    state = {}

    def visit(module, stack):
        if state.get(module) == "done":
            return
        if module in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(module):] + [module]))
        for imported in graph.get(module, ()):
            visit(imported, stack + [module])
        state[module] = "done"

    for module in graph:
        visit(module, [])


# Exceptions that never reach a user: control flow inside one module (a skipped line, a stop or interruption the
# preprocessing job reports itself). Every other exception class is a MegatronPatchError, which each entry point
# reports as one line (megatron_patch/errors.py).
INTERNAL_EXCEPTIONS = {"BadLine", "Stopped", "ReportedOnRoot", "Terminated"}
REPORTED_WITHOUT_ERROR_SUFFIX = {"BadInput", "TrainingDiverged"}
EXCEPTION_BASES = re.compile(r"(Error|Exception|Interrupt|Exit|Diverged)$")


def _base_name(node) -> str:
    return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")


def test_every_error_a_command_line_can_report_is_a_megatron_patch_error():
    import importlib

    from megatron_patch.errors import MegatronPatchError

    problems, checked = [], 0
    for module, path in _modules():
        for node in ast.parse(open(path).read()).body:
            if not isinstance(node, ast.ClassDef) or node.name.startswith("_") or node.name in INTERNAL_EXCEPTIONS:
                continue
            if not (node.name.endswith("Error") or node.name in REPORTED_WITHOUT_ERROR_SUFFIX
                    or any(EXCEPTION_BASES.search(_base_name(base)) for base in node.bases)):
                continue
            cls = getattr(importlib.import_module(f"megatron_patch.{module}"), node.name)
            checked += 1
            if not (isinstance(cls, type) and issubclass(cls, MegatronPatchError)):
                problems.append(f"megatron_patch.{module}.{node.name} does not derive from MegatronPatchError")
    assert checked >= 15 and not problems, "\n".join(problems)


def test_one_line_error_parser_and_reporting_live_in_errors_only():
    """Flags are parsed by errors.OneLineErrorParser and errors are reported by errors.fail / one_line_errors:
    no module builds a plain ArgumentParser, subclasses it or has a fail helper of its own."""
    problems = []
    for module, path in _modules():
        if module == "errors":
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Call) and _base_name(node.func) == "ArgumentParser":
                problems.append(f"megatron_patch.{module}:{node.lineno}: argparse.ArgumentParser(...)")
            elif isinstance(node, ast.ClassDef) and any(_base_name(b) == "ArgumentParser" for b in node.bases):
                problems.append(f"megatron_patch.{module}:{node.lineno}: class {node.name}(ArgumentParser)")
            elif isinstance(node, ast.FunctionDef) and node.name.lstrip("_") == "fail":
                problems.append(f"megatron_patch.{module}:{node.lineno}: def {node.name}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("modules", [
    ["megatron_patch.config.flags", "megatron_patch.config.plan", "megatron_patch.cli.plan",
     "megatron_patch.training.json_log", "megatron_patch.experiments.sweep", "megatron_patch.cli.sweep"],
    ["megatron_patch.cli.preprocess", "megatron_patch.cli.merge", "megatron_patch.cli.train_tokenizer"],
], ids=["plan", "preprocessing"])
def test_login_node_paths_import_no_torch(modules):
    """Plans (slurm/phase.sbatch --check) and preprocessing run where torch may be absent and must start fast."""
    code = (f"import sys\nimport {', '.join(modules)}\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron', 'deepspeed')))")
    assert run([PYTHON, "-c", code]).stdout.strip() == "[]"


def test_ruff():
    run([os.path.join(os.path.dirname(PYTHON), "ruff"), "check", ROOT])


def test_shell_scripts_pass_shellcheck():
    ensure_programs(["shellcheck"], ["shellcheck"])
    scripts = [path for pattern in ("**/*.sh", "**/*.sbatch", ".ci/run")
               for path in glob.glob(os.path.join(ROOT, pattern), recursive=True) if "/.venv/" not in path]
    assert len(scripts) >= 7 and any(re.search(r"examples/.*\.sh$", s) for s in scripts)
    run(["shellcheck", "-x", *sorted(scripts)])
