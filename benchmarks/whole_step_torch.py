"""What TrAct costs in a whole PyTorch training step: forward, loss, backward, SGD update.

    python benchmarks/whole_step_torch.py [--rounds 30] [--models cnn resnet18 vit]
                                          [--threads 2] [--device cpu] [--json F]
                                          [--also PACKAGE ...]

Every model runs as the plain model, with its first layer wrapped by tract_core, and with
the public implementation's algorithm (unfold every patch, explicit inverse). The
variants take turns within each round, in an order reversed every round; each round's
time of a variant is divided by the plain model's time in that same round, and the table
shows the median of these paired ratios and their interquartile range. ``--also
PACKAGE`` adds another importable build of tract_core (e.g. an older checkout installed
under another name) as one more variant.

Models (the first layer is the one TrAct trains):
- cnn: conv 5x5 1->32, pool, conv 3x3 32->64, pool, FC 128, FC 10; 28x28 inputs, b128.
- resnet18: CIFAR ResNet-18 (3x3 stem, 64 channels); 32x32 inputs, b64.
- vit: CIFAR ViT, patch 4, dim 384, depth 7, 12 heads, MLP 2x; 32x32 inputs, b64.
"""

import argparse
import copy
import importlib
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import _harness
from bench_torch import _unfold_baseline
from tract_compare.models import ResNet18, SmallCNN, SmallViT

MODELS = {
    "cnn": (lambda: SmallCNN(1, 28, 10), (128, 1, 28, 28), "conv1"),
    "resnet18": (lambda: ResNet18(3, 32, 10), (64, 3, 32, 32), "stem"),
    "vit": (lambda: SmallViT(3, 32, 10, patch=4, dim=384, depth=7, heads=12), (64, 3, 32, 32),
            "patch_embed"),
}


def variants(name, packages, device):
    """{variant: (model, optimizer)}: the same initial weights in every variant."""
    factory, _, first = MODELS[name]
    torch.manual_seed(0)
    plain = factory()
    made = {"plain": plain}
    for package in ("tract_core", *packages):
        model = copy.deepcopy(plain)
        wrap = importlib.import_module(f"{package}.torch").wrap
        setattr(model, first, wrap(getattr(model, first), lam=0.1))
        made["tract" if package == "tract_core" else package] = model
    if isinstance(getattr(plain, first), nn.Conv2d):
        model = copy.deepcopy(plain)
        setattr(model, first, _unfold_baseline(getattr(model, first)))
        made["public"] = model
    return {key: (model.to(device), torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
            for key, model in made.items()}


def train_step(model, optimizer, x, y):
    optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    if x.is_cuda:
        torch.cuda.synchronize()


def main(argv=None):
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--rounds", type=int, default=30)
    options.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    options.add_argument("--threads", type=int, default=2)
    options.add_argument("--device", default="cpu")
    options.add_argument("--also", nargs="*", default=[], help="more tract_core builds")
    options.add_argument("--json", help="write the ratios here too")
    args = options.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    print(f"| whole step / plain step (median [IQR] of {args.rounds} paired rounds) | "
          "variant | ratio |\n|---|---|---|")
    for name in args.models:
        _, shape, _ = MODELS[name]
        torch.manual_seed(1)
        x = torch.randn(shape, device=args.device)
        y = torch.randint(0, 10, (shape[0],), device=args.device)
        runs = {key: (*pair, x, y) for key, pair in
                variants(name, args.also, args.device).items()}
        seconds = _harness.paired_times(runs, args.rounds, train_step)
        for key in runs:
            if key == "plain":
                continue
            median, low, high = _harness.ratio_summary(seconds, key)
            results[f"{name}/{key}"] = [t / p for t, p in zip(seconds[key], seconds["plain"])]
            print(f"| {name} | {key} | {median:.3f} [{low:.3f}, {high:.3f}] |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
