"""The parts of a run that JAX and Keras share, in numpy: the loop's shape is train.py's.

Batch order and augmentation come from one ``numpy.random.Generator`` seeded with the run's
seed, so a seed's vanilla and TrAct runs in one framework see the same batches in the same
order with the same augmentations. The order differs from torch's (torch's own generator
draws it there): compare frameworks by means over seeds, not seed by seed.

No framework is imported here, so the command line can call :func:`limit_cpu_threads`
before JAX starts.
"""

from __future__ import annotations

import math
import os
import sys
import time

import numpy as np


def limit_cpu_threads(threads: int) -> bool:
    """Keep this process on ``threads`` of its CPU cores, if JAX has not started yet.

    XLA has no setting for its CPU thread count: it sizes its pools to the cores the
    process may run on, and its one-thread XLA_FLAGS (``--xla_cpu_multi_thread_eigen=false
    intra_op_parallelism_threads=1``) no longer keep jaxlib 0.10's matrix products on one
    core. So ``--threads N`` pins the process (and the threads it starts later) to N cores.
    Returns whether it did: False once ``jax`` is imported (its pools may exist already)
    or where the OS has no CPU affinity (macOS, Windows).
    """
    if "jax" in sys.modules or not hasattr(os, "sched_setaffinity"):
        return False
    cores = sorted(os.sched_getaffinity(0))
    if threads < len(cores):
        os.sched_setaffinity(0, cores[:max(threads, 1)])
    return True


def cpu_cores() -> int:
    """The cores this process may run on (what XLA sizes its CPU thread pools by)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def channels_last(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> (N, H, W, C), contiguous: the layout of JAX's and Keras's convs."""
    return np.ascontiguousarray(images.transpose(0, 2, 3, 1))


def steps_per_epoch(count: int, batch_size: int) -> int:
    """Optimizer steps per epoch: the last batch is smaller, not dropped (as in torch)."""
    return math.ceil(count / batch_size)


def epoch_batches(count: int, batch_size: int, rng: np.random.Generator) -> list:
    """One epoch's batches: index arrays of a fresh permutation of range(count)."""
    order = rng.permutation(count)
    return [order[i:i + batch_size] for i in range(0, count, batch_size)]


def augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per image: a random crop of the 4-pixel zero-padded image and a random h-flip.

    images: (N, H, W, C), channels-last. The numpy twin of ``train.augment``.
    """
    n, height, width, _ = images.shape
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    shift_y = rng.integers(0, 9, (n, 1))
    shift_x = rng.integers(0, 9, (n, 1))
    flip = rng.random((n, 1)) < 0.5
    rows = shift_y + np.arange(height)  # (N, H)
    cols = shift_x + np.where(flip, np.arange(width - 1, -1, -1), np.arange(width))  # (N, W)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def progress_bar(method: str, seed: int, epochs: int, total: int, progress: bool):
    """The run's tqdm bar over all its steps (shown only where stderr is a terminal)."""
    from tqdm import tqdm  # imported when training: --help needs only numpy

    return tqdm(total=total, disable=None if progress else True,
                desc=f"{method} seed {seed} ({epochs} ep)", unit="step", leave=False)


def accuracy(predict, images: np.ndarray, labels: np.ndarray, batch_size=1000) -> float:
    """Test accuracy in percent; ``predict`` maps an image batch to (B, classes) logits."""
    correct = sum(int((np.asarray(predict(images[i:i + batch_size])).argmax(1)
                       == labels[i:i + batch_size]).sum())
                  for i in range(0, len(labels), batch_size))
    return 100.0 * correct / len(labels)


def run_epochs(config, method: str, seed: int, data, train_step, predict, progress: bool):
    """train.py's loop, for a framework's ``train_step`` and ``predict``.

    Args:
        config: the run's ``RunConfig``. data: a ``Dataset`` (images channels-first).
        train_step: ``(images (B, H, W, C), labels (B,)) -> loss`` float, one optimizer
            step. predict: ``images -> (B, classes)`` logits, in evaluation mode.

    Returns:
        (history, train_loss): test accuracy after each epoch, mean loss per epoch.
    """
    x_train, x_test = channels_last(data.x_train), channels_last(data.x_test)
    total = config.epochs * steps_per_epoch(len(data.y_train), config.batch_size)
    batches = np.random.default_rng(seed)  # batch order and augmentation
    history, train_loss = [], []
    with progress_bar(method, seed, config.epochs, total, progress) as bar:
        for _ in range(config.epochs):
            losses = []
            for idx in epoch_batches(len(data.y_train), config.batch_size, batches):
                images = x_train[idx]
                if config.augment:
                    images = augment(images, batches)
                losses.append(float(train_step(images, idx)))
                bar.update()
                bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
            train_loss.append(sum(losses) / len(losses))
            history.append(accuracy(predict, x_test, data.y_test))
    return history, train_loss


def paired_step_seconds(steppers: dict, count: int, batch_size: int, rounds: int = 10,
                        steps: int = 4, seed: int = 0) -> dict:
    """Seconds per training step of each method, timed side by side in this process.

    Args:
        steppers: {"vanilla": step, "tract": step}; ``step(idx)`` runs one optimizer step
            on the training images ``idx`` (an index array) and returns once it is done.
        count: training images. batch_size: images per step.
        rounds: timed rounds; each times ``steps`` steps of every method, the order
            alternating between rounds (the machine's drift hits both alike).
        seed: the batches' random seed.

    Returns:
        {method: median seconds per step over rounds, "ratios": TrAct / vanilla per round}.
    """
    rng = np.random.default_rng(seed)
    batches = [rng.permutation(count)[:batch_size] for _ in range(steps)]
    for step in steppers.values():  # compile, warm caches and allocators
        for idx in batches[:2]:
            step(idx)
    methods = list(steppers)
    seconds = {method: [] for method in methods}
    for round_ in range(rounds):
        for method in methods if round_ % 2 == 0 else methods[::-1]:
            start = time.perf_counter()
            for idx in batches:
                steppers[method](idx)
            seconds[method].append((time.perf_counter() - start) / steps)
    result = {method: float(np.median(values)) for method, values in seconds.items()}
    result["ratios"] = [t / v for t, v in zip(seconds["tract"], seconds["vanilla"])]
    return result
