"""Finished runs on disk (resumable), the markdown tables and the accuracy plot."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import statistics

from .config import KEY_DEFAULTS, RunConfig

KEY_FIELDS = ("method", "seed", *(f.name for f in dataclasses.fields(RunConfig)))
LABELS = {"vanilla": "vanilla", "tract": "TrAct"}


def _key_text(record) -> str:
    """The record's key as canonical JSON; a field it predates reads as the default
    (records written before ``framework`` existed are torch runs)."""
    return json.dumps({field: record.get(field, KEY_DEFAULTS.get(field))
                       for field in KEY_FIELDS}, sort_keys=True)


class ResultStore:
    """Finished runs, one JSON object per line of ``path`` (None: kept in memory only).

    Each record is appended (and flushed to disk) as soon as its run ends, so an
    interrupted comparison loses at most the run in progress; re-running skips the rest.
    """

    def __init__(self, path=None):
        self.path = None if path is None else pathlib.Path(path)
        self._records = {}
        if self.path is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill mid-write: that run reruns
                self._records[_key_text(record)] = record

    def __len__(self):
        return len(self._records)

    def get(self, key: dict) -> dict | None:
        """The finished run with this key (see ``train.run_key``), or None."""
        return self._records.get(_key_text(key))

    def add(self, record: dict) -> None:
        """Remember a finished run and append it to the file at once."""
        self._records[_key_text(record)] = record
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as file:
                file.write(json.dumps(record) + "\n")
                file.flush()
                os.fsync(file.fileno())


@dataclasses.dataclass
class Comparison:
    """Both methods' runs (one record per seed, in seed order) for one epoch budget."""

    epochs: int
    lr: float
    runs: dict  # method -> list of records


def mean_std(values):
    """Mean and sample standard deviation (Bessel-corrected; 0 for a single value)."""
    values = list(values)
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _accuracy_cell(records):
    mean, std = mean_std(r["test_acc"] for r in records)
    return f"{mean:.2f} ± {std:.2f}"


def _seeds_cell(records):
    return ", ".join(f"{r['test_acc']:.2f}" for r in records)


def comparison_table(comparisons) -> str:
    """Markdown: per epoch budget, both methods' test accuracy (mean ± std), every seed."""
    lines = ["| epochs | lr | vanilla (%) | TrAct (%) | TrAct - vanilla | vanilla, per seed "
             "| TrAct, per seed | s / run (vanilla, TrAct) |",
             "|---:|---:|---:|---:|---:|---|---|---:|"]
    for c in comparisons:
        vanilla, tract = c.runs["vanilla"], c.runs["tract"]
        gain = mean_std(r["test_acc"] for r in tract)[0] - mean_std(
            r["test_acc"] for r in vanilla)[0]
        gain = round(gain, 2) + 0.0  # no "-0.00"
        seconds = [mean_std(r["seconds"] for r in runs)[0] for runs in (vanilla, tract)]
        lines.append(f"| {c.epochs} | {c.lr:g} | {_accuracy_cell(vanilla)} "
                     f"| {_accuracy_cell(tract)} | {gain:+.2f} | {_seeds_cell(vanilla)} "
                     f"| {_seeds_cell(tract)} | {seconds[0]:.0f}, {seconds[1]:.0f} |")
    return "\n".join(lines)


def sweep_table(sweep) -> str:
    """Markdown: the baseline's test accuracy per (epochs, lr); * marks the chosen lr.

    ``sweep``: {epochs: {lr: [vanilla records]}}.
    """
    lines = ["| epochs | lr | vanilla (%) | per seed |", "|---:|---:|---:|---|"]
    for epochs, by_lr in sweep.items():
        best = max(by_lr, key=lambda lr: mean_std(r["test_acc"] for r in by_lr[lr])[0])
        for lr, records in by_lr.items():
            mark = " *" if lr == best else ""
            lines.append(f"| {epochs} | {lr:g}{mark} | {_accuracy_cell(records)} "
                         f"| {_seeds_cell(records)} |")
    return "\n".join(lines)


def _band(axes, x, rows, label, style):
    """Mean line with a ±1 std band over the rows (one row per seed)."""
    columns = list(zip(*rows))
    stats = [mean_std(column) for column in columns]
    mean, std = [m for m, _ in stats], [s for _, s in stats]
    axes.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=label, **style)
    axes.fill_between(x, [m - s for m, s in stats], [m + s for m, s in stats],
                      color=style["color"], alpha=0.2, linewidth=0)


def plot_accuracy(comparisons, path, title="") -> None:
    """PNG, two panels, mean ± std over seeds per method.

    Left: final test accuracy per epoch budget (one cosine run per budget, as in the
    paper's figures). Right: test accuracy after each epoch of the longest budget.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(figure)  # Agg, without touching pyplot's global backend
    final, per_epoch = figure.subplots(1, 2)
    styles = {"vanilla": {"color": "tab:gray", "linestyle": "--"},
              "tract": {"color": "tab:blue", "linestyle": "-"}}
    budgets = [c.epochs for c in comparisons]
    longest = max(comparisons, key=lambda c: c.epochs)
    for method, style in styles.items():
        finals = [[r["test_acc"] for r in c.runs[method]] for c in comparisons]
        _band(final, budgets, list(zip(*finals)), LABELS[method], style)
        histories = [r["history"] for r in longest.runs[method]]
        _band(per_epoch, range(1, longest.epochs + 1), histories, LABELS[method], style)
    final.set(xlabel="epoch budget (a full cosine run each)", ylabel="final test accuracy (%)",
              xticks=budgets, title="after training")
    per_epoch.set(xlabel="epoch", ylabel="test accuracy (%)",
                  xticks=range(1, longest.epochs + 1),
                  title=f"during the {longest.epochs}-epoch runs")
    for axes in (final, per_epoch):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(title)
    figure.savefig(path, dpi=120)
