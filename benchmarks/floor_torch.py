"""The least TrAct's ViT patch embeddings can cost in PyTorch: the framework's own kernels
called bare, side by side with the plain layer's.

    python benchmarks/floor_torch.py [--repeats 15] [--threads 2] [--cases ...]

On top of the plain layer's kernels (forward, weight and bias gradients), TrAct needs
for disjoint patches at least the patches' copy, the Gram X^T X, a Cholesky
factorization and its two triangular solves. This script times those kernels called
directly ("bare": no autograd, no checks, shapes fixed), the plain layer's kernels
called the same way, and both layers through autograd, all interleaved in one process,
and prints the ratios of the minimum times. No implementation built from these kernels
reaches a ratio below the bare one on the machine measured.
"""

import argparse

import _harness
import bench_torch
import torch

import tract_core as tc

GOALS = {case: bench_torch.GOALS[case] for case in ("cifar_vit_patch4", "vit_patch16")}


def _layer_args(layer):
    return layer.weight, layer.bias, layer.stride


def plain_kernels(x, grad_z, weight, bias, stride):
    """The plain layer's forward and its weight and bias gradients: (z, grad_w, grad_b)."""
    z = torch.nn.functional.conv2d(x, weight, bias, stride)
    _, grad_w, grad_b = torch.ops.aten.convolution_backward(
        grad_z, x, weight, [bias.shape[0]], stride, [0, 0], [1, 1], False, [0, 0], 1,
        [False, True, True])
    return z, grad_w, grad_b


def tract_kernels(x, grad_z, weight, bias, stride, lam=0.1):
    """:func:`plain_kernels` plus TrAct's least work for disjoint patches (kernel = stride,
    no padding): (z, TrAct's grad_w, grad_b)."""
    z, grad_w, grad_b = plain_kernels(x, grad_z, weight, bias, stride)
    m, n = weight.shape[0], weight[0].numel()
    rows = tc.conv_patches(x, weight.shape[2:], stride, (1, 1))[0]  # (b, n), one copy
    system = tc.gram(rows) / rows.shape[0] + lam * torch.eye(n, dtype=x.dtype)
    chol, _ = torch.linalg.cholesky_ex(system)
    # grad_w L^-T L^-1, from the right: faster on CPU for many rows (see tract_core._backends)
    rows = torch.linalg.solve_triangular(chol.T, grad_w.reshape(m, n), upper=True, left=False)
    grad_w = torch.linalg.solve_triangular(chol, rows, upper=False, left=False)
    return z, grad_w.reshape(weight.shape), grad_b


def _bare(kernels):
    def run(layer, x, grad_z):
        with torch.no_grad():
            kernels(x, grad_z, *_layer_args(layer))
    return run


def _through_autograd(layer, x, grad_z):
    bench_torch.step(layer, x, grad_z)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", nargs="*", default=list(GOALS), choices=list(GOALS))
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, min of {args.repeats} runs")
    _harness.print_header("case", "plain ms", "TrAct/plain", "bare plain ms",
                          "bare TrAct/bare plain", "goal")
    results = {}
    for case in args.cases:
        plain, x, grad_z = bench_torch.make(case, "plain")
        tract = bench_torch.make(case, "tract")[0]
        runs = {"plain": (_through_autograd, plain), "tract": (_through_autograd, tract),
                "bare_plain": (_bare(plain_kernels), plain),
                "bare_tract": (_bare(tract_kernels), plain)}
        best = _harness.best_times({k: (fn, layer, x, grad_z) for k, (fn, layer) in runs.items()},
                                   args.repeats, lambda fn, *rest: fn(*rest))
        ratio, floor = best["tract"] / best["plain"], best["bare_tract"] / best["bare_plain"]
        results[case] = {**{f"{k}_s": v for k, v in best.items()}, "ratio": ratio,
                         "bare_ratio": floor}
        _harness.print_row(case, f"{best['plain'] * 1e3:.2f}", f"{ratio:.2f}x",
                           f"{best['bare_plain'] * 1e3:.2f}", f"{floor:.2f}x",
                           f"<= {GOALS[case]}x")
    _harness.write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
