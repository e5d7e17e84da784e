"""Keras 3 layers on the active backend (KERAS_BACKEND=tensorflow, jax or torch).

The fixture cases that Keras can express ('valid'/'same' zero padding, no stride with
dilation) run through the TrAct layers; forward values and input gradients must be the
plain Keras layer's, the kernel gradient the fixture's. Fixtures are in torch layout:
x (N, C, *spatial), weight (M, C/g, *k); Keras kernels are (*k, C/g, M), Dense (n, m).
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import CASES, assert_close, case_id, need

keras = need("keras")
BACKEND = keras.backend.backend()
framework = need(BACKEND)
if BACKEND == "jax":
    framework.config.update("jax_enable_x64", True)  # the float64 fixture checks

import tract_core  # noqa: E402
import tract_core.keras as tk  # noqa: E402

CONV_LAYERS = {"conv1d": "Conv1D", "conv2d": "Conv2D", "conv3d": "Conv3D"}


# --------------------------------------------------------------------------- layouts


def tf_same_pads(spatial, kernel, strides, dilation):
    """Keras/TF 'same': total pad from ceil(size / stride), odd pixel high."""
    pads = []
    for size, k, s, d in zip(spatial, kernel, strides, dilation):
        total = max((math.ceil(size / s) - 1) * s + d * (k - 1) + 1 - size, 0)
        pads.append([total // 2, total - total // 2])
    return pads


def keras_padding(case):
    """'valid' or 'same' when the case's pads are what Keras would use, else None."""
    pads = [list(p) for p in case.pads]
    if all(p == [0, 0] for p in pads):
        return "valid"
    if pads == tf_same_pads(case.x.shape[2:], case.kernel, case.stride, case.dilation):
        return "same"
    return None


def keras_expressible(case):
    if case.kind == "linear":
        return True
    return (case.padding_mode == "zeros" and keras_padding(case) is not None
            and not (max(case.stride) > 1 and max(case.dilation) > 1))


KERAS_CASES = [c for c in CASES if keras_expressible(c)]
KERAS_CONV_CASES = [c for c in KERAS_CASES if c.kind != "linear"]


def to_keras_kernel(weight):
    if weight.ndim == 2:
        return weight.T
    d = weight.ndim - 2
    return np.transpose(weight, (*range(2, d + 2), 1, 0))


def to_torch_weight(kernel):
    if kernel.ndim == 2:
        return kernel.T
    d = kernel.ndim - 2
    return np.transpose(kernel, (d + 1, d, *range(d)))


def channels_last(a):
    return np.moveaxis(a, 1, -1)


def channels_first(a):
    return np.moveaxis(a, -1, 1)


def keras_layout(case, a):
    """A fixture array (torch layout) as the channels-last Keras layer takes it."""
    return a if case.kind == "linear" else channels_last(a)


def torch_layout(case, a):
    return a if case.kind == "linear" else channels_first(a)


def make_layer(case, tract, dtype, data_format="channels_last"):
    """The case's layer, built, holding the fixture weights."""
    # Zeros: the fixture weights replace them, and random init compiles on JAX.
    init = dict(kernel_initializer="zeros")
    if case.kind == "linear":
        kwargs = dict(units=case.out, use_bias=case.has_bias, dtype=dtype, **init)
        layer = tk.TrActDense(lam=case.lam, **kwargs) if tract else keras.layers.Dense(**kwargs)
        shape = case.x.shape
    else:
        kwargs = dict(filters=case.out, kernel_size=tuple(case.kernel),
                      strides=tuple(case.stride), padding=keras_padding(case),
                      dilation_rate=tuple(case.dilation), groups=case.groups,
                      use_bias=case.has_bias, data_format=data_format, dtype=dtype, **init)
        name = CONV_LAYERS[case.kind]
        layer = (getattr(tk, f"TrAct{name}")(lam=case.lam, **kwargs) if tract
                 else getattr(keras.layers, name)(**kwargs))
        shape = case.x.shape if data_format == "channels_first" else channels_last(case.x).shape
    layer.build(shape)
    weights = [to_keras_kernel(case.weight)] + ([case.bias] if case.has_bias else [])
    layer.set_weights(weights)
    return layer


# --------------------------------------------------------------------------- autodiff


def forward_backward(layer, x, grad_z):
    """z and the gradients of <z, grad_z> w.r.t. x, kernel, [bias]; numpy arrays (eager
    on TensorFlow and torch, jitted on JAX)."""
    if BACKEND == "tensorflow":
        tf = framework

        def run(x, grad_z):
            with tf.GradientTape() as tape:
                tape.watch(x)
                z = layer(x)
            grads = tape.gradient(z, [x, *layer.trainable_variables],
                                  output_gradients=tf.cast(grad_z, z.dtype))
            return [z, *grads]

        return [np.asarray(t) for t in run(tf.constant(x), tf.constant(grad_z))]
    if BACKEND == "torch":
        torch = framework
        x = torch.tensor(x, requires_grad=True)
        z = layer(x)
        z.backward(torch.tensor(grad_z).to(z.dtype))
        grads = [x.grad] + [v.value.grad for v in layer.trainable_variables]
        return [t.detach().float().numpy() if t.dtype == torch.bfloat16 else t.detach().numpy()
                for t in [z, *grads]]
    jax, jnp = framework, framework.numpy
    trainable = [v.value for v in layer.trainable_variables]
    frozen = [v.value for v in layer.non_trainable_variables]

    def apply(trainable, x):
        return layer.stateless_call(trainable, frozen, x)[0]

    @jax.jit  # as Keras trains; op-by-op dispatch would compile every small op alone
    def run(trainable, x, grad_z):
        z, vjp = jax.vjp(apply, trainable, x)
        grad_vars, grad_x = vjp(grad_z.astype(z.dtype))
        return [z, grad_x, *grad_vars]

    return [np.asarray(t.astype(jnp.float32) if t.dtype == jnp.bfloat16 else t)
            for t in run(trainable, jnp.asarray(x), jnp.asarray(grad_z))]


def run_case(layer, case, dtype, channels_first_layer=False):
    def layout(a):
        return a if channels_first_layer else keras_layout(case, a)

    return forward_backward(layer, layout(case.x).astype(dtype),
                            layout(case.grad_z).astype(dtype))


# --------------------------------------------------------------------------- fixtures


@pytest.mark.parametrize("name", ["linear_tokens_b_lt_n", "conv2d_stride2_pixels",
                                  "conv3d_dilation_same_pixels"])
def test_tract_layer_matches_fixture_float64(name):
    """End to end in float64 (a few cases: each compiles on JAX; float32 covers them all)."""
    case = next(c for c in KERAS_CASES if c.name == name)
    layer = make_layer(case, tract=True, dtype="float64")
    z, grad_x, grad_kernel, *grad_bias = run_case(layer, case, np.float64)
    assert_close(torch_layout(case, z), case.z, 1e-12, "z")
    assert_close(torch_layout(case, grad_x), case.grad_x, 1e-12, "grad_x")
    assert_close(to_torch_weight(grad_kernel), case.grad_weight, 1e-8, "grad_weight")
    if case.has_bias:
        assert_close(grad_bias[0], case.grad_bias, 1e-12, "grad_bias")


@pytest.mark.parametrize("case", KERAS_CASES, ids=case_id)
def test_float32_equals_plain_layer_and_kernel_grad_is_tracts(case):
    z_p, grad_x_p, grad_kernel_p, *grad_bias_p = run_case(
        make_layer(case, tract=False, dtype="float32"), case, np.float32)
    z, grad_x, grad_kernel, *grad_bias = run_case(
        make_layer(case, tract=True, dtype="float32"), case, np.float32)
    np.testing.assert_array_equal(z, z_p)
    np.testing.assert_array_equal(grad_x, grad_x_p)
    if case.has_bias:
        np.testing.assert_array_equal(grad_bias[0], grad_bias_p[0])
    assert grad_kernel.dtype == np.float32
    assert_close(to_torch_weight(grad_kernel), case.grad_weight, 2e-4, "grad_weight")
    # The plain layer's kernel gradient is far from TrAct's: the check can fail.
    plain_error = np.linalg.norm(to_torch_weight(grad_kernel_p) - case.grad_weight)
    assert plain_error > 1e-2 * np.linalg.norm(case.grad_weight)


@pytest.mark.parametrize("name", ["conv1d_pixels_valid", "conv2d_depthwise_b_lt_n",
                                  "conv3d_stride_groups"])
def test_channels_first(name):
    case = next(c for c in KERAS_CONV_CASES if c.name == name)
    z, grad_x, grad_kernel, *_ = run_case(
        make_layer(case, tract=True, dtype="float32", data_format="channels_first"), case,
        np.float32, channels_first_layer=True)
    if BACKEND == "tensorflow":
        # TF's CPU kernels have no channels-first convolution: compare with channels-last.
        z_p, grad_x_p, *_ = run_case(make_layer(case, tract=False, dtype="float32"), case,
                                     np.float32)
        z_p, grad_x_p = channels_first(z_p), channels_first(grad_x_p)
    else:
        z_p, grad_x_p, *_ = run_case(
            make_layer(case, tract=False, dtype="float32", data_format="channels_first"), case,
            np.float32, channels_first_layer=True)
    np.testing.assert_array_equal(z, z_p)
    np.testing.assert_array_equal(grad_x, grad_x_p)
    assert_close(to_torch_weight(grad_kernel), case.grad_weight, 2e-4, "grad_weight")


def test_channels_first_bias_is_added_per_channel():
    """The last spatial size equal to the filters: Keras's TensorFlow add would take a
    channels-first bias for a last-axis one (its bias_add shortcut); the TrAct layer adds
    it per channel, as a channels-last layer does."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 2, 6, 3)).astype("float32")
    weights = [rng.normal(size=(3, 3, 2, 3)).astype("float32"),
               np.array([0.1, 0.2, 0.3], "float32")]
    outs = []
    for data_format, inputs in (("channels_first", x), ("channels_last", channels_last(x))):
        layer = tk.TrActConv2D(3, 3, padding="same", data_format=data_format, lam=0.1)
        layer.build(inputs.shape)
        layer.set_weights(weights)
        outs.append(keras.ops.convert_to_numpy(layer(inputs)))
    np.testing.assert_allclose(outs[0], channels_first(outs[1]), rtol=1e-5, atol=1e-5)


def reference_conv_kernel_grad(x, grad_z, kernel_size, strides, dilation, pads, lam):
    """TrAct's kernel gradient from the numpy core, channels-last in, Keras layout out."""
    xf = np.pad(channels_first(x).astype(np.float64), [(0, 0), (0, 0), *pads])
    rows = tract_core.conv_patches(xf, kernel_size, strides, dilation, 1)
    grads = grad_z.astype(np.float64).reshape(1, -1, grad_z.shape[-1])
    weight = tract_core.weight_grad(rows, grads, lam)[0]  # (M, C * K)
    channels = x.shape[-1]
    return to_keras_kernel(weight.reshape(weight.shape[0], channels, *kernel_size))


@pytest.mark.parametrize("layer_name, x_shape, options", [
    ("Conv2D", (3, 8, 8, 3), dict(kernel_size=3, strides=2, padding="same")),  # pads (0, 1)
    ("Conv2D", (2, 9, 7, 2), dict(kernel_size=(4, 2), padding="same")),  # pads (1, 2), (0, 1)
    ("Conv1D", (4, 12, 3), dict(kernel_size=3, padding="causal", dilation_rate=2)),
    ("Conv3D", (2, 6, 5, 4, 1), dict(kernel_size=2, strides=2, padding="same")),
    ("Conv3D", (2, 4, 5, 3, 2), dict(kernel_size=(2, 3, 1), padding="valid")),
])
def test_keras_padding_options_match_plain_layer(layer_name, x_shape, options):
    rng = np.random.default_rng(1)
    x = rng.normal(size=x_shape).astype(np.float32)
    rank = len(x_shape) - 2
    plain = getattr(keras.layers, layer_name)(5, **options)
    tract = getattr(tk, f"TrAct{layer_name}")(5, lam=0.1, **options)
    plain.build(x_shape)
    tract.build(x_shape)
    tract.set_weights(plain.get_weights())
    grad_z = rng.normal(size=tuple(plain.compute_output_shape(x_shape))).astype(np.float32)
    # Eager on TensorFlow: the 3-D input gradient too (tf.nn.convolution's fails there
    # unless the data format is named, as Keras names it).
    z_p, grad_x_p, *_ = forward_backward(plain, x, grad_z)
    z, grad_x, grad_kernel, _ = forward_backward(tract, x, grad_z)
    np.testing.assert_array_equal(z, z_p)
    np.testing.assert_array_equal(grad_x, grad_x_p)
    kernel_size, strides = tract.kernel_size, tract.strides
    if options["padding"] == "causal":
        pads = [(tract.dilation_rate[0] * (kernel_size[0] - 1), 0)]
    elif options["padding"] == "valid":
        pads = [(0, 0)] * rank
    else:
        pads = tf_same_pads(x_shape[1:-1], kernel_size, strides, (1,) * rank)
    expected = reference_conv_kernel_grad(x, grad_z, kernel_size, strides, tract.dilation_rate,
                                          pads, 0.1)
    assert_close(grad_kernel, expected, 2e-4, "grad_kernel")


# --------------------------------------------------------------------------- training


def sgd_model(first_layer, input_shape):
    model = keras.Sequential([keras.Input(input_shape), first_layer, keras.layers.Flatten()])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), loss="mse")
    return model


@pytest.mark.parametrize("batch", [4, 16])
def test_fit_dense_step_is_sgd_on_tract_gradient(batch):
    """One fit step (batch size unknown while tracing) moves the kernel by -lr * TrAct grad."""
    rng = np.random.default_rng(batch)
    x = rng.normal(size=(batch, 6)).astype(np.float32)
    y = rng.normal(size=(batch, 3)).astype(np.float32)
    model = sgd_model(tk.TrActDense(3, lam=0.1), (6,))
    kernel, bias = (w.astype(np.float64) for w in model.get_weights())
    z = x @ kernel + bias
    grad_z = 2 * (z - y) / z.size  # d mean((z - y)^2) / dz
    expected = kernel - 0.1 * tract_core.weight_grad(x.astype(np.float64), grad_z, 0.1).T
    model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
    new_kernel = model.get_weights()[0]
    assert_close(new_kernel - kernel, expected - kernel, 1e-4, "kernel update")
    # Relative to the whole update: one float32 entry near zero carries no relative accuracy.
    assert_close(model.get_weights()[1] - bias, -0.1 * grad_z.sum(0), 1e-5, "bias update")


def test_fit_conv_step_is_sgd_on_tract_gradient():
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 255, size=(5, 8, 8, 3)).astype(np.float32)  # pixel scale
    conv = tk.TrActConv2D(4, 3, strides=2, padding="same", lam=0.1)
    model = sgd_model(conv, (8, 8, 3))
    y = rng.normal(size=(5, 4 * 4 * 4)).astype(np.float32)
    kernel = model.get_weights()[0].astype(np.float64)
    z = np.asarray(keras.ops.convert_to_numpy(model(x)), dtype=np.float64)
    grad_z = (2 * (z - y) / z.size).reshape(5, 4, 4, 4)
    expected_step = -0.1 * reference_conv_kernel_grad(x, grad_z, (3, 3), (2, 2), (1, 1),
                                                      [(0, 1), (0, 1)], 0.1)
    model.fit(x, y, batch_size=5, epochs=1, shuffle=False, verbose=0)
    assert_close(model.get_weights()[0] - kernel, expected_step, 1e-3, "kernel update")


# --------------------------------------------------------------------------- saving


def two_layer_model(tract, lam_conv=0.2, lam_dense=0.05):
    if tract:
        conv, dense = tk.TrActConv2D(4, 3, lam=lam_conv), tk.TrActDense(2, lam=lam_dense)
    else:
        conv, dense = keras.layers.Conv2D(4, 3), keras.layers.Dense(2)
    return keras.Sequential([keras.Input((6, 6, 3)), conv, keras.layers.Flatten(), dense])


def test_keras_file_round_trip_keeps_lam_and_outputs(tmp_path):
    model = two_layer_model(tract=True)
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype(np.float32)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects: registered on import
    conv, dense = loaded.layers[0], loaded.layers[2]
    assert type(conv) is tk.TrActConv2D and type(dense) is tk.TrActDense
    assert (conv.lam, dense.lam) == (0.2, 0.05)
    assert conv.get_config()["lam"] == 0.2
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(x)),
                                  keras.ops.convert_to_numpy(model(x)))


def test_plain_weights_load_into_tract_model_and_back():
    plain, tract = two_layer_model(tract=False), two_layer_model(tract=True)
    assert [(w.name, tuple(w.shape)) for w in plain.weights] == \
        [(w.name, tuple(w.shape)) for w in tract.weights]
    tract.set_weights(plain.get_weights())
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype(np.float32)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(tract(x)),
                                  keras.ops.convert_to_numpy(plain(x)))
    fresh = two_layer_model(tract=False)
    fresh.set_weights(tract.get_weights())
    for a, b in zip(fresh.get_weights(), plain.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_wrap_copies_config_and_weights():
    plain = keras.layers.Conv2D(4, 3, strides=2, padding="same", groups=1, use_bias=False,
                                name="stem")
    x = np.random.default_rng(0).normal(size=(2, 7, 7, 3)).astype(np.float32)
    z = keras.ops.convert_to_numpy(plain(x))
    twin = tk.wrap(plain, lam=0.2)
    assert type(twin) is tk.TrActConv2D and twin.lam == 0.2 and twin.built
    assert twin.name == "stem" and twin.strides == (2, 2) and not twin.use_bias
    extra = ("lam", "sync", "accumulate")
    assert {k: v for k, v in twin.get_config().items() if k not in extra} == plain.get_config()
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(twin(x)), z)
    assert tk.wrap(twin, lam=0.05).lam == 0.05 and twin.lam == 0.2
    dense = tk.wrap(keras.layers.Dense(3), lam=0.1)  # not built: config only
    assert type(dense) is tk.TrActDense and not dense.built
    with pytest.raises(TypeError, match="wrap"):
        tk.wrap(keras.layers.LSTM(3))


@pytest.mark.parametrize("lam", [0, -1.0, math.nan, math.inf, "0.1", None, True])
def test_bad_lam_raises_value_error(lam):
    with pytest.raises(ValueError, match="lam"):
        tk.TrActDense(3, lam=lam)
    with pytest.raises(ValueError, match="lam"):
        tk.TrActConv2D(4, 3, lam=lam)
    with pytest.raises(ValueError, match="lam"):
        tk.wrap(keras.layers.Conv1D(2, 3), lam=lam)


@pytest.mark.parametrize("layer", [
    keras.layers.Conv2DTranspose(2, 3), keras.layers.DepthwiseConv2D(3),
    keras.layers.SeparableConv2D(2, 3), keras.layers.BatchNormalization(),
    keras.layers.EinsumDense("ab,bc->ac", 3),
], ids=lambda layer: type(layer).__name__)
def test_wrap_of_unsupported_layer_raises_type_error_naming_it(layer):
    with pytest.raises(TypeError, match=f"got layer of type {type(layer).__name__}"):
        tk.wrap(layer)


@pytest.mark.parametrize("name", ["Dense", "Conv2D"])
def test_integer_inputs_are_promoted_as_the_plain_layer_promotes_them(name):
    """uint8 pixels or int tokens: the forward is the plain layer's on the promoted
    inputs, the kernel gradient TrAct's of those; complex inputs raise a TypeError."""
    rng = np.random.default_rng(4)
    shape, units = ((5, 4), 3) if name == "Dense" else ((2, 5, 5, 2), 3)
    x = rng.integers(0, 256, size=shape).astype(np.uint8)
    kwargs = dict(kernel_size=3) if name == "Conv2D" else {}
    plain = getattr(keras.layers, name)(units, **kwargs)
    tract = getattr(tk, f"TrAct{name}")(units, lam=0.1, **kwargs)
    plain.build(shape)
    tract.build(shape)
    tract.set_weights(plain.get_weights())
    z = keras.ops.convert_to_numpy(tract(x))
    assert z.dtype == np.float32
    # Keras's own conv refuses integers on TF and torch: compare with float inputs there.
    x_plain = x if name == "Dense" else x.astype(np.float32)
    np.testing.assert_array_equal(z, keras.ops.convert_to_numpy(plain(x_plain)))
    grad_z = rng.normal(size=z.shape).astype(np.float32)
    _, _, grad_kernel, _ = forward_backward(tract, x.astype(np.float32), grad_z)
    if name == "Dense":
        expected = tract_core.weight_grad(x.astype(np.float64), grad_z.astype(np.float64),
                                          0.1).T
    else:
        expected = reference_conv_kernel_grad(x, grad_z, (3, 3), (1, 1), (1, 1),
                                              [(0, 0), (0, 0)], 0.1)
    assert_close(grad_kernel, expected, 1e-4, "grad_kernel")
    with pytest.raises(TypeError, match=r"real inputs.*complex64"):
        tract(x.astype(np.complex64))


@pytest.mark.parametrize("layer_name, x_shape, options", [
    ("Conv2D", (1, 2, 2, 3), dict(kernel_size=3)),
    ("Conv3D", (1, 2, 5, 5, 1), dict(kernel_size=3, dilation_rate=2)),
])
def test_kernel_that_does_not_fit_raises_value_error(layer_name, x_shape, options):
    layer = getattr(tk, f"TrAct{layer_name}")(2, lam=0.1, **options)
    with pytest.raises(ValueError, match=r"zero or negative|does not fit"):
        layer(np.ones(x_shape, np.float32))


@pytest.mark.skipif(BACKEND != "tensorflow",
                    reason="Keras's JAX and torch trainers refuse an empty batch themselves")
@pytest.mark.parametrize("name", ["Dense", "Conv2D"])
def test_train_on_empty_batch_leaves_weights_unchanged(name):
    """Keras retraces train_on_batch for any batch size: the empty batch's kernel gradient
    is G^T X = 0 (was NaN, 0 rows / 0), so SGD moves nothing."""
    layer, shape = ((tk.TrActDense(3, lam=0.1), (6,)) if name == "Dense"
                    else (tk.TrActConv2D(2, 3, padding="same", lam=0.1), (5, 5, 2)))
    model = sgd_model(layer, shape)
    outputs = model.output_shape[-1]
    rng = np.random.default_rng(5)
    model.train_on_batch(rng.normal(size=(3, *shape)).astype(np.float32),
                         rng.normal(size=(3, outputs)).astype(np.float32))
    before = model.get_weights()
    model.train_on_batch(np.zeros((0, *shape), np.float32), np.zeros((0, outputs), np.float32))
    for new, old in zip(model.get_weights(), before):
        np.testing.assert_array_equal(new, old)


# --------------------------------------------------------------------------- precision


@pytest.mark.parametrize("name", ["linear_tokens", "conv2d_cifar_stem"])
def test_mixed_bfloat16(name):
    case = next(c for c in KERAS_CASES if c.name == name)
    layer = make_layer(case, tract=True, dtype="mixed_bfloat16")
    assert layer.kernel.dtype == "float32" and layer.compute_dtype == "bfloat16"
    z, _, grad_kernel, *_ = run_case(layer, case, np.float32)
    assert grad_kernel.dtype == np.float32  # the variable's gradient
    # bf16 operands carry ~3 digits; the Gram and the solve run in float32.
    assert_close(to_torch_weight(grad_kernel), case.grad_weight, 5e-2, "grad_weight")
    assert_close(torch_layout(case, z), case.z, 2e-2, "z")


def test_imports_only_the_active_backends_adapter():
    """tract_core.keras loads its adapter lazily, and only the active backend's."""
    script = (
        "import json, sys, numpy as np, tract_core.keras as tk\n"
        "adapters = lambda: sorted({'tract_core.tensorflow', 'tract_core.jax',\n"
        "                           'tract_core.torch', 'tract_core.flax'} & set(sys.modules))\n"
        "before = adapters()\n"
        "tk.TrActDense(2)(np.ones((3, 4), 'float32'))\n"
        "print(json.dumps([before, adapters()]))\n"
    )
    env = {**os.environ, "KERAS_BACKEND": BACKEND}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, check=True)
    before, after = json.loads(result.stdout.strip().splitlines()[-1])
    assert before == []
    assert after == [tk._ADAPTERS[BACKEND]]


# --------------------------------------------------------------------------- unwrap


def test_unwrap_gives_the_plain_layer_with_the_same_config_and_weights():
    tract = tk.TrActConv2D(4, 3, strides=2, padding="same", lam=0.2, name="stem")
    x = np.random.default_rng(0).normal(size=(2, 7, 7, 3)).astype(np.float32)
    z = keras.ops.convert_to_numpy(tract(x))
    plain = tk.unwrap(tract)
    assert type(plain) is keras.layers.Conv2D and plain.built
    config = {k: v for k, v in tract.get_config().items()
              if k not in ("lam", "sync", "accumulate")}
    assert plain.get_config() == config
    for a, b in zip(plain.get_weights(), tract.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(plain(x)), z)
    dense = tk.unwrap(tk.TrActDense(3, lam=0.1))  # not built: config only
    assert type(dense) is keras.layers.Dense and not dense.built
    with pytest.raises(TypeError, match="got layer of type Conv2D"):
        tk.unwrap(plain)


# --------------------------------------------------------------------------- first layer


@pytest.fixture
def float64_layers():
    """Inputs and layers in float64 (floatx, the dtype policy) for the test."""
    previous = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_floatx(previous[0])
    keras.config.set_dtype_policy(previous[1])


@keras.saving.register_keras_serializable(package="tract_core_tests")
class ClassToken(keras.layers.Layer):
    """Prepends a learned token to (N, T, D) tokens, as a ViT's class token."""

    def build(self, input_shape):
        self.token = self.add_weight(shape=(1, 1, input_shape[-1]), initializer="normal",
                                     name="token")

    def call(self, tokens):
        batch = keras.ops.shape(tokens)[0]
        token = keras.ops.broadcast_to(self.token, (batch, 1, tokens.shape[-1]))
        return keras.ops.concatenate([keras.ops.cast(token, tokens.dtype), tokens], axis=1)


def resnet_like(name="resnet"):
    """Zero padding, a 3x3 stride-2 stem without bias, BN, a residual block, the head."""
    x = keras.Input((8, 8, 3))
    y = keras.layers.ZeroPadding2D(1)(x)
    y = keras.layers.Conv2D(4, 3, strides=2, use_bias=False, name="stem")(y)
    y = keras.layers.ReLU()(keras.layers.BatchNormalization()(y))
    branch = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3, padding="same")(y))
    y = keras.layers.GlobalAveragePooling2D()(keras.layers.Add()([y, branch]))
    return keras.Model(x, keras.layers.Dense(3)(y), name=name)


def vit_like():
    """A 4x4 patch embedding, a class token, one token-mixing block, a head on the class
    token. (Mixing by a Dense over the tokens, no norm: on JAX, Keras's attention and
    LayerNormalization gradients are not float64-accurate, and the test is float64.)"""
    x = keras.Input((8, 8, 3))
    tokens = keras.layers.Reshape((4, 5))(
        keras.layers.Conv2D(5, 4, strides=4, name="patch_embed")(x))
    tokens = ClassToken()(tokens)
    mixed = keras.layers.Dense(5, activation="tanh")(keras.layers.Permute((2, 1))(tokens))
    tokens = tokens + keras.layers.Permute((2, 1))(mixed)
    return keras.Model(x, keras.layers.Dense(3)(tokens[:, 0]))


def mlp():
    return keras.Sequential([keras.Input((6,)), keras.layers.Dropout(0.1),
                             keras.layers.Dense(4, activation="relu", name="first"),
                             keras.layers.Dense(3)])


def nested():
    return keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Rescaling(0.5),
                             resnet_like(), keras.layers.Dense(2)])


FIRST_LAYER_MODELS = {  # builder, wrapped layer's path, x -> the wrapped layer's input
    "sequential_mlp": (mlp, "first", lambda x: x),
    "functional_resnet": (resnet_like, "stem",
                          lambda x: np.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])),
    "functional_vit_class_token": (vit_like, "patch_embed", lambda x: x),
    "nested_resnet": (nested, "resnet/stem",
                      lambda x: np.pad(0.5 * x, [(0, 0), (1, 1), (1, 1), (0, 0)])),
}


def tract_kernel_grad(plain_grad, layer, layer_input, lam):
    """(G^T X) (X^T X / b + lam I)^-1 from the plain model's kernel gradient G^T X and the
    wrapped layer's input rows X (float64, numpy), in Keras layout."""
    if plain_grad.ndim == 2:  # Dense: rows are the input vectors, kernel (n, m)
        rows = layer_input
        plain = plain_grad.T
    else:
        rows = tract_core.conv_patches(channels_first(layer_input), layer.kernel_size,
                                       layer.strides, layer.dilation_rate, 1)[0]
        plain = to_torch_weight(plain_grad).reshape(plain_grad.shape[-1], -1)
    gram = rows.T @ rows / rows.shape[0] + lam * np.eye(rows.shape[1])
    tract = np.linalg.solve(gram, plain.T).T  # gram is symmetric
    if plain_grad.ndim == 2:
        return tract.T
    return to_keras_kernel(tract.reshape(to_torch_weight(plain_grad).shape))


@pytest.mark.parametrize("name", FIRST_LAYER_MODELS)
def test_wrap_first_layer_copies_the_model_with_a_tract_first_layer(name, float64_layers):
    """The copy: the same weights and forward; the first layer's kernel gradient is
    TrAct's (float64 reference from the plain model's gradient), every other gradient
    the plain model's. The original model is left as it was."""
    build, path, layer_input = FIRST_LAYER_MODELS[name]
    keras.utils.set_random_seed(0)
    model = build()
    model.compile(optimizer="sgd", loss="mse")
    tract_model, wrapped = tk.wrap_first_layer(model, lam=0.2)
    assert wrapped == path

    def at(m):
        for part in path.split("/"):
            m = m.get_layer(part)
        return m

    first, plain_first = at(tract_model), at(model)
    assert type(first) is tk._PLAIN_TO_TRACT[type(plain_first)] and first.lam == 0.2
    assert tract_model.compiled  # from the compile config
    assert [w.path for w in tract_model.weights] == [w.path for w in model.weights]
    for a, b in zip(tract_model.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)

    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, *model.input_shape[1:]))
    grad_z = rng.normal(size=(5, *model.output_shape[1:]))
    z_p, gx_p, *grads_p = forward_backward(model, x, grad_z)
    z, gx, *grads = forward_backward(tract_model, x, grad_z)
    # Keras's torch backend computes float64 products in float32 (its result_type of two
    # float64 torch tensors is float32): the plain model is float32-accurate there.
    rtol = 1e-5 if BACKEND == "torch" else 1e-9
    assert_close(z, z_p, rtol, "z")
    assert_close(gx, gx_p, rtol, "grad_x")
    kernel = [v.path for v in tract_model.trainable_variables].index(first.kernel.path)
    for i, (g, g_p) in enumerate(zip(grads, grads_p, strict=True)):
        if i != kernel:
            assert_close(g, g_p, rtol, tract_model.trainable_variables[i].path)
    expected = tract_kernel_grad(grads_p[kernel], first, layer_input(x), 0.2)
    assert_close(grads[kernel], expected, rtol, "first layer kernel grad")
    assert np.linalg.norm(grads_p[kernel] - expected) > 1e-2 * np.linalg.norm(expected)
    assert type(at(model)) is type(plain_first)  # the original is untouched


@pytest.mark.parametrize("norm", [
    keras.layers.BatchNormalization(name="norm"), keras.layers.LayerNormalization(name="norm"),
    keras.layers.Normalization(mean=0.5, variance=2.0, name="norm"),
    keras.layers.UnitNormalization(name="norm"),  # no weights, still a normalisation
], ids=lambda layer: type(layer).__name__)
def test_wrap_first_layer_refuses_an_input_normalisation_and_names_it(norm):
    x = keras.Input((6, 6, 3))
    y = keras.layers.Conv2D(2, 3, name="conv")(norm(keras.layers.ZeroPadding2D(1)(x)))
    model = keras.Model(x, keras.layers.Flatten()(y))
    message = rf"normalises its input with 'norm' \({type(norm).__name__}\).*layer='conv'"
    with pytest.raises(TypeError, match=message):
        tk.wrap_first_layer(model)
    tract_model, path = tk.wrap_first_layer(model, layer="conv")  # as the message says
    assert path == "conv" and type(tract_model.get_layer("conv")) is tk.TrActConv2D


def test_wrap_first_layer_refuses_other_first_layers_and_models_clearly():
    def sequential(*layers, shape=(6, 6, 3)):
        return keras.Sequential([keras.Input(shape), *layers])

    for model, error, message in [
        (sequential(keras.layers.Conv2DTranspose(2, 3, name="up")), TypeError,
         r"first layer 'up' \(Conv2DTranspose\) is not a layer TrAct supports"),
        (sequential(keras.layers.Embedding(10, 3, name="emb"), shape=(4,)), TypeError,
         r"'emb' \(Embedding\)"),
        (keras.Sequential([keras.layers.Dense(2)]), ValueError, "built model"),
        (sequential(keras.layers.Flatten()), ValueError, "found none"),
    ]:
        with pytest.raises(error, match=message):
            tk.wrap_first_layer(model)
    x = keras.Input((4,))
    two_heads = keras.Model(x, keras.layers.Add(name="sum")([
        keras.layers.Dense(2, name="a")(x), keras.layers.Dense(2, name="b")(x)]))
    with pytest.raises(ValueError, match="found 'a', 'b': pass layer="):
        tk.wrap_first_layer(two_heads)
    with pytest.raises(ValueError, match="layer='c'"):
        tk.wrap_first_layer(two_heads, layer="c")
    with pytest.raises(TypeError, match=r"layer 'sum' \(Add\)"):
        tk.wrap_first_layer(two_heads, layer="sum")
    with pytest.raises(ValueError, match="lam"):
        tk.wrap_first_layer(two_heads, lam=0.0, layer="a")

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.stem = keras.layers.Dense(2)

        def call(self, x):
            return self.stem(x)

    subclassed = Subclassed()
    subclassed(np.ones((1, 4), np.float32))
    with pytest.raises(TypeError, match=r"subclassed Subclassed.*in its __init__"):
        tk.wrap_first_layer(subclassed)


def test_clone_model_with_a_clone_function_wraps_a_named_layer():
    """The recipe of the Keras quickstart: any layer of a built functional model."""
    keras.utils.set_random_seed(0)
    model = resnet_like()

    def clone(layer):
        if layer.name == "stem":
            return tk.wrap(layer, lam=0.1)  # built: holds a copy of the weights
        return layer.__class__.from_config(layer.get_config())

    tract_model = keras.models.clone_model(model, clone_function=clone)
    tract_model.set_weights(model.get_weights())
    assert type(tract_model.get_layer("stem")) is tk.TrActConv2D
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(tract_model(x)),
                                  keras.ops.convert_to_numpy(model(x)))
