"""Command line: vanilla vs TrAct over seeds and epoch budgets, resumable, with a report.

The paper's protocol (section 4): the baseline's best learning rate is used for TrAct
too. Give one ``--lr``, or ``--lr-sweep`` to train the baseline at each lr of a grid per
epoch budget, pick the lr with the best mean test accuracy, and train TrAct with it.
(Like the paper, the sweep selects on test accuracy: a bias in the baseline's favour.)

``--framework`` picks the trainer: ``train`` (PyTorch), ``train_jax`` (Flax NNX + optax)
or ``train_keras`` (Keras 3 on KERAS_BACKEND, default jax). Only the chosen one is
imported, so a torch comparison never starts JAX and a JAX one never imports torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import pathlib
import shlex
import statistics
import sys
import time

from . import loop, speedup
from .config import FRAMEWORKS, METHODS, MODEL_NAMES, RunConfig, run_key
from .data import DATASETS, INPUTS, DataNotFoundError, load_dataset
from .results import Comparison, ResultStore, comparison_table, mean_std, plot_accuracy
from .results import sweep_table as make_sweep_table
from .speedup import speed_up_table, summary_line

DEFAULT_LR = {"sgd": 0.05, "adam": 1e-3}
DEFAULT_SWEEP = {"sgd": [0.1, 0.05, 0.02], "adam": [10**-2, 10**-2.5, 10**-3, 10**-3.5]}
TRAINERS = {"torch": "train", "jax": "train_jax", "keras": "train_keras"}


def load_trainer(framework, threads=None):
    """The trainer module of ``framework`` (a key of TRAINERS, or a run's framework such
    as "keras-jax"), imported on first use; ``threads`` (if given) applied to it.

    JAX takes its CPU thread count from the cores the process may use when it starts, so
    for jax (and Keras on jax) the process is pinned to ``threads`` cores before the
    import (see ``loop.limit_cpu_threads``); torch and TensorFlow are told directly.
    """
    name = framework.split("-")[0]
    if name not in TRAINERS:
        raise ValueError(f"framework must be one of {', '.join(TRAINERS)}, got {framework!r}")
    if name == "keras":
        os.environ.setdefault("KERAS_BACKEND", "jax")  # as train_keras does, but sooner
    if threads is not None and (name == "jax" or (
            name == "keras" and os.environ["KERAS_BACKEND"] == "jax")):
        loop.limit_cpu_threads(threads)
    module = importlib.import_module(f".{TRAINERS[name]}", __package__)
    if threads is not None:
        module.set_threads(threads)
    return module


def train_run(config, method, seed, data, progress=False) -> dict:
    """One run, by the trainer of ``config.framework`` (see train.train_run)."""
    return load_trainer(config.framework).train_run(config, method, seed, data,
                                                    progress=progress)


def parse_args(argv=None, defaults=None):
    """The command line's options (``--help`` lists them); ``defaults`` overrides ours."""
    parser = argparse.ArgumentParser(
        prog="compare.py", description="Vanilla vs TrAct: test accuracy over seeds and "
        "epoch budgets, same init, batches and lr for both.")
    parser.add_argument("--dataset", choices=list(DATASETS), default="digits")
    parser.add_argument("--data-dir", help="folder of the data files (fashion-mnist: "
                        "default /usr/share/datasets/fashion-mnist; cifar: required)")
    parser.add_argument("--framework", choices=FRAMEWORKS, default="torch",
                        help="torch (default), jax (Flax NNX + optax) or keras (Keras 3 on "
                        "KERAS_BACKEND, default jax); part of each run's key")
    parser.add_argument("--model", choices=MODEL_NAMES, default="cnn")
    parser.add_argument("--optimizer", choices=list(DEFAULT_LR), default="sgd",
                        help="sgd (momentum 0.9) or adam; cosine schedule either way")
    parser.add_argument("--lr", type=float, help="default: 0.05 (sgd), 1e-3 (adam)")
    parser.add_argument("--lr-sweep", type=float, nargs="*", metavar="LR",
                        help="train the baseline at each LR (none given: a default grid), "
                        "then TrAct at the baseline's best, per epoch budget")
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 2, 4],
                        help="epoch budgets of both methods; each is its own cosine run "
                        "(default 1 2 4)")
    parser.add_argument("--baseline-epochs", type=int, nargs="*", default=[],
                        help="more budgets for vanilla alone: how far its curve reaches "
                        "bounds the speed-up factor")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    parser.add_argument("--lam", type=float, nargs="+", default=[0.1],
                        help="TrAct's lambda; several values: a lambda sweep (the first "
                        "one is the summary's)")
    parser.add_argument("--inputs", choices=INPUTS, default="standardized",
                        help="pixel scaling: standardized per channel (default), or in "
                        "[0, 1] or [0, 255] (the paper's no-standardization ablation)")
    parser.add_argument("--pad-to", type=int, metavar="SIZE",
                        help="zero-pad images to SIZE x SIZE (e.g. Fashion-MNIST to 32 for "
                        "the CIFAR ResNet-18)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--augment", action="store_true",
                        help="random 4-pixel shifts and horizontal flips (for CIFAR)")
    parser.add_argument("--patch", type=int, default=4, help="ViT patch size")
    parser.add_argument("--width", type=int, default=64,
                        help="ResNet-18's stem channels, doubled per stage (torch only)")
    parser.add_argument("--train-limit", type=int, help="first N training images only")
    parser.add_argument("--test-limit", type=int, help="first N test images only")
    parser.add_argument("--threads", type=int, default=2,
                        help="CPU threads (jax: the process is pinned to this many cores)")
    parser.add_argument("--timing-rounds", type=int, default=10,
                        help="rounds of side-by-side step timing for the speed-up in "
                        "wall-clock time (0: none; cached in OUT/timing.json)")
    parser.add_argument("--out", type=pathlib.Path,
                        help="folder for runs.jsonl (resumable), results.md, accuracy.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(**(defaults or {}))
    args = parser.parse_args(argv)
    if args.lr is None:
        args.lr = DEFAULT_LR[args.optimizer]
    if args.lr_sweep == []:
        args.lr_sweep = DEFAULT_SWEEP[args.optimizer]
    for name in ("epochs", "baseline_epochs"):
        if any(epochs < 1 for epochs in getattr(args, name)):
            parser.error(f"--{name.replace('_', '-')} must be positive integers")
    if any(lam <= 0 for lam in args.lam):
        parser.error("--lam must be positive")
    if args.width != 64 and (args.framework != "torch" or args.model != "resnet18"):
        parser.error("--width applies to the torch ResNet-18 only")
    return args


class Runner:
    """Trains each (method, seed, config) once: finished runs come from the store."""

    def __init__(self, data, store, progress, total):
        self.data, self.store, self.progress = data, store, progress
        self.total, self.count, self.seen = total, 0, set()

    def __call__(self, config, method, seed):
        key = run_key(config, method, seed)
        record = self.store.get(key)
        if record is not None and str(key) in self.seen:
            return record  # already reported in this invocation (the sweep's runs)
        self.seen.add(str(key))
        self.count += 1
        origin = "from runs.jsonl"
        if record is None:
            record = train_run(config, method, seed, self.data, progress=self.progress)
            self.store.add(record)
            origin = f"{record['seconds']:.0f} s"
        print(f"[{self.count}/{self.total}] {method:7s} seed {seed}  {config.epochs} ep  "
              f"lr {config.lr:g}: test {record['test_acc']:.2f} %  ({origin})", flush=True)
        return record


def measure_step_times(trainer, config, data, rounds, out=None) -> dict | None:
    """Seconds per step of both methods, side by side (``loop.paired_step_seconds``).

    ``config``: the TrAct runs' settings. Cached in OUT/timing.json per setting (epochs,
    lr and lam do not change a step's cost), so re-running a command reuses the numbers.
    None where ``rounds`` is 0.
    """
    if not rounds:
        return None
    key = json.dumps({name: value for name, value in dataclasses.asdict(config).items()
                      if name not in ("epochs", "lr", "lam")} | {"rounds": rounds},
                     sort_keys=True)
    path = out / "timing.json" if out else None
    cache = json.loads(path.read_text()) if path and path.exists() else {}
    if key not in cache:
        print(f"timing both methods' training steps side by side ({rounds} rounds)",
              flush=True)
        steppers = {method: trainer.stepper(config, method, 0, data) for method in METHODS}
        cache[key] = loop.paired_step_seconds(steppers, len(data.y_train),
                                              config.batch_size, rounds=rounds)
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(cache, indent=1))
    return cache[key]


def _report(args, argv, config, comparisons, sweep, environment, speedups, timing):
    title = (f"{args.dataset}, {args.model}, {args.optimizer} + cosine, batch "
             f"{args.batch_size}, TrAct lam {', '.join(f'{lam:g}' for lam in args.lam)}, "
             f"{args.seeds} seeds, {config.framework}")
    table = comparison_table(comparisons)
    settings = ", ".join(f"{name} {value}" for name, value in dataclasses.asdict(config).items()
                         if name not in ("lr", "epochs", "lam"))
    text = [f"# Vanilla vs TrAct: {title}", "",
            f"Command: `python {shlex.join([sys.argv[0], *argv])}`", "",
            f"Settings: {settings}; {environment}.",
            "",
            "Final test accuracy (%), mean ± sample std over seeds; every seed listed "
            "(seeds 0, 1, ...). Both methods share seed, initialisation, batches and lr; "
            "each budget is its own full cosine run.",
            "", table, ""]
    if speedups:
        text += ["Speed-up: the epochs vanilla needs to reach TrAct's mean accuracy, "
                 "interpolated in log2(epochs) between vanilla's budgets, over TrAct's "
                 "epochs; \"> x\": vanilla never got there within its largest budget. "
                 f"95% intervals: bootstrap over seeds ({speedup.BOOTSTRAP_RESAMPLES} "
                 "resamples, a seed's runs kept together).", "",
                 speed_up_table(speedups), ""]
    if timing:
        ratios = sorted(timing["ratios"])
        text += [f"Time per training step, TrAct / vanilla, measured side by side in one "
                 f"process: median {statistics.median(ratios):.3f} over "
                 f"{len(ratios)} rounds (range {ratios[0]:.3f} to {ratios[-1]:.3f}); "
                 "the speed-up in time divides the one in epochs by it (the bootstrap "
                 "resamples the rounds too).", ""]
    if sweep:
        text += ["Baseline learning-rate sweep (* = the lr TrAct used):", "",
                 make_sweep_table(sweep), ""]
    text += ["![test accuracy and speed-up](accuracy.png)", ""]
    return title, table, "\n".join(text)


def _speed_ups(comparisons, lams, timing):
    """{lam: [SpeedUp per TrAct budget]} from the runs (empty if vanilla ran one budget)."""
    vanilla = {c.epochs: [r["test_acc"] for r in c.runs["vanilla"]]
               for c in comparisons if c.lam in (None, lams[0])}
    if len(vanilla) < 2:
        return {}
    ratios = timing["ratios"] if timing else None
    return {lam: speedup.speed_ups(vanilla, {
        c.epochs: [r["test_acc"] for r in c.runs["tract"]]
        for c in comparisons if c.lam == lam}, ratios) for lam in lams}


def main(argv=None, defaults=None):
    """Run the comparison the arguments describe; returns the list of Comparisons.

    ``argv``: the options (default: the command line's); ``defaults``: option defaults
    (argparse ``dest`` names) replacing ours, for entry points like train_digits.py.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv, defaults)
    started = time.perf_counter()
    trainer = load_trainer(args.framework, args.threads)
    environment = ", ".join(f"{name} {value}" for name, value in trainer.environment().items())
    try:
        data = load_dataset(args.dataset, args.data_dir, args.train_limit, args.test_limit,
                            inputs=args.inputs, pad_to=args.pad_to)
    except DataNotFoundError as error:
        sys.exit(f"error: {error}")  # the message names the folder and the files
    store = ResultStore(args.out / "runs.jsonl" if args.out else None)
    base = RunConfig(
        dataset=args.dataset, model=args.model, optimizer=args.optimizer, lr=args.lr,
        epochs=0, batch_size=args.batch_size, lam=args.lam[0],
        weight_decay=args.weight_decay, label_smoothing=args.label_smoothing,
        augment=args.augment, patch=args.patch, train_limit=args.train_limit,
        test_limit=args.test_limit, framework=getattr(trainer, "FRAMEWORK", args.framework),
        inputs=args.inputs, pad_to=args.pad_to, width=args.width)
    budgets = sorted({*args.epochs, *args.baseline_epochs})
    grid = args.lr_sweep or []
    total = args.seeds * (len(budgets) * max(len(grid), 1) + len(args.epochs) * len(args.lam))
    run = Runner(data, store, not args.no_progress, total)
    print(f"{args.dataset}: {len(data.y_train)} train, {len(data.y_test)} test images "
          f"{tuple(data.x_train.shape[1:])}; {len(store)} runs already in the results file; "
          f"{base.framework} ({environment})", flush=True)

    best_lr, sweep = {}, {}
    for epochs in budgets:
        best_lr[epochs] = args.lr
        if grid:  # the baseline alone at each lr; TrAct then gets the best one
            sweep[epochs] = {
                lr: [run(dataclasses.replace(base, epochs=epochs, lr=lr), "vanilla", seed)
                     for seed in range(args.seeds)] for lr in grid}
            best_lr[epochs] = max(grid, key=lambda lr, e=epochs: mean_std(
                r["test_acc"] for r in sweep[e][lr])[0])

    comparisons = []
    for epochs in budgets:
        config = dataclasses.replace(base, epochs=epochs, lr=best_lr[epochs])
        lams = args.lam if epochs in args.epochs else []
        runs = {(method, lam): [] for method, lam in [("vanilla", None)] + [
            ("tract", lam) for lam in lams]}
        for seed in range(args.seeds):
            for method, lam in runs:
                runs[method, lam].append(run(dataclasses.replace(config, lam=lam or base.lam),
                                             method, seed))
        comparisons += [Comparison(epochs, best_lr[epochs], {
            "vanilla": runs["vanilla", None], "tract": runs.get(("tract", lam), [])},
            lam if lams else None) for lam in (lams or [None])]

    timing = measure_step_times(trainer, dataclasses.replace(
        base, epochs=max(args.epochs), lr=best_lr[max(args.epochs)]), data,
        args.timing_rounds, args.out)
    speedups = _speed_ups(comparisons, args.lam, timing)
    title, table, report = _report(args, argv, base, comparisons, sweep, environment,
                                   speedups, timing)
    print(f"\nTest accuracy (%), {title}:\n{table}")
    if speedups:
        print(f"\n{speed_up_table(speedups)}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.md").write_text(report)
        plot_accuracy(comparisons, speedups, args.out / "accuracy.png", title)
        print(f"wrote {args.out / 'results.md'}, {args.out / 'accuracy.png'}")
    print(f"total {time.perf_counter() - started:.0f} s")
    if speedups:
        print(summary_line(speedups[args.lam[0]][-1]))
    return comparisons
