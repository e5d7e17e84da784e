"""One session per backend environment; `nox` runs them all.

Each session installs its pinned requirements from backends/<name>.txt, then runs the
shared test bodies with TRACT_REQUIRE naming the frameworks that must import there (a
missing one is an error, not a skip).
"""

import nox

nox.options.default_venv_backend = "venv"
nox.options.error_on_missing_interpreters = True

KERAS_TESTS = ["tests/test_keras.py", "tests/test_keras_accumulation.py", "tests/test_fuzz.py"]
# session name -> (requirements file, frameworks that must import, test files, extra env)
BACKENDS = {
    "numpy": ("numpy", "numpy", ["tests/test_core.py", "tests/test_fixtures.py",
                                 "tests/test_project.py", "tests/test_fuzz.py"], {}),
    "torch": ("torch", "numpy torch",
              ["tests/test_core.py", "tests/test_torch.py", "tests/test_torch_accumulation.py",
               "tests/test_fuzz.py"], {}),
    "jax": ("jax", "numpy jax optax",
            ["tests/test_core.py", "tests/test_jax.py", "tests/test_jax_accumulation.py",
             "tests/test_functional.py", "tests/test_fuzz.py"], {}),
    "flax": ("flax", "numpy jax flax equinox optax",
             ["tests/test_flax.py", "tests/test_fuzz.py"], {}),
    "tensorflow": ("tensorflow", "numpy tensorflow",
                   ["tests/test_core.py", "tests/test_tensorflow.py",
                    "tests/test_functional.py", "tests/test_fuzz.py"], {}),
    "keras-tensorflow": ("keras-tensorflow", "numpy keras tensorflow", KERAS_TESTS,
                         {"KERAS_BACKEND": "tensorflow"}),
    "keras-jax": ("keras-jax", "numpy keras jax", KERAS_TESTS, {"KERAS_BACKEND": "jax"}),
    "keras-torch": ("keras-torch", "numpy keras torch", KERAS_TESTS, {"KERAS_BACKEND": "torch"}),
    "examples": ("examples", "numpy torch sklearn matplotlib tqdm jax flax optax keras",
                 ["tests/test_examples.py", "tests/test_benchmarks.py"],
                 {"KERAS_BACKEND": "jax"}),
    # Exact data parallelism: 2 gloo processes (torch), 2 forced host devices (JAX),
    # MirroredStrategy over 2 logical CPUs (TensorFlow, Keras).
    "distributed": ("distributed", "numpy torch jax tensorflow keras",
                    ["tests/test_distributed_torch.py", "tests/test_distributed_jax.py",
                     "tests/test_distributed_tensorflow.py"], {}),
}


def _backend_session(name, requirements, required, tests, env):
    @nox.session(name=name)
    def session(s):
        s.install("-r", f"backends/{requirements}.txt")
        s.install("--no-deps", "-e", ".")
        s.run("pytest", *tests, *s.posargs, env={"TRACT_REQUIRE": required, **env})

    return session


for _name, (_req, _required, _tests, _env) in BACKENDS.items():
    globals()[f"session_{_name.replace('-', '_')}"] = _backend_session(
        _name, _req, _required, _tests, _env
    )


@nox.session
def lint(s):
    s.install("-r", "backends/lint.txt")
    s.run("ruff", "check", ".")


@nox.session
def docs(s):
    """The documentation site, built with warnings as errors, and every snippet in it run."""
    s.install("-r", "backends/docs.txt")
    s.install("--no-deps", "-e", ".")
    s.run("mkdocs", "build", "--strict", "--site-dir", f"{s.create_tmp()}/site",
          env={"NO_MKDOCS_2_WARNING": "1"})
    s.run("pytest", "tests/test_docs.py", *s.posargs,
          env={"TRACT_REQUIRE": "numpy torch jax flax equinox optax tensorflow keras"})
