"""TensorFlow adapter: dense/conv against the float64 fixtures and the plain TF ops.

Every fixture case with zero padding runs eagerly and under ``tf.function`` with and
without XLA. Fixtures are in torch layout: x (N, C, *spatial), weight (M, C/g, *k); the
helpers below translate to TF's channels-last x and (*k, C/g, M) kernels.
"""

import math

import numpy as np
import pytest
from conftest import CASES, assert_close, case_id, need

tf = need("tensorflow")
ttf = pytest.importorskip("tract_core.tensorflow")

TF_CASES = [c for c in CASES if c.kind == "linear" or c.padding_mode == "zeros"]
MODES = ["eager", "graph", "xla"]


# --------------------------------------------------------------------------- layouts


def to_channels_last(a):
    return np.moveaxis(a, 1, -1)


def to_tf_kernel(weight):
    """(M, C/g, *k) -> (*k, C/g, M)."""
    d = weight.ndim - 2
    return np.transpose(weight, (*range(2, d + 2), 1, 0))


def to_torch_weight(kernel):
    """(*k, C/g, M) -> (M, C/g, *k)."""
    d = kernel.ndim - 2
    return np.transpose(kernel, (d + 1, d, *range(d)))


def tf_arrays(case):
    """x, kernel, bias, grad_z of a case in TF layout (float64 numpy)."""
    if case.kind == "linear":
        return case.x, case.weight.T, case.get("bias"), case.grad_z
    return (to_channels_last(case.x), to_tf_kernel(case.weight), case.get("bias"),
            to_channels_last(case.grad_z))


def from_tf(case, z, grad_x, grad_kernel):
    """Back to the fixture's torch layout."""
    if case.kind == "linear":
        return z, grad_x, grad_kernel.T
    return (np.moveaxis(z, -1, 1), np.moveaxis(grad_x, -1, 1), to_torch_weight(grad_kernel))


def conv_options(case):
    return dict(strides=tuple(case.stride), padding=[tuple(p) for p in case.pads],
                kernel_dilation=tuple(case.dilation), feature_group_count=case.groups)


# --------------------------------------------------------------------------- running


def tract_op(case, lam=None):
    lam = case.lam if lam is None else lam
    if case.kind == "linear":
        return lambda x, k, b: ttf.dense(x, k, b, lam=lam)
    return lambda x, k, b: ttf.conv(x, k, b, lam=lam, **conv_options(case))


def plain_op(case):
    """The plain TF op the adapter must reproduce: matmul/tensordot or padded VALID conv."""
    if case.kind == "linear":
        def dense(x, k, b):
            z = tf.matmul(x, k) if x.shape.rank == 2 else tf.tensordot(x, k, [[x.shape.rank - 1],
                                                                             [0]])
            return z if b is None else z + b
        return dense

    pads = [(0, 0), *[tuple(p) for p in case.pads], (0, 0)]

    def convolution(x, k):
        if max(case.stride) > 1 and max(case.dilation) > 1:
            # TF refuses both at once: stride 1, then every stride-th output.
            z = tf.nn.convolution(tf.pad(x, pads), k, 1, "VALID", dilations=tuple(case.dilation))
            return z[(slice(None), *(slice(None, None, s) for s in case.stride))]
        return tf.nn.convolution(tf.pad(x, pads), k, tuple(case.stride), "VALID",
                                 dilations=tuple(case.dilation))

    if case.groups > 1:  # TF's CPU kernels have no grouped convolution gradients
        convolution = tf.function(convolution, jit_compile=True)

    def conv(x, k, b):
        z = convolution(x, k)
        return z if b is None else z + b
    return conv


def value_and_grads(op, x, kernel, bias, grad_z, mode, *more_ops):
    """z and the gradients of <z, grad_z> w.r.t. x, kernel, bias, in the given mode.

    With more_ops: one such list per op, all from one traced function (one compile).
    """

    def run(x, kernel, bias, grad_z):
        results = []
        for each in (op, *more_ops):
            sources = [x, kernel] + ([] if bias is None else [bias])
            with tf.GradientTape() as tape:
                tape.watch(sources)
                z = each(x, kernel, bias)
            results.append([z, *tape.gradient(z, sources, output_gradients=grad_z)])
        return results

    if mode != "eager":
        run = tf.function(run, jit_compile=mode == "xla")
    results = [[t.numpy() for t in ts] for ts in run(x, kernel, bias, grad_z)]
    return results if more_ops else results[0]


def tensors(arrays, dtype):
    return [None if a is None else tf.constant(a, dtype=dtype) for a in arrays]


# --------------------------------------------------------------------------- fixtures


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", TF_CASES, ids=case_id)
def test_forward_and_input_gradients_are_the_plain_ops_exactly(case, mode):
    x, kernel, bias, grad_z = tensors(tf_arrays(case), tf.float64)
    tract, plain = value_and_grads(tract_op(case), x, kernel, bias, grad_z, mode,
                                   plain_op(case))
    z, grad_x, grad_kernel, *grad_bias = tract
    z_p, grad_x_p, grad_kernel_p, *grad_bias_p = plain
    # Forward, x and bias gradients: exactly the plain op's, in the same mode.
    np.testing.assert_array_equal(z, z_p)
    np.testing.assert_array_equal(grad_x, grad_x_p)
    if case.has_bias:
        np.testing.assert_array_equal(grad_bias[0], grad_bias_p[0])
    # ... and the kernel gradient really is not the plain one.
    assert np.linalg.norm(grad_kernel - grad_kernel_p) > 1e-3 * np.linalg.norm(grad_kernel_p)


@pytest.mark.parametrize("path, mode", [("filter_gradient", mode) for mode in MODES]
                         + [("chunked_patches", "graph"), ("chunked_patches", "xla")])
@pytest.mark.parametrize("case", [c for c in TF_CASES if c.kind != "linear"], ids=case_id)
def test_each_conv_path_matches_reference(case, path, mode):
    """The fixtures' convs mostly have patches of few entries: explicit patches, one
    chunk. Their geometries here take TF's filter-gradient kernel with the structured
    Gram (enough channels for over 96 entries per patch; disjoint patches stay explicit),
    or explicit patches summed over chunks (70 images of a batch size known at run time)."""
    rng = np.random.default_rng(3)
    window, groups, m = case.weight.shape[2:], case.groups, case.weight.shape[0]
    if path == "filter_gradient":
        batch, channels = case.x.shape[0], groups * (96 // math.prod(window) + 1)
    else:
        batch, channels = 70, case.x.shape[1]
    x = rng.normal(size=(batch, *case.x.shape[2:], channels))
    kernel = rng.normal(size=(*window, channels // groups, m))
    options = dict(conv_options(case), lam=case.lam)
    grad_z = rng.normal(size=ttf.conv(x, kernel, **options).shape)
    run = kernel_grad_fn(mode, kernel, x.shape, grad_z.shape, **options)
    grad_kernel = run(tf.constant(x), tf.constant(grad_z))
    expected = conv_reference(x, grad_z, window, tuple(case.stride), tuple(case.dilation),
                              [tuple(p) for p in case.pads], groups, case.lam)
    assert_close(grad_kernel, expected, 1e-9, "grad_kernel")


@pytest.mark.parametrize("name", ["linear_tokens", "conv2d_cifar_stem", "conv3d_stride_groups",
                                  "conv2d_b_lt_n_pixels"])
def test_bfloat16_runs_and_is_close(name):
    case = next(c for c in TF_CASES if c.name == name)
    x, kernel, bias, grad_z = tensors(tf_arrays(case), tf.bfloat16)
    z, grad_x, grad_kernel, *_ = value_and_grads(tract_op(case), x, kernel, bias, grad_z,
                                                 "eager")
    assert grad_kernel.dtype == tf.bfloat16.as_numpy_dtype
    _, _, grad_w_t = from_tf(case, z, grad_x, grad_kernel.astype(np.float64))
    # bf16 inputs carry ~3 significant digits (the statistics and solve run in float64).
    assert_close(grad_w_t, case.grad_weight, 0.1, "grad_weight")


# --------------------------------------------------------------------------- batch size


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("name", ["linear_b_lt_n", "linear_rows", "conv2d_b_lt_n_pixels",
                                  "conv2d_cifar_stem", "conv2d_patchify_groups_gaps"])
def test_unknown_batch_size_in_tf_function(name, jit):
    """Keras traces with batch size None: the n x n system, whatever the run-time b."""
    case = next(c for c in TF_CASES if c.name == name)
    x, kernel, bias, grad_z = tensors(tf_arrays(case), tf.float64)
    op = tract_op(case)

    def run(x, grad_z):
        with tf.GradientTape() as tape:
            tape.watch(kernel)
            z = op(x, kernel, bias)
        return tape.gradient(z, kernel, output_gradients=grad_z)

    unknown = [tf.TensorSpec((None, *x.shape[1:]), tf.float64),
               tf.TensorSpec((None, *grad_z.shape[1:]), tf.float64)]
    graph = tf.function(run, input_signature=unknown, jit_compile=jit)
    grad_kernel = graph(x, grad_z).numpy()
    _, _, grad_w_t = from_tf(case, case.z, case.x, grad_kernel)
    assert_close(grad_w_t, case.grad_weight, 1e-8, "grad_weight")


# --------------------------------------------------------------------------- edge cases


def test_variable_kernel_and_bias_get_tract_gradients():
    case = next(c for c in TF_CASES if c.name == "conv2d_cifar_stem")
    x, kernel, bias, grad_z = tf_arrays(case)
    kernel_var, bias_var = tf.Variable(kernel), tf.Variable(bias)
    with tf.GradientTape() as tape:
        z = ttf.conv(tf.constant(x), kernel_var, bias_var, padding="SAME", lam=case.lam)
    grad_kernel, grad_bias = tape.gradient(z, [kernel_var, bias_var],
                                           output_gradients=tf.constant(grad_z))
    assert_close(to_torch_weight(grad_kernel.numpy()), case.grad_weight, 1e-8, "grad_weight")
    assert_close(grad_bias, case.grad_bias, 1e-12, "grad_bias")


def test_same_padding_with_stride_follows_tf_rules():
    """'SAME' with stride 2 on an even size pads (0, 1): forward equals tf.nn.convolution."""
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(2, 8, 8, 3)))
    kernel = tf.constant(rng.normal(size=(3, 3, 3, 4)))
    z = ttf.conv(x, kernel, strides=2, padding="SAME")
    np.testing.assert_array_equal(z, tf.nn.convolution(x, kernel, 2, "SAME"))
    # The kernel gradient sees the same pads: compare with explicit (0, 1) pads.
    grad_z = tf.constant(rng.normal(size=z.shape))
    _, _, same, *_ = value_and_grads(
        lambda x, k, b: ttf.conv(x, k, strides=2, padding="SAME"), x, kernel, None, grad_z,
        "eager")
    _, _, explicit, *_ = value_and_grads(
        lambda x, k, b: ttf.conv(x, k, strides=2, padding=[(0, 1), (0, 1)]), x, kernel, None,
        grad_z, "eager")
    np.testing.assert_allclose(same, explicit, rtol=1e-12)


def test_bad_shapes_raise_value_error():
    with pytest.raises(ValueError, match="x must have shape"):
        ttf.dense(tf.ones((4, 5)), tf.ones((3, 2)))
    with pytest.raises(ValueError, match="bias"):
        ttf.dense(tf.ones((4, 3)), tf.ones((3, 2)), tf.ones((3,)))
    with pytest.raises(ValueError, match="feature_group_count"):
        ttf.conv(tf.ones((1, 5, 5, 4)), tf.ones((3, 3, 3, 4)), feature_group_count=2)
    with pytest.raises(ValueError, match="padding"):
        ttf.conv(tf.ones((1, 5, 5, 2)), tf.ones((3, 3, 2, 4)), padding="FULL")


# --------------------------------------------------------------------------- larger shapes


def patches_reference(x, window, stride):
    """(N * L, C * K) rows of a 2-D 'VALID' convolution of channels-last x, columns in
    (channel, *window) order: numpy's sliding windows, independent of the core."""
    views = np.lib.stride_tricks.sliding_window_view(x, window, axis=(1, 2))
    views = views[:, ::stride[0], ::stride[1]]  # (N, L0, L1, C, k0, k1)
    return views.reshape(-1, math.prod(views.shape[3:]))


def tract_reference(rows, grads, lam):
    """G^T X (X^T X / b + lam I)^-1, numpy LU solve, float64."""
    b, n = rows.shape
    system = rows.T @ rows / b + lam * np.eye(n)
    return np.linalg.solve(system, rows.T @ grads).T


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["dense_100", "patch8_192"])
def test_wide_rows_match_reference(name, mode):
    """n > 64: under XLA the Cholesky factor comes by halves; NaN still gives NaN."""
    rng = np.random.default_rng(7)
    if name == "dense_100":
        x, kernel = rng.standard_normal((300, 100)), rng.standard_normal((100, 6))
        op, rows = (lambda x, k, b: ttf.dense(x, k, lam=0.1)), x
    else:
        x, kernel = rng.standard_normal((5, 32, 24, 3)), rng.standard_normal((8, 8, 3, 6))
        op = lambda x, k, b: ttf.conv(x, k, strides=8, lam=0.1)
        rows = patches_reference(x, (8, 8), (8, 8))
    grad_z = rng.standard_normal((rows.shape[0], kernel.shape[-1]))
    x_t, kernel_t = tf.constant(x), tf.constant(kernel)
    grad_z_t = tf.constant(grad_z.reshape(op(x_t, kernel_t, None).shape))
    _, _, grad_kernel = value_and_grads(op, x_t, kernel_t, None, grad_z_t, mode)
    expected = tract_reference(rows, grad_z, 0.1)  # (m, n), columns (channel, *window)
    if name != "dense_100":
        expected = to_tf_kernel(expected.reshape(6, 3, 8, 8))
    assert_close(grad_kernel, expected.T if name == "dense_100" else expected, 1e-9)
    x[0, 0] = np.nan
    _, _, grad_kernel = value_and_grads(op, tf.constant(x), kernel_t, None, grad_z_t, mode)
    assert np.isnan(grad_kernel).all()


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("channels", [2, 16])
def test_unknown_batch_statistics_sum_chunks(channels, jit):
    """43 images of a batch size known only at run time: the statistics (explicit patches
    for 2 channels, the filter gradient and structured Gram for 16) are summed over
    chunks of a static size, zero images filling the last one."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((43, 9, 8, channels))
    kernel, grad_z = rng.standard_normal((3, 3, channels, 4)), rng.standard_normal((43, 9, 8, 4))
    run = kernel_grad_fn("xla" if jit else "graph", kernel, x.shape, grad_z.shape,
                         padding="SAME", lam=0.1)
    grad_kernel = run(tf.constant(x), tf.constant(grad_z))
    expected = conv_reference(x, grad_z, (3, 3), pads=[(1, 1), (1, 1)])
    assert_close(grad_kernel, expected, 1e-9)


@pytest.mark.parametrize("mode", MODES)
def test_filter_gradient_path_matches_reference_and_nan_flows(mode):
    """16 channels, 3x3 (144 entries per patch): TF's filter-gradient kernel and the
    structured Gram; the same gradient as explicit patches, and NaN still flows."""
    rng = np.random.default_rng(9)
    x, kernel = rng.standard_normal((3, 11, 11, 16)), rng.standard_normal((3, 3, 16, 6))
    grad_z = rng.standard_normal((3, 6, 6, 6))
    options = dict(strides=2, padding=[(1, 1), (1, 1)], lam=0.1)
    run = kernel_grad_fn(mode, kernel, x.shape, grad_z.shape, **options)
    grad_kernel = run(tf.constant(x), tf.constant(grad_z))
    expected = conv_reference(x, grad_z, (3, 3), (2, 2), pads=[(1, 1), (1, 1)])
    assert_close(grad_kernel, expected, 1e-9)
    x[1, 2, 3, 0] = np.nan
    assert np.isnan(run(tf.constant(x), tf.constant(grad_z))).all()


# --------------------------------------------------------------------------- geometries


def explicit_rows(x, window, strides, dilation, pads, groups):
    """(g, N * L, C/g * K) receptive fields of channels-last x, any dimensionality, columns
    (channel, *window) per group: one strided slice per kernel offset, in numpy."""
    x = np.pad(x, [(0, 0), *pads, (0, 0)])
    out = [(size - d * (k - 1) - 1) // s + 1
           for size, k, s, d in zip(x.shape[1:-1], window, strides, dilation)]
    taps = [x[(slice(None), *(slice(o * d, o * d + s * (n - 1) + 1, s)
                              for o, d, s, n in zip(offsets, dilation, strides, out)))]
            for offsets in np.ndindex(*window)]  # each (N, *out, C)
    rows = np.stack(taps, axis=-1).reshape(-1, groups, x.shape[-1] // groups * len(taps))
    return np.transpose(rows, (1, 0, 2)), out


def same_pads(spatial, window, strides):
    """TF's 'SAME' as (lo, hi) per axis: out = ceil(size / stride), the odd pixel high."""
    totals = [max((-(-n // s) - 1) * s + k - n, 0) for n, k, s in zip(spatial, window, strides)]
    return [(t // 2, t - t // 2) for t in totals]


def conv_reference(x, grad_z, window, strides=None, dilation=None, pads=None, groups=1,
                   lam=0.1):
    """TrAct's conv kernel gradient in float64 from explicit patches, TF layout."""
    d = len(window)
    strides, dilation = strides or (1,) * d, dilation or (1,) * d
    rows, _ = explicit_rows(x, window, strides, dilation, pads or [(0, 0)] * d, groups)
    m = grad_z.shape[-1]
    grads = np.transpose(grad_z.reshape(-1, groups, m // groups), (1, 0, 2))
    weight = np.concatenate([tract_reference(r, g, lam) for r, g in zip(rows, grads)])
    return to_tf_kernel(weight.reshape(m, x.shape[-1] // groups, *window))


def kernel_grad_fn(mode, kernel, x_shape, grad_z_shape, dtype=tf.float64, **options):
    """(x, grad_z) -> TrAct's conv kernel gradient, eager or traced with the batch size
    unknown (as Keras traces), with or without XLA."""
    kernel = tf.constant(kernel, dtype)

    def run(x, grad_z):
        with tf.GradientTape() as tape:
            tape.watch(kernel)
            z = ttf.conv(x, kernel, **options)
        return tape.gradient(z, kernel, output_gradients=grad_z)

    if mode == "eager":
        return run
    unknown = [tf.TensorSpec((None, *x_shape[1:]), dtype),
               tf.TensorSpec((None, *grad_z_shape[1:]), dtype)]
    return tf.function(run, input_signature=unknown, jit_compile=mode == "xla")


@pytest.mark.parametrize("batch", [5, 0])
@pytest.mark.parametrize("mode", MODES)
def test_float32_whitened_rows_match_reference(mode, batch):
    """A float32 patch embedding with m >= 4n (2x2 patches of 3 pixel-range channels,
    64 filters) takes G^T Z of its whitened rows in float32: the float64 gradient to a
    few float32 roundings, eagerly and traced with an unknown batch size (chunked
    statistics, the row count a tensor), with or without XLA; no rows give zero."""
    rng = np.random.default_rng(11)
    x = np.round(rng.uniform(0, 255, (batch, 8, 8, 3))).astype(np.float32)
    kernel = rng.standard_normal((2, 2, 3, 64)).astype(np.float32)
    grad_z = rng.standard_normal((batch, 4, 4, 64)).astype(np.float32)
    run = kernel_grad_fn(mode, kernel, x.shape, grad_z.shape, tf.float32, strides=2, lam=0.1)
    grad_kernel = run(tf.constant(x), tf.constant(grad_z))
    assert grad_kernel.dtype == tf.float32
    if batch == 0:
        np.testing.assert_array_equal(grad_kernel.numpy(), np.zeros(kernel.shape))
        return
    expected = conv_reference(x.astype(np.float64), grad_z.astype(np.float64), (2, 2), (2, 2))
    assert_close(grad_kernel, expected, 1e-6)


def test_conv3d_eager_input_gradient_is_the_plain_ops():
    """3-D convolution, eager: the input gradient is Keras's tf.nn.convolution's (data
    format named), bit for bit, and the kernel gradient TrAct's."""
    rng = np.random.default_rng(11)
    x = tf.constant(rng.normal(size=(2, 5, 6, 4, 2)))
    kernel = tf.constant(rng.normal(size=(2, 3, 2, 2, 3)))
    options = dict(strides=(1, 2, 1), padding="SAME")
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, kernel])
        z = ttf.conv(x, kernel, lam=0.1, **options)
        z_plain = tf.nn.convolution(x, kernel, data_format="NDHWC", **options)
    grad_z = tf.constant(rng.normal(size=z.shape))
    grad_x, grad_kernel = tape.gradient(z, [x, kernel], output_gradients=grad_z)
    np.testing.assert_array_equal(z, z_plain)
    np.testing.assert_array_equal(grad_x, tape.gradient(z_plain, x, output_gradients=grad_z))
    pads = same_pads((5, 6, 4), (2, 3, 2), (1, 2, 1))
    expected = conv_reference(x.numpy(), grad_z.numpy(), (2, 3, 2), (1, 2, 1), pads=pads)
    assert_close(grad_kernel, expected, 1e-9, "grad_kernel")


DISJOINT_REMAINDER = {  # kernel < stride, input size not a multiple of the stride
    "1x1_stride3_on_10": ((2, 10, 10, 1), (1, 1), (3, 3), 1, 2),
    "2x1_stride2x3_on_7x8_groups": ((3, 7, 8, 2), (2, 1), (2, 3), 2, 4),
    "b_lt_n": ((1, 11, 10, 2), (3, 3), (4, 4), 1, 3),  # b = 6 rows < n = 18
    "n_gt_96": ((26, 13, 12, 4), (5, 5), (7, 6), 1, 2),  # n = 100 <= b: the Gram of rows
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(DISJOINT_REMAINDER))
def test_disjoint_patches_with_input_left_over(name, mode):
    x_shape, window, strides, groups, m = DISJOINT_REMAINDER[name]
    rng = np.random.default_rng(12)
    x = rng.normal(size=x_shape)
    kernel = rng.normal(size=(*window, x_shape[-1] // groups, m))
    out = [(size - k) // s + 1 for size, k, s in zip(x_shape[1:-1], window, strides)]
    grad_z = rng.normal(size=(x_shape[0], *out, m))
    run = kernel_grad_fn(mode, kernel, x.shape, grad_z.shape, strides=strides,
                         feature_group_count=groups, lam=0.1)
    grad_kernel = run(tf.constant(x), tf.constant(grad_z))
    expected = conv_reference(x, grad_z, window, strides, groups=groups)
    assert_close(grad_kernel, expected, 1e-9, "grad_kernel")


EMPTY_BATCH = {
    "dense_n1": ((1,), (1, 2)),
    "dense_tokens": ((4, 3), (3, 2)),
    "conv_overlapping": ((6, 5, 2), (3, 3, 2, 4), dict(padding="SAME")),
    "conv_disjoint_wide": ((16, 16, 3), (8, 8, 3, 2), dict(strides=8)),
}


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("name", list(EMPTY_BATCH))
def test_empty_batch_of_unknown_size_gives_zero_kernel_gradient(name, jit):
    """Traced for any batch size, the empty batch gives G^T X = 0, so zero, not NaN
    (0 rows / 0); the same trace on 3 images gives TrAct's gradient."""
    sample, kernel_shape, *options = EMPTY_BATCH[name]
    options = options[0] if options else {}
    rng = np.random.default_rng(13)
    kernel = tf.constant(rng.normal(size=kernel_shape))
    op = ((lambda x: ttf.dense(x, kernel, lam=0.1)) if len(kernel_shape) == 2
          else lambda x: ttf.conv(x, kernel, lam=0.1, **options))

    @tf.function(jit_compile=jit, input_signature=[tf.TensorSpec((None, *sample), tf.float64)])
    def run(x):
        with tf.GradientTape() as tape:
            tape.watch(kernel)
            z = op(x)
        grad_z = tf.reshape(tf.range(tf.size(z), dtype=z.dtype) % 3 - 1, tf.shape(z))
        return tape.gradient(z, kernel, output_gradients=grad_z), grad_z

    empty, _ = run(tf.zeros((0, *sample), tf.float64))
    np.testing.assert_array_equal(empty, np.zeros(kernel_shape))
    x = rng.normal(size=(3, *sample))
    grad_kernel, grad_z = run(tf.constant(x))
    if len(kernel_shape) == 2:
        n, m = kernel_shape
        expected = tract_reference(x.reshape(-1, n), grad_z.numpy().reshape(-1, m), 0.1).T
    else:
        pads = (same_pads(sample[:-1], kernel_shape[:-2], (options.get("strides", 1),) * 2)
                if options.get("padding") == "SAME" else None)
        expected = conv_reference(x, grad_z.numpy(), kernel_shape[:-2],
                                  (options.get("strides", 1),) * 2, pads=pads)
    assert_close(grad_kernel, expected, 1e-9, "grad_kernel")


@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("name", [n for n in EMPTY_BATCH if n.startswith("conv")])
def test_empty_batch_of_static_size_has_the_output_shape(name, graph):
    """TF's float32 CPU convolution gives an empty batch its input's shape; the TrAct
    conv gives (0, *out, M) with zero input and kernel gradients, eagerly and in a
    tf.function traced for that empty batch."""
    sample, kernel_shape, options = EMPTY_BATCH[name]
    kernel = tf.constant(np.random.default_rng(3).normal(size=kernel_shape), tf.float32)

    def run(x):
        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            z = ttf.conv(x, kernel, lam=0.1, **options)
        return (z, *tape.gradient(z, [x, kernel], output_gradients=tf.zeros_like(z)))

    x = tf.zeros((0, *sample), tf.float32)
    z, grad_x, grad_kernel = (tf.function(run) if graph else run)(x)
    stride = options.get("strides", 1)
    size = [-(-s // stride) if options.get("padding") == "SAME" else (s - k) // stride + 1
            for s, k in zip(sample[:-1], kernel_shape[:-2])]
    assert z.shape == (0, *size, kernel_shape[-1])
    np.testing.assert_array_equal(grad_x, np.zeros(x.shape))
    np.testing.assert_array_equal(grad_kernel, np.zeros(kernel_shape))


@pytest.mark.parametrize("dtype", [tf.int32, tf.bool, tf.complex64])
def test_non_floating_tensors_raise_type_error(dtype):
    for op, x_shape, kernel_shape in [(ttf.dense, (4, 3), (3, 2)),
                                      (ttf.conv, (1, 5, 5, 2), (3, 3, 2, 4))]:
        x, kernel = tf.ones(x_shape), tf.ones(kernel_shape)
        with pytest.raises(TypeError, match=f"x must have the kernel's dtype float32, got "
                                            f"{dtype.name}"):
            op(tf.cast(x, dtype), kernel)
        with pytest.raises(TypeError, match=f"kernel must have a floating dtype.*{dtype.name}"):
            op(tf.cast(x, dtype), tf.cast(kernel, dtype))
        with pytest.raises(TypeError, match="bias must have the kernel's dtype"):
            op(x, kernel, tf.cast(tf.ones(kernel_shape[-1:]), dtype))
        with pytest.raises(TypeError, match="x must have a floating dtype"):
            op(np.ones(x_shape, dtype.as_numpy_dtype), kernel)


def test_mixed_float_dtypes_raise_type_error_and_numpy_converts():
    kernel = tf.ones((3, 2))
    with pytest.raises(TypeError, match="x must have the kernel's dtype float32, got float64"):
        ttf.dense(tf.ones((4, 3), tf.float64), kernel)
    z = ttf.dense(np.ones((4, 3)), kernel)  # numpy float64: converted, as before
    assert z.dtype == tf.float32


@pytest.mark.parametrize("x_shape, kernel_shape, options", [
    ((1, 2, 2, 2), (3, 3, 2, 4), {}),
    ((1, 5, 5, 2), (3, 3, 2, 4), dict(kernel_dilation=3)),
    ((2, 2, 5, 5, 1), (3, 3, 3, 1, 2), dict(padding=[(0, 0), (1, 1), (1, 1)])),
    ((1, 2, 3), (3, 3, 2), dict(padding=[(0, 0)], strides=2)),
])
def test_kernel_that_does_not_fit_raises_in_forward(x_shape, kernel_shape, options):
    # tf.nn.convolution itself returns an empty output here; Keras refuses it.
    with pytest.raises(ValueError, match="does not fit"):
        ttf.conv(tf.ones(x_shape), tf.ones(kernel_shape), **options)


def test_kernel_with_a_zero_size_raises_value_error():
    with pytest.raises(ValueError, match="no size 0"):
        ttf.conv(tf.ones((1, 5, 5, 2)), tf.ones((3, 3, 2, 0)))
