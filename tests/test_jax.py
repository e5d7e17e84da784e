"""tract_core.jax: dense/conv against the float64 fixtures and against lax itself.

Forward values and input/bias cotangents must be bitwise lax's; the kernel cotangent must
be TrAct's (fixtures: an independent numpy reference in torch layout).
"""

import functools
import math

import numpy as np
import pytest
from conftest import CONV_CASES, LINEAR_CASES, assert_close, case_id, need

jax = need("jax")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

import tract_core.jax as tj  # noqa: E402

# Reflect/replicate/circular padding is torch's F.pad; lax only zero-pads.
JAX_CONV_CASES = [c for c in CONV_CASES if c.padding_mode == "zeros"]
ALL_CASES = LINEAR_CASES + JAX_CONV_CASES
DIMENSION_SPECS = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"),
                   3: ("NDHWC", "DHWIO", "NDHWC")}


# --------------------------------------------------------------------------- helpers


def kernel_from_torch(weight):
    """(M, C/g, *k) -> (*k, C/g, M)."""
    d = weight.ndim - 2
    return np.transpose(weight, (*range(2, 2 + d), 1, 0))


def kernel_to_torch(kernel):
    """(*k, C/g, M) -> (M, C/g, *k)."""
    d = kernel.ndim - 2
    return np.transpose(np.asarray(kernel, dtype=np.float64), (d + 1, d, *range(d)))


def channels_last(a):
    return np.moveaxis(a, 1, -1)


def channels_first(a):
    return np.moveaxis(np.asarray(a, dtype=np.float64), -1, 1)


def conv_options(case):
    if isinstance(case.padding, str):
        padding = case.padding.upper()
    else:
        padding = [tuple(p) for p in case.pads]
    return dict(strides=tuple(case.stride), padding=padding,
                kernel_dilation=tuple(case.dilation), feature_group_count=case.groups)


def plain_dense(x, kernel, bias=None, *, precision=None):
    z = jnp.matmul(x, kernel, precision=precision)
    return z if bias is None else z + bias


def lax_padding(padding, d):
    """int / per-axis ints / pairs -> lax's (lo, hi) pairs; strings unchanged."""
    if isinstance(padding, str):
        return padding
    if isinstance(padding, int):
        padding = [padding] * d
    return [(p, p) if isinstance(p, int) else tuple(p) for p in padding]


def plain_conv(x, kernel, bias=None, *, strides=1, padding="VALID", kernel_dilation=1,
               feature_group_count=1, precision=None):
    d = x.ndim - 2
    per_axis = lambda v: (v,) * d if isinstance(v, int) else tuple(v)
    padding = lax_padding(padding, d)
    z = lax.conv_general_dilated(
        x, kernel, per_axis(strides), padding, rhs_dilation=per_axis(kernel_dilation),
        dimension_numbers=lax.conv_dimension_numbers(x.shape, kernel.shape, DIMENSION_SPECS[d]),
        feature_group_count=feature_group_count, precision=precision)
    return z if bias is None else z + bias


def value_and_cotangents(*fns):
    """(x, kernel, bias, grad_z) -> [(z, grad_x, grad_kernel, grad_bias) per fn], jitted
    as one program (one compile)."""

    @jax.jit
    def run(x, kernel, bias, grad_z):
        results = []
        for fn in fns:
            z, vjp = jax.vjp(fn, x, kernel, bias)
            results.append((z, *vjp(grad_z)))
        return results

    return run


def case_arrays(case, dtype):
    if case.kind == "linear":
        x, kernel, grad_z = case.x, case.weight.T, case.grad_z
    else:
        x, grad_z = channels_last(case.x), channels_last(case.grad_z)
        kernel = kernel_from_torch(case.weight)
    bias = case.bias if case.has_bias else None
    as_jax = lambda a: None if a is None else jnp.asarray(a, dtype=dtype)
    return as_jax(x), as_jax(kernel), as_jax(bias), as_jax(grad_z)


def case_ops(case):
    """(tract op, plain lax op) for a fixture case, both (x, kernel, bias) -> z."""
    if case.kind == "linear":
        return functools.partial(tj.dense, lam=case.lam), plain_dense
    options = conv_options(case)
    return (functools.partial(tj.conv, lam=case.lam, **options),
            functools.partial(plain_conv, **options))


@functools.cache
def run_case(name, dtype_name, with_plain=False):
    """[(z, grad_x, grad_kernel, grad_bias)] of one fixture case through tract, and through
    the plain lax op too if asked."""
    case = next(c for c in ALL_CASES if c.name == name)
    tract, plain = case_ops(case)
    fns = (tract, plain) if with_plain else (tract,)
    return value_and_cotangents(*fns)(*case_arrays(case, jnp.dtype(dtype_name)))


def to_torch_layout(case, z, grad_x, grad_kernel):
    if case.kind == "linear":
        return z, grad_x, np.asarray(grad_kernel, dtype=np.float64).T
    return channels_first(z), channels_first(grad_x), kernel_to_torch(grad_kernel)


# --------------------------------------------------------------------------- fixtures


@pytest.mark.parametrize("case", ALL_CASES, ids=case_id)
def test_forward_and_input_gradients_are_bitwise_lax(case):
    ours, plain = run_case(case.name, "float64", True)
    for what, a, b in zip(("z", "grad_x", "grad_bias"), ours[:2] + ours[3:], plain[:2] + plain[3:]):
        if b is None:
            assert a is None
        else:
            assert a.dtype == b.dtype and np.array_equal(a, b), what
    # The kernel cotangent is the one thing that differs.
    assert not np.allclose(ours[2], plain[2])


@pytest.mark.parametrize("name", ["linear_b_lt_n", "conv2d_cifar_stem"])
def test_bfloat16_runs_in_bfloat16(name):
    case = next(c for c in ALL_CASES if c.name == name)
    [results] = run_case(name, "bfloat16")
    for value in results:
        assert value.dtype == jnp.bfloat16
    _, _, grad_weight = to_torch_layout(case, *results[:3])
    # Inputs rounded to bf16 (8 bits) perturb the solution; the solve itself is float32.
    assert_close(grad_weight, case.grad_weight, 5e-2, "grad_weight")


# --------------------------------------------------------------------------- options


def patches_reference(x, kernel_shape, options):
    """(g, b, C/g*K) rows via lax.conv_general_dilated_patches (independent of the core)."""
    d = x.ndim - 2
    *window, c_g, _ = kernel_shape
    g = options.get("feature_group_count", 1)
    per_axis = lambda v: (v,) * d if isinstance(v, int) else tuple(v)
    padding = lax_padding(options.get("padding", "VALID"), d)
    patches = lax.conv_general_dilated_patches(
        x, window, per_axis(options.get("strides", 1)), padding,
        rhs_dilation=per_axis(options.get("kernel_dilation", 1)),
        dimension_numbers=DIMENSION_SPECS[d], precision=lax.Precision.HIGHEST)
    rows = np.asarray(patches).reshape(-1, g, c_g * math.prod(window))  # (channel, *k) order
    return rows.transpose(1, 0, 2)


def tract_reference(rows, grads, lam):
    """G^T X (X^T X / b + lam I)^-1 per group, numpy LU solve."""
    b, n = rows.shape[-2:]
    system = np.swapaxes(rows, -1, -2) @ rows / b + lam * np.eye(n)
    plain = np.swapaxes(grads, -1, -2) @ rows
    return np.swapaxes(np.linalg.solve(system, np.swapaxes(plain, -1, -2)), -1, -2)


CONV_OPTIONS = [
    ("1d_int_padding", (3, 11, 4), (3, 4, 5), dict(padding=2, strides=2)),
    ("1d_same_stride", (2, 12, 3), (4, 3, 6), dict(padding="SAME", strides=3)),
    ("1d_same_lower_dilated", (2, 13, 2), (3, 2, 4), dict(padding="SAME_LOWER", kernel_dilation=3)),
    ("2d_asym_pairs", (2, 7, 6, 4), (3, 2, 4, 6), dict(padding=[(0, 2), (1, 0)], strides=(2, 1))),
    ("2d_per_axis_ints_groups", (2, 6, 6, 6), (3, 3, 2, 6),
     dict(padding=[1, 2], feature_group_count=3)),
    ("2d_negative_pad", (2, 8, 8, 3), (3, 3, 3, 4), dict(padding=[(-1, 1), (0, -2)])),
    ("2d_highest_precision", (2, 5, 5, 3), (2, 2, 3, 4),
     dict(padding="SAME", precision=lax.Precision.HIGHEST)),
    ("3d_same_stride_groups", (1, 5, 6, 5, 4), (2, 3, 2, 2, 4),
     dict(padding="SAME", strides=(2, 1, 2), feature_group_count=2)),
    ("2d_stem_7x7_stride2", (3, 16, 15, 3), (7, 7, 3, 5), dict(padding=3, strides=2)),
    ("2d_dilated_stride2", (2, 13, 12, 2), (3, 3, 2, 3),
     dict(padding="SAME", strides=2, kernel_dilation=2)),
]


def per_example(op):
    """op applied to each example under jax.vmap (Equinox style): the pooled path."""
    return lambda x, kernel, bias: jax.vmap(lambda xi: op(xi[None], kernel, bias)[0])(x)


# One call (the core's own rule) and vmapped examples (their pooled statistics).
@pytest.mark.parametrize("mode", ["one_call", "vmapped_examples"])
@pytest.mark.parametrize("index", range(len(CONV_OPTIONS)), ids=[o[0] for o in CONV_OPTIONS])
def test_conv_options(index, mode):
    _, x_shape, kernel_shape, options = CONV_OPTIONS[index]
    rng = np.random.default_rng(index)
    x = rng.standard_normal(x_shape)
    kernel = rng.standard_normal(kernel_shape)
    bias = rng.standard_normal(kernel_shape[-1:]) if index % 2 == 0 else None
    z_shape = jax.eval_shape(functools.partial(plain_conv, **options), x, kernel).shape
    grad_z = rng.standard_normal(z_shape)

    tract = functools.partial(tj.conv, lam=0.1, **options)
    if mode == "vmapped_examples":
        tract = per_example(tract)
    ours, plain = value_and_cotangents(tract, functools.partial(plain_conv, **options))(
        x, kernel, bias, grad_z)
    if mode == "one_call":
        assert np.array_equal(ours[0], plain[0]), "z"
        assert np.array_equal(ours[1], plain[1]), "grad_x"
        if bias is not None:
            assert np.array_equal(ours[3], plain[3]), "grad_bias"

    rows = patches_reference(jnp.asarray(x), kernel_shape, options)
    g, m = options.get("feature_group_count", 1), kernel_shape[-1]
    grads = grad_z.reshape(-1, g, m // g).transpose(1, 0, 2)
    expected = tract_reference(rows, grads, 0.1).reshape(m, *kernel_to_torch(kernel).shape[1:])
    assert_close(kernel_to_torch(ours[2]), expected, 1e-10, "grad_kernel")


def test_dense_precision_and_token_axes():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    kernel = rng.standard_normal((5, 6)).astype(np.float32)
    grad_z = rng.standard_normal((2, 3, 4, 6)).astype(np.float32)
    rows = x.reshape(1, -1, 5).astype(np.float64)
    grads = grad_z.reshape(1, -1, 6).astype(np.float64)
    for precision in (None, lax.Precision.HIGHEST):
        ours, plain = value_and_cotangents(functools.partial(tj.dense, precision=precision),
                                           functools.partial(plain_dense, precision=precision))(
            x, kernel, None, grad_z)
        assert np.array_equal(ours[0], plain[0]) and np.array_equal(ours[1], plain[1])
        assert_close(np.asarray(ours[2]).T, tract_reference(rows, grads, 0.1)[0], 2e-5)


# --------------------------------------------------------------------------- checks




@pytest.mark.parametrize("kwargs, argument", [
    (dict(padding="FULL"), "padding"),
    (dict(padding=[(1, 1)]), "padding"),
    (dict(strides=(1, 2, 3)), "strides"),
    (dict(strides=0), "strides"),
    (dict(kernel_dilation=(1,)), "kernel_dilation"),
    (dict(feature_group_count=2), "feature_group_count"),
])
def test_bad_conv_arguments_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        tj.conv(jnp.ones((1, 5, 5, 3)), jnp.ones((3, 3, 3, 2)), **kwargs)


def test_bad_shapes_name_the_argument():
    with pytest.raises(ValueError, match="x must"):
        tj.dense(jnp.ones((4, 3)), jnp.ones((5, 2)))
    with pytest.raises(ValueError, match="kernel must"):
        tj.dense(jnp.ones((4, 3)), jnp.ones((3,)))
    with pytest.raises(ValueError, match="bias must"):
        tj.dense(jnp.ones((4, 3)), jnp.ones((3, 2)), jnp.ones(3))
    with pytest.raises(ValueError, match="x must"):
        tj.conv(jnp.ones((5, 5, 3)), jnp.ones((3, 3, 3, 2)))


@pytest.mark.parametrize("op", ["dense_eager", "conv_jit"])
def test_nan_or_inf_in_x_gives_nan_kernel_grad(op):
    rng = np.random.default_rng(0)
    if op == "dense_eager":
        fn, x, kernel = tj.dense, rng.standard_normal((10, 4)), np.ones((4, 3))
    else:
        fn = functools.partial(tj.conv, padding="SAME")
        x, kernel = rng.standard_normal((2, 6, 6, 3)), np.ones((3, 3, 3, 4))
    bias = np.zeros(kernel.shape[-1])
    grad_z = rng.standard_normal(jax.eval_shape(fn, x, kernel).shape)

    def loss(x, kernel, bias):
        return jnp.sum(fn(x, kernel, bias) * grad_z)

    grad = jax.grad(loss, argnums=(0, 1, 2))
    grad = jax.jit(grad) if op.endswith("jit") else grad
    for bad in (np.nan, np.inf):
        x[0, ..., 1] = bad
        grad_x, grad_kernel, grad_bias = grad(x, kernel, bias)
        assert grad_kernel.shape == kernel.shape and np.isnan(grad_kernel).all(), bad
        # x and bias cotangents are lax's and do not involve x's values.
        assert np.isfinite(grad_x).all() and np.isfinite(grad_bias).all(), bad


def _dot_precisions(jaxpr):
    """Precision of every dot_general in a jaxpr and the jaxprs nested in it."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn.params["precision"])
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)  # ClosedJaxpr -> Jaxpr
            if hasattr(inner, "eqns"):
                found += _dot_precisions(inner)
    return found


def test_backward_has_no_host_callbacks_and_full_precision_matmuls():
    def loss(kernel, x):
        return jnp.sum(tj.conv(x, kernel, padding="SAME") ** 2)

    args = jnp.ones((3, 3, 3, 4), jnp.float32), jnp.ones((2, 5, 5, 3), jnp.float32)
    # The Gram, G^T X and the solve's products are HIGHEST (no TF32), whatever the default.
    with jax.default_matmul_precision("bfloat16"):
        jaxpr = jax.make_jaxpr(jax.grad(loss))(*args)
    assert "callback" not in str(jaxpr)
    precisions = _dot_precisions(jaxpr.jaxpr)
    assert precisions and all(p == (lax.Precision.HIGHEST,) * 2 for p in precisions), precisions


def test_value_and_grad_under_jit():
    case = next(c for c in LINEAR_CASES if c.name == "linear_tokens")
    x, kernel, bias, grad_z = case_arrays(case, jnp.float64)

    def loss(params):
        return jnp.sum(tj.dense(x, params["kernel"], params["bias"], lam=case.lam) * grad_z)

    value, grads = jax.jit(jax.value_and_grad(loss))({"kernel": kernel, "bias": bias})
    assert_close(value, np.sum(case.z * case.grad_z), 1e-12, "value")
    assert_close(grads["kernel"].T, case.grad_weight, 1e-8, "grad_weight")
    assert_close(grads["bias"], case.grad_bias, 1e-12, "grad_bias")


# --------------------------------------------------------------------------- vmap


def _example_losses(fn, xs, grad_zs):
    """sum_i <fn(x_i), G_i> with fn applied per example under vmap."""
    return jnp.sum(jax.vmap(lambda x, g: jnp.sum(fn(x[None]) * g[None]))(xs, grad_zs))


# b >= n and b < n (block-diagonal G) after pooling; tokens; 3-D conv with groups.
VMAP_CASES = ["linear_rows", "linear_tokens_b_lt_n", "conv3d_stride_groups",
              "conv2d_patchify_pixels"]


def _op_of(case):
    if case.kind == "linear":
        return lambda x, kernel, bias: tj.dense(x, kernel, bias, lam=case.lam)
    return lambda x, kernel, bias: tj.conv(x, kernel, bias, lam=case.lam, **conv_options(case))


@pytest.mark.parametrize("name", VMAP_CASES)
def test_grad_of_vmapped_examples_pools_the_batch(name):
    """Equinox style: the Gram is over all vmapped examples, as for the stacked batch."""
    case = next(c for c in ALL_CASES if c.name == name)
    x, kernel, bias, grad_z = case_arrays(case, jnp.float64)
    op = _op_of(case)

    def per_example(kernel, bias):
        return _example_losses(lambda xi: op(xi, kernel, bias), x, grad_z)

    def stacked(kernel):
        return jnp.sum(op(x, kernel, bias) * grad_z)

    @jax.jit
    def both(kernel, bias):
        return jax.grad(per_example, argnums=(0, 1))(kernel, bias), jax.grad(stacked)(kernel)

    (grad_kernel, grad_bias), batch = both(kernel, bias)
    got = (np.asarray(grad_kernel).T if case.kind == "linear" else kernel_to_torch(grad_kernel))
    assert_close(got, case.grad_weight, 1e-8, "grad_weight")
    if case.has_bias:
        assert_close(grad_bias, case.grad_bias, 1e-12, "grad_bias")
    # And the same numbers as one call on the stacked batch, to rounding.
    assert_close(grad_kernel, batch, 1e-12, "vmapped vs batched")


@pytest.mark.parametrize("name", ["linear_rows", "linear_b_lt_n", "conv2d_cifar_stem"])
def test_per_example_grads_are_shares_of_the_batch_grad(name):
    """vmap(grad): example i gets G_i^T X_i A^-1, A from the whole vmapped batch."""
    case = next(c for c in ALL_CASES if c.name == name)
    x, kernel, bias, grad_z = case_arrays(case, jnp.float64)
    op = _op_of(case)

    def example_loss(kernel, xi, gi):
        return jnp.sum(op(xi[None], kernel, bias) * gi[None])

    shares = jax.jit(jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0)))(kernel, x, grad_z)
    assert shares.shape == (x.shape[0], *kernel.shape)
    total = np.asarray(shares).sum(0)
    got = total.T if case.kind == "linear" else kernel_to_torch(total)
    assert_close(got, case.grad_weight, 1e-8, "sum of shares")
    # Example 0's share for dense, from the definition.
    if case.kind == "linear":
        rows = case.x.reshape(-1, case.x.shape[-1])
        b, n = rows.shape
        system = rows.T @ rows / b + case.lam * np.eye(n)
        share0 = np.linalg.solve(system, case.x[0][:, None] @ case.grad_z[0][None, :])
        assert_close(shares[0], share0, 1e-8, "share of example 0")


def test_nested_vmap_pools_every_level():
    case = next(c for c in LINEAR_CASES if c.name == "linear_rows")
    x, kernel, bias, grad_z = case_arrays(case, jnp.float64)

    def nested(kernel):
        inner = jax.vmap(lambda xi, gi: jnp.sum(tj.dense(xi, kernel, bias, lam=case.lam) * gi))
        return jnp.sum(jax.vmap(inner)(x.reshape(4, 10, 8), grad_z.reshape(4, 10, 5)))

    assert_close(jax.jit(jax.grad(nested))(kernel).T, case.grad_weight, 1e-8)


def test_vmapped_kernels_keep_separate_statistics():
    """A stack of kernels (an ensemble) is a stack of layers: one Gram each."""
    cases = [c for c in LINEAR_CASES if c.name in ("linear_rows", "linear_pixels")]
    rng = np.random.default_rng(3)
    xs = jnp.asarray(np.stack([c.x[:40, :8] for c in cases]))
    grads = jnp.asarray(rng.standard_normal((2, 40, 5)))
    kernels = jnp.asarray(rng.standard_normal((2, 8, 5)))

    def member_loss(kernel, x, g):
        return jnp.sum(tj.dense(x, kernel, lam=0.1) * g)

    stacked = jax.jit(jax.grad(lambda ks: jnp.sum(jax.vmap(member_loss)(ks, xs, grads))))(kernels)
    alone = jax.jit(jax.grad(member_loss))
    for i in range(2):
        assert_close(stacked[i], alone(kernels[i], xs[i], grads[i]), 1e-12, f"member {i}")


def test_jacobian_rows_are_tract_grads():
    """jacrev vmaps over cotangents with x unbatched: pooling copies of x changes nothing."""
    case = next(c for c in LINEAR_CASES if c.name == "linear_rows")
    x, kernel, _, _ = case_arrays(case, jnp.float64)
    jacobian = jax.jit(jax.jacrev(lambda k: jnp.sum(tj.dense(x, k, lam=case.lam), axis=0)))(kernel)
    rows = case.x
    system = rows.T @ rows / rows.shape[0] + case.lam * np.eye(rows.shape[1])
    for j in (0, 3):
        # Cotangent e_j on every row: G^T X = column sums of X in row j.
        expected = np.zeros(kernel.shape)
        expected[:, j] = np.linalg.solve(system, rows.sum(0))
        assert_close(jacobian[j], expected, 1e-12, f"row {j}")


@pytest.mark.parametrize("mode", ["plain", "vmapped_examples", "per_example_grads"])
def test_backward_can_be_differentiated_again(mode):
    """Gradient penalties differentiate the backward; checked by central differences."""
    rng = np.random.default_rng(5)
    x, kernel = rng.standard_normal((6, 3)), rng.standard_normal((3, 2))
    direction = rng.standard_normal(x.shape)

    def loss(x, kernel):
        return jnp.sum(jnp.tanh(tj.dense(x, kernel, lam=0.3)))

    def penalty(x):
        if mode == "plain":
            grad_kernel = jax.grad(loss, argnums=1)(x, kernel)
        elif mode == "vmapped_examples":
            grad_kernel = jax.grad(
                lambda k: jnp.sum(jax.vmap(lambda xi: loss(xi[None], k))(x)))(kernel)
        else:
            grad_kernel = jax.vmap(jax.grad(loss, argnums=1), in_axes=(0, None))(x[:, None], kernel)
        return jnp.sum(grad_kernel ** 3) + jnp.sum(jax.grad(loss)(x, kernel) ** 2)

    step = 1e-6
    numeric = (penalty(x + step * direction) - penalty(x - step * direction)) / (2 * step)
    analytic = np.vdot(jax.jit(jax.grad(penalty))(x), direction)
    assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric))


def test_complex_arrays_and_kernels_that_do_not_fit_raise_at_call():
    kernel = jnp.ones((3, 3, 2, 4))
    with pytest.raises(TypeError, match="x must be real"):
        tj.conv(jnp.ones((1, 5, 5, 2), jnp.complex64), kernel)
    with pytest.raises(TypeError, match="kernel must have a real floating dtype"):
        tj.dense(jnp.ones((3, 2)), jnp.ones((2, 4), jnp.complex64))
    with pytest.raises(ValueError, match="does not fit"):
        tj.conv(jnp.ones((1, 2, 2, 2)), kernel)
    with pytest.raises(ValueError, match="does not fit"):
        tj.conv(jnp.ones((1, 2, 9, 2)), kernel, kernel_dilation=(1, 2), padding=((0, 0), (1, 1)))
    # Padding that makes it fit is fine, as for the plain lax conv.
    assert tj.conv(jnp.ones((1, 2, 2, 2)), kernel, padding="SAME").shape == (1, 2, 2, 4)


# --------------------------------------------------------------------------- robustness


def test_dtypes_are_checked_at_call_and_name_the_argument():
    x, kernel = jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 4))
    for bad in (jnp.int32, jnp.bool_, jnp.complex64):
        # TrAct's gradient is for real floating kernels; lax would run an integer one.
        with pytest.raises(TypeError, match=rf"kernel must .*{jnp.dtype(bad).name}"):
            tj.dense(jnp.ones((3, 2), bad), jnp.ones((2, 4), bad))
        with pytest.raises(TypeError, match=rf"kernel must .*{jnp.dtype(bad).name}"):
            tj.conv(x.astype(bad), kernel.astype(bad))
    # lax's conv takes one dtype (Flax promotes before it calls): named here, up front.
    with pytest.raises(TypeError, match=r"x .*int32.*kernel .*float"):
        tj.conv(x.astype(jnp.int32), kernel)
    with pytest.raises(TypeError, match=r"x must be real.*complex64"):
        tj.dense(jnp.ones((3, 2), jnp.complex64), jnp.ones((2, 4)))
    with pytest.raises(TypeError, match=r"bias must be real.*complex64"):
        tj.dense(jnp.ones((3, 2)), jnp.ones((2, 4)), jnp.ones(4, jnp.complex64))
    with pytest.raises(ValueError, match=r"kernel .*window"):
        tj.conv(x, jnp.ones((0, 3, 2, 4)))


@pytest.mark.parametrize("x_dtype", ["int32", "bool"])
def test_dense_promotes_integer_x_as_lax_does(x_dtype):
    """lax.dot_general takes an integer x with a float kernel (it promotes): so does
    dense, forward bitwise lax's, the kernel gradient TrAct's of the promoted rows."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.integers(0, 4, (9, 3)), x_dtype)
    kernel = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)
    grad_z = jnp.asarray(rng.standard_normal((9, 4)), jnp.float32)
    z = tj.dense(x, kernel)
    assert z.dtype == jnp.float32
    assert np.array_equal(z, lax.dot_general(x, kernel, (((1,), (0,)), ((), ()))))
    grad = jax.jit(jax.grad(lambda k: jnp.sum(tj.dense(x, k) * grad_z)))(kernel)
    rows = np.asarray(x, np.float64)[None]
    expected = tract_reference(rows, np.asarray(grad_z, np.float64)[None], 0.1)[0]
    assert_close(np.asarray(grad).T, expected, 1e-5)


# One call on an empty batch (N = 0): the plain layer runs and gives zero kernel and bias
# gradients; so must TrAct, whichever path the geometry takes (b < n is every one of them).
EMPTY_CASES = [
    ("dense", (0, 5), (5, 3), None),
    ("dense_tokens", (0, 4, 5), (5, 3), None),
    ("conv_n_le_96", (0, 6, 6, 3), (3, 3, 3, 4), dict(padding="SAME")),
    ("conv_n_gt_96_stem", (0, 9, 9, 3), (7, 7, 3, 4), dict(strides=2, padding=3)),
    ("conv_grouped_dilated", (0, 7, 7, 4), (3, 3, 2, 4),
     dict(feature_group_count=2, kernel_dilation=2)),
    ("conv_disjoint_patches", (0, 8, 8, 3), (4, 4, 3, 5), dict(strides=4)),
    ("conv1d", (0, 8, 3), (3, 3, 5), dict(padding=[(2, 0)])),
    ("conv3d", (0, 4, 4, 4, 2), (2, 2, 2, 2, 3), dict(strides=(1, 2, 1))),
]


@pytest.mark.parametrize("x_shape, kernel_shape, options",
                         [c[1:] for c in EMPTY_CASES], ids=[c[0] for c in EMPTY_CASES])
def test_empty_batch_gives_zero_kernel_grads(x_shape, kernel_shape, options):
    op = tj.dense if options is None else functools.partial(tj.conv, **options)
    rng = np.random.default_rng(0)
    kernel = jnp.asarray(rng.standard_normal(kernel_shape), jnp.float32)
    bias = jnp.ones(kernel_shape[-1], jnp.float32)
    x = jnp.zeros(x_shape, jnp.float32)

    def loss(kernel, bias, x):
        return jnp.sum(op(x, kernel, bias) ** 2)

    def per_example(kernel, bias, x):  # Equinox style: vmapped over zero examples
        return jnp.sum(jax.vmap(lambda xi: loss(kernel, bias, xi[None]))(x))

    @jax.jit
    def traced(kernel, bias, x):
        shares = jax.vmap(jax.grad(loss), in_axes=(None, None, 0))(kernel, bias, x[:, None])
        return jax.grad(loss, (0, 1))(kernel, bias, x), jax.grad(per_example, (0, 1))(
            kernel, bias, x), shares

    eager = jax.grad(loss, (0, 1))(kernel, bias, x)
    jitted, vmapped, shares = traced(kernel, bias, x)
    for name, (grad_kernel, grad_bias) in [("eager", eager), ("jit", jitted),
                                           ("vmap", vmapped)]:
        assert grad_kernel.shape == kernel.shape and grad_kernel.dtype == jnp.float32, name
        assert np.array_equal(grad_kernel, np.zeros(kernel.shape)), name
        assert np.array_equal(grad_bias, np.zeros(bias.shape)), name
    assert shares.shape == (0, *kernel.shape)


# Random geometries (seeded): per-example shares under vmap(grad) against their
# definition, G_i^T X_i (X^T X / b + lam I)^-1 with X every example's rows.
def _random_conv_geometry(seed):
    rng = np.random.default_rng(seed)
    d = int(rng.integers(1, 4))
    groups = int(rng.choice([1, 2]))
    c_in, m = groups * int(rng.integers(1, 3)), groups * int(rng.integers(1, 3))
    window = tuple(int(k) for k in rng.integers(1, 4, d))
    options = dict(strides=tuple(int(s) for s in rng.integers(1, 3, d)),
                   kernel_dilation=tuple(int(s) for s in rng.integers(1, 3, d)),
                   padding=str(rng.choice(["SAME", "VALID", "PAIRS"])),
                   feature_group_count=groups)
    if options["padding"] == "PAIRS":
        options["padding"] = [tuple(int(p) for p in rng.integers(0, 3, 2)) for _ in range(d)]
    dilated = [(k - 1) * r + 1 for k, r in zip(window, options["kernel_dilation"])]
    spatial = tuple(int(s) + k for s, k in zip(rng.integers(0, 4, d), dilated))
    examples = int(rng.integers(1, 4))
    return (examples, *spatial, c_in), (*window, c_in // groups, m), options


@pytest.mark.parametrize("seed", range(6))
def test_per_example_conv_shares_match_their_definition(seed):
    x_shape, kernel_shape, options = _random_conv_geometry(seed)
    rng = np.random.default_rng(100 + seed)
    x = rng.standard_normal(x_shape)
    kernel = rng.standard_normal(kernel_shape)
    op = functools.partial(tj.conv, lam=0.1, **options)
    grad_z = rng.standard_normal(jax.eval_shape(op, x, kernel).shape)

    def example_loss(kernel, xi, gi):
        return jnp.sum(op(xi[None], kernel) * gi[None])

    shares = jax.jit(jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0)))(kernel, x, grad_z)
    rows = patches_reference(jnp.asarray(x), kernel_shape, options)  # (g, b, n)
    g, b, n = rows.shape
    m_g = kernel_shape[-1] // g
    grads = grad_z.reshape(-1, g, m_g).transpose(1, 0, 2)
    system = np.swapaxes(rows, -1, -2) @ rows / b + 0.1 * np.eye(n)
    per_example = b // x.shape[0]
    for i in range(x.shape[0]):
        mine = slice(i * per_example, (i + 1) * per_example)
        plain = np.swapaxes(grads[:, mine], -1, -2) @ rows[:, mine]  # (g, m/g, n)
        share = np.swapaxes(np.linalg.solve(system, np.swapaxes(plain, -1, -2)), -1, -2)
        expected = share.reshape(kernel_shape[-1], *kernel_to_torch(kernel).shape[1:])
        assert_close(kernel_to_torch(shares[i]), expected, 1e-9,
                     f"example {i} of {x_shape} {kernel_shape} {options}")


def test_string_padding_resolves_as_lax_does():
    """The kernel gradient pads with tract_core._args.resolve_pads; lax pads the forward."""
    from tract_core._args import resolve_pads

    for size, window, stride, dilation in np.ndindex(9, 5, 4, 3):
        if window == 0 or stride == 0 or dilation == 0:
            continue
        for padding in ("SAME", "SAME_LOWER", "VALID"):
            dilated = (window - 1) * dilation + 1
            expected = lax.padtype_to_pads((size,), (dilated,), (stride,), padding)
            got = resolve_pads(padding, (size,), (window,), (stride,), (dilation,))
            assert [tuple(p) for p in expected] == list(got), (size, window, stride, dilation)
