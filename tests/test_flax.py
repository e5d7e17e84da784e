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

    layer = example.TrActConv(eqx.nn.Conv2d(3, 16, 3, padding=1, dtype=jnp.float32,
                                            key=jax.random.key(0)), lam=0.1)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.random((6, 3, 8, 8), dtype=np.float32))
    grad_z = jnp.asarray(rng.standard_normal((6, 16, 8, 8), dtype=np.float32))

    def example_grad(layer, image, g):
        return eqx.filter_grad(lambda m: jnp.sum(m(image) * g))(layer).conv.weight

    @eqx.filter_jit
    def grads(layer):
        per_example = eqx.filter_grad(lambda m: jnp.sum(jax.vmap(m)(images) * grad_z))(layer)
        batched = jax.grad(lambda w: jnp.sum(tj.conv(
            jnp.moveaxis(images, 1, -1), jnp.transpose(w, (2, 3, 1, 0)), None,
            padding=1, lam=0.1) * jnp.moveaxis(grad_z, 1, -1)))(layer.conv.weight)
        # lax.map is a loop, not a vmap: one Gram per example.
        separate = jax.lax.map(lambda xg: example_grad(layer, *xg), (images, grad_z))
        return per_example.conv.weight, batched, separate.sum(0)

    per_example, batched, separate = grads(layer)
    assert_close(per_example, batched, 1e-5, "vmapped per-example vs batched")
    assert np.linalg.norm(separate - batched) > 1e-2 * np.linalg.norm(batched)


EQX_CONVS = [  # (dims, in, out, kernel, options): every eqx.nn.Conv option the recipe maps
    (2, 3, 4, 3, dict(use_bias=False)),
    (2, 3, 4, (3, 2), dict(padding=((1, 2), (0, 1)), padding_mode="REFLECT", stride=2)),
    (2, 4, 6, 3, dict(padding="SAME", padding_mode="CIRCULAR", groups=2, dilation=(1, 2))),
    (1, 2, 3, 5, dict(padding=2, padding_mode="REPLICATE", use_bias=False)),
    (3, 2, 2, 2, dict(padding="VALID", stride=(1, 2, 1))),
    (2, 3, 5, 4, dict(padding="SAME_LOWER", stride=4)),
]


@pytest.mark.parametrize("dims, c_in, c_out, kernel, options", EQX_CONVS,
                         ids=[str(i) for i in range(len(EQX_CONVS))])
def test_equinox_recipe_matches_the_plain_layer(dims, c_in, c_out, kernel, options):
    """Forward and input gradient as eqx.nn.Conv computes them; the weight gradient is
    TrAct's (against a float64 reference from explicit patches); no bias, any padding
    mode."""
    need("equinox")
    import equinox as eqx

    example = load_example("equinox_example")
    with jax.enable_x64(True):
        conv = eqx.nn.Conv(dims, c_in, c_out, kernel, dtype=jnp.float64,
                           key=jax.random.key(1), **options)
        layer = example.TrActConv(conv, lam=0.1)
        rng = np.random.default_rng(dims)
        x = jnp.asarray(rng.standard_normal((c_in, *(7,) * dims)))
        z_plain = conv(x)
        z = layer(x)
        np.testing.assert_allclose(z, z_plain, rtol=1e-12, atol=1e-12)
        g = jnp.asarray(rng.standard_normal(z.shape))
        gx_plain = jax.grad(lambda x: jnp.sum(conv(x) * g))(x)
        gx = jax.grad(lambda x: jnp.sum(layer(x) * g))(x)
        np.testing.assert_allclose(gx, gx_plain, rtol=1e-12, atol=1e-12)
        grad_w = eqx.filter_grad(lambda m: jnp.sum(m(x) * g))(layer).conv.weight
        # Patches by the plain layer's own conv with one-hot filters, one per entry.
        n_all = c_in * int(np.prod(conv.kernel_size))
        eye = jnp.eye(n_all).reshape(n_all, c_in, *conv.kernel_size)
        probe = eqx.nn.Conv(dims, c_in, n_all, kernel, use_bias=False, dtype=jnp.float64,
                            key=jax.random.key(0), **{k: v for k, v in options.items()
                                                      if k not in ("use_bias", "groups")})
        probe = eqx.tree_at(lambda m: m.weight, probe, eye)
        rows = np.asarray(probe(x)).reshape(n_all, -1).T  # (b, C * K), (channel, taps)
    groups = options.get("groups", 1)
    c_g, m_g = c_in // groups, c_out // groups
    grads = np.asarray(g).reshape(c_out, -1).T
    k = int(np.prod(conv.kernel_size))
    for group in range(groups):
        xg = rows[:, group * c_g * k:(group + 1) * c_g * k]
        gg = grads[:, group * m_g:(group + 1) * m_g]
        b, n = xg.shape
        expected = np.linalg.solve(xg.T @ xg / b + 0.1 * np.eye(n), xg.T @ gg).T
        got = np.asarray(grad_w[group * m_g:(group + 1) * m_g]).reshape(m_g, -1)
        assert_close(got, expected, 1e-9, f"group {group}")


def test_equinox_recipe_refuses_other_modules():
    need("equinox")
    import equinox as eqx

    example = load_example("equinox_example")
    with pytest.raises(TypeError, match=r"eqx\.nn\.Conv"):
        example.TrActConv(eqx.nn.Linear(3, 4, key=jax.random.key(0)))
