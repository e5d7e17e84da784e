"""Every Python snippet of the documentation runs: docs/**/*.md and README.md.

Rules the pages follow:

- Each page's fenced ``python`` blocks run in order, in one fresh Python process, sharing
  one namespace, so a page can build an example up step by step. Tracebacks point at the
  page's own lines. A page fails if any of its blocks raises.
- A block right after a line ``<!-- skip-snippet -->`` (an HTML comment, invisible on the
  site) is not run. Use it only for code that cannot run here (a multi-process launch).
- A page's frameworks are read from its imports (``import torch``,
  ``import tract_core.flax``, ...). Each one goes through ``conftest.need``: if it is
  absent the page is skipped, unless TRACT_REQUIRE names it (then that is an error).
- A page with a line ``<!-- keras-backends: tensorflow jax torch -->`` runs once per
  listed backend, with KERAS_BACKEND set, and needs that backend's framework as well.
"""

import ast
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
from conftest import need

ROOT = pathlib.Path(__file__).parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
SKIP_MARK = re.compile(r"^\s*<!--\s*skip-snippet\b.*-->\s*$")
KERAS_MARK = re.compile(r"^\s*<!--\s*keras-backends:\s*(?P<names>[\w\s]+?)\s*-->\s*$", re.M)
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w+-]*)")
# The modules a tract_core adapter imports, beyond tract_core's own numpy.
ADAPTER_NEEDS = {
    "tract_core.torch": ["torch"],
    "tract_core.jax": ["jax"],
    "tract_core.flax": ["jax", "flax"],
    "tract_core.tensorflow": ["tensorflow"],
    "tract_core.keras": ["keras"],
}
SNIPPET_TIMEOUT_S = 600

# Runs in the child: blocks arrive as JSON [path, first line, code] on stdin.
RUNNER = """
import json, sys
namespace = {"__name__": "__main__"}
for path, line, code in json.load(sys.stdin):
    exec(compile("\\n" * (line - 1) + code, path, "exec"), namespace)
"""


def fenced_blocks(text):
    """(language, first code line (1-based), code, skipped) for every fenced block."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, lang = match.group("indent"), match.group("lang")
        previous = next((line for line in reversed(lines[:i]) if line.strip()), "")
        body, j = [], i + 1
        while j < len(lines) and not re.match(rf"^{re.escape(indent)}```\s*$", lines[j]):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j])
            j += 1
        blocks.append((lang, i + 2, "\n".join(body) + "\n", bool(SKIP_MARK.match(previous))))
        i = j + 1
    return blocks


def python_blocks(page):
    """[(first line, code)] of the page's runnable python blocks."""
    return [(line, code) for lang, line, code, skipped in fenced_blocks(page.read_text())
            if lang == "python" and not skipped]


def imported_modules(code):
    """Top-level names of everything the code imports (tract_core adapters expanded)."""
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for module in modules:
            for prefix, needs in ADAPTER_NEEDS.items():
                if module == prefix or module.startswith(prefix + "."):
                    names.update(needs)
            top = module.split(".")[0]
            if top != "tract_core" and top not in sys.stdlib_module_names:
                names.add(top)
    return names


def keras_backends(page):
    match = KERAS_MARK.search(page.read_text())
    return match.group("names").split() if match else [None]


def page_runs():
    """One pytest param per page and Keras backend, for every page with python blocks."""
    params = []
    for page in PAGES:
        if not python_blocks(page):
            continue
        for backend in keras_backends(page):
            name = str(page.relative_to(ROOT)) + (f"[{backend}]" if backend else "")
            params.append(pytest.param(page, backend, id=name))
    return params


@pytest.mark.parametrize(("page", "backend"), page_runs())
def test_page_snippets_run(page, backend, tmp_path):
    blocks = python_blocks(page)
    modules = set().union(*(imported_modules(code) for _, code in blocks))
    if backend:
        modules |= {"keras", backend}
    for module in sorted(modules):
        need(module)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    if backend:
        env["KERAS_BACKEND"] = backend
    payload = json.dumps([[str(page), line, code] for line, code in blocks])
    result = subprocess.run([sys.executable, "-c", RUNNER], input=payload, text=True,
                            capture_output=True, cwd=tmp_path, env=env,
                            timeout=SNIPPET_TIMEOUT_S)
    assert result.returncode == 0, (
        f"a snippet of {page.relative_to(ROOT)} failed"
        f"{f' (KERAS_BACKEND={backend})' if backend else ''}:\n{result.stderr[-6000:]}")


def test_snippets_are_found():
    """Guards the extraction itself: the pages hold many runnable blocks."""
    runnable = sum(len(python_blocks(page)) for page in PAGES)
    assert runnable >= 30, f"only {runnable} python blocks found"
    assert python_blocks(ROOT / "README.md"), "README.md's python blocks were not found"


def test_fence_parser_sees_indented_and_skipped_blocks():
    text = ("Text\n\n```python\na = 1\n```\n\n<!-- skip-snippet -->\n```python\nb = 2\n```\n"
            '=== "Tab"\n\n    ```python\n    c = 3\n    ```\n')
    blocks = fenced_blocks(text)
    assert [(b[0], b[1], b[2], b[3]) for b in blocks] == [
        ("python", 4, "a = 1\n", False), ("python", 9, "b = 2\n", True),
        ("python", 14, "c = 3\n", False)]


def test_every_page_is_in_the_nav():
    """Every page of docs/ (but docs/results/, another tool's output) is in mkdocs.yml."""
    config = (ROOT / "mkdocs.yml").read_text()
    for page in DOCS.rglob("*.md"):
        relative = page.relative_to(DOCS).as_posix()
        if not relative.startswith("results/"):
            assert f" {relative}\n" in config, f"{relative} is not in mkdocs.yml's nav"
