"""Exact gradient accumulation in Keras 3 (KERAS_BACKEND=tensorflow, jax or torch): a layer
made with ``accumulate=True`` and an optimizer passed through ``exact_accumulation`` take,
over ``gradient_accumulation_steps`` micro-batches, the one SGD step of the whole batch's
TrAct gradient. References: the numpy core on the whole batch, in float64.
"""

import numpy as np
import pytest
from conftest import assert_close, need
from test_keras import reference_conv_kernel_grad

keras = need("keras")
BACKEND = keras.backend.backend()
if BACKEND == "jax":
    need("jax").config.update("jax_enable_x64", True)  # float64 models

import tract_core  # noqa: E402
import tract_core.keras as tk  # noqa: E402

LR = 0.1


@pytest.fixture(autouse=True)
def float64_losses():
    """Keras computes losses in floatx: float64 here, as the models and references."""
    floatx = keras.config.floatx()
    keras.config.set_floatx("float64")
    yield
    keras.config.set_floatx(floatx)


def linear_model(layer, input_shape, steps=None):
    """layer -> Flatten, MSE, SGD through exact_accumulation, float64."""
    model = keras.Sequential([keras.Input(input_shape, dtype="float64"), layer,
                              keras.layers.Flatten(dtype="float64")])
    optimizer = keras.optimizers.SGD(LR, gradient_accumulation_steps=steps)
    model.compile(optimizer=tk.exact_accumulation(optimizer), loss="mse")
    return model


def whole_batch_grad_z(model, x, y):
    """d mean((z - y)^2) / dz over the whole batch, float64 (the layer's output grads)."""
    z = np.asarray(keras.ops.convert_to_numpy(model(x)), dtype=np.float64)
    return 2 * (z - y) / z.size


@pytest.mark.parametrize("steps", [4, None])
def test_micro_batches_take_the_whole_batch_step_conv(steps):
    """4 micro-batches of 4 and one update, or one batch of 16: the same TrAct step."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, size=(16, 8, 8, 3))
    layer = tk.TrActConv2D(4, 3, strides=2, padding="same", lam=0.05, accumulate=True,
                           dtype="float64")
    model = linear_model(layer, (8, 8, 3), steps)
    y = rng.normal(size=(16, 4 * 4 * 4))
    kernel, bias = (np.array(w) for w in model.get_weights()[:2])
    grad_z = whole_batch_grad_z(model, x, y).reshape(16, 4, 4, 4)
    expected = -LR * reference_conv_kernel_grad(x, grad_z, (3, 3), (2, 2), (1, 1),
                                                [(0, 1), (0, 1)], 0.05)
    model.fit(x, y, batch_size=16 if steps is None else 4, shuffle=False, verbose=0)
    assert_close(layer.kernel.numpy() - kernel, expected, 1e-10, "kernel step")
    assert_close(layer.bias.numpy() - bias, -LR * grad_z.sum((0, 1, 2)), 1e-10, "bias step")
    assert not np.any(layer.tract_statistics.numpy())  # the statistics stay zero


def test_micro_batches_take_the_whole_batch_step_dense_tokens():
    """A Dense layer on tokens: every token is a row; 3 micro-batches of 2 sequences of 5
    tokens. Keras's JAX and torch trainers take even a plain float64 Dense step to within
    ~1e-7 of numpy's; preconditioning each micro-batch alone would be off by far more."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, 5, 7)), rng.normal(size=(6, 5 * 3))
    layer = tk.TrActDense(3, lam=0.2, accumulate=True, dtype="float64")
    model = linear_model(layer, (5, 7), steps=3)
    kernel = np.array(layer.kernel.numpy())
    grad_z = whole_batch_grad_z(model, x, y).reshape(6, 5, 3)
    expected = -LR * tract_core.weight_grad(x.reshape(-1, 7), grad_z.reshape(-1, 3), 0.2).T
    per_micro_batch = -LR * sum(tract_core.weight_grad(x[i:i + 2].reshape(-1, 7),
                                                       grad_z[i:i + 2].reshape(-1, 3), 0.2).T
                                for i in (0, 2, 4))
    assert np.linalg.norm(per_micro_batch - expected) > 1e-2 * np.linalg.norm(expected)
    model.fit(x, y, batch_size=2, shuffle=False, verbose=0)
    assert_close(layer.kernel.numpy() - kernel, expected, 1e-6)


def test_without_exact_accumulation_the_output_turns_nan():
    """A plain optimizer steps the statistics weight: the layer's next output is NaN (it
    cannot train on its zero kernel gradient unnoticed)."""
    x = np.random.default_rng(2).normal(size=(4, 6))
    model = keras.Sequential([keras.Input((6,), dtype="float64"),
                              tk.TrActDense(2, accumulate=True, dtype="float64")])
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    assert np.isfinite(model.predict(x, verbose=0)).all()
    model.fit(x, np.ones((4, 2)), batch_size=4, verbose=0)
    assert np.isnan(model.predict(x, verbose=0)).all()


def test_loss_scale_optimizer_and_float32():
    """exact_accumulation reaches into a LossScaleOptimizer; float32 model, two steps."""
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(8, 6)).astype("float32"), rng.normal(size=(8, 2)).astype("float32")
    layer = tk.TrActDense(2, lam=0.1, accumulate=True)
    model = keras.Sequential([keras.Input((6,)), layer])
    optimizer = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(LR, gradient_accumulation_steps=2))
    model.compile(optimizer=tk.exact_accumulation(optimizer), loss="mse")
    kernel = np.array(layer.kernel.numpy(), dtype=np.float64)
    grad_z = whole_batch_grad_z(model, x, y)
    expected = -LR * tract_core.weight_grad(x.astype(np.float64), grad_z, 0.1).T
    model.fit(x, y, batch_size=4, shuffle=False, verbose=0)
    assert_close(layer.kernel.numpy() - kernel, expected, 1e-4)


def test_saving_wrapping_and_unwrapping_keep_the_statistics_apart(tmp_path):
    plain = keras.layers.Conv2D(4, 3, groups=1)
    model = keras.Sequential([keras.Input((6, 6, 2)), plain])
    layer = tk.wrap(plain, lam=0.2, accumulate=True)
    assert layer.accumulate and not np.any(layer.tract_statistics.numpy())
    assert layer.tract_statistics.shape == (tract_core.packed_size(4, 18),)
    assert_close(layer.kernel.numpy(), plain.kernel.numpy(), 0)
    saved = keras.Sequential([keras.Input((6, 6, 2)), layer])
    saved.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras").layers[0]
    assert type(loaded) is tk.TrActConv2D and loaded.accumulate and loaded.lam == 0.2
    back = tk.unwrap(loaded)
    assert type(back) is keras.layers.Conv2D and len(back.weights) == 2
    assert_close(back.kernel.numpy(), plain.kernel.numpy(), 0)
    copy, name = tk.wrap_first_layer(model, accumulate=True)
    assert copy.get_layer(name).tract_statistics is not None
