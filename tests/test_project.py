"""House rules that can be checked: layering of imports, README commands, CI."""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).parents[1]
FRAMEWORKS = {"torch", "jax", "jaxlib", "flax", "equinox", "tensorflow", "keras", "optax"}
# Each module may import these frameworks and these tract_core modules (the house's layers).
ALLOWED = {
    "_args": (set(), set()),
    "_backends": ({"torch", "jax"}, {"_tf_namespace"}),  # lazily, for arrays of that library
    "_patches": (set(), {"_backends"}),
    "_conv_gram": (set(), {"_backends", "_patches"}),
    "_core": (set(), {"_backends", "_patches", "_conv_gram"}),
    "__init__": (set(), {"_core", "_patches", "_conv_gram"}),
    "_tf_namespace": ({"tensorflow"}, {"_backends", "_patches"}),
    "_jax_vmap": ({"jax"}, set()),
    "torch": ({"torch"}, {"__init__", "_args"}),
    "jax": ({"jax"}, {"__init__", "_args", "_backends", "_jax_vmap"}),
    "tensorflow": ({"tensorflow"}, {"__init__", "_args", "_tf_namespace"}),
    "flax": ({"jax", "flax"}, {"jax", "__init__"}),
    "keras": ({"keras", "torch", "jax", "tensorflow"},
              {"torch", "jax", "tensorflow", "__init__", "_args"}),
}


def imports_of(path):
    frameworks, internal = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top == "tract_core":
                    internal.add(alias.name.split(".")[1] if "." in alias.name else "__init__")
                elif top in FRAMEWORKS:
                    frameworks.add(top)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: from ._core import x / from . import _core
                internal.update([module.split(".")[0]] if module
                                else (alias.name for alias in node.names))
            elif module.split(".")[0] == "tract_core":
                parts = module.split(".")
                internal.add(parts[1] if len(parts) > 1 else "__init__")
            elif module.split(".")[0] in FRAMEWORKS:
                frameworks.add(module.split(".")[0])
    return frameworks, internal


def test_imports_only_run_down_the_layers():
    for path in sorted((ROOT / "tract_core").glob("*.py")):
        allowed_frameworks, allowed_internal = ALLOWED[path.stem]
        frameworks, internal = imports_of(path)
        assert frameworks <= allowed_frameworks, f"{path.name} imports {frameworks}"
        assert internal <= allowed_internal, f"{path.name} imports tract_core.{internal}"


def readme_commands():
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    commands = readme_commands()
    assert len(commands) == 2
    assert "examples/" in commands[0] and "nox" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci


def test_every_backend_file_is_pinned():
    for path in (ROOT / "backends").glob("*.txt"):
        for line in path.read_text().splitlines():
            line = line.split("#")[0].strip()
            if line and not line.startswith("-r"):
                assert "==" in line, f"{path.name}: {line} is not pinned"
