"""First-layer cost of TrAct vs the plain layer in PyTorch, measured side by side.

    python benchmarks/bench_torch.py [--rounds 15] [--threads 2] [--memory] [--json F]
                                     [--device cuda [--cuda-graphs]]

Each case times forward + backward of the first layer alone (its input needs no gradient,
as for a stem), plain, TrAct and the unfold baseline interleaved in one process, and
prints the ratios of the minimum times. The unfold baseline is the public
implementation's algorithm, re-implemented here: unfold every patch, form X^T X,
invert it explicitly, multiply. Peak memory (--memory) is the growth of the peak RSS
over one warm forward+backward, each variant in a fresh subprocess; the table shows each
variant's growth minus the plain layer's. On a GPU (--device cuda) each step ends with a
synchronization, and peak memory is the growth of the CUDA allocator's peak over one
warm step, in process; --cuda-graphs replays every variant's forward and backward from
CUDA graphs, which removes the launch and Python cost of each kernel.
"""

import sys
from pathlib import Path

import _harness
import torch
from torch import nn

import tract_core.torch as tt


class _UnfoldInverse(torch.autograd.Function):
    """The public implementation's conv backward: whole unfold, Gram, explicit inverse."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, lam):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.lam = stride, padding, lam
        return nn.functional.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, grad_z):
        x, weight = ctx.saved_tensors
        grad_w = torch.nn.grad.conv2d_weight(x, weight.shape, grad_z, ctx.stride, ctx.padding)
        patches = nn.functional.unfold(x, weight.shape[2:], padding=ctx.padding,
                                       stride=ctx.stride)  # (N, n, L): the blow-up
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        eye = torch.eye(rows.shape[1], dtype=rows.dtype, device=rows.device)
        system = rows.T @ rows / rows.shape[0] + ctx.lam * eye
        grad_w = (grad_w.reshape(weight.shape[0], -1) @ torch.linalg.inv(system))
        grad_b = grad_z.sum((0, 2, 3)) if ctx.needs_input_grad[2] else None
        return None, grad_w.reshape(weight.shape), grad_b, None, None, None


class UnfoldInverseConv2d(nn.Conv2d):
    """nn.Conv2d whose weight gradient comes from :class:`_UnfoldInverse` (lam 0.1)."""

    def forward(self, x):
        return _UnfoldInverse.apply(x, self.weight, self.bias, self.stride, self.padding, 0.1)


def _unfold_baseline(layer):
    twin = UnfoldInverseConv2d.__new__(UnfoldInverseConv2d)
    twin.__dict__.update(layer.__dict__)
    return twin


VARIANTS = ("plain", "tract", "unfold")

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
    if tract == "tract":
        model.net.stem = tt.wrap(model.net.stem, lam=0.1)
    elif tract == "unfold":
        model.net.stem = _unfold_baseline(model.net.stem)
    return model


CASES["resnet18_cifar_step"] = (None, (128, 3, 32, 32))


def make(case, variant, seed=0, device="cpu", graphed=False):
    """(layer or model, input, output gradient); ``graphed``: forward and backward
    captured once as CUDA graphs (torch.cuda.make_graphed_callables), replayed each step."""
    factory, shape = CASES[case]
    torch.manual_seed(seed)  # data drawn on the CPU: the same on every device, and the
    # CUDA generator is left alone (after a graph capture it refuses eager draws)
    if case == "resnet18_cifar_step":
        layer, x = _resnet_step(variant), torch.randn(shape)
        grad_z = torch.randn(shape[0], 10)
    else:
        layer = factory()
        if variant == "tract":
            layer = tt.wrap(layer, lam=0.1)
        elif variant == "unfold":
            layer = _unfold_baseline(layer)
        x = torch.randn(shape)
        with torch.no_grad():
            grad_z = torch.randn(layer(x).shape)
    layer, x, grad_z = layer.to(device), x.to(device), grad_z.to(device)
    if graphed:
        torch.cuda.make_graphed_callables(layer, (x,))  # layer.forward now replays
    return layer, x, grad_z


def step(layer, x, grad_z):
    for p in layer.parameters():
        p.grad = None
    layer(x).backward(grad_z)
    if x.is_cuda:
        torch.cuda.synchronize()


def time_case(case, rounds, device="cpu", graphed=False):
    """Seconds per variant and round (``_harness.paired_times``); a variant whose
    capture fails (the baseline's explicit inverse checks its result on the host) is
    left out."""
    runs = {}
    for variant in VARIANTS:
        try:
            runs[variant] = make(case, variant, device=device, graphed=graphed)
        except RuntimeError as error:
            if not graphed or variant != "unfold":
                raise
            print(f"{case}: {variant} not captured ({str(error).splitlines()[0][:80]})")
    return _harness.paired_times(runs, rounds, step)


def _warm(case, variant, device="cpu"):
    """A variant after one step: allocator and kernels warm, as in training."""
    layer, x, grad_z = make(case, variant, device=device)
    step(layer, x, grad_z)
    for p in layer.parameters():
        p.grad = None
    return layer, x, grad_z


def peak_growth_in_child(case, variant, threads):
    """Peak RSS growth of one warm forward+backward in MiB; see _harness.peak_growth_mib."""
    torch.set_num_threads(threads)
    layer, x, grad_z = _warm(case, variant)
    return _harness.peak_growth_mib(lambda: step(layer, x, grad_z))


def cuda_peak_growth(case, variant):
    """Growth of the CUDA allocator's peak over one warm forward+backward, in MiB."""
    layer, x, grad_z = _warm(case, variant, "cuda")
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step(layer, x, grad_z)
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def main(argv=None):
    parser = _harness.parser(__doc__.splitlines()[0], GOALS)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="with --device cuda: every variant replayed from CUDA graphs")
    args = parser.parse_args(argv)
    if args.cuda_graphs and args.device != "cuda":
        parser.error("--cuda-graphs needs --device cuda")
    torch.set_num_threads(args.threads)
    where = (torch.cuda.get_device_name() if args.device == "cuda"
             else f"{args.threads} threads")
    graphs = ", CUDA graphs" if args.cuda_graphs else ""
    print(f"torch {torch.__version__}, {where}{graphs}, {args.rounds} paired rounds")
    columns = [*_harness.TIMING_COLUMNS, "unfold baseline/plain"]
    if args.memory:
        columns += ["TrAct extra peak MiB", "baseline extra peak MiB"]
    _harness.print_header(*columns)
    results = {}
    for case in args.cases:
        seconds = time_case(case, args.rounds, args.device, args.cuda_graphs)
        cells, results[case] = _harness.timing_cells(case, seconds, GOALS)
        if "unfold" in seconds:
            baseline = _harness.ratio_summary(seconds, "unfold")
            cells.append(_harness.ratio_text(baseline))
            results[case].update(unfold_ratio=baseline[0], unfold_ratio_iqr=baseline[1:])
        else:
            cells.append("not captured")
        if args.memory and args.device == "cuda":
            growth = {v: cuda_peak_growth(case, v) for v in VARIANTS}
        elif args.memory:
            growth = {v: _harness.in_fresh_process("bench_torch", "peak_growth_in_child", case,
                                                   v, args.threads) for v in VARIANTS}
        if args.memory:
            extra = {v: growth[v] - growth["plain"] for v in ("tract", "unfold")}
            results[case].update(extra_peak_mib=extra["tract"],
                                 unfold_extra_peak_mib=extra["unfold"])
            cells += [f"{extra['tract']:.0f}", f"{extra['unfold']:.0f}"]
        _harness.print_row(*cells)
    _harness.write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
