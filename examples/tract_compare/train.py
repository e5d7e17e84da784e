"""One training run: a (method, seed, config) triple, trained and tested.

Vanilla and TrAct runs with the same seed and config start from the same initialisation,
see the same batches in the same order (and the same augmentations) and use the same
learning-rate schedule: only the first layer's weight gradient differs.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from tqdm import tqdm

from .config import METHODS, RunConfig, run_key
from .models import build_model, wrap_first_layer

__all__ = ["METHODS", "RunConfig", "accuracy", "augment", "environment", "make_optimizer",
           "make_step", "run_key", "set_threads", "stepper", "train_run"]


def set_threads(threads: int) -> None:
    """torch's intra-op CPU threads for this process."""
    torch.set_num_threads(threads)


def environment() -> dict:
    """The record's framework fields: threads in use and the torch version."""
    return {"threads": torch.get_num_threads(), "torch": torch.__version__}


def make_optimizer(name, parameters, lr, weight_decay):
    """SGD with momentum 0.9, or Adam (the paper's two optimizers)."""
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {name!r}")


def augment(images, generator):
    """Per image: a random crop of the 4-pixel zero-padded image and a random h-flip."""
    n, channels, height, width = images.shape
    padded = nn.functional.pad(images, (4, 4, 4, 4))
    shift_y = torch.randint(0, 9, (n, 1), generator=generator)
    shift_x = torch.randint(0, 9, (n, 1), generator=generator)
    flip = torch.rand(n, 1, generator=generator) < 0.5
    rows = shift_y + torch.arange(height)
    cols = shift_x + torch.where(flip, torch.arange(width - 1, -1, -1), torch.arange(width))
    return padded[torch.arange(n)[:, None, None, None], torch.arange(channels)[:, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


@torch.no_grad()
def accuracy(model, images, labels, batch_size=1000):
    """Test accuracy in percent (eval mode, so batch norm uses its running statistics)."""
    model.eval()
    correct = sum((model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size])
                  .sum().item() for i in range(0, len(labels), batch_size))
    return 100.0 * correct / len(labels)


def make_step(config: RunConfig, method: str, seed: int, data):
    """The run's model and its training step, ``step(images, labels) -> loss`` (a float).

    The model starts from the seed's initialisation (the same for both methods: ``wrap``
    draws nothing); the step is one SGD/Adam update with the per-step cosine schedule.
    """
    torch.manual_seed(seed)
    model = build_model(config.model, data.channels, data.image_size, data.classes,
                        patch=config.patch, width=config.width)
    if method == "tract":
        wrap_first_layer(model, config.lam)
    optimizer = make_optimizer(config.optimizer, model.parameters(), config.lr,
                               config.weight_decay)
    steps_per_epoch = math.ceil(len(data.y_train) / config.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=config.epochs * steps_per_epoch)  # per step, down to 0 at the end

    def step(images, labels):
        model.train()
        loss = nn.functional.cross_entropy(model(images), labels,
                                           label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        return loss.item()

    return model, step


def stepper(config: RunConfig, method: str, seed: int, data):
    """``step(idx)``: one training step on the training images ``idx`` (for timing)."""
    _, one_step = make_step(config, method, seed, data)
    x_train, y_train = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)

    def step(idx):
        idx = torch.from_numpy(idx)
        return one_step(x_train[idx], y_train[idx])

    return step


def train_run(config: RunConfig, method: str, seed: int, data, progress=False) -> dict:
    """Train one model and return its record: the run key plus accuracies and timings.

    Args:
        config: the run's settings. method: "vanilla" or "tract". seed: int.
        data: a ``data.Dataset`` (numpy arrays, already limited to config.train_limit/
            test_limit).
        progress: show a tqdm bar (only where stderr is a terminal).

    Returns:
        ``run_key(...)`` plus test_acc (final, %), history (test accuracy after each
        epoch), train_loss (mean per epoch), seconds (training and testing time).
    """
    if config.framework != "torch":
        raise ValueError(f"train.py trains torch runs; this config is {config.framework!r}")
    record = run_key(config, method, seed)
    start = time.perf_counter()
    model, one_step = make_step(config, method, seed, data)
    x_train, y_train = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    steps_per_epoch = math.ceil(len(y_train) / config.batch_size)
    batches = torch.Generator().manual_seed(seed)  # batch order and augmentation
    history, train_loss = [], []
    bar = tqdm(total=config.epochs * steps_per_epoch, disable=None if progress else True,
               desc=f"{method} seed {seed} ({config.epochs} ep)", unit="step", leave=False)
    with bar:
        for _ in range(config.epochs):
            losses = []
            for idx in torch.randperm(len(y_train), generator=batches).split(
                    config.batch_size):
                images = x_train[idx]
                if config.augment:
                    images = augment(images, batches)
                losses.append(one_step(images, y_train[idx]))
                bar.update()
                bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
            train_loss.append(sum(losses) / len(losses))
            history.append(accuracy(model, torch.from_numpy(data.x_test),
                                    torch.from_numpy(data.y_test)))
    record.update(test_acc=history[-1], history=history, train_loss=train_loss,
                  seconds=round(time.perf_counter() - start, 2), **environment())
    return record
