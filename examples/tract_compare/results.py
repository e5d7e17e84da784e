"""Finished runs on disk (resumable), the markdown tables and the accuracy plot."""

from __future__ import annotations

import dataclasses
import json
import math
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
    """Both methods' runs (one record per seed, in seed order) for one epoch budget.

    ``runs["tract"]`` is empty at budgets vanilla ran alone (``--baseline-epochs``);
    ``lam`` is the TrAct runs' lambda (None there).
    """

    epochs: int
    lr: float
    runs: dict  # method -> list of records
    lam: float | None = None


def mean_std(values):
    """Mean and sample standard deviation (Bessel-corrected; 0 for a single value)."""
    values = list(values)
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _accuracy_cell(records):
    if not records:
        return "—"
    mean, std = mean_std(r["test_acc"] for r in records)
    return f"{mean:.2f} ± {std:.2f}"


def _seeds_cell(records):
    return ", ".join(f"{r['test_acc']:.2f}" for r in records) or "—"


def _seconds_cell(records):
    return f"{mean_std(r['seconds'] for r in records)[0]:.0f}" if records else "—"


def comparison_table(comparisons) -> str:
    """Markdown: per epoch budget (and lambda), both methods' test accuracy (mean ± std)
    and every seed; "—" where vanilla ran alone."""
    lines = ["| epochs | lr | lam | vanilla (%) | TrAct (%) | TrAct - vanilla "
             "| vanilla, per seed | TrAct, per seed | s / run (vanilla, TrAct) |",
             "|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    for c in comparisons:
        vanilla, tract = c.runs["vanilla"], c.runs["tract"]
        gain = "—"
        if tract:
            difference = mean_std(r["test_acc"] for r in tract)[0] - mean_std(
                r["test_acc"] for r in vanilla)[0]
            gain = f"{round(difference, 2) + 0.0:+.2f}"  # no "-0.00"
        lam = "—" if c.lam is None else f"{c.lam:g}"
        lines.append(f"| {c.epochs} | {c.lr:g} | {lam} | {_accuracy_cell(vanilla)} "
                     f"| {_accuracy_cell(tract)} | {gain} | {_seeds_cell(vanilla)} "
                     f"| {_seeds_cell(tract)} | {_seconds_cell(vanilla)}, "
                     f"{_seconds_cell(tract)} |")
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
    stats = [mean_std(column) for column in zip(*rows)]
    mean = [m for m, _ in stats]
    axes.plot(x, mean, marker="o", label=label, **style)
    axes.fill_between(x, [m - s for m, s in stats], [m + s for m, s in stats],
                      color=style["color"], alpha=0.2, linewidth=0)


def _log2_axis(axes, budgets):
    axes.set_xscale("log", base=2)
    axes.set_xticks(budgets, [str(b) for b in budgets])
    axes.minorticks_off()


def plot_accuracy(comparisons, speedups, path, title="") -> None:
    """PNG: test accuracy per epoch budget (log2 axis), mean ± std over seeds per method
    (one TrAct line per lambda); with speed-ups, a second panel: the factor in epochs
    (and in time) per TrAct budget with its 95% interval (vanilla's ceiling marked)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lams = list(dict.fromkeys(c.lam for c in comparisons if c.lam is not None))
    count = 1 + bool(speedups) + (len(lams) > 1)
    figure = Figure(figsize=(5.5 * count, 4.2), layout="constrained")
    FigureCanvasAgg(figure)  # Agg, without touching pyplot's global backend
    panels = figure.subplots(1, count, squeeze=False)[0]
    accuracy_panel = panels[0]
    vanilla = {c.epochs: c.runs["vanilla"] for c in comparisons}
    budgets = sorted(vanilla)
    _band(accuracy_panel, budgets, list(zip(*[[r["test_acc"] for r in vanilla[b]]
                                              for b in budgets])),
          "vanilla", {"color": "tab:gray", "linestyle": "--"})
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for lam, color in zip(lams, colors * len(lams)):
        runs = {c.epochs: c.runs["tract"] for c in comparisons if c.lam == lam}
        label = "TrAct" if len(lams) == 1 else f"TrAct, lam {lam:g}"
        _band(accuracy_panel, sorted(runs), list(zip(*[[r["test_acc"] for r in runs[b]]
                                                       for b in sorted(runs)])),
              label, {"color": color, "linestyle": "-"})
    accuracy_panel.set(xlabel="epoch budget (a full cosine run each)",
                       ylabel="final test accuracy (%)", title="accuracy, mean ± std")
    _log2_axis(accuracy_panel, budgets)
    if speedups:
        _plot_speed_ups(panels[1], speedups, colors)
    if len(lams) > 1:
        _plot_lams(panels[-1], comparisons, lams)
    for axes in panels:
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(title)
    figure.savefig(path, dpi=120)


def _plot_lams(axes, comparisons, lams):
    """Accuracy against lambda (log axis) at the largest TrAct budget; vanilla's band."""
    epochs = max(c.epochs for c in comparisons if c.lam is not None)
    runs = {c.lam: c.runs for c in comparisons if c.epochs == epochs and c.lam is not None}
    order = sorted(runs)
    _band(axes, order, list(zip(*[[r["test_acc"] for r in runs[lam]["tract"]]
                                  for lam in order])), "TrAct", {"color": "tab:blue"})
    vanilla = mean_std(r["test_acc"] for r in runs[order[0]]["vanilla"])
    axes.axhline(vanilla[0], color="tab:gray", linestyle="--", label="vanilla")
    axes.axhspan(vanilla[0] - vanilla[1], vanilla[0] + vanilla[1], color="tab:gray",
                 alpha=0.2, linewidth=0)
    axes.set_xscale("log")
    axes.set(xlabel="lambda", ylabel="final test accuracy (%)",
             title=f"{epochs} epochs, by lambda")


def _plot_speed_ups(axes, speedups, colors):
    """The factor per TrAct budget with its interval; an arrow where it is a lower bound."""
    for index, ((lam, rows), color) in enumerate(zip(speedups.items(), colors)):
        for time, marker in ((False, "o"), (True, "s")):
            if time and rows[0].time_factor is None:
                continue
            x = [s.epochs * 2 ** (0.06 * (2 * index + time)) for s in rows]  # side by side
            values, intervals = [], []
            for s in rows:
                interval = s.time_interval if time else s.interval
                ceiling = s.max_budget / s.epochs / (s.time_ratio if time else 1)
                values.append(ceiling if s.bound == ">" else
                              (s.time_factor if time else s.factor))
                # Unbounded ends (vanilla never got there) drawn at vanilla's ceiling.
                intervals.append(tuple(ceiling if math.isinf(v) else v for v in interval))
            low = [v - i[0] for v, i in zip(values, intervals)]
            high = [i[1] - v for v, i in zip(values, intervals)]
            name = "in time" if time else "in epochs"
            label = name if len(speedups) == 1 else f"lam {lam:g}, {name}"
            axes.errorbar(x, values, yerr=[low, high], marker=marker, capsize=3,
                          color=color, linestyle=":" if time else "-", label=label,
                          alpha=0.7 if time else 1.0)
            for xi, value, s in zip(x, values, rows):
                if s.bound == ">":
                    axes.annotate("", (xi, value * 1.15), (xi, value),
                                  arrowprops={"arrowstyle": "->", "color": color})
    bounds = [s.max_budget / s.epochs for rows in speedups.values() for s in rows
              if s.bound == ">"]
    if bounds:  # room above the highest bound for its arrow
        axes.set_ylim(top=max(axes.get_ylim()[1], 1.2 * max(bounds)))
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set(xlabel="TrAct's epoch budget", ylabel="speed-up factor (vanilla / TrAct)",
             title="speed-up to TrAct's accuracy (95% CI)")
    _log2_axis(axes, [s.epochs for s in next(iter(speedups.values()))])
