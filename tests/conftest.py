"""Shared test machinery: the float64 fixtures and the ``xp`` backend fixture.

One test body runs on every array library present (SciPy's ``xp`` pattern). Under nox,
TRACT_REQUIRE lists the libraries that must import: a missing one fails the run rather
than silently skipping.
"""

import importlib
import json
import os
import pathlib

import numpy as np
import pytest

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
REQUIRED = set(os.environ.get("TRACT_REQUIRE", "").split())


def need(module_name):
    """Import ``module_name``; skip if absent, unless TRACT_REQUIRE says it must be there."""
    if module_name in REQUIRED:
        return importlib.import_module(module_name)
    return pytest.importorskip(module_name)


class Case(dict):
    """One fixture case: metadata keys plus float64 numpy arrays."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError as error:
            raise AttributeError(key) from error


def load_cases():
    meta = json.loads((FIXTURES / "cases.json").read_text())
    with np.load(FIXTURES / "cases.npz") as arrays:
        data = {key: arrays[key] for key in arrays.files}
    cases = []
    for entry in meta["cases"]:
        case = Case(entry)
        for key in entry["arrays"]:
            case[key] = data[f"{entry['name']}/{key}"]
        cases.append(case)
    return cases


CASES = load_cases()
LINEAR_CASES = [c for c in CASES if c.kind == "linear"]
CONV_CASES = [c for c in CASES if c.kind.startswith("conv")]


def case_id(case):
    return case.name


def _numpy_xp():
    return np


def _torch_xp():
    torch = need("torch")
    torch.set_default_dtype(torch.float32)
    return importlib.import_module("array_api_compat.torch")


def _jax_xp():
    jax = need("jax")
    jax.config.update("jax_enable_x64", True)
    return importlib.import_module("jax.numpy")


def _tensorflow_xp():
    need("tensorflow")
    return importlib.import_module("tract_core._tf_namespace").TF


def _cupy_xp():
    need("cupy")
    return importlib.import_module("array_api_compat.cupy")


XP_FACTORIES = {"numpy": _numpy_xp, "torch": _torch_xp, "jax": _jax_xp,
                "tensorflow": _tensorflow_xp, "cupy": _cupy_xp}


# With TRACT_REQUIRE only the libraries it names; without it whatever is installed.
XP_NAMES = [name for name in XP_FACTORIES if not REQUIRED or name in REQUIRED]


@pytest.fixture(params=XP_NAMES)
def xp(request):
    """An array namespace: numpy, torch (array-api-compat), jax.numpy, TensorFlow's (the
    adapter's namespace module) or cupy."""
    return XP_FACTORIES[request.param]()


def to_numpy(array):
    if hasattr(array, "detach"):
        array = array.detach().cpu()
    elif type(array).__module__.startswith("cupy"):
        array = array.get()  # cupy refuses implicit copies to the host
    return np.asarray(array, dtype=np.float64)


def assert_close(actual, expected, rtol, what=""):
    """Relative error in the Frobenius norm, the measure the issues name."""
    actual, expected = to_numpy(actual), to_numpy(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = np.linalg.norm(expected)
    error = np.linalg.norm(actual - expected) / (scale if scale > 0 else 1.0)
    assert error <= rtol, f"{what}: relative error {error:.3g} > {rtol:g}"
