"""Exact gradient accumulation in JAX: the gradients of k micro-batches through an
``accumulating`` kernel, summed (a Python loop, ``lax.scan``) or averaged
(``optax.MultiSteps``), then ``finalize``d, give the union batch's TrAct gradient.

References: the float64 fixtures (an independent numpy evaluation in torch layout) and,
for random geometries, the one-call gradient (itself checked against the fixtures).
"""

import functools
import itertools

import numpy as np
import pytest
from conftest import assert_close, case_id, need

jax = need("jax")
optax = need("optax")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
from test_jax import ALL_CASES, case_arrays, conv_options, kernel_to_torch  # noqa: E402

import tract_core.jax as tj  # noqa: E402


def micro_batches(n, parts=3):
    """Unequal parts (the row counts must be summed, not assumed), maybe an empty one."""
    cuts = sorted([0, n, *np.random.default_rng(n).integers(0, n + 1, parts - 1).tolist()])
    return [slice(a, b) for a, b in itertools.pairwise(cuts)]


def op_and_groups(case):
    if case.kind == "linear":
        return tj.dense, 1
    options = conv_options(case)
    groups = options.pop("feature_group_count")
    return functools.partial(tj.conv, feature_group_count=groups, **options), groups


def torch_layout(case, kernel_grad):
    kernel_grad = np.asarray(kernel_grad, dtype=np.float64)
    return kernel_grad.T if case.kind == "linear" else kernel_to_torch(kernel_grad)


@pytest.mark.parametrize("case", ALL_CASES, ids=case_id)
def test_micro_batches_give_the_union_batch_gradient(case):
    x, kernel, bias, grad_z = case_arrays(case, jnp.float64)
    op, groups = op_and_groups(case)
    op = functools.partial(op, lam=case.lam)
    params = (tj.accumulating(kernel, feature_group_count=groups), bias)
    grad = jax.jit(jax.grad(lambda p, x, g: jnp.sum(op(x, *p) * g)))
    parts = [grad(params, x[part], grad_z[part]) for part in micro_batches(len(x))]
    total = jax.tree.map(lambda *a: sum(a), *parts)
    assert not np.any(total[0].kernel)  # nothing usable before finalize
    node, grad_bias = tj.finalize(total)
    assert_close(torch_layout(case, node.kernel), case.grad_weight, 1e-9)
    assert not np.any(node.statistics)  # the optimizer leaves the statistics at zero
    if case.has_bias:
        assert_close(grad_bias, case.grad_bias, 1e-12)


def test_lax_scan_under_jit_with_a_scaled_loss():
    """Equal micro-batches under lax.scan: a loss scaled by 2**12 (as a loss scaler does),
    unscaled after finalize, gives the one-call gradient of the whole batch."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((8, 10, 10, 6)))
    weights = jnp.asarray(rng.standard_normal((8, 5, 5, 8)))
    kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 8)))
    conv = functools.partial(tj.conv, strides=2, padding="SAME", feature_group_count=2,
                             lam=0.05)

    def loss(kernel, x, w, scale=1.0):
        return scale * jnp.sum(jnp.tanh(conv(x, kernel)) * w)

    @jax.jit
    def accumulated(node):
        def step(total, batch):
            grads = jax.grad(loss)(node, *batch, scale=2.0**12)
            return jax.tree.map(jnp.add, total, grads), None

        zeros = jax.tree.map(jnp.zeros_like, node)
        batches = [a.reshape(4, 2, *a.shape[1:]) for a in (x, weights)]
        total, _ = lax.scan(step, zeros, batches)
        return jax.tree.map(lambda g: g / 2.0**12, tj.finalize(total))

    node = accumulated(tj.accumulating(kernel, feature_group_count=2))
    one_call = jax.grad(lambda k: jnp.sum(jnp.tanh(conv(x, k)) * weights))(kernel)
    assert_close(node.kernel, one_call, 1e-10)


def test_optax_multisteps_takes_the_union_batch_step():
    """MultiSteps averages k micro-batch gradients, then its inner chain preconditions once:
    the parameters move as one SGD step on the whole batch's TrAct gradient."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((12, 9)))
    labels = jnp.asarray(rng.standard_normal((12, 4)))
    params = {"first": tj.accumulating(jnp.asarray(rng.standard_normal((9, 6)))),
              "bias": jnp.zeros(6), "head": jnp.asarray(rng.standard_normal((6, 4)))}

    def loss(params, x, labels):  # a mean over rows: MultiSteps' average is the batch's mean
        hidden = jnp.tanh(tj.dense(x, params["first"], params["bias"], lam=0.2))
        return jnp.mean((hidden @ params["head"] - labels) ** 2)

    optimizer = optax.MultiSteps(optax.chain(tj.precondition_accumulated(),
                                             optax.clip_by_global_norm(1e6), optax.sgd(0.5)),
                                 every_k_schedule=3, accumulator_dtype=jnp.float64)
    state, current = optimizer.init(params), params
    for part in jnp.split(jnp.arange(12), 3):
        grads = jax.grad(loss)(current, x[part], labels[part])
        updates, state = optimizer.update(grads, state, current)
        current = optax.apply_updates(current, updates)

    grad_kernel, grad_bias, grad_head = jax.grad(
        lambda k, b, h: jnp.mean((jnp.tanh(tj.dense(x, k, b, lam=0.2)) @ h - labels) ** 2),
        argnums=(0, 1, 2))(params["first"].kernel, params["bias"], params["head"])
    assert_close(current["first"].kernel, params["first"].kernel - 0.5 * grad_kernel, 1e-12)
    assert_close(current["bias"], params["bias"] - 0.5 * grad_bias, 1e-12)
    assert_close(current["head"], params["head"] - 0.5 * grad_head, 1e-12)
    assert not np.any(current["first"].statistics)


def test_a_forgotten_finalize_makes_the_next_output_nan():
    """Under jit nothing can raise: an optimizer that stepped the statistics (finalize
    skipped) makes the layer's next output NaN; with finalize they stay zero."""
    node, x = tj.accumulating(jnp.ones((3, 2))), jnp.ones((4, 3))
    forward = jax.jit(lambda n: tj.dense(x, n))
    grads = jax.grad(lambda n: jnp.sum(forward(n)))(node)
    step = lambda g: optax.apply_updates(node, jax.tree.map(lambda u: -0.1 * u, g))
    assert np.isnan(forward(step(grads))).all()
    assert np.array_equal(forward(step(tj.finalize(grads))),
                          x @ step(tj.finalize(grads)).kernel)


def test_float32_statistics_without_x64():
    """With jax_enable_x64 off the sums are float32; the solve still runs in float64."""
    rng = np.random.default_rng(3)
    x, kernel = rng.standard_normal((64, 12)), rng.standard_normal((12, 5))
    grad_z = rng.standard_normal((64, 5))
    reference = jax.grad(lambda k: jnp.sum(tj.dense(jnp.asarray(x), k) * grad_z))(
        jnp.asarray(kernel))  # float64, one call
    with jax.enable_x64(False):
        node = tj.accumulating(jnp.asarray(kernel, jnp.float32))
        assert node.statistics.dtype == jnp.float32
        grad = jax.grad(lambda n, x, g: jnp.sum(tj.dense(x, n) * g))
        parts = [grad(node, jnp.asarray(x[p], jnp.float32), jnp.asarray(grad_z[p], jnp.float32))
                 for p in (slice(0, 20), slice(20, 64))]
        final = tj.finalize(jax.tree.map(jnp.add, *parts))
        assert final.kernel.dtype == jnp.float32
    assert_close(final.kernel, reference, 1e-5)


def test_misuse_is_refused():
    node = tj.accumulating(jnp.ones((3, 3, 4, 6)), feature_group_count=2)
    x = jnp.ones((1, 5, 5, 8))
    with pytest.raises(ValueError, match="axis_name"):
        tj.conv(x, node, feature_group_count=2, axis_name="d")
    with pytest.raises(ValueError, match="feature_group_count=3"):
        tj.conv(jnp.ones((1, 5, 5, 12)), node, feature_group_count=3)
    with pytest.raises(ValueError, match="divisible"):
        tj.accumulating(jnp.ones((3, 3, 4, 6)), feature_group_count=4)
    with pytest.raises(ValueError, match="lam"):
        jax.grad(lambda n: jnp.sum(tj.dense(jnp.ones((2, 3)), n, lam=0.0)))(
            tj.accumulating(jnp.ones((3, 4))))


def test_micro_batches_may_use_different_lams_of_one_layer():
    """lam enters the statistics as lam b I: micro-batches with one lam each give the
    system of the row-weighted mean lam (one lam for all: the usual TrAct)."""
    rng = np.random.default_rng(4)
    x, grad_z = rng.standard_normal((30, 6)), rng.standard_normal((30, 3))
    node = tj.accumulating(jnp.zeros((6, 3)))
    parts = [(slice(0, 10), 0.3), (slice(10, 30), 0.06)]  # mean lam: (3 + 1.2) / 30 = 0.14
    loss = lambda n, x, g, lam: jnp.sum(tj.dense(x, n, lam=lam) * g)
    grads = [jax.grad(loss)(node, x[p], grad_z[p], lam) for p, lam in parts]
    kernel_grad = tj.finalize(jax.tree.map(jnp.add, *grads)).kernel
    expected = np.linalg.solve(x.T @ x / 30 + 0.14 * np.eye(6), x.T @ grad_z)  # (n, m)
    assert_close(kernel_grad, expected, 1e-12)
