"""What bench_torch.py, bench_jax.py and bench_tf.py share: the command line, timing the
variants interleaved, peak RSS growth in a fresh process, and the table."""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parser(description, goals):
    """The options every benchmark takes; a script adds its own."""
    options = argparse.ArgumentParser(description=description)
    options.add_argument("--repeats", type=int, default=7)
    options.add_argument("--threads", type=int, default=2)
    options.add_argument("--cases", nargs="*", default=list(goals), choices=list(goals))
    options.add_argument("--memory", action="store_true", help="also measure extra peak memory")
    options.add_argument("--json", help="write the results here too")
    return options


def best_times(runs, repeats, run):
    """Minimum seconds of ``run(*args)`` for each variant of ``runs`` ({variant: args}).

    Each variant runs once to compile and warm up; then the variants take turns, so that
    a change in the machine's load or state hits all of them alike, in an order reversed
    every round, so that each follows each other as often (what ran before, its caches
    and its freed memory, moves a whole ResNet step by a few percent).
    """
    best = {variant: float("inf") for variant in runs}
    for args in runs.values():
        run(*args)
    order = list(runs.items())
    for round_ in range(repeats):
        for variant, args in order if round_ % 2 == 0 else reversed(order):
            start = time.perf_counter()
            run(*args)
            best[variant] = min(best[variant], time.perf_counter() - start)
    return best


def peak_growth_mib(step):
    """Peak RSS while ``step()`` runs minus the RSS before it, in MiB (Linux /proc).

    Call it after a warm-up step, so that what a training step keeps (compiled code,
    allocator pools) is not counted.
    """
    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    before = status("VmRSS:")
    step()
    return (status("VmHWM:") - before) / 1024


def in_fresh_process(module, function, *args):
    """``module.function(*args)`` (a benchmark script here) in a new interpreter: its float
    result. Peak memory needs a process of its own per measurement."""
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import {module}; "
            f"print({module}.{function}(*{args!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def print_row(*cells):
    print("| " + " | ".join(str(cell) for cell in cells) + " |", flush=True)


def print_header(*columns):
    print_row(*columns)
    print("|---" * len(columns) + "|")


def timing_cells(case, best, goals):
    """case, plain ms, TrAct ms, TrAct/plain, goal; and the same as a results dict."""
    ratio = best["tract"] / best["plain"]
    cells = [case, f"{best['plain'] * 1e3:.1f}", f"{best['tract'] * 1e3:.1f}", f"{ratio:.2f}x",
             f"<= {goals[case]}x"]
    return cells, {"plain_s": best["plain"], "tract_s": best["tract"], "ratio": ratio}


TIMING_COLUMNS = ("case", "plain ms", "TrAct ms", "TrAct/plain", "goal")


def write_json(path, results):
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
