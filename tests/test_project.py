"""House rules that can be checked: layering of imports, README commands, CI, and the
package people install (version, license, metadata, wheel contents, missing frameworks)."""

import ast
import email
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
from conftest import REQUIRED

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

import tract_core
from tract_core._requires import requires

ROOT = pathlib.Path(__file__).parents[1]
FRAMEWORKS = {"torch", "jax", "jaxlib", "flax", "equinox", "tensorflow", "keras", "optax"}
# Each module may import these frameworks and these tract_core modules (the house's layers).
ALLOWED = {
    "_args": (set(), set()),
    "_requires": (set(), set()),
    "_call_order": (set(), set()),
    "_backends": ({"torch", "jax"}, {"_tf_namespace"}),  # lazily, for arrays of that library
    "_patches": (set(), {"_backends"}),
    "_conv_gram": (set(), {"_backends", "_patches"}),
    "_core": (set(), {"_backends", "_patches", "_conv_gram"}),
    "__init__": (set(), {"_core", "_patches", "_conv_gram"}),
    "_tf_namespace": ({"tensorflow"}, {"_backends", "_patches"}),
    "_jax_vmap": ({"jax"}, set()),
    "_torch_accumulate": ({"torch"}, {"__init__"}),
    "_torch_adopt": ({"torch"}, set()),
    "torch": ({"torch"}, {"__init__", "_args", "_requires", "_torch_accumulate",
                          "_torch_adopt"}),
    "jax": ({"jax"}, {"__init__", "_args", "_backends", "_jax_vmap", "_requires"}),
    "tensorflow": ({"tensorflow"}, {"__init__", "_args", "_tf_namespace", "_requires"}),
    "flax": ({"jax", "flax"}, {"jax", "__init__", "_requires", "_call_order"}),
    "equinox": ({"jax", "equinox"}, {"jax", "__init__", "_requires", "_call_order"}),
    "keras": ({"keras", "torch", "jax", "tensorflow"},
              {"torch", "jax", "tensorflow", "__init__", "_args", "_requires"}),
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


# The package people install.

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# adapter -> the modules it needs; its extra is named after it (tract-core[torch], ...).
ADAPTERS = {"torch": ["torch"], "jax": ["jax"], "flax": ["flax", "jax"],
            "equinox": ["equinox", "jax"], "tensorflow": ["tensorflow"], "keras": ["keras"]}
FRAMEWORK_EXTRAS = ["torch", "jax", "flax", "equinox", "tensorflow", "keras"]


def test_the_version_is_written_once_and_the_changelog_has_it():
    """pyproject.toml reads tract_core.__version__; the built wheel's version is checked
    in test_wheel_ships_the_package_and_imports_no_framework."""
    assert "version" not in PYPROJECT and "version" in PYPROJECT["dynamic"]
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["dynamic"]["version"] == {"attr": "tract_core.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", tract_core.__version__)
    assert f"## [{tract_core.__version__}]" in (ROOT / "CHANGELOG.md").read_text()


def test_license_file_matches_the_metadata():
    assert PYPROJECT["license"] == "MIT" and PYPROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "Permission is hereby granted, free of charge" in text
    assert not any(c.startswith("License ::") for c in PYPROJECT["classifiers"])


def test_all_extra_is_every_framework_extra():
    extras = PYPROJECT["optional-dependencies"]
    union = {req for name in FRAMEWORK_EXTRAS for req in extras[name]}
    assert set(extras["all"]) == union and len(extras["all"]) == len(union)


def test_citation_names_the_paper():
    citation = (ROOT / "CITATION.cff").read_text()
    readme = (ROOT / "README.md").read_text()
    for text in (citation, readme):
        assert "2410.23970" in text and "Making First-layer Pre-Activations Trainable" in text
    assert "cff-version:" in citation and "preferred-citation:" in citation


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_adapter_without_its_framework_names_the_extra(adapter):
    """In a fresh interpreter; frameworks that are installed are hidden from it
    (None in sys.modules), those that are not are missing for real."""
    hidden = [m for m in ADAPTERS[adapter] if importlib.util.find_spec(m) is not None]
    child = ("import importlib, json, sys\n"
             "sys.modules.update(dict.fromkeys(sys.argv[2:]))\n"
             "try:\n"
             "    importlib.import_module(sys.argv[1])\n"
             "except ImportError as error:\n"
             "    print(json.dumps([type(error).__name__, str(error),\n"
             "                      type(error.__cause__).__name__]))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", child, f"tract_core.{adapter}", *hidden],
                            capture_output=True, text=True, env=env, timeout=60, check=True)
    kind, message, cause = json.loads(result.stdout)
    assert kind == "ModuleNotFoundError" and cause == "ModuleNotFoundError"
    assert message.startswith(f"tract_core.{adapter} needs ")
    assert message.endswith(f"pip install 'tract-core[{adapter}]'")


def test_requires_lets_other_missing_modules_through():
    with pytest.raises(ModuleNotFoundError) as raised, requires("torch", "PyTorch"):
        importlib.import_module("tract_core_no_such_module")
    assert raised.value.name == "tract_core_no_such_module"
    assert "tract-core[" not in str(raised.value)


def test_wheel_ships_the_package_and_imports_no_framework(tmp_path):
    """Builds the wheel from a copy of the project (no build isolation: setuptools from
    backends/numpy.txt), checks its files and metadata, installs it into a folder with
    no dependencies and imports it from there."""
    import setuptools

    if int(setuptools.__version__.split(".")[0]) < 77:
        message = f"setuptools {setuptools.__version__} < 77 (backends/numpy.txt pins it)"
        pytest.fail(message) if REQUIRED else pytest.skip(message)
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns(".*", "__pycache__", "*.egg-info", "build", "dist",
                                    "site", "runs")
    shutil.copytree(ROOT, source, ignore=ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-index", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, capture_output=True, timeout=120)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    version = tract_core.__version__
    assert wheel.name == f"tract_core-{version}-py3-none-any.whl"

    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = f"tract_core-{version}.dist-info"
        metadata = email.message_from_bytes(archive.read(f"{info}/METADATA"))
        license_text = archive.read(f"{info}/licenses/LICENSE").decode()
    modules = {f"tract_core/{p.name}" for p in (ROOT / "tract_core").glob("*.py")}
    assert modules | {"tract_core/py.typed"} <= names
    assert {name.split("/")[0] for name in names} == {"tract_core", info}
    assert license_text == (ROOT / "LICENSE").read_text()
    assert metadata["Version"] == version and metadata["License-Expression"] == "MIT"
    assert metadata["Name"] == "tract-core"
    assert metadata["Requires-Python"] == PYPROJECT["requires-python"]
    required = [r for r in metadata.get_all("Requires-Dist") if "extra ==" not in r]
    assert sorted(re.match(r"[\w-]+", r).group() for r in required) == [
        "array-api-compat", "numpy"]
    assert set(metadata.get_all("Provides-Extra")) >= {*FRAMEWORK_EXTRAS, "all"}

    target = tmp_path / "installed"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, timeout=120)
    check = ("import importlib.metadata, json, pathlib, sys, tract_core\n"
             "frameworks = {'torch', 'jax', 'flax', 'equinox', 'tensorflow', 'keras'}\n"
             "print(json.dumps([tract_core.__file__, tract_core.__version__,\n"
             "                  importlib.metadata.version('tract-core'),\n"
             "                  sorted(frameworks & set(sys.modules))]))\n")
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env,
                            capture_output=True, text=True, check=True, timeout=60)
    path, imported, installed, frameworks = json.loads(result.stdout)
    assert pathlib.Path(path).is_relative_to(target)
    assert (pathlib.Path(path).parent / "py.typed").is_file()
    assert imported == installed == version and frameworks == []


def test_compare_help_needs_no_framework():
    """``examples/compare.py --help`` works where only numpy is installed."""
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "compare.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--baseline-epochs" in out and "--framework" in out
