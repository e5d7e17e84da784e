"""First-layer cost of TrAct vs the plain layer in PyTorch, measured side by side.

    python benchmarks/bench_torch.py [--repeats 7] [--threads 2] [--quick]

Each case times forward + backward of the first layer alone (its input needs no gradient,
as for a stem), plain and TrAct interleaved in one process, and prints the ratio of the
minimum times. Peak memory (--memory) is the growth of the peak RSS over one
warm forward+backward, each variant in a fresh subprocess; the table shows TrAct's
growth minus the plain layer's.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import tract_core.torch as tt

# name: (layer factory, input shape)
CASES = {
    "cifar_stem_3x3": (lambda: nn.Conv2d(3, 64, 3, padding=1), (128, 3, 32, 32)),
    "imagenet_stem_7x7s2": (lambda: nn.Conv2d(3, 64, 7, stride=2, padding=3), (32, 3, 224, 224)),
    "vit_patch16": (lambda: nn.Conv2d(3, 384, 16, stride=16), (32, 3, 224, 224)),
    "cifar_vit_patch4": (lambda: nn.Conv2d(3, 384, 4, stride=4), (128, 3, 32, 32)),
}
GOALS = {"resnet18_cifar_step": 1.05, "cifar_stem_3x3": 1.10, "imagenet_stem_7x7s2": 1.6,
         "vit_patch16": 2.05, "cifar_vit_patch4": 1.08}


class _ResNetStep(nn.Module):
    """A whole CIFAR ResNet-18 (stem wrapped for TrAct): the step times forward+backward."""

    def __init__(self):
        super().__init__()
        sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
        from tract_compare.models import ResNet18

        self.net = ResNet18(in_channels=3, image_size=32, classes=10)
        self.weight, self.bias = self.net.stem.weight, self.net.stem.bias

    def forward(self, x):
        return self.net(x)


def _resnet_step(tract):
    model = _ResNetStep()
    if tract:
        model.net.stem = tt.wrap(model.net.stem, lam=0.1)
    return model


CASES["resnet18_cifar_step"] = (None, (128, 3, 32, 32))


def make(case, variant, seed=0):
    factory, shape = CASES[case]
    if case == "resnet18_cifar_step":
        torch.manual_seed(seed)
        model, x = _resnet_step(variant == "tract"), torch.randn(shape)
        return model, x, torch.randn(shape[0], 10)
    torch.manual_seed(seed)
    layer = factory()
    if variant == "tract":
        layer = tt.wrap(layer, lam=0.1)
    x = torch.randn(shape)
    with torch.no_grad():
        grad_z = torch.randn_like(layer(x))
    return layer, x, grad_z


def step(layer, x, grad_z):
    for p in layer.parameters():
        p.grad = None
    layer(x).backward(grad_z)


def time_case(case, repeats):
    runs = {v: make(case, v) for v in ("plain", "tract")}
    best = {v: float("inf") for v in runs}
    for v in runs:
        step(*runs[v])  # warm-up
    for _ in range(repeats):
        for v, args in runs.items():
            start = time.perf_counter()
            step(*args)
            best[v] = min(best[v], time.perf_counter() - start)
    return best


def _peak_growth_in_child(case, variant, threads):
    """Peak RSS during one forward+backward minus RSS before it, in MiB (Linux)."""
    torch.set_num_threads(threads)
    layer, x, grad_z = make(case, variant)
    step(layer, x, grad_z)  # allocator and kernels warm, as in training
    for p in layer.parameters():
        p.grad = None

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    before = status("VmRSS:")
    step(layer, x, grad_z)
    return (status("VmHWM:") - before) / 1024


def peak_rss_growth(case, variant):
    """Run :func:`_peak_growth_in_child` in a fresh process."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import bench_torch as b; "
            f"print(b._peak_growth_in_child({case!r}, {variant!r}, {torch.get_num_threads()}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", nargs="*", default=list(GOALS))
    parser.add_argument("--memory", action="store_true", help="also measure peak RSS growth")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, min of {args.repeats} runs")
    memory_column = " extra peak MiB |" if args.memory else ""
    print("| case | plain ms | TrAct ms | ratio | goal |" + memory_column)
    print("|---|---|---|---|---|" + ("---|" if args.memory else ""))
    results = {}
    for case in args.cases:
        best = time_case(case, args.repeats)
        ratio = best["tract"] / best["plain"]
        row = (f"| {case} | {best['plain'] * 1e3:.1f} | {best['tract'] * 1e3:.1f} | "
               f"{ratio:.2f}x | <= {GOALS[case]}x |")
        results[case] = {"plain_s": best["plain"], "tract_s": best["tract"], "ratio": ratio}
        if args.memory:
            extra = peak_rss_growth(case, "tract") - peak_rss_growth(case, "plain")
            results[case]["extra_peak_mib"] = extra
            row += f" {extra:.0f} |"
        print(row, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
