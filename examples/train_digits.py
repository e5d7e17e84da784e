"""Vanilla vs TrAct on scikit-learn's 8x8 digits: a small CNN, first conv wrapped.

    python examples/train_digits.py [--epochs 3] [--seeds 3] [--lam 0.1]

The data ship with scikit-learn (no download). Both runs use the same seeds, model
initialisation, batches and learning rate; only the first layer's weight gradient
differs. Prints the test accuracy of each seed and the mean +- std per method.
"""

import argparse
import statistics
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

import tract_core.torch as tt


def load_data(seed=0):
    """Standardized digits as (N, 1, 8, 8) float32 tensors; a fixed 80/20 split."""
    digits = load_digits()
    images = digits.images.astype(np.float32)[:, None]
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    cut = int(0.8 * len(labels))
    train, test = order[:cut], order[cut:]
    mean, std = images[train].mean(), images[train].std()
    images = (images - mean) / std
    return (torch.from_numpy(images[train]), torch.from_numpy(labels[train]),
            torch.from_numpy(images[test]), torch.from_numpy(labels[test]))


class SmallCNN(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.head = nn.Linear(64 * 4 * 4, classes)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.head(x.flatten(1))


def train(method, seed, data, epochs, lam, lr=0.05, batch=64):
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = SmallCNN()
    if method == "tract":
        model.conv1 = tt.wrap(model.conv1, lam=lam)
    steps = epochs * -(-len(y_train) // batch)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    order_rng = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y_train), generator=order_rng).split(batch):
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return (model(x_test).argmax(1) == y_test).float().mean().item() * 100


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lam", type=float, default=0.1)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    data = load_data()
    results = {}
    for method in ("vanilla", "tract"):
        start = time.perf_counter()
        results[method] = [train(method, seed, data, args.epochs, args.lam)
                           for seed in range(args.seeds)]
        seconds = time.perf_counter() - start
        accs = ", ".join(f"{a:.2f}" for a in results[method])
        spread = statistics.stdev(results[method]) if args.seeds > 1 else 0.0
        print(f"{method:8s} test accuracy {statistics.mean(results[method]):6.2f} "
              f"+- {spread:.2f} %  (seeds: {accs}; {seconds:.1f} s)")
    return results


if __name__ == "__main__":
    main()
