"""What the benchmarks share: the command line, timing the variants interleaved as paired
rounds, peak RSS growth in a fresh process, and the table."""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parser(description, goals):
    """The options every benchmark takes; a script adds its own."""
    options = argparse.ArgumentParser(description=description)
    options.add_argument("--rounds", type=int, default=15,
                         help="paired rounds (each variant once per round)")
    options.add_argument("--threads", type=int, default=2)
    options.add_argument("--cases", nargs="*", default=list(goals), choices=list(goals))
    options.add_argument("--memory", action="store_true", help="also measure extra peak memory")
    options.add_argument("--json", help="write the results here too")
    return options


def paired_times(runs, rounds, run):
    """Seconds of ``run(*args)`` per round for each variant of ``runs`` ({variant: args}).

    Each variant runs once to compile and warm up; then the variants take turns, so that
    a change in the machine's load hits all of them alike, in an order reversed every
    round, so that each follows each other as often (what ran before, its caches and its
    freed memory, moves a whole ResNet step by a few percent). Compare variants by their
    per-round ratios (:func:`ratio_summary`): on a shared machine those are stable where
    separate minima are not.
    """
    for args in runs.values():
        run(*args)
    seconds = {variant: [] for variant in runs}
    order = list(runs.items())
    for round_ in range(rounds):
        for variant, args in order if round_ % 2 == 0 else reversed(order):
            start = time.perf_counter()
            run(*args)
            seconds[variant].append(time.perf_counter() - start)
    return seconds


def ratio_summary(seconds, variant, baseline="plain"):
    """Median, first and third quartile of ``variant``'s per-round time over the
    baseline's (``seconds`` from :func:`paired_times`)."""
    ratios = [t / b for t, b in zip(seconds[variant], seconds[baseline])]
    if len(ratios) == 1:
        return ratios[0], ratios[0], ratios[0]
    low, _, high = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), low, high


def ratio_text(summary):
    median, low, high = summary
    return f"{median:.2f}x [{low:.2f}, {high:.2f}]"


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


# The whole-step models in channels-last frameworks (JAX, Keras): name -> (input shape
# (N, H, W, C), the model builder's extra arguments).
CHANNELS_LAST_MODELS = {
    "cnn": ((128, 28, 28, 1), {}),
    "resnet18": ((64, 32, 32, 3), {}),
    "vit": ((64, 32, 32, 3), {"patch": 4, "dim": 384, "depth": 7, "heads": 12}),
}


def print_whole_step_header(rounds, *extra_columns):
    columns = ["variant", "ratio", "plain ms", "variant ms", *extra_columns]
    print(f"| whole step / plain step (median [IQR] of {rounds} paired rounds) | "
          + " | ".join(columns) + " |\n" + "|---" * (len(columns) + 1) + "|")


def print_whole_step_rows(name, seconds, steps, results, *extra_cells):
    """One table row per variant besides plain (``seconds`` from `paired_times`, ``steps``
    training steps per round); the per-round ratios into ``results``."""
    plain_ms = statistics.median(seconds["plain"]) / steps * 1e3
    for key in seconds:
        if key == "plain":
            continue
        median, low, high = ratio_summary(seconds, key)
        results[f"{name}/{key}"] = [t / p for t, p in zip(seconds[key], seconds["plain"])]
        variant_ms = statistics.median(seconds[key]) / steps * 1e3
        print_row(name, key, f"{median:.3f} [{low:.3f}, {high:.3f}]", f"{plain_ms:.1f}",
                  f"{variant_ms:.1f}", *extra_cells)


def timing_cells(case, seconds, goals):
    """case, plain ms, TrAct ms (medians), TrAct/plain (median [IQR] of per-round ratios),
    goal; and the same as a results dict."""
    summary = ratio_summary(seconds, "tract")
    plain, tract = (statistics.median(seconds[v]) for v in ("plain", "tract"))
    cells = [case, f"{plain * 1e3:.1f}", f"{tract * 1e3:.1f}", ratio_text(summary),
             f"<= {goals[case]}x"]
    return cells, {"plain_s": plain, "tract_s": tract, "ratio": summary[0],
                   "ratio_iqr": summary[1:], "ratios_per_round": [
                       t / p for t, p in zip(seconds["tract"], seconds["plain"])]}


TIMING_COLUMNS = ("case", "plain ms", "TrAct ms", "TrAct/plain [IQR]", "goal")


def write_json(path, results):
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
