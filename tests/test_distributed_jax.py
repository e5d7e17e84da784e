"""Exact distributed TrAct in JAX: 2 forced host devices, each with half a batch.

With ``axis_name`` every device preconditions its own kernel gradient with the psum'd Gram
and row count, so the sum of the devices' gradients is the fixtures' full-batch gradient.
XLA_FLAGS must be set before jax starts, and other test files import jax first: one
subprocess runs every scenario (start-up and compiles dominate) and writes an npz.
"""

import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import CASES, assert_close, need

need("jax")

TESTS = pathlib.Path(__file__).parent
# dense, dense with b < n (local and global), conv2d, grouped conv3d; equal halves
# (shard_map and pmap need equal shards).
CASE_NAMES = ["linear_rows", "linear_b_lt_n", "conv2d_cifar_stem", "conv3d_stride_groups"]
MODES = ["shard_map_outer", "shard_map_inner", "pmap"]

SCRIPT = textwrap.dedent("""
    import functools, sys
    import numpy as np
    import jax, jax.numpy as jnp
    from jax import lax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from conftest import CASES, Case
    import tract_core.jax as tj
    from test_jax import (case_arrays, case_ops, conv_options, kernel_to_torch,
                          patches_reference, tract_reference)

    assert jax.device_count() == 2, jax.devices()
    mesh = jax.make_mesh((2,), ("d",))
    results = {}

    def torch_layout(case, kernel_grad):
        kernel_grad = np.asarray(kernel_grad, dtype=np.float64)
        return kernel_grad.T if case.kind == "linear" else kernel_to_torch(kernel_grad)

    def gradient(case, mode, axis_name):
        x, kernel, bias, grad_z = case_arrays(case, jnp.float64)
        op = base = functools.partial(case_ops(case)[0], axis_name=axis_name)
        if mode == "vmap":  # per-example calls inside the shard_map
            one = lambda xi, k, b: base(xi[None], k, b)[0]
            op = lambda x, k, b: jax.vmap(one, in_axes=(0, None, None))(x, k, b)

        def local_loss(kernel, x, grad_z):
            return jnp.sum(op(x, kernel, bias) * grad_z)

        if mode == "pmap":
            halves = lambda a: a.reshape(2, a.shape[0] // 2, *a.shape[1:])
            grads = jax.pmap(lambda k, x, g: lax.psum(jax.grad(local_loss)(k, x, g), "d"),
                             axis_name="d", in_axes=(None, 0, 0))(kernel, halves(x),
                                                                  halves(grad_z))
            assert np.array_equal(grads[0], grads[1])
            return grads[0]
        shard = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
        specs = dict(mesh=mesh, in_specs=(P(), P("d"), P("d")), out_specs=P())
        if mode == "accumulate":  # jax.grad inside sums the replicated node's gradient
            groups = case.groups if case.kind != "linear" else 1
            node = tj.accumulating(kernel, feature_group_count=groups)
            summed = jax.jit(jax.shard_map(jax.grad(local_loss), **specs))(
                node, shard(x, P("d")), shard(grad_z, P("d")))
            return tj.finalize(summed).kernel
        args = shard(kernel, P()), shard(x, P("d")), shard(grad_z, P("d"))
        if mode == "shard_map_outer":  # gradient of the summed per-device losses
            total = jax.shard_map(lambda k, x, g: lax.psum(local_loss(k, x, g), "d"), **specs)
            return jax.jit(jax.grad(total))(*args)
        # jax.grad inside: a replicated kernel's gradient comes out summed over devices.
        return jax.jit(jax.shard_map(jax.grad(local_loss), **specs))(*args)

    # A 7x7/2 stem: more patch entries than JAX's explicit-patch limit, so the core takes
    # lax's conv transpose and the structured Gram, under shard_map.
    rng = np.random.default_rng(0)
    stem = Case(name="stem7x7s2", kind="conv2d", x=rng.standard_normal((4, 3, 12, 12)),
                weight=rng.standard_normal((4, 3, 7, 7)), grad_z=rng.standard_normal((4, 4, 6, 6)),
                has_bias=False, padding=None, pads=[[3, 3], [3, 3]], stride=[2, 2],
                dilation=[1, 1], groups=1, lam=0.1)
    CASES.append(stem)
    rows = patches_reference(jnp.asarray(np.moveaxis(stem.x, 1, -1)), (7, 7, 3, 4),
                             conv_options(stem))
    grads = np.moveaxis(stem.grad_z, 1, -1).reshape(1, -1, 4)
    results["stem7x7s2/reference"] = tract_reference(rows, grads, 0.1).reshape(4, 3, 7, 7)

    scenarios = [(name, mode, "d") for name in sys.argv[2].split(",")
                 for mode in sys.argv[3].split(",")]
    scenarios += [("linear_rows", "vmap", "d"), ("conv2d_cifar_stem", "vmap", "d"),
                  ("linear_b_lt_n", "vmap", "d"),
                  ("conv2d_cifar_stem", "shard_map_outer", None),
                  ("linear_rows", "shard_map_inner", None), ("stem7x7s2", "shard_map_inner", "d"),
                  ("stem7x7s2", "vmap", "d"), ("conv3d_stride_groups", "accumulate", None),
                  ("linear_rows", "accumulate", None)]
    for name, mode, axis_name in scenarios:
        case = next(c for c in CASES if c.name == name)
        key = f"{name}/{mode}/{axis_name}"
        try:
            results[key] = torch_layout(case, gradient(case, mode, axis_name))
        except Exception as error:  # reported by the test that reads it
            results[key + "_error"] = np.array(repr(error))
    np.savez(sys.argv[1], **results)
""")


@pytest.fixture(scope="module")
def device_results(tmp_path_factory):
    result = tmp_path_factory.mktemp("jax_devices") / "grads.npz"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_ENABLE_X64": "1", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS),
                                          os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(result), ",".join(CASE_NAMES),
                           ",".join(MODES)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    with np.load(result) as data:
        return {key: data[key] for key in data.files}


def result_of(results, name, mode, axis_name="d"):
    key = f"{name}/{mode}/{axis_name}"
    assert key + "_error" not in results, str(results[key + "_error"])
    return results[key]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case_name", CASE_NAMES)
def test_synced_sum_equals_full_batch(device_results, case_name, mode):
    case = next(c for c in CASES if c.name == case_name)
    assert_close(result_of(device_results, case_name, mode), case.grad_weight, 1e-9,
                 f"{case_name} {mode}")


@pytest.mark.parametrize("case_name", ["linear_rows", "conv2d_cifar_stem", "linear_b_lt_n"])
def test_vmap_inside_shard_map_pools_examples_and_devices(device_results, case_name):
    case = next(c for c in CASES if c.name == case_name)
    assert_close(result_of(device_results, case_name, "vmap"), case.grad_weight, 1e-9)


@pytest.mark.parametrize("mode", ["shard_map_inner", "vmap"])
def test_synced_stem_with_many_patch_entries(device_results, mode):
    assert_close(result_of(device_results, "stem7x7s2", mode), device_results[
        "stem7x7s2/reference"], 1e-9, mode)


@pytest.mark.parametrize("case_name, mode", [("conv2d_cifar_stem", "shard_map_outer"),
                                             ("linear_rows", "shard_map_inner")])
def test_unsynced_devices_use_local_statistics(device_results, case_name, mode):
    case = next(c for c in CASES if c.name == case_name)
    grad = result_of(device_results, case_name, mode, None)
    error = np.linalg.norm(grad - case.grad_weight) / np.linalg.norm(case.grad_weight)
    assert error > 1e-3


@pytest.mark.parametrize("case_name", ["conv3d_stride_groups", "linear_rows"])
def test_accumulating_kernel_summed_over_devices_equals_full_batch(device_results, case_name):
    """An accumulating kernel's statistics summed over devices as its gradient is, then
    finalized: no axis_name needed."""
    case = next(c for c in CASES if c.name == case_name)
    assert_close(result_of(device_results, case_name, "accumulate", None), case.grad_weight,
                 1e-9)


def test_axis_name_of_a_vmap_is_rejected():
    jax = need("jax")
    import jax.numpy as jnp

    import tract_core.jax as tj

    x, kernel = jnp.ones((2, 3, 4)), jnp.ones((4, 5))
    grad = jax.grad(lambda k, x: jnp.sum(tj.dense(x, k, axis_name="v")))
    with pytest.raises(NotImplementedError, match="axis_name"):
        jax.vmap(grad, in_axes=(None, 0), axis_name="v")(kernel, x)


def test_axis_name_must_be_hashable():
    jax = need("jax")
    import tract_core.jax as tj

    with pytest.raises(ValueError, match="axis_name"):
        tj.dense(jax.numpy.ones((2, 3)), jax.numpy.ones((3, 4)), axis_name={"d": 1})
