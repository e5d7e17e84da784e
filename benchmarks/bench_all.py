"""Every framework's first-layer benchmark, one after another, in one command.

    python benchmarks/bench_all.py [--rounds 15] [--threads 2] [--memory] [--out DIR]

Runs bench_torch.py, bench_jax.py and bench_tf.py, each in its own process (the
frameworks do not share a process well, and each sizes its thread pool at start-up),
with the same options, and prints their tables: TrAct vs the plain layer of the same
framework, measured side by side, plus (PyTorch) the public implementation's unfold +
inverse algorithm. A framework that is not installed is reported and skipped. With
``--out``, each table also goes to ``DIR/<framework>.md`` and ``DIR/<framework>.json``.
"""

import argparse
import importlib.util
import os
import pathlib
import platform
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
SCRIPTS = {"torch": "bench_torch.py", "jax": "bench_jax.py", "tensorflow": "bench_tf.py"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory", action="store_true", help="also measure peak RSS growth")
    parser.add_argument("--frameworks", nargs="*", default=list(SCRIPTS), choices=list(SCRIPTS))
    parser.add_argument("--out", type=pathlib.Path, help="folder for the tables (md, json)")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {load:.2f} at start")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
    failed = []
    for framework in args.frameworks:
        print(f"\n## {framework}\n", flush=True)
        if importlib.util.find_spec(framework) is None:
            print(f"{framework} is not installed here: skipped")
            continue
        command = [sys.executable, str(HERE / SCRIPTS[framework]), "--rounds",
                   str(args.rounds), "--threads", str(args.threads)]
        if args.memory:
            command.append("--memory")
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            command += ["--json", str(args.out / f"{framework}.json")]
        run = subprocess.run(command, env=env, capture_output=True, text=True)
        print(run.stdout, end="")
        if run.returncode:
            print(run.stderr, file=sys.stderr)
            failed.append(framework)
        elif args.out:
            (args.out / f"{framework}.md").write_text(run.stdout)
    if failed:
        sys.exit(f"benchmark failed for: {', '.join(failed)}")


if __name__ == "__main__":
    main()
