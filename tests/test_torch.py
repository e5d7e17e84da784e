"""PyTorch adapter: wrapped layers against the float64 fixtures and the plain layers."""

import copy
import io
import math
import os
import pathlib
import re
import subprocess
import sys

import array_api_compat.torch
import numpy as np
import pytest
from conftest import CASES, CONV_CASES, assert_close, case_id, need

import tract_core
import tract_core._backends

torch = need("torch")
nn = torch.nn
tt = pytest.importorskip("tract_core.torch")

CONV_CLASSES = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}

# One test body per device (SciPy's xp pattern): CUDA joins where a GPU is present.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def plain_layer(case, dtype=torch.float64, device="cpu"):
    """The plain torch layer a fixture case describes, with the case's parameters."""
    if case.kind == "linear":
        layer = nn.Linear(case.x.shape[-1], case.grad_z.shape[-1], bias=case.has_bias)
    else:
        padding = case.padding if isinstance(case.padding, str) else tuple(case.padding)
        layer = CONV_CLASSES[case.kind](
            case.x.shape[1], case.weight.shape[0], tuple(case.kernel), stride=tuple(case.stride),
            padding=padding, dilation=tuple(case.dilation), groups=case.groups,
            padding_mode=case.padding_mode, bias=case.has_bias)
    layer = layer.to(device, dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(case.weight))
        if case.has_bias:
            layer.bias.copy_(torch.from_numpy(case.bias))
    return layer


def _disjoint(case):
    return tract_core.disjoint_patches(case.kernel, case.stride, case.dilation)


# Patches of this many entries per group take the conv kernel and the structured Gram;
# the fixtures' patches (at most 75 entries) take explicit patches.
MANY_PATCH_ENTRIES = 320


def test_geometries_lie_on_both_sides_of_the_explicit_patch_limit():
    """The core picks explicit patches for overlapping patches of few entries: the
    fixtures and MANY_PATCH_ENTRIES must straddle its limit for torch (read, not set),
    so that the tests below reach both of its ways of gathering a conv's statistics."""
    limit = tract_core._backends.backend(array_api_compat.torch).few_patch_entries
    overlapping = [c.row_width for c in CONV_CASES if c.rows >= c.row_width and not _disjoint(c)]
    assert max(overlapping) <= limit < MANY_PATCH_ENTRIES


def test_the_fixtures_exercise_every_form():
    """Overlapping and disjoint patches with b >= n (the n x n system), and the b x b form."""
    convs = [case for case in CONV_CASES if case.rows >= case.row_width]
    assert sum(not _disjoint(c) for c in convs) >= 6 and sum(map(_disjoint, convs)) >= 3
    assert len(CONV_CASES) - len(convs) >= 2


def run(layer, case, dtype=torch.float64, device="cpu"):
    """Forward and backward with the case's output gradient; returns z, x.grad."""
    x = torch.tensor(case.x, dtype=dtype, device=device, requires_grad=True)
    z = layer(x)
    z.backward(torch.tensor(case.grad_z, dtype=z.dtype, device=device))
    return z.detach(), x.grad


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_wrapped_layer_matches_fixture_float64(case, device):
    layer = tt.wrap(plain_layer(case, device=device), lam=case.lam)
    z, grad_x = run(layer, case, device=device)
    assert_close(z, case.z, 1e-12, "z")
    assert_close(grad_x, case.grad_x, 1e-12, "grad_x")
    assert_close(layer.weight.grad, case.grad_weight, 1e-9, "grad_weight")
    if case.has_bias:
        assert_close(layer.bias.grad, case.grad_bias, 1e-12, "grad_bias")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_float32_matches_fixture_and_plain_layer_bit_for_bit(case, device, monkeypatch):
    # cuDNN's fastest kernels may reorder sums from call to call: then not even two plain
    # calls agree bit for bit.
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    plain = plain_layer(case, torch.float32, device)
    z_plain, grad_x_plain = run(plain, case, torch.float32, device)
    bias_grad_plain = plain.bias.grad.clone() if case.has_bias else None
    plain.zero_grad(set_to_none=True)
    wrapped = tt.wrap(plain, lam=case.lam)
    z, grad_x = run(wrapped, case, torch.float32, device)
    assert torch.equal(z, z_plain)
    if device.type == "cuda" and case.get("padding_mode") in ("reflect", "replicate"):
        # These pads' backward adds with atomics on CUDA, in no fixed order.
        assert_close(grad_x, grad_x_plain, 1e-6, "grad_x")
    else:
        assert torch.equal(grad_x, grad_x_plain)
    if case.has_bias:  # G summed by TrAct's node; a conv kernel may sum in another order
        assert_close(wrapped.bias.grad, bias_grad_plain, 1e-6, "grad_bias")
    assert wrapped.weight.grad.dtype == torch.float32
    assert_close(wrapped.weight.grad, case.grad_weight, 2e-4, "grad_weight")


def widened(case, entries=MANY_PATCH_ENTRIES, seed=0):
    """The case's conv geometry with at least ``entries`` patch entries per group (more
    input channels) and b >= n rows: plain float64 layer, input, output gradient."""
    torch.manual_seed(seed)
    channels = case.groups * -(-entries // math.prod(case.kernel))
    padding = case.padding if isinstance(case.padding, str) else tuple(case.padding)
    layer = CONV_CLASSES[case.kind](
        channels, case.weight.shape[0], tuple(case.kernel), stride=tuple(case.stride),
        padding=padding, dilation=tuple(case.dilation), groups=case.groups,
        padding_mode=case.padding_mode, bias=case.has_bias).double()
    positions = math.prod(case.grad_z.shape[2:])
    images = max(len(case.x), -(-2 * channels * math.prod(case.kernel) // positions))
    x = torch.randn(images, channels, *case.x.shape[2:], dtype=torch.float64)
    return layer, x, torch.randn(images, *case.grad_z.shape[1:], dtype=torch.float64)


@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
def test_many_patch_entries_match_the_float64_reference(case, device, monkeypatch):
    """Every fixture geometry widened to many entries per patch (overlapping ones take
    torch's conv backward kernel and the structured Gram): float64 weight gradient
    against the independent reference; in float32 the output is the plain layer's bit for
    bit and the bias gradient to the rounding of its sum."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    plain, x, grad_z = widened(case)
    assert len(x) * math.prod(grad_z.shape[2:]) >= plain.weight[0].numel()  # b >= n
    layer = tt.wrap(plain.to(device), lam=case.lam)
    layer(x.to(device)).backward(grad_z.to(device))
    assert_close(layer.weight.grad, tract_reference(plain, x, grad_z, case.lam), 1e-9)
    plain.float().zero_grad(set_to_none=True)
    results = []
    for module in (plain, layer):
        z = module(x.float().to(device))
        z.backward(grad_z.float().to(device))
        results.append(z.detach())
        plain.zero_grad(set_to_none=True)
    assert torch.equal(results[1], results[0])
    if case.has_bias:
        for module in (plain, layer):
            module(x.float().to(device)).backward(grad_z.float().to(device))
            results.append(plain.bias.grad)
            plain.zero_grad(set_to_none=True)
        assert_close(results[3], results[2], 1e-6, "grad_bias")


def test_official_example_numbers():
    """The printed numbers of the official TrActLinear / conv example (shared/reference)."""
    torch.manual_seed(0)
    x, y = torch.randn(30, 8), torch.randn(30, 5)
    layer = tt.wrap(nn.Linear(8, 5), lam=0.1)
    (y - layer(x)).pow(2).mean().backward()
    np.testing.assert_allclose(layer.weight.grad[0], [0.0741, 0.0949, -0.0559, -0.0398,
                                                      -0.1364, 0.0013, 0.1603, -0.0468],
                               atol=6e-5)
    np.testing.assert_allclose(layer.weight.grad[4], [0.1438, -0.0729, -0.0261, -0.1015,
                                                      -0.0902, 0.1821, -0.1520, 0.0950],
                               atol=6e-5)
    np.testing.assert_allclose(layer.bias.grad, [-0.1162, 0.1062, -0.1275, -0.0206, -0.1149],
                               atol=6e-5)
    torch.manual_seed(0)
    x, y = torch.randn(30, 2, 6, 4), torch.randn(30, 5, 4, 2)
    conv = tt.wrap(nn.Conv2d(2, 5, 3), lam=0.1)
    (y - conv(x)).pow(2).mean().backward()
    np.testing.assert_allclose(conv.bias.grad, [0.0052, -0.0397, 0.1093, 0.0464, -0.1079],
                               atol=6e-5)
    np.testing.assert_allclose(conv.weight.grad[0, 0], [[-0.0501, -0.0166, 0.0214],
                                                        [-0.0230, 0.0324, 0.0655],
                                                        [0.0010, 0.0600, 0.0290]], atol=6e-5)


@pytest.mark.parametrize("make", [lambda: nn.Linear(4, 3), lambda: nn.Conv2d(2, 3, 3),
                                  lambda: nn.Conv1d(2, 4, 3, groups=2, bias=False),
                                  lambda: nn.Conv3d(1, 2, 2, padding_mode="circular", padding=1)])
def test_same_parameters_and_state_dict_both_ways(make):
    plain = make()
    wrapped = tt.wrap(plain, lam=0.2)
    assert wrapped.weight is plain.weight and wrapped.bias is plain.bias
    assert isinstance(wrapped, type(plain)) and wrapped.lam == 0.2
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    other = make()
    wrapped.load_state_dict(other.state_dict())
    assert torch.equal(plain.weight, other.weight)  # same Parameter objects
    torch.nn.init.normal_(wrapped.weight)
    fresh = make()
    fresh.load_state_dict(wrapped.state_dict())
    assert torch.equal(fresh.weight, wrapped.weight)
    back = tt.unwrap(wrapped)
    assert type(back) is type(plain) and back.weight is plain.weight
    assert not hasattr(back, "lam")
    assert tt.wrap(wrapped, lam=0.05).lam == 0.05 and wrapped.lam == 0.2


@pytest.mark.parametrize("layer", [nn.LSTM(3, 4), nn.ConvTranspose2d(2, 3, 3),
                                   nn.Sequential(nn.Linear(2, 2)), nn.Bilinear(2, 2, 2)],
                         ids=lambda m: type(m).__name__)
def test_unsupported_layers_raise_type_error(layer):
    with pytest.raises(TypeError, match=r"nn\.Linear, nn\.Conv1d, nn\.Conv2d, nn\.Conv3d"):
        tt.wrap(layer)
    with pytest.raises(TypeError, match="unwrap"):
        tt.unwrap(layer)


@pytest.mark.parametrize("lam", [0, -1.0, float("nan"), float("inf"), True, "0.1", None])
def test_bad_lam_raises_value_error(lam):
    with pytest.raises(ValueError, match="lam"):
        tt.wrap(nn.Linear(2, 2), lam=lam)
    with pytest.raises(ValueError, match="lam"):
        tt.conv(torch.ones(1, 1, 3), torch.ones(1, 1, 2), lam=lam)
    with pytest.raises(ValueError, match="lam"):
        tt.linear(torch.ones(1, 2), torch.ones(3, 2), lam=lam)
    with pytest.raises(ValueError, match="lam"):
        tt.TrActConv2d(1, 2, 3, lam=lam)
    with pytest.raises(ValueError, match="lam"):
        tt.wrap_first_layer(nn.Sequential(nn.Linear(2, 2)), torch.ones(1, 2), lam=lam)
    layer = tt.TrActConv2d(1, 2, 3)
    layer.lam = lam
    with pytest.raises(ValueError, match="lam"):
        layer(torch.ones(1, 1, 4, 4))


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = tt.wrap(nn.Conv2d(1, 4, 3, padding=1), lam=0.1)
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv1(x)).flatten(1))


def grads_of(model, x):
    model.zero_grad(set_to_none=True)
    model(x).square().sum().backward()
    return [p.grad.clone() for p in model.parameters()]


def test_save_deepcopy_and_to_keep_tract():
    torch.manual_seed(0)
    model, x = SmallNet(), torch.randn(5, 1, 6, 6)
    reference = grads_of(model, x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    copied = copy.deepcopy(model)
    for other in (loaded, copied):
        assert isinstance(other.conv1, tt.TrActConv2d) and other.conv1.lam == 0.1
        for got, want in zip(grads_of(other, x), reference):
            assert torch.equal(got, want)
    model64 = copied.to(torch.float64)
    got = grads_of(model64, x.double())
    assert got[0].dtype == torch.float64
    assert_close(got[0], reference[0].double().numpy(), 1e-5)


def test_state_dict_checkpoint_loads_into_plain_model():
    torch.manual_seed(0)
    model = SmallNet()
    plain = SmallNet()
    plain.conv1 = tt.unwrap(plain.conv1)
    plain.load_state_dict(model.state_dict())
    assert torch.equal(plain.conv1.weight, model.conv1.weight)


AUTOCAST_DTYPES = [(device, dtype) for device in DEVICES for dtype in
                   ([torch.bfloat16] if device == "cpu" else [torch.float16, torch.bfloat16])]


@pytest.mark.parametrize("device, dtype", AUTOCAST_DTYPES, ids=str)
def test_autocast_is_accurate(device, dtype):
    """Autocast (bf16 on CPU; fp16 and bf16 on CUDA): the Gram and solve still run in
    float32, for the structured Gram (7x7/2) and explicit patches (3x3) alike; the bias
    gradient is the plain layer's under autocast, in the bias's dtype."""
    torch.manual_seed(0)
    for conv, size in ((nn.Conv2d(3, 8, 3, padding=1), 8), (nn.Conv2d(3, 8, 7, 2, 3), 16)):
        x = torch.randn(16, 3, size, size, device=device)
        plain = copy.deepcopy(conv).to(device)
        layer = tt.wrap(conv.to(device), lam=0.1)
        z_grad = torch.randn_like(layer(x))
        layer(x).backward(z_grad)
        reference = layer.weight.grad.clone()
        layer.zero_grad(set_to_none=True)
        for module in (plain, layer):
            with torch.autocast(device, dtype=dtype):
                z = module(x)
                assert z.dtype == dtype
                z.backward(z_grad.to(dtype))  # backward inside autocast too
        assert layer.weight.grad.dtype == layer.bias.grad.dtype == torch.float32
        assert_close(layer.weight.grad, reference.cpu().numpy(), 2e-2)
        assert_close(layer.bias.grad, plain.bias.grad, 1e-2, "grad_bias")


def test_bfloat16_parameters():
    torch.manual_seed(0)
    layer = tt.wrap(nn.Linear(6, 3), lam=0.1)
    x, g = torch.randn(50, 6), torch.randn(50, 3)
    expected = (g.T @ x @ torch.linalg.inv(x.T @ x / 50 + 0.1 * torch.eye(6))).double().numpy()
    layer = layer.to(torch.bfloat16)
    layer(x.bfloat16()).backward(g.bfloat16())
    assert layer.weight.grad.dtype == torch.bfloat16
    assert_close(layer.weight.grad.float(), expected, 2e-2)


def test_tf32_settings_leave_the_statistics_accurate(device, monkeypatch):
    """A user's TF32 opt-in (10-bit mantissa) speeds up their layers, not TrAct's products
    and solve: pixel-scale patches need their digits. On CPU the flags change nothing."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 for cuBLAS
    try:
        _check_pixel_statistics(device)
    finally:
        torch.set_float32_matmul_precision(precision)


def _check_pixel_statistics(device):
    torch.manual_seed(0)
    for channels in (3, 8):  # 147 entries per patch (explicit patches), 392 (structured Gram)
        x = 255 * torch.rand(8, channels, 20, 20, device=device, dtype=torch.float64)
        grad_z = torch.randn(8, 8, 10, 10, device=device, dtype=torch.float64)
        plain = nn.Conv2d(channels, 8, 7, 2, 3).to(device, torch.float64)
        grads = {}
        for dtype in (torch.float64, torch.float32):
            layer = tt.wrap(copy.deepcopy(plain).to(dtype), lam=0.1)
            layer(x.to(dtype)).backward(grad_z.to(dtype))
            grads[dtype] = layer.weight.grad.double()
        # TF32 products would err by 2e-4 to 5e-4 here.
        assert_close(grads[torch.float32], grads[torch.float64].cpu().numpy(), 2e-5,
                     f"{channels} channels")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("batch", [8, 1])
def test_nan_inf_flow_through(bad, batch, device):
    layer = tt.wrap(nn.Conv2d(3, 4, 3), lam=0.1).to(device)
    x = torch.randn(batch, 3, 5, 5, device=device)
    x[0, 1, 2, 2] = bad
    layer(x).sum().backward()
    assert torch.isnan(layer.weight.grad).any()


def test_channels_last_unbatched_and_no_grad():
    torch.manual_seed(0)
    plain = nn.Conv2d(3, 4, 3, padding="same")
    wrapped = tt.wrap(plain, lam=0.1)
    x = torch.randn(4, 3, 6, 6)
    wrapped(x).sum().backward()
    reference = plain.weight.grad.clone()
    plain.zero_grad(set_to_none=True)
    wrapped(x.to(memory_format=torch.channels_last)).sum().backward()
    torch.testing.assert_close(plain.weight.grad, reference, rtol=1e-5, atol=1e-6)
    plain.zero_grad(set_to_none=True)
    wrapped(x[0]).sum().backward()  # unbatched input: one image's rows
    single = plain.weight.grad.clone()
    plain.zero_grad(set_to_none=True)
    wrapped(x[:1]).sum().backward()
    torch.testing.assert_close(single, plain.weight.grad)
    with torch.no_grad():
        assert torch.equal(wrapped(x), plain(x))
    plain.weight.requires_grad_(False)
    wrapped(x.requires_grad_()).sum().backward()  # frozen weight: input grads only
    assert x.grad is not None


def test_functional_conv_equals_module():
    torch.manual_seed(0)
    layer = tt.wrap(nn.Conv1d(2, 4, 3, stride=2, padding=2, dilation=2, padding_mode="reflect"))
    x = torch.randn(3, 2, 12)
    layer(x).sum().backward()
    expected = layer.weight.grad.clone()
    weight = layer.weight.detach().clone().requires_grad_()
    z = tt.conv(x, weight, layer.bias, stride=2, padding=2, dilation=2,
                padding_mode="reflect", lam=0.1)
    assert torch.equal(z, layer(x))
    z.sum().backward()
    assert torch.equal(weight.grad, expected)
    with pytest.raises(ValueError, match="padding_mode"):
        tt.conv(x, weight, padding_mode="mirror")
    with pytest.raises(ValueError, match="stride"):
        tt.conv(x, weight, stride=(1, 2))


@pytest.mark.parametrize("kernel, images, size", [(3, 16, 8), (7, 4, 16)],
                         ids=["patches", "structured_gram"])
def test_torch_compile_fullgraph_gives_eager_gradients(kernel, images, size, device):
    """A 3x3 stem (explicit patches) and a 7x7/2 one (the structured Gram: phase
    stack, shift correlations, frame strips and corners)."""
    torch.manual_seed(0)
    model = nn.Sequential(tt.wrap(nn.Conv2d(3, 8, kernel, padding=kernel // 2, stride=2)),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * (size // 2) ** 2, 4))
    model.to(device)
    x = torch.randn(images, 3, size, size, device=device)
    eager = grads_of(model, x)
    compiled = torch.compile(model, fullgraph=True)
    compiled.zero_grad(set_to_none=True)
    compiled(x).square().sum().backward()
    for got, want in zip([p.grad for p in model.parameters()], eager):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_tract_layers_can_be_built_directly():
    torch.manual_seed(0)
    layer = tt.TrActConv2d(3, 4, 3)
    assert layer.lam == 0.1 and not layer.sync
    layer(torch.randn(2, 3, 5, 5)).sum().backward()
    assert layer.weight.grad.shape == (4, 3, 3, 3)


def test_benchmark_baseline_computes_the_same_gradient_as_tract(monkeypatch):
    """bench_torch.py compares against the unfold + inverse algorithm: same numbers, in fp64."""
    import importlib.util

    benchmarks = pathlib.Path(__file__).parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(benchmarks))  # for its _harness
    spec = importlib.util.spec_from_file_location("bench_torch", benchmarks / "bench_torch.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    torch.manual_seed(0)
    plain = nn.Conv2d(3, 5, 3, stride=2, padding=1).double()
    x = torch.randn(6, 3, 9, 9, dtype=torch.float64)
    grads = {}
    for name, layer in (("tract", tt.wrap(plain)), ("unfold", bench._unfold_baseline(plain))):
        plain.zero_grad(set_to_none=True)
        layer(x).square().sum().backward()
        grads[name] = (plain.weight.grad, plain.bias.grad)
    torch.testing.assert_close(grads["unfold"], grads["tract"], rtol=1e-10, atol=0)


def test_forward_and_backward_read_nothing_back_to_the_host(monkeypatch, device):
    """No tensor value reaches Python during a step (on a GPU, .item(), bool(), float(),
    .tolist() or .numpy() each wait for the device): every conv path, the push-through
    form, a grouped conv and the linear layer, NaN data included. On CUDA, torch's sync
    debug mode also fails any synchronization inside a kernel (cuSOLVER/MAGMA status)."""
    torch.manual_seed(0)
    cases = [(nn.Conv2d(3, 4, 3, padding=1), (2, 3, 12, 12)),
             (nn.Conv2d(3, 4, 7, stride=2, padding=3), (2, 3, 16, 16)),
             (nn.Conv2d(4, 4, 3, padding="same", groups=2, padding_mode="reflect"),
              (2, 4, 12, 12)),
             (nn.Conv2d(3, 4, 4, stride=4), (2, 3, 12, 12)),
             (nn.Conv2d(3, 4, 5), (1, 3, 6, 6)),  # b = 4 < n = 75
             (nn.Linear(6, 4), (9, 6)),
             (nn.Linear(6, 4), (9, 6))]
    cases = [(tt.wrap(layer.to(device)), torch.randn(shape, device=device))
             for layer, shape in cases]
    cases[-1][1].fill_(float("nan"))
    read = []
    for name in ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _f=original, _n=name, **k:
                            read.append(_n) or _f(self, *a, **k))
    for layer, x in cases:  # first step: index constants copied to the device once
        layer(x).square().sum().backward()
        layer.weight.grad = None
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        for layer, x in cases:
            layer(x).square().sum().backward()
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        monkeypatch.undo()
    assert read == []
    assert all(layer.weight.grad is not None for layer, _ in cases)
    assert torch.isnan(cases[-1][0].weight.grad).all()


def test_backward_copies_nothing_from_the_host_after_the_first_step(monkeypatch, device):
    """Index constants are made once per device: later backwards create no tensor from host
    data (on a GPU each such copy would synchronize with the device)."""
    torch.manual_seed(0)
    layers = [tt.wrap(nn.Conv2d(3, 4, 3, padding=1)), tt.wrap(nn.Conv2d(3, 4, 7, stride=2)),
              tt.wrap(nn.Conv2d(3, 4, 4, stride=4)), tt.wrap(nn.Linear(6, 4))]
    layers = [layer.to(device) for layer in layers]
    inputs = [torch.randn(2, 3, 12, 12, device=device)] * 3 + [torch.randn(9, 6, device=device)]
    for layer, x in zip(layers, inputs):
        layer(x).square().sum().backward()  # first step: constants made
    made = []
    for name in ("tensor", "as_tensor", "asarray", "from_numpy"):
        original = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _f=original, _n=name, **k:
                            made.append(_n) or _f(*a, **k))
    for layer, x in zip(layers, inputs):
        layer.weight.grad = None
        layer(x).square().sum().backward()
        assert layer.weight.grad is not None
    assert made == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replays_give_eager_gradients():
    """torch.cuda.make_graphed_callables captures a TrAct layer's forward and backward
    once (possible because they read nothing back to the host); replays on new data
    give eager's gradients: stems of few and many patch entries, a ViT patch embedding,
    the b x b form, a linear layer. The graphed module runs its eager forward in eval
    mode."""
    torch.manual_seed(0)
    cases = [(nn.Conv2d(3, 4, 3, padding=1), (4, 3, 12, 12)),
             (nn.Conv2d(3, 4, 7, stride=2, padding=3), (4, 3, 16, 16)),
             (nn.Conv2d(8, 4, 7, stride=2, padding=3), (8, 8, 16, 16)),  # 392 entries
             (nn.Conv2d(3, 4, 4, stride=4), (4, 3, 12, 12)),
             (nn.Conv2d(3, 4, 5), (1, 3, 6, 6)),  # b = 4 < n = 75
             (nn.Linear(6, 4), (9, 6))]
    for plain, shape in cases:
        layer = tt.wrap(plain.to("cuda", torch.float64))
        sample = torch.randn(shape, dtype=torch.float64, device="cuda")
        torch.cuda.make_graphed_callables(layer, (sample,))  # layer.forward now replays
        for _ in range(2):
            x = torch.randn(shape, dtype=torch.float64, device="cuda")
            grads = []
            for training in (True, False):  # graph replay, then eager
                layer.train(training)
                layer.zero_grad(set_to_none=True)
                layer(x).square().sum().backward()
                grads.append(layer.weight.grad)
            torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=0)


def tract_reference(layer, x, grad_z, lam=0.1):
    """TrAct's weight gradient ``G^T X (X^T X / b + lam I)^-1`` in float64 numpy, sharing
    no code with the library: a conv's rows X are its patches by an identity-kernel conv,
    one system per group; no rows (b = 0) give zeros. ``x`` may be unbatched."""
    x, grad_z = x.detach().cpu().double(), grad_z.detach().cpu().double()
    weight = layer.weight.detach()
    if isinstance(layer, nn.Linear):
        rows = [x.reshape(-1, x.shape[-1]).numpy()]
        grads = [grad_z.reshape(-1, grad_z.shape[-1]).numpy()]
    else:
        d, groups = weight.ndim - 2, layer.groups
        if x.ndim == d + 1:
            x, grad_z = x[None], grad_z[None]
        padding = layer.padding
        if layer.padding_mode != "zeros":
            x = nn.functional.pad(x, layer._reversed_padding_repeated_twice,
                                  mode=layer.padding_mode)
            padding = 0
        n_g, m_g = weight[0].numel(), weight.shape[0] // groups
        eye = torch.eye(n_g, dtype=torch.float64).reshape(n_g, *weight.shape[1:])
        patches = getattr(nn.functional, f"conv{d}d")(
            x, eye.repeat(groups, *[1] * (d + 1)), None, layer.stride, padding,
            layer.dilation, groups)
        count = math.prod(patches.shape[2:])
        rows = patches.reshape(len(x), groups, n_g, count).permute(1, 0, 3, 2)
        grads = grad_z.reshape(len(x), groups, m_g, count).permute(1, 0, 3, 2)
        rows = list(rows.reshape(groups, -1, n_g).numpy())
        grads = list(grads.reshape(groups, -1, m_g).numpy())
    out = []
    for r, g in zip(rows, grads):
        b, n = r.shape
        plain = g.T @ r
        out.append(plain if b == 0 else
                   np.linalg.solve(r.T @ r / b + lam * np.eye(n), plain.T).T)
    return np.concatenate(out).reshape(weight.shape)


def test_tract_reference_matches_the_fixtures():
    """tract_reference agrees with the float64 fixtures on every case."""
    for case in CASES:
        layer = plain_layer(case)
        x = torch.from_numpy(case.x)
        assert_close(tract_reference(layer, x, torch.from_numpy(case.grad_z), case.lam),
                     case.grad_weight, 1e-9, case.name)


@pytest.fixture
def world_of_one(tmp_path):
    """torch.distributed initialized: one gloo process."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}",
                                         rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


EMPTY_BATCHES = [
    (lambda: nn.Conv2d(3, 4, 3, padding=1), (0, 3, 8, 8)),  # few patch entries
    (lambda: nn.Conv2d(3, 16, 7, stride=2, padding=3), (0, 3, 16, 16)),
    (lambda: nn.Conv2d(8, 4, 7, stride=2, padding=3), (0, 8, 16, 16)),  # many entries
    (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode="reflect"), (0, 4, 6, 6)),
    (lambda: nn.Conv2d(3, 4, 4, stride=4), (0, 3, 8, 8)),  # disjoint patches
    (lambda: nn.Conv1d(2, 3, 3, dilation=2), (0, 2, 9)),
    (lambda: nn.Conv3d(2, 2, 2, bias=False), (0, 2, 4, 4, 4)),
    (lambda: nn.Linear(5, 3), (0, 5)),
    (lambda: nn.Linear(5, 3), (2, 0, 5)),
]


@pytest.mark.parametrize("sync", [False, True], ids=["local", "synced"])
@pytest.mark.parametrize("make, shape", EMPTY_BATCHES, ids=[
    "stem3x3", "stem7x7s2", "many_entries", "grouped_reflect", "disjoint", "conv1d", "conv3d",
    "linear", "linear_tokens"])
def test_empty_batch_gives_the_plain_layers_zero_gradients(make, shape, sync, request):
    """N = 0 (the last batch of a filtered loader): the plain layer's output and input
    and bias gradients, and a zero weight gradient (G^T X over no rows). Synced, in a
    real process group of one, the Gram and the row count of 0 are all-reduced."""
    if sync:
        request.getfixturevalue("world_of_one")
    torch.manual_seed(0)
    plain = make().double()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    results = []
    for layer in (plain, tt.wrap(plain, sync=sync)):
        plain.zero_grad(set_to_none=True)
        x.grad = None
        z = layer(x)
        z.sum().backward()
        results.append([z, x.grad] + ([plain.bias.grad] if plain.bias is not None else []))
    for got, want in zip(results[1], results[0]):
        assert got.shape == want.shape and torch.equal(got, want)
    assert plain.weight.grad.shape == plain.weight.shape
    assert_close(plain.weight.grad, tract_reference(plain, x, torch.ones_like(z)), 0)


IN_PLACE_LAYERS = [
    (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (2, 3, 6, 6)),
    (lambda: nn.Conv2d(3, 4, 7, stride=2, padding=3), (2, 3, 12, 12)),
    (lambda: nn.Conv1d(2, 4, 3, padding="same", dilation=2), (2, 7)),  # unbatched
    (lambda: nn.Linear(5, 3), (4, 2, 5)),
    (lambda: nn.Linear(5, 3), (5,)),
]
IN_PLACE_OPS = {  # (in place, the same out of place)
    "relu_inplace": (nn.ReLU(inplace=True), torch.relu),
    "add_": (lambda z: z.add_(1).square(), lambda z: (z + 1).square()),
    "sigmoid_": (lambda z: z.sigmoid_(), torch.sigmoid),
}


@pytest.mark.parametrize("op", IN_PLACE_OPS)
@pytest.mark.parametrize("make, shape", IN_PLACE_LAYERS, ids=[
    "reflect", "stem7x7s2", "conv1d_unbatched", "linear_tokens", "linear_unbatched"])
def test_in_place_op_on_the_output(make, shape, op):
    """nn.ReLU(inplace=True) right after the layer (AlexNet/VGG stems) and other in-place
    ops: the plain layer's values and input and bias gradients, TrAct's weight gradient
    for the output gradient before the op."""
    in_place, out_of_place = IN_PLACE_OPS[op]
    torch.manual_seed(0)
    plain = make().double()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    z = plain(x)
    weights = torch.randn_like(z)
    (grad_z,) = torch.autograd.grad((out_of_place(z) * weights).sum(), z)
    results = []
    for layer in (plain, tt.wrap(plain, lam=0.1)):
        plain.zero_grad(set_to_none=True)
        x.grad = None
        out = in_place(layer(x))
        (out * weights).sum().backward()
        results.append((out.detach(), x.grad, plain.bias.grad))
    for got, want in zip(results[1], results[0]):
        assert torch.equal(got, want)
    assert_close(plain.weight.grad, tract_reference(plain, x, grad_z), 1e-9)


DOUBLE_BACKWARD_LAYERS = [
    (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1, padding_mode="reflect"), (3, 2, 7, 7)),
    (lambda: nn.Conv2d(2, 4, 3, groups=2), (2, 6, 6)),  # unbatched, b < n
    (lambda: nn.Linear(4, 3), (5, 2, 4)),
]


@pytest.mark.parametrize("make, shape", DOUBLE_BACKWARD_LAYERS,
                         ids=["conv_reflect_s2", "grouped_unbatched", "linear_tokens"])
def test_gradient_penalty_matches_the_plain_layer(make, shape):
    """create_graph=True (gradient penalties): the input gradient is the plain layer's
    and as differentiable in the weight. A penalty P(dL/dx) then gets the plain layer's
    weight gradient through the weight in dL/dx, plus TrAct's for its gradient at z;
    a loss linear in z (dP/dz = 0) gets exactly the plain layer's."""
    torch.manual_seed(0)
    plain = make().double()
    weight = plain.weight
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    scale = torch.randn_like(plain(x))

    def linear_loss(z):
        return (z * scale).sum()

    def quadratic_loss(z):
        return (z.square() * scale).sum() / 2

    penalty_grads = []
    for layer in (plain, tt.wrap(plain)):
        (grad_x,) = torch.autograd.grad(linear_loss(layer(x)), x, create_graph=True)
        penalty_grads.append(torch.autograd.grad(grad_x.square().sum(), weight)[0])
    torch.testing.assert_close(penalty_grads[1], penalty_grads[0], rtol=1e-12, atol=1e-12)

    # The plain layer's terms: through z (the TrAct node's share) and the rest.
    z = plain(x)
    grad_x = torch.autograd.grad(quadratic_loss(z), x, create_graph=True)[0]
    total, grad_at_z = torch.autograd.grad(grad_x.square().sum(), (weight, z),
                                           retain_graph=True)
    (through_z,) = torch.autograd.grad(z, weight, grad_at_z)
    expected = (total - through_z).numpy() + tract_reference(plain, x, grad_at_z)

    z = tt.wrap(plain)(x)
    grad_x, grad_w = torch.autograd.grad(quadratic_loss(z), (x, weight), create_graph=True)
    assert_close(grad_w, tract_reference(plain, x, z * scale), 1e-9, "first order")
    (penalty_grad,) = torch.autograd.grad(grad_x.square().sum(), weight)
    assert_close(penalty_grad, expected, 1e-9, "penalty")


@pytest.mark.parametrize("make, shape", DOUBLE_BACKWARD_LAYERS[::2],
                         ids=["conv_reflect_s2", "linear_tokens"])
def test_torch_func_grad_and_vmap(make, shape):
    """torch.func.grad of a functional_call gives TrAct's weight gradient; under
    torch.func.vmap each mapped call is a batch of its own (per-example gradients with
    each example's own statistics); a vmapped ensemble's forward is the plain one; a
    gradient penalty by nested grads gets what create_graph=True gives (tested above)."""
    from torch.func import functional_call, grad, stack_module_state, vmap

    torch.manual_seed(0)
    plain = make().double()
    wrapped = tt.wrap(plain, lam=0.1)
    params = {name: p.detach() for name, p in wrapped.named_parameters()}
    x = torch.randn(shape, dtype=torch.float64)

    def loss(p, images):
        return functional_call(wrapped, p, (images,)).square().sum() / 2

    got = grad(loss)(params, x)
    z = plain(x)
    (bias_grad,) = torch.autograd.grad(z.square().sum() / 2, plain.bias)
    assert_close(got["weight"], tract_reference(plain, x, z), 1e-9, "grad")
    torch.testing.assert_close(got["bias"], bias_grad, rtol=1e-12, atol=0)
    per_example = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for i in range(len(x)):
        assert_close(per_example["weight"][i], tract_reference(plain, x[i], z[i]), 1e-9,
                     f"example {i}")

    def penalty(p, images):  # the weight is differentiated by the outer grad only
        return grad(loss, argnums=1)(p, images).square().sum()

    images = x.clone().requires_grad_()
    (grad_x,) = torch.autograd.grad(loss(dict(wrapped.named_parameters()), images), images,
                                    create_graph=True)
    (expected,) = torch.autograd.grad(grad_x.square().sum(), plain.weight)
    assert_close(grad(penalty)(params, x)["weight"], expected, 1e-10, "nested grads")
    other = copy.deepcopy(plain)
    nn.init.normal_(other.weight)
    stacked, _ = stack_module_state([plain, other])
    outputs = vmap(lambda p: functional_call(wrapped, p, (x,)))(stacked)
    for output, layer in zip(outputs, (plain, other)):
        torch.testing.assert_close(output, layer(x), rtol=1e-12, atol=1e-14)


FRESH_COMPILE = r"""
import copy, torch, torch.nn as nn
import tract_core.torch as tt
torch.manual_seed(0)
model = nn.Sequential(
    tt.wrap(nn.Conv2d(4, 16, 7, stride=2, padding=3)),  # 196 patch entries: structured Gram
    nn.ReLU(inplace=True),
    tt.wrap(nn.Conv2d(16, 8, 3, padding=1, groups=8)),  # 18 per group: explicit patches
    nn.ReLU(inplace=True), nn.Flatten(),
    tt.wrap(nn.Linear(8 * 16 * 16, 4))).double()  # b = 2 < n: the b x b form
eager = copy.deepcopy(model)
x = torch.randn(2, 4, 32, 32, dtype=torch.float64)
compiled = torch.compile(model, fullgraph=True)
out = compiled(x)  # first call in the process: no eager step filled any memo
out.square().sum().backward()
reference = eager(x)
reference.square().sum().backward()
torch.testing.assert_close(out, reference, rtol=1e-12, atol=0)
for (name, p), q in zip(model.named_parameters(), eager.parameters()):
    torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=0, msg=name)
print("same gradients")
"""


def test_torch_compile_fullgraph_in_a_fresh_process():
    """torch.compile(fullgraph=True) of a small model (7x7/2 stem on 4 channels, past
    PyTorch's explicit-patch limit, in-place ReLU, a grouped 3x3 conv, a linear head) in
    a new process, where no eager run has filled the library's memos: forward and
    gradients equal eager's."""
    result = subprocess.run([sys.executable, "-c", FRESH_COMPILE], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0 and "same gradients" in result.stdout, result.stderr[-4000:]


def test_complex_layers_raise_type_error_in_forward():
    layer = tt.wrap(nn.Conv2d(2, 3, 3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="complex64"):
        layer(torch.randn(1, 2, 5, 5, dtype=torch.complex64))
    layer = tt.wrap(nn.Linear(2, 3, dtype=torch.complex128))
    with pytest.raises(TypeError, match="complex128"):
        layer(torch.randn(4, 2, dtype=torch.complex128))


@pytest.mark.parametrize("make, x", [
    (lambda: nn.Conv2d(3, 2, 3), torch.zeros(1, 3, 5, 5, dtype=torch.int64)),
    (lambda: nn.Linear(3, 2), torch.zeros(4, 3, dtype=torch.uint8)),
    (lambda: nn.Conv2d(3, 2, 5, padding=1), torch.zeros(1, 3, 2, 2)),  # kernel > input
    (lambda: nn.Conv1d(3, 2, 3, padding=4, padding_mode="reflect"), torch.zeros(1, 3, 3)),
    (lambda: nn.Conv3d(1, 2, 3), torch.zeros(0, 1, 2, 4, 4)),  # and no images
], ids=["int_conv", "uint8_linear", "kernel_too_large", "reflect_too_wide", "empty_small"])
def test_inputs_the_plain_layer_refuses_raise_its_error(make, x):
    plain = make()
    with pytest.raises(Exception) as plain_error:
        plain(x)
    with pytest.raises(type(plain_error.value)) as ours:
        tt.wrap(plain)(x)
    assert str(ours.value) == str(plain_error.value)


# Adoption: layers built with lam, the official call, subclasses, the first-layer helper.

BUILT_DIRECTLY = [
    (tt.TrActLinear, (5, 3), {}, 0.05, (7, 2, 5)),
    (tt.TrActConv1d, (2, 4, 3), {"stride": 2, "dilation": 2}, 0.3, (3, 2, 13)),
    (tt.TrActConv2d, (3, 4, 7), {"stride": 2, "padding": 3, "bias": False}, 0.05,
     (6, 3, 12, 12)),
    (tt.TrActConv3d, (2, 4, 2), {"padding": 1, "padding_mode": "circular", "groups": 2}, 0.2,
     (2, 2, 3, 4, 4)),
]


@pytest.mark.parametrize("cls, args, options, lam, shape", BUILT_DIRECTLY,
                         ids=lambda v: v.__name__ if isinstance(v, type) else None)
def test_layers_built_with_lam_give_tracts_gradient(cls, args, options, lam, shape):
    """TrActConv2d(3, 4, 7, ..., lam=0.05): the plain layer's options and the given lam."""
    torch.manual_seed(0)
    layer = cls(*args, **options, lam=lam, dtype=torch.float64)
    assert isinstance(layer, _PLAIN_OF[cls]) and layer.lam == lam and not layer.sync
    x = torch.randn(shape, dtype=torch.float64)
    z = layer(x)
    grad_z = torch.randn_like(z)
    z.backward(grad_z)
    assert_close(layer.weight.grad, tract_reference(layer, x, grad_z, lam), 1e-9)
    plain = tt.unwrap(layer)
    assert type(plain) is _PLAIN_OF[cls] and plain.weight is layer.weight
    assert torch.equal(plain(x), z.detach())


_PLAIN_OF = {tt.TrActLinear: nn.Linear, tt.TrActConv1d: nn.Conv1d, tt.TrActConv2d: nn.Conv2d,
             tt.TrActConv3d: nn.Conv3d}


def test_official_call_is_wrap():
    """TrAct(layer, l=...) (the official implementation's call) is wrap(layer, lam=...)."""
    torch.manual_seed(0)
    plain = nn.Conv2d(3, 4, 3, stride=2).double()
    x = torch.randn(5, 3, 9, 9, dtype=torch.float64)
    grads = []
    for layer in (tt.TrAct(plain, l=0.3), tt.wrap(plain, lam=0.3), tt.TrAct(plain)):
        plain.zero_grad(set_to_none=True)
        layer(x).square().sum().backward()
        grads.append(plain.weight.grad)
        assert type(layer) is tt.TrActConv2d and layer.weight is plain.weight
    assert torch.equal(grads[0], grads[1]) and not torch.equal(grads[0], grads[2])
    assert tt.TrAct(plain).lam == 0.1
    assert_close(grads[0], tract_reference(plain, x, 2 * plain(x), 0.3), 1e-9)


class _InitOnlyConv2d(nn.Conv2d):
    """A subclass that changes only the construction: wrap() accepts it."""

    def __init__(self, channels, width):
        super().__init__(channels, width, 3, padding=1, bias=False)
        self.role = "stem"

    def reset_parameters(self):
        nn.init.normal_(self.weight, std=0.1)

    def describe(self):
        return f"{self.role} {self.out_channels}"


class _StdConv2d(nn.Conv2d):
    """Weight standardization as timm's StdConv2d does it: forward overridden."""

    def forward(self, x):
        weight = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (
            self.weight.std((1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, weight, self.bias)


class _ScaledConvForward(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, 2 * weight, bias)


class _ScaledCallLinear(nn.Linear):
    def __call__(self, x):
        return 2 * super().__call__(x)


def test_subclass_with_the_plain_forward_is_accepted():
    """Its TrAct class derives from it: TrAct's gradient, the subclass's methods, pickling
    and deepcopy keep the class, unwrap gives the subclass back with the same Parameters."""
    torch.manual_seed(0)
    plain = _InitOnlyConv2d(3, 4).double()
    layer = tt.wrap(plain, lam=0.2)
    assert isinstance(layer, _InitOnlyConv2d) and isinstance(layer, tt.TrActConv2d)
    assert type(layer) is type(tt.wrap(_InitOnlyConv2d(2, 2)))  # one class per subclass
    assert layer.describe() == "stem 4" and layer.weight is plain.weight and layer.lam == 0.2
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    z = layer(x)
    z.square().sum().backward()
    assert torch.equal(z, plain(x))
    assert_close(plain.weight.grad, tract_reference(plain, x, 2 * z, 0.2), 1e-9)
    buffer = io.BytesIO()
    torch.save(nn.Sequential(layer), buffer)
    buffer.seek(0)
    for other in (torch.load(buffer, weights_only=False)[0], copy.deepcopy(layer)):
        assert type(other) is type(layer) and other.lam == 0.2
        assert torch.equal(other.weight, layer.weight)
    back = tt.unwrap(layer)
    assert type(back) is _InitOnlyConv2d and back.weight is plain.weight
    assert tt.wrap(layer, lam=0.05).lam == 0.05  # re-wrap


@pytest.mark.parametrize("make, defined", [
    (lambda: _StdConv2d(3, 4, 3), "its class .*_StdConv2d defines forward"),
    (lambda: _ScaledConvForward(3, 4, 3), "defines _conv_forward"),
    (lambda: _ScaledCallLinear(3, 4), "defines __call__"),
], ids=["forward", "conv_forward", "call"])
def test_subclass_that_may_change_the_forward_is_refused(make, defined):
    with pytest.raises(TypeError, match=defined) as error:
        tt.wrap(make())
    assert "different function" in str(error.value)
    assert "tract_core.torch.conv" in str(error.value) or "torch.linear" in str(error.value)


def test_layer_whose_forward_was_replaced_is_refused():
    layer = nn.Conv2d(3, 4, 3)
    layer.forward = lambda x: x  # as hook libraries do
    with pytest.raises(TypeError, match="the layer itself defines forward"):
        tt.wrap(layer)


def test_parametrized_layers_are_refused_until_the_parametrization_is_removed():
    """weight_norm (parametrization or old-style pre-hook), spectral_norm: the weight is
    computed from other parameters, so TrAct's gradient would not be theirs."""
    parametrize = nn.utils.parametrize
    layer = nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3))
    with pytest.raises(TypeError, match=r"parametrized .*remove_parametrizations"):
        tt.wrap(layer)
    parametrize.remove_parametrizations(layer, "weight")
    assert type(tt.wrap(layer)) is tt.TrActConv2d
    with pytest.warns(FutureWarning):
        old_style = nn.utils.weight_norm(nn.Linear(3, 4))
    for layer in (old_style, nn.utils.spectral_norm(nn.Linear(3, 4))):
        with pytest.raises(TypeError, match="computed by a forward pre-hook"):
            tt.wrap(layer)


def test_lazy_layer_is_refused_before_its_first_forward():
    layer = nn.LazyConv2d(4, 3)
    with pytest.raises(TypeError, match="run one forward pass first"):
        tt.wrap(layer)
    layer(torch.randn(1, 3, 5, 5))
    assert type(tt.wrap(layer)) is tt.TrActConv2d


class _ResNetLike(nn.Module):
    """Registered head first: the first conv by name order is not the first one called."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 3)
        self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.stem = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False)),
                                  nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.Dropout(0.5))

    def forward(self, x):
        x = self.stem(x)
        return self.fc(torch.relu(x + self.layer1(x)).mean((2, 3)))


class _ViT(nn.Module):
    """A class token and position embeddings on the model itself; LayerNorms in blocks."""

    def __init__(self, width=16, patches=4):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.blocks = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU())
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, width, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, patches + 1, width))

    def forward(self, pixel_values):
        tokens = self.patch_embed.proj(pixel_values).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], 1)
        return self.norm(self.blocks(tokens + self.pos_embed))[:, 0]


class _Standardize(nn.Module):
    """Fixed per-channel mean and std (buffers, or frozen Parameters): preprocessing."""

    def __init__(self, frozen_parameters=False):
        super().__init__()
        for name, value in (("mean", [0.5, 0.4, 0.3]), ("std", [0.2, 0.3, 0.25])):
            value = torch.tensor(value).view(3, 1, 1)
            if frozen_parameters:
                self.register_parameter(name, nn.Parameter(value, requires_grad=False))
            else:
                self.register_buffer(name, value)

    def forward(self, x):
        return (x - self.mean) / self.std


class _NormalizedFirst(nn.Module):
    def __init__(self, first):
        super().__init__()
        self.input_norm, self.conv = first, nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if self.input_norm is None:  # functional standardization in the forward
            x = (x - x.mean()) / x.std()
        else:
            x = self.input_norm(x)
        return self.conv(x).mean((2, 3))


@pytest.mark.parametrize("make, example, path", [
    (_ResNetLike, torch.randn(2, 3, 8, 8), "stem.0.0"),
    (_ViT, {"pixel_values": torch.randn(2, 3, 8, 8)}, "patch_embed.proj"),
    (lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.ReLU(), nn.Linear(4, 2)),
     torch.randn(2, 3, 2, 2), "1"),
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), (torch.randn(1, 3, 5, 5),), "0"),
    (lambda: _NormalizedFirst(_Standardize()), torch.randn(2, 3, 6, 6), "conv"),
    (lambda: _NormalizedFirst(_Standardize(True)), torch.randn(2, 3, 6, 6), "conv"),
    (lambda: _NormalizedFirst(None), torch.randn(2, 3, 6, 6), "conv"),
], ids=["resnet", "vit_class_token", "mlp_flatten", "sequential", "standardize_buffers",
        "standardize_frozen_parameters", "standardize_functional"])
def test_wrap_first_layer_finds_the_layer_the_input_reaches_first(make, example, path):
    """From one forward (a tensor, a tuple of arguments, a dict of keywords), not from
    names; parameter-free modules and functional ops on the way are skipped. Training
    modes (a frozen BatchNorm in eval included) and running statistics stay as they were."""
    torch.manual_seed(0)
    model = make().train()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if norms:
        norms[-1].eval()
    modes = [m.training for m in model.modules()]
    plain = model.get_submodule(path)
    assert tt.wrap_first_layer(model, example, lam=0.2) == path
    layer = model.get_submodule(path)
    assert type(layer) is tt.wrap(plain).__class__ and layer.lam == 0.2
    assert layer.weight is plain.weight
    assert [m.training for m in model.modules()] == modes
    assert all(int(m.num_batches_tracked) == 0 for m in norms)
    assert sum(isinstance(m, tt.TrActConv2d | tt.TrActLinear) for m in model.modules()) == 1


def test_wrapped_first_layer_gets_tracts_gradient_and_the_rest_the_plain_ones():
    """The ResNet-like model in float64: the stem's weight gradient is TrAct's for the
    gradient at its output; every other gradient and the output are the plain model's."""
    torch.manual_seed(0)
    plain = _ResNetLike().double().eval()  # no dropout: both models see the same
    model = copy.deepcopy(plain)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    assert tt.wrap_first_layer(model, x, lam=0.1) == "stem.0.0"
    stem_out = []
    plain.stem[0][0].register_forward_hook(lambda m, i, z: z.retain_grad() or stem_out.append(z))
    results = []
    for net in (plain, model):
        out = net(x)
        out.square().sum().backward()
        results.append((out, dict(net.named_parameters())))
    assert torch.equal(results[1][0], results[0][0])
    for name, p in results[0][1].items():
        if name != "stem.0.0.weight":
            assert torch.equal(results[1][1][name].grad, p.grad), name
    assert_close(results[1][1]["stem.0.0.weight"].grad,
                 tract_reference(plain.stem[0][0], x, stem_out[0].grad), 1e-9)


@pytest.mark.parametrize("first, named", [
    (nn.BatchNorm2d(3), r"'input_norm' \(BatchNorm2d\)"),
    (nn.GroupNorm(1, 3, affine=False), r"'input_norm' \(GroupNorm\)"),  # no parameters
    (nn.Sequential(nn.Identity(), nn.InstanceNorm2d(3)), r"'input_norm.1' \(InstanceNorm2d\)"),
], ids=["batchnorm", "groupnorm_no_affine", "instancenorm"])
def test_wrap_first_layer_refuses_a_normalisation_before_the_first_layer(first, named):
    """The message names the normalisation (path and class) and the layer after it; the
    model is left as it was, running statistics included."""
    model = _NormalizedFirst(first).train()
    with pytest.raises(TypeError, match=f"{named}, a normalisation") as error:
        tt.wrap_first_layer(model, torch.randn(2, 3, 6, 6))
    assert "after it ('conv', Conv2d)" in str(error.value)
    assert type(model.conv) is nn.Conv2d and all(m.training for m in model.modules())
    assert all(int(m.num_batches_tracked) == 0 for m in model.modules()  # ran in eval mode
               if isinstance(m, nn.BatchNorm2d))


def test_wrap_first_layer_names_an_unsupported_first_layer():
    model = nn.Sequential(nn.Identity(), nn.Sequential(nn.ConvTranspose2d(3, 4, 3)))
    with pytest.raises(TypeError, match=r"first layer '1\.0'.*got layer of type ConvTranspose2d"):
        tt.wrap_first_layer(model, torch.randn(1, 3, 5, 5))
    with pytest.raises(ValueError, match="called no module with a weight"):
        tt.wrap_first_layer(nn.Sequential(nn.ReLU()), torch.randn(2, 3))
    with pytest.raises(ValueError, match="itself its first layer"):
        tt.wrap_first_layer(nn.Linear(3, 2), torch.randn(2, 3))
    with pytest.raises(ValueError, match="example_input is required"):
        tt.wrap_first_layer(nn.Sequential(nn.Linear(3, 2)))


class _TimmLike(nn.Module):
    """timm-style: pretrained_cfg names the first conv; the forward must not run."""

    def __init__(self, stem_conv, first_conv="stem.conv"):
        super().__init__()
        self.stem = nn.Module()
        self.stem.conv = stem_conv
        self.pretrained_cfg = {"first_conv": first_conv, "num_classes": 10}

    def forward(self, x):
        raise AssertionError("no forward needed")


def test_wrap_first_layer_uses_timms_first_conv_without_a_forward():
    model = _TimmLike(nn.Conv2d(3, 8, 3))
    assert tt.wrap_first_layer(model, lam=0.3) == "stem.conv"
    assert type(model.stem.conv) is tt.TrActConv2d and model.stem.conv.lam == 0.3
    with pytest.raises(TypeError, match=r"'stem\.conv': _StdConv2d's forward may differ"):
        tt.wrap_first_layer(_TimmLike(_StdConv2d(3, 8, 3)), torch.randn(1, 3, 5, 5))
    with pytest.raises(ValueError, match=r"'stem\.proj', which names no submodule"):
        tt.wrap_first_layer(_TimmLike(nn.Conv2d(3, 8, 3), "stem.proj"))


def test_wrap_first_layer_rewraps_and_replaces_every_reference():
    """A layer already wrapped gets the new settings (no double wrapping); a layer held at
    two paths is replaced at both."""
    conv = nn.Conv2d(3, 4, 3)
    model = nn.Sequential(conv, nn.ReLU())
    model.alias = conv
    x = torch.randn(1, 3, 5, 5)
    assert tt.wrap_first_layer(model, x, lam=0.3) == "0"
    assert model[0] is model.alias and type(model.alias) is tt.TrActConv2d
    assert tt.wrap_first_layer(model, x, lam=0.05) == "0"
    assert type(model[0]) is tt.TrActConv2d and model[0].lam == 0.05
    assert model[0] is model.alias and model[0].weight is conv.weight


COMPILE_WARNINGS = r"""
import sys, torch, torch.nn as nn
import tract_core.torch as tt
for phase in ("plain", "wrapped"):
    print(f"--- {phase}", file=sys.stderr, flush=True)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 4))
    x = torch.randn(4, 3, 8, 8)
    if phase == "wrapped":
        tt.wrap_first_layer(model, x)
    torch.compile(model)(x).square().sum().backward()
    sys.stderr.flush()
print("compiled")
"""


@pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="no torch.compile here")
def test_torch_compile_of_a_wrapped_model_warns_no_more_than_the_plain_one(tmp_path):
    """torch.compile (inductor) of a plain model, then of the same model with its first
    layer wrapped, in a fresh process with every warning shown: compiling the wrapped
    one prints nothing (warning or log line) that compiling the plain one did not."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path),
           "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    result = subprocess.run([sys.executable, "-W", "always", "-c", COMPILE_WARNINGS],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]
    _, plain, wrapped = re.split(r"^--- (?:plain|wrapped)$", result.stderr, flags=re.M)
    # Log lines start with a time and a process id; objects print their addresses.
    lines = [{re.sub(r"^[A-Z]\d{4} \S+ \d+ |0x[0-9a-f]+", "", line)
              for line in text.splitlines() if line.strip()} for text in (plain, wrapped)]
    assert lines[1] <= lines[0], sorted(lines[1] - lines[0])
