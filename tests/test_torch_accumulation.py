"""Exact gradient accumulation in PyTorch: k micro-batches, then finalize(), give the union
batch's TrAct gradient; a forgotten finalize() stops the optimizer.

References are independent float64 numpy evaluations of ``G^T X (X^T X / b + lam I)^-1``
over all micro-batches' rows (``test_torch.tract_reference``).
"""

import copy
import itertools

import numpy as np
import pytest
from conftest import CASES, assert_close, need

torch = need("torch")
tt = pytest.importorskip("tract_core.torch")
from test_torch import plain_layer, tract_reference, widened  # noqa: E402

ACCUMULATED = ["linear_rows", "linear_tokens", "conv2d_cifar_stem", "conv1d_stride_dilation",
               "conv3d_stride_groups", "linear_b_lt_n", "conv2d_stride2_pixels"]


def case_named(name):
    return next(c for c in CASES if c.name == name)


def micro_batches(n, parts=3):
    """Unequal parts (the row counts must be summed, not assumed), one maybe empty."""
    cuts = sorted({0, n, *np.random.default_rng(n).integers(0, n + 1, parts - 1).tolist()})
    return [slice(a, b) for a, b in itertools.pairwise(cuts)] or [slice(0, 0)]


def accumulate(layer, x, grad_z, parts=3):
    """One backward per micro-batch of z.backward(grad_z) (its pieces sum to the batch's)."""
    for part in micro_batches(len(x), parts):
        layer(x[part]).backward(grad_z[part])


@pytest.mark.parametrize("name", ACCUMULATED)
def test_micro_batches_give_the_union_batch_gradient(name):
    case = case_named(name)
    x, grad_z = torch.tensor(case.x), torch.tensor(case.grad_z)
    layer = tt.wrap(plain_layer(case), lam=case.lam, accumulate=True)
    accumulate(layer, x, grad_z)
    assert not layer.weight.grad.any()  # nothing usable before finalize
    assert tt.finalize(layer) == 1
    assert_close(layer.weight.grad, case.grad_weight, 1e-10)
    assert_close(layer.weight.grad, tract_reference(plain_layer(case), x, grad_z, case.lam),
                 1e-10)
    if case.has_bias:
        assert_close(layer.bias.grad, case.grad_bias, 1e-12)
    assert tt.finalize(layer) == 0  # the sums start again from zero


def test_many_patch_entries_accumulate_exactly():
    """The structured Gram and torch's conv kernel (many entries per patch) accumulate too."""
    case = case_named("conv2d_stride2_pixels")
    plain, x, grad_z = widened(case)
    layer = tt.wrap(plain, lam=case.lam, accumulate=True)
    accumulate(layer, x, grad_z, parts=2)
    tt.finalize(layer)
    assert_close(layer.weight.grad, tract_reference(plain, x, grad_z, case.lam), 1e-9)


def test_accumulation_differs_from_preconditioning_each_micro_batch():
    case = case_named("conv2d_cifar_stem")
    x, grad_z = torch.tensor(case.x), torch.tensor(case.grad_z)
    each = tt.wrap(plain_layer(case), lam=case.lam)
    accumulate(each, x, grad_z)
    error = np.linalg.norm(each.weight.grad.numpy() - case.grad_weight)
    assert error > 1e-3 * np.linalg.norm(case.grad_weight)  # so the test above can fail


def test_a_forgotten_finalize_stops_the_optimizer():
    case = case_named("conv2d_cifar_stem")
    model = torch.nn.Sequential(tt.wrap(plain_layer(case), lam=case.lam, accumulate=True))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, grad_z = torch.tensor(case.x), torch.tensor(case.grad_z)
    accumulate(model, x, grad_z)
    before = model[0].weight.detach().clone()
    with pytest.raises(RuntimeError, match="finalize"):
        optimizer.step()
    assert torch.equal(model[0].weight, before)
    assert tt.finalize(model) == 1
    optimizer.step()  # now it may
    expected = before - 0.1 * torch.tensor(case.grad_weight)
    assert_close(model[0].weight.detach(), expected.numpy(), 1e-12)
    # Another optimizer that does not hold the weight is not concerned.
    accumulate(model, x, grad_z)
    torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1).step()
    assert tt.discard(model) == 1
    optimizer.step()  # dropped: nothing pending


def test_loss_scale_and_nan_flow_through():
    """A loss scaler's factor scales the result (the solve is linear in G); NaN stays NaN."""
    case = case_named("linear_rows")
    x, grad_z = torch.tensor(case.x), torch.tensor(case.grad_z)
    layer = tt.wrap(plain_layer(case), lam=case.lam, accumulate=True)
    accumulate(layer, x, grad_z * 1024.0)
    tt.finalize(layer)
    assert_close(layer.weight.grad / 1024.0, case.grad_weight, 1e-10)
    x[1, 0] = float("nan")
    layer.weight.grad = None
    accumulate(layer, x, grad_z)
    tt.finalize(layer)
    assert torch.isnan(layer.weight.grad).all()


def test_torch_compile_accumulates_like_eager():
    case = case_named("conv2d_cifar_stem")
    x, grad_z = torch.tensor(case.x), torch.tensor(case.grad_z)
    layer = tt.wrap(plain_layer(case), lam=case.lam, accumulate=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    accumulate(compiled, x, grad_z, parts=2)
    tt.finalize(layer)
    assert_close(layer.weight.grad, case.grad_weight, 1e-10)


def test_float32_layers_accumulate_in_float64():
    """The sums are float64 whatever the layer: float32 only in the final cast."""
    case = case_named("conv2d_cifar_stem")
    x, grad_z = torch.tensor(case.x), torch.tensor(case.grad_z)
    layer = tt.wrap(plain_layer(case, dtype=torch.float32), lam=case.lam, accumulate=True)
    accumulate(layer, x.float(), grad_z.float())
    tt.finalize(layer)
    assert layer.weight.grad.dtype == torch.float32
    x32, g32 = x.float().double(), grad_z.float().double()  # the float32 data, exactly
    expected = tract_reference(plain_layer(case), x32, g32, case.lam)
    assert_close(layer.weight.grad, expected, 1e-6)


def test_accumulate_is_an_option_of_wrap_and_unwrap_drops_it():
    case = case_named("linear_rows")
    layer = tt.wrap(plain_layer(case), accumulate=True)
    assert layer.accumulate and "accumulate=True" in repr(layer)
    assert not tt.wrap(layer).accumulate  # re-wrapped with new settings
    layer(torch.tensor(case.x)).backward(torch.tensor(case.grad_z))
    with pytest.raises(RuntimeError, match="pending"):
        tt.unwrap(layer)
    tt.discard(layer)
    assert type(tt.unwrap(layer)) is torch.nn.Linear


def test_copies_and_moved_layers_keep_accumulating_safely():
    case = case_named("linear_rows")
    x, grad_z = torch.tensor(case.x), torch.tensor(case.grad_z)
    model = copy.deepcopy(torch.nn.Sequential(tt.wrap(plain_layer(case), lam=case.lam,
                                                      accumulate=True)))
    model = model.float().double()  # the sums follow the weight (and are float64 anyway)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    accumulate(model, x, grad_z)
    with pytest.raises(RuntimeError, match="finalize"):
        optimizer.step()
    with pytest.raises(RuntimeError, match="pending"):
        model.float()
    tt.finalize(model)
    assert_close(model[0].weight.grad, case.grad_weight, 1e-10)
