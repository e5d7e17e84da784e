"""The speed-up factor: how many epochs vanilla needs to match TrAct, with an interval.

For a TrAct budget E (a full cosine run of E epochs) and TrAct's mean test accuracy a
there, vanilla's budget to reach a is read off vanilla's mean accuracy over its measured
budgets, interpolated linearly in log2(epochs) between the first budget that reaches a
and the one before it. The factor is that budget over E. Vanilla may never get there
(the factor is then only bounded: "> max budget / E") or may get there at its smallest
budget already ("<= min budget / E").

The interval is a percentile bootstrap over seeds. A seed fixes a run's initialisation
and batches for both methods and every budget, so a resample draws seeds with
replacement and keeps each drawn seed's runs together. The time-to-accuracy factor is the
epoch factor divided by the ratio of TrAct's to vanilla's time per epoch (measured side by
side, see ``loop.paired_step_seconds``: the median of per-round ratios); the bootstrap
resamples those rounds as well.

Pure Python and numpy: no framework is imported.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np

BOOTSTRAP_RESAMPLES = 4000
CONFIDENCE = 0.95


def vanilla_epochs_to_reach(budgets, accuracies, target) -> float:
    """The epochs vanilla needs for ``target`` accuracy, from its accuracy per budget.

    Args:
        budgets: increasing epoch budgets (each a full run). accuracies: vanilla's mean
            accuracy at each. target: the accuracy to reach.

    Returns:
        Epochs, interpolated in log2(epochs) between the first budget reaching ``target``
        and its predecessor; ``budgets[0]`` if the first budget reaches it already (an
        upper bound); ``inf`` if no budget reaches it.
    """
    if len(budgets) != len(accuracies) or not budgets:
        raise ValueError("budgets and accuracies must be non-empty and of equal length")
    if any(b <= a for a, b in itertools.pairwise(budgets)):
        raise ValueError(f"budgets must increase, got {budgets}")
    for i, accuracy in enumerate(accuracies):
        if accuracy >= target:
            if i == 0:
                return float(budgets[0])
            low, high = accuracies[i - 1], accuracy
            fraction = (target - low) / (high - low)
            log_low, log_high = math.log2(budgets[i - 1]), math.log2(budgets[i])
            return 2.0 ** (log_low + fraction * (log_high - log_low))
    return math.inf


@dataclasses.dataclass
class SpeedUp:
    """TrAct's speed-up at one budget: in epochs and in wall-clock time, with intervals.

    ``factor`` is vanilla's epochs to reach TrAct's mean accuracy over ``epochs``; inf
    where vanilla never reaches it. ``bound`` is "" (an interpolated value), ">" (vanilla
    did not reach it within ``max_budget``: the factor is at least max_budget / epochs) or
    "<=" (vanilla reached it at its smallest budget). ``interval`` and ``time_interval``
    are the bootstrap's (low, high); a high of inf means "unbounded by the budgets run".
    """

    epochs: int
    tract_accuracy: float
    vanilla_accuracy: float | None  # vanilla's mean at the same budget
    vanilla_epochs: float
    factor: float
    bound: str
    interval: tuple
    max_budget: int
    time_ratio: float | None = None  # TrAct / vanilla seconds per epoch (median)
    time_factor: float | None = None
    time_interval: tuple | None = None


def _bound(vanilla_epochs, budgets) -> str:
    if math.isinf(vanilla_epochs):
        return ">"
    return "<=" if vanilla_epochs == budgets[0] else ""


def _percentile_interval(values) -> tuple:
    """The central CONFIDENCE interval of ``values`` by rank (inf kept as inf; NaN: none)."""
    ordered = np.sort(np.asarray(values, dtype=float))
    if np.isnan(ordered).any():
        return math.nan, math.nan
    tail = (1 - CONFIDENCE) / 2
    low = ordered[math.floor(tail * (len(ordered) - 1))]
    high = ordered[math.ceil((1 - tail) * (len(ordered) - 1))]
    return float(low), float(high)


def speed_ups(vanilla: dict, tract: dict, time_ratios=None, seed=0) -> list[SpeedUp]:
    """TrAct's speed-up factor at each of its budgets.

    Args:
        vanilla: {epochs: [accuracy per seed]} over every budget vanilla ran (each list in
            seed order, the same seeds for every budget).
        tract: {epochs: [accuracy per seed]}, same seeds.
        time_ratios: per-round ratios of TrAct's to vanilla's seconds per epoch (measured
            side by side), or None for no time-to-accuracy factor.
        seed: the bootstrap's random seed (the result is reproducible).

    Returns:
        One SpeedUp per TrAct budget, in increasing order.
    """
    budgets = sorted(vanilla)
    seeds = {len(runs) for runs in (*vanilla.values(), *tract.values())}
    if len(seeds) != 1:
        raise ValueError(f"every budget needs the same seeds; got {sorted(seeds)} runs")
    (count,) = seeds
    vanilla_table = np.array([vanilla[b] for b in budgets], dtype=float)  # (budgets, seeds)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, count, (BOOTSTRAP_RESAMPLES, count))
    vanilla_means = vanilla_table[:, draws].mean(axis=2).T  # (resamples, budgets)
    ratios = None if not time_ratios else np.asarray(time_ratios, dtype=float)
    ratio_draws = None if ratios is None else np.median(  # the median of resampled rounds
        ratios[rng.integers(0, len(ratios), (BOOTSTRAP_RESAMPLES, len(ratios)))], axis=1)
    results = []
    for epochs in sorted(tract):
        accuracies = np.asarray(tract[epochs], dtype=float)
        target = float(accuracies.mean())
        needed = vanilla_epochs_to_reach(budgets, vanilla_table.mean(axis=1).tolist(), target)
        resampled = np.array([
            vanilla_epochs_to_reach(budgets, means.tolist(), accuracies[row].mean())
            for means, row in zip(vanilla_means, draws)]) / epochs
        if count < 2:  # one seed: nothing to resample, no interval
            resampled = np.full_like(resampled, math.nan)
        speed_up = SpeedUp(
            epochs=epochs, tract_accuracy=target,
            vanilla_accuracy=float(np.mean(vanilla[epochs])) if epochs in vanilla else None,
            vanilla_epochs=needed, factor=needed / epochs, bound=_bound(needed, budgets),
            interval=_percentile_interval(resampled), max_budget=budgets[-1])
        if ratios is not None:
            speed_up.time_ratio = float(np.median(ratios))
            speed_up.time_factor = speed_up.factor / speed_up.time_ratio
            speed_up.time_interval = _percentile_interval(resampled / ratio_draws)
        results.append(speed_up)
    return results


def _times(value) -> str:
    return "∞" if math.isinf(value) else f"{value:.2f}x"


def factor_text(speed_up: SpeedUp, time=False) -> str:
    """E.g. "1.62x [1.31x, 2.05x]", "> 2.00x [1.50x, ∞]" or "<= 0.50x [...]"."""
    if time:
        factor, (low, high) = speed_up.time_factor, speed_up.time_interval
        if speed_up.bound == ">":
            factor = speed_up.max_budget / speed_up.epochs / speed_up.time_ratio
    else:
        factor, (low, high) = speed_up.factor, speed_up.interval
        if speed_up.bound == ">":
            factor = speed_up.max_budget / speed_up.epochs
    prefix = {"": "", ">": "> ", "<=": "<= "}[speed_up.bound]
    if math.isinf(low):  # no resample got there either: the same bound
        return f"{prefix}{_times(factor)} [{prefix}{_times(factor)}, ∞]"
    if math.isnan(low):
        return f"{prefix}{_times(factor)} [no interval: one seed]"
    return f"{prefix}{_times(factor)} [{_times(low)}, {_times(high)}]"


def speed_up_table(speed_ups_by_lam: dict) -> str:
    """Markdown: per lam and TrAct budget, the epochs vanilla needs and both factors."""
    timed = any(s.time_factor is not None for rows in speed_ups_by_lam.values() for s in rows)
    header = ("| lam | TrAct epochs | TrAct (%) | vanilla at same epochs (%) | vanilla epochs "
              "to match | speed-up in epochs [95% CI] |")
    rule = "|---:|---:|---:|---:|---:|---:|"
    if timed:
        header += " speed-up in time [95% CI] |"
        rule += "---:|"
    lines = [header, rule]
    for lam, rows in speed_ups_by_lam.items():
        for s in rows:
            needed = {">": f"> {s.max_budget}", "<=": f"<= {s.epochs * s.factor:g}"}.get(
                s.bound, f"{s.vanilla_epochs:.2f}")
            same = "—" if s.vanilla_accuracy is None else f"{s.vanilla_accuracy:.2f}"
            line = (f"| {lam:g} | {s.epochs} | {s.tract_accuracy:.2f} | {same} | {needed} "
                    f"| {factor_text(s)} |")
            if timed:
                line += f" {factor_text(s, time=True)} |"
            lines.append(line)
    return "\n".join(lines)


def summary_line(speed_up: SpeedUp) -> str:
    """One line: the factor at a budget with its interval, and both accuracies there."""
    vanilla = ("vanilla not run at that budget" if speed_up.vanilla_accuracy is None
               else f"vanilla {speed_up.vanilla_accuracy:.2f} %")
    line = (f"TrAct speed-up [95% CI] at {speed_up.epochs} epochs: {factor_text(speed_up)} "
            f"in epochs")
    if speed_up.time_factor is not None:
        line += f", {factor_text(speed_up, time=True)} in time"
    return (f"{line}; test accuracy at {speed_up.epochs} epochs: {vanilla}, "
            f"TrAct {speed_up.tract_accuracy:.2f} %")
