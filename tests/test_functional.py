"""One test body for the channels-last functional APIs, `tract_core.jax` and
`tract_core.tensorflow` (same signatures and layouts): the float64 fixtures, float32,
NaN, empty batches and argument errors, in every mode each framework runs in.

Fixtures are in torch layout: x (N, C, *spatial), weight (M, C/g, *k); TF and JAX take
channels-last x and (*k, C/g, M) kernels.
"""

import math

import numpy as np
import pytest
from conftest import CASES, REQUIRED, assert_close, case_id, need

CHANNELS_LAST_CASES = [c for c in CASES if c.kind == "linear" or c.padding_mode == "zeros"]


class _Jax:
    modes = ("jit",)

    def __init__(self):
        self.jax = need("jax")
        self.jax.config.update("jax_enable_x64", True)
        import tract_core.jax as adapter

        self.adapter = adapter

    def run(self, op, arrays, dtype, mode):
        """z and the cotangents of x, kernel, bias for output cotangent grad_z (numpy)."""
        jnp = self.jax.numpy
        x, kernel, bias, grad_z = (None if a is None else jnp.asarray(a, dtype) for a in arrays)

        @self.jax.jit
        def run(x, kernel, bias, grad_z):
            z, vjp = self.jax.vjp(op, x, kernel, bias)
            return (z, *vjp(grad_z))

        return [None if a is None else np.asarray(a) for a in run(x, kernel, bias, grad_z)]


class _TensorFlow:
    modes = ("eager", "graph", "xla")

    def __init__(self):
        self.tf = need("tensorflow")
        import tract_core.tensorflow as adapter

        self.adapter = adapter

    def run(self, op, arrays, dtype, mode):
        tf = self.tf
        x, kernel, bias, grad_z = (None if a is None else tf.constant(a, dtype) for a in arrays)

        def run(x, kernel, bias, grad_z):
            sources = [x, kernel] + ([] if bias is None else [bias])
            with tf.GradientTape() as tape:
                tape.watch(sources)
                z = op(x, kernel, bias)
            grads = tape.gradient(z, sources, output_gradients=grad_z)
            return [z, *grads, *([None] if bias is None else [])]

        if mode != "eager":
            run = tf.function(run, jit_compile=mode == "xla")
        return [None if a is None else a.numpy() for a in run(x, kernel, bias, grad_z)]


FRAMEWORKS = {"jax": _Jax, "tensorflow": _TensorFlow}
MADE = {}


def framework(name):
    if name not in MADE:
        MADE[name] = FRAMEWORKS[name]()
    return MADE[name]


FRAMEWORK_MODES = [(name, mode) for name in FRAMEWORKS if not REQUIRED or name in REQUIRED
                   for mode in FRAMEWORKS[name].modes]


@pytest.fixture(params=FRAMEWORK_MODES, ids=lambda p: f"{p[0]}-{p[1]}")
def api(request):
    """(framework, mode): the adapter module is ``framework.adapter``."""
    name, mode = request.param
    return framework(name), mode


def channels_last_arrays(case):
    """x, kernel, bias, grad_z of a fixture case in channels-last layout (float64)."""
    bias = case.bias if case.has_bias else None
    if case.kind == "linear":
        return case.x, case.weight.T, bias, case.grad_z
    d = case.weight.ndim - 2
    return (np.moveaxis(case.x, 1, -1), np.transpose(case.weight, (*range(2, d + 2), 1, 0)),
            bias, np.moveaxis(case.grad_z, 1, -1))


def to_torch_layout(case, z, grad_x, grad_kernel):
    if case.kind == "linear":
        return z, grad_x, grad_kernel.T
    return np.moveaxis(z, -1, 1), np.moveaxis(grad_x, -1, 1), torch_weight(grad_kernel)


def torch_weight(kernel):
    """(*k, C/g, M) or (n, m) -> (M, C/g, *k) or (m, n)."""
    d = kernel.ndim - 2
    return kernel.T if d == 0 else np.transpose(kernel, (d + 1, d, *range(d)))


def tract_op(adapter, case, lam=None):
    lam = case.lam if lam is None else lam
    if case.kind == "linear":
        return lambda x, k, b: adapter.dense(x, k, b, lam=lam)
    options = dict(strides=tuple(case.stride), padding=[tuple(p) for p in case.pads],
                   kernel_dilation=tuple(case.dilation), feature_group_count=case.groups)
    return lambda x, k, b: adapter.conv(x, k, b, lam=lam, **options)


@pytest.mark.parametrize("case", CHANNELS_LAST_CASES, ids=case_id)
def test_float64_matches_fixture(api, case):
    fw, mode = api
    z, grad_x, grad_kernel, grad_bias = fw.run(tract_op(fw.adapter, case),
                                               channels_last_arrays(case), "float64", mode)
    z, grad_x, grad_weight = to_torch_layout(case, z, grad_x, grad_kernel)
    assert_close(z, case.z, 1e-12, "z")
    assert_close(grad_x, case.grad_x, 1e-12, "grad_x")
    assert_close(grad_weight, case.grad_weight, 1e-8, "grad_weight")
    if case.has_bias:
        assert_close(grad_bias, case.grad_bias, 1e-12, "grad_bias")


@pytest.mark.parametrize("case", CHANNELS_LAST_CASES, ids=case_id)
def test_float32_kernel_grad_is_float64_accurate(api, case):
    """TrAct's statistics run in float64: a float32 layer's kernel gradient is within
    float32 rounding of the float64 fixture."""
    fw, mode = api
    if mode == "graph":
        pytest.skip("eager and XLA cover TensorFlow's float32")
    _, _, grad_kernel, _ = fw.run(tract_op(fw.adapter, case), channels_last_arrays(case),
                                  "float32", mode)
    assert grad_kernel.dtype == np.float32
    grad_weight = torch_weight(grad_kernel)
    assert_close(grad_weight, case.grad_weight, 2e-4, "grad_weight")


@pytest.mark.parametrize("name", ["linear_rows", "linear_b_lt_n", "conv2d_cifar_stem",
                                  "conv2d_depthwise_b_lt_n"])
def test_nan_in_x_gives_nan_kernel_grad(api, name):
    fw, mode = api
    case = next(c for c in CHANNELS_LAST_CASES if c.name == name)
    x, kernel, bias, grad_z = channels_last_arrays(case)
    x = x.copy()
    x.flat[3] = np.nan
    _, _, grad_kernel, _ = fw.run(tract_op(fw.adapter, case), (x, kernel, bias, grad_z),
                                  "float32", mode)
    assert np.isnan(grad_kernel).any()


EMPTY_BATCHES = {  # x shape, kernel shape, options, output shape
    "dense": ((0, 6), (6, 4), None, (0, 4)),
    "conv_stem": ((0, 8, 8, 3), (3, 3, 3, 5), dict(padding="SAME"), (0, 8, 8, 5)),
    "conv_disjoint": ((0, 8, 8, 3), (4, 4, 3, 5), dict(strides=4), (0, 2, 2, 5)),
    "conv1d": ((0, 8, 3), (3, 3, 5), dict(padding=[(2, 0)]), (0, 8, 5)),
}


@pytest.mark.parametrize("name", list(EMPTY_BATCHES))
def test_empty_batch_gives_zero_kernel_grad(api, name):
    """The last batch of a filtered loader: zero gradients, as the plain layer gives."""
    fw, mode = api
    x_shape, kernel_shape, options, z_shape = EMPTY_BATCHES[name]
    if options is not None and mode in ("eager", "graph"):
        pytest.skip("TensorFlow's own CPU convolution (the plain layer's too) gives a batch of "
                    "static size 0 the input's shape; see test_tensorflow for unknown sizes")
    kernel = np.random.default_rng(0).standard_normal(kernel_shape)
    bias = np.ones(kernel_shape[-1])
    op = (fw.adapter.dense if options is None else
          (lambda x, k, b: fw.adapter.conv(x, k, b, **options)))
    z, _, grad_kernel, grad_bias = fw.run(op, (np.zeros(x_shape), kernel, bias,
                                               np.ones(z_shape)), "float32", mode)
    assert z.shape == z_shape
    assert grad_kernel.dtype == np.float32
    assert np.array_equal(grad_kernel, np.zeros(kernel_shape))
    assert np.array_equal(grad_bias, np.zeros(kernel_shape[-1]))


@pytest.mark.parametrize("lam", [0, -0.1, math.nan, math.inf, "0.1", None, True])
def test_bad_lam_raises_value_error_naming_lam(api, lam):
    adapter = api[0].adapter
    x, kernel = np.ones((4, 3), np.float32), np.ones((3, 2), np.float32)
    with pytest.raises(ValueError, match="lam"):
        adapter.dense(x, kernel, lam=lam)
    with pytest.raises(ValueError, match="lam"):
        adapter.conv(np.ones((1, 5, 5, 2), np.float32), np.ones((3, 3, 2, 4), np.float32),
                     lam=lam)


@pytest.mark.parametrize("call, argument", [
    (lambda a: a.dense(np.ones((4, 5)), np.ones((3, 2))), "x"),
    (lambda a: a.dense(np.ones((4, 3)), np.ones((3, 2)), np.ones(3)), "bias"),
    (lambda a: a.conv(np.ones((1, 5, 5, 4)), np.ones((3, 3, 3, 4)), feature_group_count=2),
     "feature_group_count"),
    (lambda a: a.conv(np.ones((1, 5, 5, 2)), np.ones((3, 3, 2, 4)), padding="FULL"),
     "padding"),
    (lambda a: a.conv(np.ones((1, 5, 5, 2)), np.ones((3, 3, 2, 4)), strides=0), "strides"),
    (lambda a: a.conv(np.ones((1, 2, 2, 2)), np.ones((3, 3, 2, 4))), "does not fit"),
])
def test_bad_arguments_raise_value_error_naming_them(api, call, argument):
    with pytest.raises(ValueError, match=argument):
        call(api[0].adapter)
