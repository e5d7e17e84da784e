"""What TrAct costs in a whole PyTorch training step: forward, loss, backward, SGD update.

    python benchmarks/whole_step_torch.py [--rounds 30] [--models cnn resnet18 vit]
                                          [--threads 2] [--device cpu] [--steps 1]
                                          [--compile [MODE] | --cuda-graphs]
                                          [--variants plain tract public] [--json F]
                                          [--also PACKAGE ...]

Every model runs as the plain model, with its first layer wrapped by tract_core, and with
the public implementation's algorithm (unfold every patch, explicit inverse). The
variants take turns within each round, in an order reversed every round; each round's
time of a variant (``--steps`` training steps, then a synchronization on a GPU) is
divided by the plain model's time in that same round, and the table shows the median of
these paired ratios and their interquartile range, and the median milliseconds per step.
``--also PACKAGE`` adds another importable build of tract_core (e.g. an older checkout
installed under another name) as one more variant.

How the step runs (what a user does to remove Python's and the kernel launches' cost):
- eager (the default);
- ``--compile [MODE]``: each model wrapped in ``torch.compile`` (inductor; MODE e.g.
  ``reduce-overhead``), compiled by warm-up steps before the timing;
- ``--cuda-graphs`` (with ``--device cuda``): the whole step, forward, loss, backward and
  the optimizer's update, captured once as a CUDA graph on static input and target
  tensors and replayed every step (PyTorch's whole-network capture: warm-up steps on a
  side stream, gradients set to None before the capture). The public algorithm's
  explicit inverse checks its result on the host and cannot be captured: it is left out.

Models (the first layer is the one TrAct trains):
- cnn: conv 5x5 1->32, pool, conv 3x3 32->64, pool, FC 128, FC 10; 28x28 inputs, b128.
- resnet18: CIFAR ResNet-18 (3x3 stem, 64 channels); 32x32 inputs, b64.
- vit: CIFAR ViT, patch 4, dim 384, depth 7, 12 heads, MLP 2x; 32x32 inputs, b64.
"""

import argparse
import copy
import functools
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
WARMUP_STEPS = 3  # compile (both passes) and fill the optimizer's momentum buffers


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


def compiled_step(model, optimizer, x, y, mode):
    """The eager step of ``torch.compile(model, mode=mode)``, compiled by warm-up steps."""
    step = functools.partial(train_step, torch.compile(model, mode=mode), optimizer, x, y)
    for _ in range(WARMUP_STEPS):
        step()
    return step


def captured_step(model, optimizer, x, y):
    """The whole step captured as one CUDA graph: returns its replay (reads x and y).

    Warm-up steps run on a side stream (they set up cuBLAS and the momentum buffers,
    which a capture may not allocate); gradients are None at the capture, so the graph's
    backward writes them into its own memory pool instead of adding to stale ones.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_STEPS):
            train_step(model, optimizer, x, y)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return graph.replay


def steps_of(name, args):
    """{variant: step()} for model ``name``, run as the command line says."""
    _, shape, _ = MODELS[name]
    torch.manual_seed(1)  # data drawn on the CPU: the same on every device
    x = torch.randn(shape).to(args.device)
    y = torch.randint(0, 10, (shape[0],)).to(args.device)
    steps = {}
    for key, (model, optimizer) in variants(name, args.also, args.device).items():
        if key not in args.variants and key not in ("plain", *args.also):
            continue
        if args.compile:
            steps[key] = compiled_step(model, optimizer, x, y, args.compile)
        elif args.cuda_graphs:
            try:
                steps[key] = captured_step(model, optimizer, x, y)
            except RuntimeError as error:
                if key != "public":
                    raise
                print(f"{name}: {key} not captured ({str(error).splitlines()[0][:80]})")
        else:
            steps[key] = functools.partial(train_step, model, optimizer, x, y)
    return steps


def run_steps(step, count, cuda):
    for _ in range(count):
        step()
    if cuda:
        torch.cuda.synchronize()


def parse(argv):
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--rounds", type=int, default=30)
    options.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    options.add_argument("--threads", type=int, default=2)
    options.add_argument("--device", default="cpu")
    options.add_argument("--steps", type=int, default=1, help="training steps per round")
    options.add_argument("--variants", nargs="*", default=["tract", "public"],
                         choices=["tract", "public"], help="besides plain")
    how = options.add_mutually_exclusive_group()
    how.add_argument("--compile", nargs="?", const="default", metavar="MODE",
                     help="torch.compile each model (mode: default, reduce-overhead, ...)")
    how.add_argument("--cuda-graphs", action="store_true",
                     help="with --device cuda: the whole step replayed from a CUDA graph")
    options.add_argument("--also", nargs="*", default=[], help="more tract_core builds")
    options.add_argument("--json", help="write the ratios here too")
    args = options.parse_args(argv)
    if args.cuda_graphs and args.device != "cuda":
        options.error("--cuda-graphs needs --device cuda")
    return args


def main(argv=None):
    args = parse(argv)
    torch.set_num_threads(args.threads)
    cuda = torch.device(args.device).type == "cuda"
    where = torch.cuda.get_device_name() if cuda else f"{args.threads} threads"
    how = (f"torch.compile (mode {args.compile})" if args.compile
           else "CUDA graphs" if args.cuda_graphs else "eager")
    print(f"torch {torch.__version__}, {where}, {how}, {args.steps} step(s) per round")
    results = {}
    _harness.print_whole_step_header(args.rounds)
    for name in args.models:
        runs = {key: (step,) for key, step in steps_of(name, args).items()}
        seconds = _harness.paired_times(
            runs, args.rounds, lambda step: run_steps(step, args.steps, cuda))
        _harness.print_whole_step_rows(name, seconds, args.steps, results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
