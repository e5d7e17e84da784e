"""Every framework's benchmarks, one after another, in one command.

    python benchmarks/bench_all.py [--rounds 15] [--threads 2] [--memory] [--out DIR]
                                   [--frameworks torch jax tensorflow]
                                   [--whole-steps [--models cnn resnet18 vit]]

Runs bench_torch.py, bench_jax.py and bench_tf.py, each in its own process (the
frameworks do not share a process well, and each sizes its thread pool at start-up),
with the same options, and prints their tables: TrAct vs the plain layer of the same
framework, measured side by side, plus (PyTorch) the public implementation's unfold +
inverse algorithm. ``--whole-steps`` adds the whole training steps of each framework:
whole_step_torch.py (PyTorch), whole_step_jax.py (JAX with Flax NNX and optax) and
whole_step_keras.py on that framework as Keras's backend. A framework (or Keras, Flax)
that is not installed is reported and skipped. With ``--out``, each table also goes to
``DIR/<name>.md`` and ``DIR/<name>.json``.
"""

import argparse
import importlib.util
import os
import pathlib
import platform
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
# framework: [(name, script, modules it needs, extra environment)], first-layer benchmark
# first, then the whole steps
RUNS = {
    "torch": [("torch", "bench_torch.py", ["torch"], {}),
              ("torch-whole-step", "whole_step_torch.py", ["torch"], {}),
              ("keras-torch-whole-step", "whole_step_keras.py", ["torch", "keras"],
               {"KERAS_BACKEND": "torch"})],
    "jax": [("jax", "bench_jax.py", ["jax"], {}),
            ("jax-whole-step", "whole_step_jax.py", ["jax", "flax", "optax"], {}),
            ("keras-jax-whole-step", "whole_step_keras.py", ["jax", "keras"],
             {"KERAS_BACKEND": "jax"})],
    "tensorflow": [("tensorflow", "bench_tf.py", ["tensorflow"], {}),
                   ("keras-tensorflow-whole-step", "whole_step_keras.py",
                    ["tensorflow", "keras"], {"KERAS_BACKEND": "tensorflow"})],
}
WHOLE_STEP_MODELS = ["cnn", "resnet18", "vit"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory", action="store_true", help="also measure peak RSS growth")
    parser.add_argument("--frameworks", nargs="*", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--whole-steps", action="store_true",
                        help="also time whole training steps (PyTorch, JAX, Keras 3)")
    parser.add_argument("--models", nargs="*", default=WHOLE_STEP_MODELS,
                        choices=WHOLE_STEP_MODELS, help="the whole steps' models")
    parser.add_argument("--out", type=pathlib.Path, help="folder for the tables (md, json)")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {load:.2f} at start")
    path = os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))
    failed = []
    for framework in args.frameworks:
        for name, script, modules, extra in RUNS[framework][:None if args.whole_steps else 1]:
            print(f"\n## {name}\n", flush=True)
            missing = [m for m in modules if importlib.util.find_spec(m) is None]
            if missing:
                print(f"{', '.join(missing)} not installed here: skipped")
                continue
            command = [sys.executable, str(HERE / script), "--rounds", str(args.rounds),
                       "--threads", str(args.threads)]
            if script.startswith("whole_step"):
                command += ["--models", *args.models]
            elif args.memory:
                command.append("--memory")
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                command += ["--json", str(args.out / f"{name}.json")]
            run = subprocess.run(command, env={**os.environ, "PYTHONPATH": path, **extra},
                                 capture_output=True, text=True)
            print(run.stdout, end="")
            if run.returncode:
                print(run.stderr, file=sys.stderr)
                failed.append(name)
            elif args.out:
                (args.out / f"{name}.md").write_text(run.stdout)
    if failed:
        sys.exit(f"benchmark failed for: {', '.join(failed)}")


if __name__ == "__main__":
    main()
