"""tract_core.flax (NNX and Linen) and the Flax / Equinox examples.

The TrAct layers must be their plain Flax layers in everything but the kernel gradient:
same parameter paths, shapes and init, a plain state loads, bitwise-equal forward, input
and bias gradients; kernel gradient = the float64 fixture's TrAct gradient.
"""

import importlib.util
import pathlib
import sys

import numpy as np
import pytest
from conftest import CONV_CASES, LINEAR_CASES, assert_close, case_id, need

jax = need("jax")
need("flax")
jax.config.update("jax_enable_x64", True)

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import tract_core.flax as tflax  # noqa: E402
import tract_core.jax as tj  # noqa: E402

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"
CASES = {c.name: c for c in LINEAR_CASES + CONV_CASES}
# Token inputs, b < n without bias, SAME, 3-D groups, and torch's reflect padding, which
# is what Flax's own padding='REFLECT' does for an odd kernel.
NNX_CASES = [CASES[n] for n in ("linear_tokens", "linear_pixels_b_lt_n",
                                "conv2d_even_kernel_same", "conv3d_stride_groups",
                                "conv1d_groups_same_reflect")]
zeros = nnx.initializers.zeros  # cheap: parameters are set from the fixtures anyway


def flax_arrays(case):
    """x, kernel, bias, grad_z of a fixture case in Flax layouts (channels-last)."""
    if case.kind == "linear":
        return case.x, case.weight.T, case.get("bias"), case.grad_z
    d = case.x.ndim - 2
    kernel = np.transpose(case.weight, (*range(2, 2 + d), 1, 0))
    return (np.moveaxis(case.x, 1, -1), kernel, case.get("bias"),
            np.moveaxis(case.grad_z, 1, -1))


def to_torch_layout(case, grad_kernel):
    grad_kernel = np.asarray(grad_kernel, dtype=np.float64)
    if case.kind == "linear":
        return grad_kernel.T
    d = grad_kernel.ndim - 2
    return np.transpose(grad_kernel, (d + 1, d, *range(d)))


def nnx_layer(case, cls, **kwargs):
    """The nnx.Linear / nnx.Conv (or TrAct class) a fixture case describes."""
    options = dict(use_bias=case.has_bias, param_dtype=jnp.float64, kernel_init=zeros,
                   rngs=nnx.Rngs(0), **kwargs)
    if case.kind == "linear":
        return cls(case.x.shape[-1], case.out, **options)
    if case.padding_mode == "reflect":
        padding = "REFLECT"
    elif isinstance(case.padding, str):
        padding = case.padding.upper()
    else:
        padding = [tuple(p) for p in case.pads]
    return cls(case.x_shape[1], case.out, tuple(case.kernel), tuple(case.stride),
               padding=padding, kernel_dilation=tuple(case.dilation),
               feature_group_count=case.groups, **options)


@nnx.jit
def outputs_and_grads(models, x, grad_z):
    """For each model: z, dL/dx and dL/dparams for L = <model(x), grad_z>."""

    def loss(model, x):
        return jnp.sum(model(x) * grad_z)

    return [(model(x), *nnx.grad(loss, argnums=(0, 1))(model, x)) for model in models]


# --------------------------------------------------------------------------- NNX


@pytest.mark.parametrize("case", NNX_CASES, ids=case_id)
def test_nnx_layer_is_the_plain_layer_but_for_the_kernel_grad(case):
    x, kernel, bias, grad_z = flax_arrays(case)
    plain_cls = nnx.Linear if case.kind == "linear" else nnx.Conv
    tract_cls = tflax.TrActLinear if case.kind == "linear" else tflax.TrActConv
    plain = nnx_layer(case, plain_cls)
    plain.kernel[...] = jnp.asarray(kernel)
    if case.has_bias:
        plain.bias[...] = jnp.asarray(bias)
    tract = nnx_layer(case, tract_cls, lam=case.lam)
    assert isinstance(tract, plain_cls) and tract.lam == case.lam

    # A plain state loads: same paths, shapes and dtypes.
    plain_state, tract_state = nnx.state(plain, nnx.Param), nnx.state(tract, nnx.Param)
    assert jax.tree.structure(plain_state) == jax.tree.structure(tract_state)
    nnx.update(tract, plain_state)

    (z_p, grads_p, gx_p), (z_t, grads_t, gx_t) = outputs_and_grads((plain, tract), x, grad_z)
    assert np.array_equal(z_t, z_p) and np.array_equal(gx_t, gx_p)
    assert_close(z_t if case.kind == "linear" else np.moveaxis(np.asarray(z_t), -1, 1),
                 case.z, 1e-12, "z")
    assert_close(to_torch_layout(case, grads_t["kernel"][...]), case.grad_weight, 1e-8,
                 "grad_weight")
    assert not np.allclose(grads_t["kernel"][...], grads_p["kernel"][...])
    if case.has_bias:
        assert np.array_equal(grads_t["bias"][...], grads_p["bias"][...])
        assert_close(grads_t["bias"][...], case.grad_bias, 1e-12, "grad_bias")


def test_nnx_default_init_matches_plain():
    # Conv with zeros: a fresh lecun_normal init shape costs an XLA compile of seconds.
    conv_options = dict(feature_group_count=2, kernel_init=zeros, rngs=nnx.Rngs(7))
    for plain, tract in [
        (nnx.Linear(5, 3, rngs=nnx.Rngs(7)), tflax.TrActLinear(5, 3, rngs=nnx.Rngs(7))),
        (nnx.Conv(4, 6, (3, 3), **conv_options), tflax.TrActConv(4, 6, (3, 3), **conv_options)),
    ]:
        plain_state, tract_state = nnx.state(plain), nnx.state(tract)
        assert jax.tree.structure(plain_state) == jax.tree.structure(tract_state)
        for a, b in zip(jax.tree.leaves(plain_state), jax.tree.leaves(tract_state)):
            assert a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)
        assert tract.lam == 0.1


def test_wrap_shares_params_and_changes_only_the_kernel_grad():
    case = CASES["conv2d_cifar_stem"]
    x, kernel, bias, grad_z = flax_arrays(case)
    plain = nnx_layer(case, nnx.Conv)
    twin = tflax.wrap(plain, lam=case.lam)
    assert type(twin) is tflax.TrActConv and twin.lam == case.lam
    assert twin.kernel is plain.kernel and twin.bias is plain.bias
    # An update through the plain module is seen by the twin: they share the Params.
    plain.kernel[...] = jnp.asarray(kernel)
    plain.bias[...] = jnp.asarray(bias)
    (z_p, _, gx_p), (z_t, grads_t, gx_t) = outputs_and_grads((plain, twin), x, grad_z)
    assert np.array_equal(z_t, z_p) and np.array_equal(gx_t, gx_p)
    assert_close(to_torch_layout(case, grads_t["kernel"][...]), case.grad_weight, 1e-8)

    rewrapped = tflax.wrap(twin, lam=0.2)
    assert rewrapped.lam == 0.2 and twin.lam == case.lam and rewrapped.kernel is plain.kernel
    linear_twin = tflax.wrap(nnx.Linear(3, 2, use_bias=False, rngs=nnx.Rngs(0)), lam=0.3)
    assert type(linear_twin) is tflax.TrActLinear and linear_twin.lam == 0.3
    assert linear_twin.bias is None


def test_wrap_and_constructors_reject_bad_arguments():
    with pytest.raises(TypeError, match=r"nnx\.Linear or nnx\.Conv"):
        tflax.wrap(nnx.Dropout(0.1))
    for lam in (0, -1.0, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="lam"):
            tflax.wrap(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), lam=lam)
        with pytest.raises(ValueError, match="lam"):
            tflax.TrActLinear(3, 2, lam=lam, rngs=nnx.Rngs(0))
    custom = nnx.Linear(3, 2, dot_general=lambda *a, **k: None, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="dot_general"):
        tflax.wrap(custom)
    with pytest.raises(TypeError, match="conv_general_dilated"):
        tflax.TrActConv(3, 2, (3, 3), conv_general_dilated=None, rngs=nnx.Rngs(0))
    conv = tflax.TrActConv(3, 2, (3, 3), input_dilation=2, rngs=nnx.Rngs(0))
    with pytest.raises(NotImplementedError, match="input_dilation"):
        conv(jnp.ones((1, 5, 5, 3)))


BAD_LAMS = [0, 0.0, -0.1, float("nan"), float("inf"), True, "0.1", None]


@pytest.mark.parametrize("lam", BAD_LAMS, ids=repr)
def test_every_layer_refuses_a_bad_lam(lam):
    x = jnp.ones((1, 5, 5, 3))
    with pytest.raises(ValueError, match="lam"):
        tflax.TrActLinear(3, 2, lam=lam, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="lam"):
        tflax.TrActConv(3, 2, (3, 3), lam=lam, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="lam"):
        tflax.wrap(nnx.Conv(3, 2, (3, 3), rngs=nnx.Rngs(0)), lam=lam)
    with pytest.raises(ValueError, match="lam"):
        tflax.TrActDense(2, lam=lam).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="lam"):
        tflax.TrActLinenConv(2, (3, 3), lam=lam).init(jax.random.key(0), x)


def test_unsupported_modules_dtypes_and_shapes_are_named():
    rngs = nnx.Rngs(0)
    for module in (nnx.ConvTranspose(3, 2, (3, 3), rngs=rngs), nnx.LayerNorm(3, rngs=rngs),
                   nnx.BatchNorm(3, rngs=rngs), nnx.LinearGeneral(3, 2, rngs=rngs)):
        with pytest.raises(TypeError, match=type(module).__name__):
            tflax.wrap(module)
    # A complex layer: Flax promotes x to the kernel's dtype; the kernel is what is wrong.
    x = jnp.ones((1, 5, 5, 3), jnp.float32)
    for layer in (tflax.TrActLinear(3, 2, param_dtype=jnp.complex64, rngs=rngs),
                  tflax.TrActConv(3, 2, (3, 3), param_dtype=jnp.complex64, rngs=rngs)):
        with pytest.raises(TypeError, match=r"kernel must have a real floating.*complex64"):
            layer(x)
    with pytest.raises(TypeError, match=r"kernel must have a real floating.*complex64"):
        tflax.TrActDense(2, param_dtype=jnp.complex64).init(jax.random.key(0), x)
    # A kernel larger than the padded input: refused at the call, not later in backward.
    with pytest.raises(ValueError, match="does not fit"):
        tflax.TrActConv(3, 2, (3, 3), padding="VALID", rngs=rngs)(jnp.ones((1, 2, 5, 3)))
    with pytest.raises(ValueError, match="does not fit"):
        tflax.TrActLinenConv(2, (3, 6), padding="VALID").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"x channels \(4\)"):
        tflax.TrActConv(3, 2, (3, 3), rngs=rngs)(jnp.ones((1, 5, 5, 4)))
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 3\)"):
        tflax.TrActLinear(3, 2, rngs=rngs)(jnp.ones((2, 4)))


def _flax_layer_pairs(rng):
    """(name, plain, tract, x shape but the batch) per layer kind: NNX modules, and Linen
    (module, variables) pairs sharing random parameters."""
    for name, plain, shape in [
        ("nnx_linear", nnx.Linear(5, 3, rngs=nnx.Rngs(0)), (5,)),
        ("nnx_conv_reflect_groups", nnx.Conv(4, 6, (3, 3), padding="REFLECT",
                                             feature_group_count=2, rngs=nnx.Rngs(0)),
         (6, 5, 4)),
    ]:
        yield name, plain, tflax.wrap(plain, lam=0.1), shape
    for name, cls, tract_cls, options, shape in [
        ("linen_dense", nn.Dense, tflax.TrActDense, dict(features=3), (5,)),
        ("linen_conv_circular", nn.Conv, tflax.TrActLinenConv,
         dict(features=4, kernel_size=(3, 2), padding="CIRCULAR", strides=2), (6, 5, 3)),
    ]:
        plain, tract = cls(**options), tract_cls(lam=0.1, **options)
        params = plain.init(jax.random.key(0), jnp.ones((1, *shape)))
        params = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype),
                              params)
        yield name, (plain, params), (tract, params), shape


def _layer_grads(layer, x, grad_z):
    """(z, kernel gradient, bias gradient) of <layer(x), grad_z>, jitted."""
    if isinstance(layer, nnx.Module):
        @nnx.jit
        def run(layer):
            grads = nnx.grad(lambda m: jnp.sum(m(x) * grad_z))(layer)
            return layer(x), grads["kernel"][...], grads["bias"][...]
        return run(layer)
    module, variables = layer

    @jax.jit
    def run(variables):
        grads = jax.grad(lambda v: jnp.sum(module.apply(v, x) * grad_z))(variables)
        return module.apply(variables, x), grads["params"]["kernel"], grads["params"]["bias"]
    return run(variables)


def test_empty_batches_give_zero_kernel_grads_in_every_layer():
    rng = np.random.default_rng(0)
    for name, plain, tract, shape in _flax_layer_pairs(rng):
        x = jnp.ones((0, *shape), jnp.float32)
        z_p, k_p, b_p = _layer_grads(plain, x, 1.0)  # loss: sum(z)
        z_t, k_t, b_t = _layer_grads(tract, x, 1.0)
        assert z_t.shape == z_p.shape, name
        assert np.array_equal(k_t, np.zeros(k_p.shape)) and np.array_equal(b_t, b_p), name


def test_integer_inputs_are_promoted_as_by_the_plain_layer():
    """Flax promotes an integer x to the parameters' dtype: the same forward, and the
    kernel gradient is TrAct's of the promoted x (float64 reference)."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.integers(0, 256, (3, 4, 4, 3)), jnp.int32)
    options = dict(features=4, kernel_size=(2, 2), strides=2, use_bias=False,
                   param_dtype=jnp.float64)
    plain, tract = nn.Conv(**options), tflax.TrActLinenConv(lam=0.1, **options)
    params = plain.init(jax.random.key(0), x)
    grad_z = rng.standard_normal((3, 2, 2, 4))
    assert np.array_equal(tract.apply(params, x), plain.apply(params, x))
    grad = jax.grad(lambda p: jnp.sum(tract.apply(p, x) * grad_z))(params)["params"]["kernel"]
    # Disjoint 2x2 patches: rows are the reshaped pixels, (kh, kw, c) order.
    rows = np.asarray(x, np.float64).reshape(3, 2, 2, 2, 2, 3).transpose(0, 1, 3, 2, 4, 5)
    rows = rows.reshape(-1, 12)
    grads = grad_z.reshape(-1, 4)
    b = rows.shape[0]
    expected = np.linalg.solve(rows.T @ rows / b + 0.1 * np.eye(12), rows.T @ grads)
    assert_close(np.asarray(grad).reshape(12, 4), expected, 1e-9)


# --------------------------------------------------------------------------- Linen


def test_linen_default_init_matches_plain():
    key, x = jax.random.key(3), jnp.ones((2, 6, 6, 5))
    conv_options = dict(feature_group_count=5, kernel_init=nn.initializers.zeros)
    for plain, tract in [(nn.Dense(3), tflax.TrActDense(3)),
                         (nn.Conv(5, (3, 3), **conv_options),
                          tflax.linen.TrActConv(5, (3, 3), **conv_options))]:
        plain_params, tract_params = plain.init(key, x), tract.init(key, x)
        assert jax.tree.structure(plain_params) == jax.tree.structure(tract_params)
        for a, b in zip(jax.tree.leaves(plain_params), jax.tree.leaves(tract_params)):
            assert a.shape == b.shape and np.array_equal(a, b)


LINEN_CASES = [CASES[n] for n in ("linear_tokens", "conv2d_cifar_stem",
                                  "conv1d_groups_same_reflect")]


def linen_layers(case):
    if case.kind == "linear":
        return (nn.Dense(case.out, use_bias=case.has_bias),
                tflax.TrActDense(case.out, use_bias=case.has_bias, lam=case.lam))
    padding = ("REFLECT" if case.padding_mode == "reflect" else
               case.padding.upper() if isinstance(case.padding, str) else
               [tuple(p) for p in case.pads])
    options = dict(features=case.out, kernel_size=tuple(case.kernel),
                   strides=tuple(case.stride), padding=padding,
                   kernel_dilation=tuple(case.dilation), feature_group_count=case.groups,
                   use_bias=case.has_bias)
    return nn.Conv(**options), tflax.TrActLinenConv(lam=case.lam, **options)


def linen_outputs_and_grads(layers, params, x, grad_z):
    @jax.jit
    def run(params, x):
        results = []
        for layer in layers:
            def loss(params, x, layer=layer):
                return jnp.sum(layer.apply({"params": params}, x) * grad_z)
            results.append((layer.apply({"params": params}, x),
                            *jax.grad(loss, argnums=(0, 1))(params, x)))
        return results

    return run(params, x)


@pytest.mark.parametrize("case", LINEN_CASES, ids=case_id)
def test_linen_layer_loads_plain_params_and_gives_tract_grads(case):
    x, kernel, bias, grad_z = flax_arrays(case)
    params = {"kernel": jnp.asarray(kernel)}
    if case.has_bias:
        params["bias"] = jnp.asarray(bias)
    plain, tract = linen_layers(case)
    assert isinstance(tract, type(plain))
    shapes = jax.tree.map(jnp.shape, jax.eval_shape(plain.init, jax.random.key(0), x)["params"])
    assert jax.tree.map(jnp.shape, params) == shapes  # the fixture tree is a plain tree
    (z_p, grads_p, gx_p), (z_t, grads_t, gx_t) = linen_outputs_and_grads(
        (plain, tract), params, x, grad_z)
    assert np.array_equal(z_t, z_p) and np.array_equal(gx_t, gx_p)
    assert_close(to_torch_layout(case, grads_t["kernel"]), case.grad_weight, 1e-8)
    if case.has_bias:
        assert np.array_equal(grads_t["bias"], grads_p["bias"])


@pytest.mark.parametrize("padding, x_shape, kernel_size", [
    ("CIRCULAR", (3, 5, 6, 2), (3, 2)),     # two batch dims
    ("CAUSAL", (7, 3), (3,)),               # unbatched 1-D
])
def test_linen_conv_padding_modes_and_batch_dims_match_plain(padding, x_shape, kernel_size):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape)
    options = dict(features=4, kernel_size=kernel_size, padding=padding,
                   mask=jnp.asarray(rng.random((*kernel_size, x_shape[-1], 4)) > 0.3))
    plain, tract = nn.Conv(**options), tflax.TrActLinenConv(lam=0.1, **options)
    params = plain.init(jax.random.key(1), x)["params"]
    params = {"kernel": params["kernel"], "bias": jnp.asarray(rng.standard_normal(4))}
    z_shape = jax.eval_shape(lambda x: plain.apply({"params": params}, x), x).shape
    grad_z = rng.standard_normal(z_shape)
    (z_p, grads_p, gx_p), (z_t, grads_t, gx_t) = linen_outputs_and_grads(
        (plain, tract), params, x, grad_z)
    assert np.array_equal(z_t, z_p) and np.array_equal(gx_t, gx_p)
    assert np.array_equal(grads_t["bias"], grads_p["bias"])
    # Masked entries get no gradient; the others are TrAct's, not the plain ones.
    assert np.all(np.asarray(grads_t["kernel"])[~np.asarray(options["mask"])] == 0)
    assert not np.allclose(grads_t["kernel"], grads_p["kernel"])


def test_linen_named_submodule_loads_a_plain_model_tree():
    class Net(nn.Module):
        tract: bool

        @nn.compact
        def __call__(self, x):
            layer = (tflax.TrActDense(4, lam=0.1, name="stem") if self.tract
                     else nn.Dense(4, name="stem"))
            return nn.Dense(2, name="head")(jax.nn.relu(layer(x)))

    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 5)))
    variables = Net(tract=False).init(jax.random.key(0), x)
    assert np.array_equal(Net(tract=True).apply(variables, x),
                          Net(tract=False).apply(variables, x))
    with pytest.raises(ValueError, match="lam"):
        tflax.TrActDense(4, lam=0).init(jax.random.key(0), x)


# --------------------------------------------------------------------------- examples


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses (eqx.Module) look their module up there
    spec.loader.exec_module(module)
    return module


def test_flax_example_trains():
    need("optax")
    losses = load_example("flax_example").main(steps=2)
    assert len(losses) == 2 and np.all(np.isfinite(losses))


def test_equinox_example_trains_and_pools_the_vmapped_batch():
    need("equinox")
    need("optax")
    example = load_example("equinox_example")
    losses = example.main(steps=2)
    assert len(losses) == 2 and np.all(np.isfinite(losses))

    # The example's per-example layer, vmapped, gets the batched call's TrAct gradient
    # (the shapes of the example's stem: its init is compiled already).
    import equinox as eqx

    layer = example.teqx.TrActConv2d(3, 16, 3, padding=1, dtype=jnp.float32, lam=0.1,
                                     key=jax.random.key(0))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.random((6, 3, 8, 8), dtype=np.float32))
    grad_z = jnp.asarray(rng.standard_normal((6, 16, 8, 8), dtype=np.float32))

    def example_grad(layer, image, g):
        return eqx.filter_grad(lambda m: jnp.sum(m(image) * g))(layer).weight

    @eqx.filter_jit
    def grads(layer):
        per_example = eqx.filter_grad(lambda m: jnp.sum(jax.vmap(m)(images) * grad_z))(layer)
        batched = jax.grad(lambda w: jnp.sum(tj.conv(
            jnp.moveaxis(images, 1, -1), jnp.transpose(w, (2, 3, 1, 0)), None,
            padding=1, lam=0.1) * jnp.moveaxis(grad_z, 1, -1)))(layer.weight)
        # lax.map is a loop, not a vmap: one Gram per example.
        separate = jax.lax.map(lambda xg: example_grad(layer, *xg), (images, grad_z))
        return per_example.weight, batched, separate.sum(0)

    per_example, batched, separate = grads(layer)
    assert_close(per_example, batched, 1e-5, "vmapped per-example vs batched")
    assert np.linalg.norm(separate - batched) > 1e-2 * np.linalg.norm(batched)


EQX_CONVS = [  # (dims, in, out, kernel, spatial, options): every eqx.nn.Conv option
    (2, 3, 4, 3, (7, 6), dict(use_bias=False)),
    (2, 3, 4, (3, 2), (7, 8), dict(padding=((1, 2), (0, 1)), padding_mode="REFLECT",
                                   stride=2)),
    (2, 4, 6, 3, (6, 7), dict(padding="SAME", padding_mode="CIRCULAR", groups=2,
                              dilation=(1, 2))),
    (1, 2, 3, 5, (9,), dict(padding=2, padding_mode="REPLICATE", use_bias=False)),
    (3, 2, 2, 2, (4, 5, 3), dict(padding="VALID", stride=(1, 2, 1))),
    (2, 3, 5, 4, (9, 7), dict(padding="SAME_LOWER", stride=4)),
    (2, 3, 3, (2, 3), (6, 7), dict(padding=(1, -1), groups=3, stride=(1, 2))),  # depthwise
    (1, 2, 4, 3, (10,), dict(padding="SAME", padding_mode="REFLECT", stride=3, dilation=2)),
    (3, 2, 4, 3, (4, 4, 5), dict(padding=1, padding_mode="CIRCULAR", groups=2)),
]


def eqx_receptive_fields(eqx, conv, dims, options, x):
    """(b, C * K) rows, (channel, taps) order: the plain layer's own padding and conv
    with one-hot filters, float64, vmapped over the examples of x."""
    c_in, n_all = conv.in_channels, conv.in_channels * int(np.prod(conv.kernel_size))
    eye = jnp.eye(n_all).reshape(n_all, c_in, *conv.kernel_size)
    probe = eqx.nn.Conv(dims, c_in, n_all, conv.kernel_size, use_bias=False,
                        dtype=jnp.float64, key=jax.random.key(0),
                        **{k: v for k, v in options.items() if k not in ("use_bias", "groups")})
    probe = eqx.tree_at(lambda m: m.weight, probe, eye)
    fields = np.asarray(jax.vmap(probe)(jnp.asarray(x, jnp.float64)))  # (B, C*K, *out)
    return np.moveaxis(fields.reshape(*fields.shape[:2], -1), 1, -1).reshape(-1, n_all)


def check_eqx_conv(index, make, weight_of, modes=("jit", "eager")):
    """Vmapped over a batch, as Equinox runs it: forward, input and bias gradients bitwise
    eqx.nn.Conv's; the weight gradient TrAct's over the whole batch (against a float64
    reference from the plain layer's own receptive fields). ``make(conv)`` is the TrAct
    layer, ``weight_of(grads)`` its weight gradient; eager runs in every other case only
    (op by op it is slow)."""
    import equinox as eqx

    dims, c_in, c_out, kernel, spatial, options = EQX_CONVS[index]
    dtype = "float64" if index % 3 == 0 else "float32"  # one compile per geometry
    conv = eqx.nn.Conv(dims, c_in, c_out, kernel, dtype=jnp.dtype(dtype),
                       key=jax.random.key(1), **options)
    layer = make(conv)
    rng = np.random.default_rng(dims)
    x = jnp.asarray(rng.standard_normal((2, c_in, *spatial)), dtype)
    g = jnp.asarray(rng.standard_normal(jax.eval_shape(jax.vmap(conv), x).shape), dtype)

    def run(model, x):
        def loss(model_and_x):
            model, x = model_and_x
            return jnp.sum(jax.vmap(model)(x) * g)
        return jax.vmap(model)(x), *eqx.filter_grad(loss)((model, x))

    # XLA fuses the jitted sums alike where eager ops differ.
    runs = {"jit": eqx.filter_jit(run), "eager": run}
    for mode in [m for m in modes if m == "jit" or index % 2]:
        z_plain, grads_plain, gx_plain = runs[mode](conv, x)
        z, grads, gx = runs[mode](layer, x)
        assert z.dtype == z_plain.dtype and np.array_equal(z, z_plain), mode
        assert np.array_equal(gx, gx_plain), mode
        bias_grad = getattr(grads, "conv", grads).bias
        if conv.use_bias:
            assert np.array_equal(bias_grad, grads_plain.bias), mode
        else:
            assert bias_grad is None

    rows = eqx_receptive_fields(eqx, conv, dims, options, x)
    groups = options.get("groups", 1)
    c_g, m_g = c_in // groups, c_out // groups
    grad_rows = np.moveaxis(np.asarray(g, np.float64).reshape(2, c_out, -1), 1, -1)
    grad_rows = grad_rows.reshape(-1, c_out)
    k = int(np.prod(conv.kernel_size))
    for group in range(groups):
        xg = rows[:, group * c_g * k:(group + 1) * c_g * k]
        gg = grad_rows[:, group * m_g:(group + 1) * m_g]
        b, n = xg.shape
        expected = np.linalg.solve(xg.T @ xg / b + 0.1 * np.eye(n), xg.T @ gg).T
        got = np.asarray(weight_of(grads)[group * m_g:(group + 1) * m_g], np.float64)
        assert_close(got.reshape(m_g, -1), expected, 1e-9 if dtype == "float64" else 2e-5,
                     f"group {group}")


# --------------------------------------------------------------------------- first layer


class NNXStem(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), strides=2, use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)

    def __call__(self, x):
        return jax.nn.relu(self.bn(self.conv(x)))


class NNXResNet(nnx.Module):
    """The head defined first and called last: the order of a forward, not of attributes."""

    def __init__(self, rngs):
        self.head = nnx.Linear(4, 3, rngs=rngs)
        self.stem = NNXStem(rngs)
        self.blocks = nnx.List([nnx.Conv(4, 4, (3, 3), rngs=rngs)])
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x, train=False):
        x = self.stem(x)
        for block in self.blocks:
            x = x + jax.nn.relu(block(x))
        return self.head(self.drop(x, deterministic=not train).mean(axis=(1, 2)))


class NNXViT(nnx.Module):
    """4x4 patches, a class token and position embeddings (Params of the model itself,
    called before nothing), one attention block, a head on the class token."""

    def __init__(self, rngs):
        self.cls_token = nnx.Param(jnp.asarray(
            np.random.default_rng(0).standard_normal((1, 1, 6))))
        self.pos_embed = nnx.Param(jnp.zeros((1, 5, 6)))
        self.patch_embed = nnx.Conv(3, 6, (4, 4), strides=4, padding="VALID",
                                    param_dtype=jnp.float64, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(2, 6, param_dtype=jnp.float64,
                                                decode=False, rngs=rngs)
        self.norm = nnx.LayerNorm(6, param_dtype=jnp.float64, rngs=rngs)
        self.head = nnx.Linear(6, 3, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, images):
        tokens = self.patch_embed(images).reshape(images.shape[0], -1, 6)
        cls = jnp.broadcast_to(self.cls_token[...], (images.shape[0], 1, 6))
        tokens = jnp.concatenate([cls, tokens], axis=1) + self.pos_embed[...]
        normed = self.norm(tokens)
        tokens = tokens + self.attention(normed, normed)
        return self.head(tokens[:, 0])


def test_nnx_wrap_first_layer_follows_the_forward_and_leaves_the_rest():
    model = NNXResNet(nnx.Rngs(0))
    before = nnx.state(model)
    kernel = model.stem.conv.kernel
    x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)  # only shapes matter
    assert tflax.wrap_first_layer(model, {"x": x, "train": True}, lam=0.2) == "stem.conv"
    assert type(model.stem.conv) is tflax.TrActConv and model.stem.conv.lam == 0.2
    assert model.stem.conv.kernel is kernel  # the same Param: optimizer state still fits
    after = nnx.state(model)
    assert jax.tree.structure(after) == jax.tree.structure(before)
    # Traced on a copy: batch statistics and RNG counts are as they were.
    def values(leaf):
        return jax.random.key_data(leaf) if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key) \
            else leaf

    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True):
        assert np.array_equal(values(a), values(b))
    sequential = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), jax.nn.relu)
    assert tflax.wrap_first_layer(sequential, (jnp.ones((2, 3)),)) == "layers.0"  # args
    assert type(sequential.layers[0]) is tflax.TrActLinear


def test_nnx_wrap_first_layer_gives_the_vit_patch_embedding_tracts_gradient():
    """Float64: the patch embedding's kernel gradient is (G^T X)(X^T X / b + lam I)^-1
    from the plain model's gradient G^T X and the patches X; every other gradient, the
    forward and the input gradient are the plain model's."""
    model = NNXViT(nnx.Rngs(0))
    plain = nnx.clone(model)
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.standard_normal((3, 8, 8, 3)))
    grad_z = jnp.asarray(rng.standard_normal((3, 3)))
    assert tflax.wrap_first_layer(model, images) == "patch_embed"
    (z_p, grads_p, gx_p), (z, grads, gx) = outputs_and_grads((plain, model), images, grad_z)
    assert_close(z, z_p, 1e-12, "z")
    assert_close(gx, gx_p, 1e-12, "grad_x")
    flat, flat_p = nnx.to_flat_state(grads), nnx.to_flat_state(grads_p)
    assert [path for path, _ in flat] == [path for path, _ in flat_p]
    for (path, g), (_, g_p) in zip(flat, flat_p, strict=True):
        if path != ("patch_embed", "kernel"):
            assert_close(g[...], g_p[...], 1e-10, str(path))
    # Disjoint 4x4 patches: the rows are the reshaped pixels, (kh, kw, c) order.
    rows = np.asarray(images).reshape(3, 2, 4, 2, 4, 3).transpose(0, 1, 3, 2, 4, 5)
    rows = rows.reshape(-1, 48)
    plain_grad = np.asarray(grads_p["patch_embed"]["kernel"][...]).reshape(48, 6)
    gram = rows.T @ rows / rows.shape[0] + 0.1 * np.eye(48)
    expected = np.linalg.solve(gram, plain_grad)
    got = np.asarray(grads["patch_embed"]["kernel"][...]).reshape(48, 6)
    assert_close(got, expected, 1e-9, "patch_embed kernel grad")
    assert np.linalg.norm(plain_grad - expected) > 1e-2 * np.linalg.norm(expected)


class NormFirst(nnx.Module):
    def __init__(self, norm, rngs):
        self.norm = norm
        self.layers = nnx.Sequential(nnx.Conv(3, 4, (3, 3), rngs=rngs), jax.nn.relu)

    def __call__(self, x):
        return self.layers(self.norm(x))


def test_nnx_wrap_first_layer_names_what_it_cannot_wrap():
    rngs, x = nnx.Rngs(0), jnp.ones((2, 6, 6, 3), jnp.float32)
    for norm in (nnx.BatchNorm(3, rngs=rngs), nnx.LayerNorm(3, rngs=rngs),
                 nnx.LayerNorm(3, use_scale=False, use_bias=False, rngs=rngs)):  # no params
        model = NormFirst(norm, rngs)
        message = (rf"normalises its input with model\.norm \(nnx\.{type(norm).__name__}\)"
                   rf".*model\.layers\.layers\[0\] = tract_core\.flax\.wrap")
        with pytest.raises(TypeError, match=message):
            tflax.wrap_first_layer(model, x)
        assert type(model.layers.layers[0]) is nnx.Conv  # untouched
    model = NormFirst(nnx.ConvTranspose(3, 3, (3, 3), rngs=rngs), rngs)
    with pytest.raises(TypeError, match=r"first layer model\.norm \(ConvTranspose\) is not"):
        tflax.wrap_first_layer(model, x)
    with pytest.raises(ValueError, match=r"itself an nnx\.Conv: use wrap"):
        tflax.wrap_first_layer(nnx.Conv(3, 2, (3, 3), rngs=rngs), x)
    with pytest.raises(ValueError, match="called no layer"):
        tflax.wrap_first_layer(nnx.Sequential(jax.nn.relu), x)
    with pytest.raises(ValueError, match="lam"):
        tflax.wrap_first_layer(NNXResNet(rngs), x, lam=0)


# --------------------------------------------------------------------------- Equinox


@pytest.mark.parametrize("index", [0, 2, 6])
def test_equinox_conv_matches_the_plain_layer_but_for_the_weight_grad(index):
    """tract_core.equinox.wrap's twin, jitted, on a few eqx.nn.Conv options (the example's
    recipe, the same code, is checked on all of them above)."""
    need("equinox")
    import tract_core.equinox as teqx

    check_eqx_conv(index, lambda conv: teqx.wrap(conv, lam=0.1), lambda grads: grads.weight,
                   modes=("jit",))


def test_equinox_linear_matches_the_plain_layer_but_for_the_weight_grad():
    """Vmapped over the batch and jitted, float64: the forward, input and bias gradients
    are eqx.nn.Linear's, the weight gradient TrAct's over the whole batch."""
    eqx = need("equinox")
    import tract_core.equinox as teqx

    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((7, 5)))
    g = jnp.asarray(rng.standard_normal((7, 3)))
    plain = eqx.nn.Linear(5, 3, dtype=jnp.float64, key=jax.random.key(0))
    tract = teqx.TrActLinear(5, 3, dtype=jnp.float64, lam=0.2, key=jax.random.key(0))
    assert isinstance(tract, eqx.nn.Linear) and tract.lam == 0.2
    assert np.array_equal(tract.weight, plain.weight)  # the same init

    @eqx.filter_jit
    def run(model):
        def loss(model, x):
            return jnp.sum(jax.vmap(model)(x) * g)
        return (jax.vmap(model)(x), eqx.filter_grad(loss)(model, x),
                jax.grad(lambda x: loss(model, x))(x))

    z_p, grads_p, gx_p = run(plain)
    z, grads, gx = run(tract)
    assert_close(z, z_p, 1e-14, "z")
    assert_close(gx, gx_p, 1e-14, "grad_x")
    assert np.array_equal(grads.bias, grads_p.bias)
    xs, gs = np.asarray(x), np.asarray(g)
    expected = np.linalg.solve(xs.T @ xs / 7 + 0.2 * np.eye(5), xs.T @ gs).T  # (out, in)
    assert_close(grads.weight, expected, 1e-12, "weight grad")
    assert_close(grads_p.weight, gs.T @ xs, 1e-12)  # the plain one: G^T X, far from it
    # 'scalar' features, as eqx.nn.Linear takes them.
    scalar = teqx.TrActLinear("scalar", "scalar", dtype=jnp.float64, key=jax.random.key(1))
    plain = eqx.nn.Linear("scalar", "scalar", dtype=jnp.float64, key=jax.random.key(1))
    assert scalar(jnp.asarray(0.5)).shape == () and np.isclose(scalar(jnp.asarray(0.5)),
                                                               plain(jnp.asarray(0.5)))


def test_equinox_wrap_keeps_the_arrays_and_refuses_other_layers():
    eqx = need("equinox")
    import tract_core.equinox as teqx

    key = jax.random.key(0)
    conv = eqx.nn.Conv2d(3, 4, 3, stride=2, padding="SAME", padding_mode="REFLECT",
                         dtype=jnp.float32, key=key)
    twin = teqx.wrap(conv, lam=0.2)
    assert type(twin) is teqx.TrActConv2d and isinstance(twin, eqx.nn.Conv2d)
    assert twin.weight is conv.weight and twin.bias is conv.bias and twin.lam == 0.2
    assert (twin.stride, twin.padding, twin.padding_mode) == (conv.stride, conv.padding,
                                                              conv.padding_mode)
    # The same leaves (lam is static): a plain checkpoint loads into the TrAct model.
    assert jax.tree.leaves(twin) == jax.tree.leaves(conv)
    image = jnp.asarray(np.random.default_rng(0).standard_normal((3, 7, 7)), jnp.float32)
    assert np.array_equal(twin(image), conv(image))
    assert teqx.wrap(twin, lam=0.05).lam == 0.05 and twin.lam == 0.2
    for plain, cls, args in [(eqx.nn.Conv1d, teqx.TrActConv1d, (2, 2, 3)),
                             (eqx.nn.Conv3d, teqx.TrActConv3d, (2, 2, 3)),
                             (eqx.nn.Conv, teqx.TrActConv, (2, 2, 2, 3)),
                             (eqx.nn.Linear, teqx.TrActLinear, (2, 3))]:
        assert type(teqx.wrap(plain(*args, key=key))) is cls
        built = cls(*args, lam=0.3, key=key)  # the plain layer's init, and lam
        assert isinstance(built, plain) and built.lam == 0.3
        assert np.array_equal(built.weight, plain(*args, key=key).weight)
    for module in (eqx.nn.ConvTranspose2d(3, 4, 3, key=key), eqx.nn.LayerNorm(3),
                   eqx.nn.MLP(2, 2, 4, 1, key=key)):
        with pytest.raises(TypeError, match=type(module).__name__):
            teqx.wrap(module)
    with pytest.raises(ValueError, match="lam"):
        teqx.wrap(conv, lam=0.0)
    with pytest.raises(ValueError, match="lam"):
        teqx.TrActConv2d(3, 4, 3, lam=-1.0, key=key)
    with pytest.raises(ValueError, match=r"x must have shape \(in_channels"):
        twin(jnp.ones((2, 3, 7, 7), jnp.float32))  # a batch: vmap the layer instead
    # An empty batch: no error, zero gradients, as for the plain layer.
    grads = eqx.filter_jit(eqx.filter_grad(
        lambda m: jnp.sum(jax.vmap(m)(jnp.ones((0, 3, 7, 7), jnp.float32)) ** 2)))(twin)
    assert np.array_equal(grads.weight, np.zeros(conv.weight.shape))
    assert np.array_equal(grads.bias, np.zeros(conv.bias.shape))


def test_equinox_wrap_first_layer_follows_the_forward():
    eqx = need("equinox")
    import tract_core.equinox as teqx

    class Net(eqx.Module):
        head: eqx.nn.Linear  # defined first, called last
        layers: list

        def __init__(self, first, key):
            self.head = eqx.nn.Linear(4, 2, key=key)
            self.layers = [first, eqx.nn.Conv2d(3, 4, 3, key=key)]

        def __call__(self, image, *, scale=1.0):
            for layer in self.layers:
                image = layer(image)
            return self.head(scale * image.mean(axis=(1, 2)))

    key = jax.random.key(0)
    model = Net(eqx.nn.Lambda(jnp.tanh), key)  # no arrays: not a layer
    image = jax.ShapeDtypeStruct((3, 8, 8), jnp.float64)  # the layers' default dtype (x64)
    new, path = teqx.wrap_first_layer(model, {"image": image, "scale": 2.0}, 0.2)
    assert path == "layers.1" and type(new.layers[1]) is teqx.TrActConv2d
    assert new.layers[1].lam == 0.2 and new.layers[1].weight is model.layers[1].weight
    assert type(model.layers[1]) is eqx.nn.Conv2d  # immutable: a new model
    with pytest.raises(TypeError, match=r"normalises its input with 'layers\.0' \(GroupNorm\)"
                                        r".*'layers\.1'"):
        teqx.wrap_first_layer(Net(eqx.nn.GroupNorm(1, 3), key), image)
    with pytest.raises(TypeError, match=r"'layers\.0' \(ConvTranspose2d\) is not"):
        teqx.wrap_first_layer(Net(eqx.nn.ConvTranspose2d(3, 3, 1, key=key), key), image)
    with pytest.raises(ValueError, match=r"itself an eqx\.nn\.Conv2d: use wrap"):
        teqx.wrap_first_layer(model.layers[1], image)
    with pytest.raises(ValueError, match="called no layer"):
        teqx.wrap_first_layer(eqx.nn.Lambda(jnp.tanh), image)
