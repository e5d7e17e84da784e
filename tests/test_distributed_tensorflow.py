"""Exact distributed TrAct in TensorFlow: MirroredStrategy over 2 logical CPU devices.

Runs in a subprocess: logical devices must be configured before TensorFlow starts, and
other test files in the same process may have started it already.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import CASES, FIXTURES, assert_close, need

need("tensorflow")
need("keras")

CASE_NAMES = ["linear_rows", "conv2d_cifar_stem", "conv3d_stride_groups", "linear_b_lt_n"]

SCRIPT = r"""
import json, sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, sys.argv[1])
from conftest import CASES
import tract_core.tensorflow as ttf

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
out = {}
for name in json.loads(sys.argv[2]):
    case = next(c for c in CASES if c.name == name)
    x, g = case.x, case.grad_z
    if case.kind == "linear":
        kernel = case.weight.T
        call = lambda xs, k, sync: ttf.dense(xs, k, lam=case.lam, sync=sync)
    else:
        d = case.x.ndim - 2
        x, g = np.moveaxis(x, 1, -1), np.moveaxis(g, 1, -1)
        kernel = np.transpose(case.weight, (*range(2, d + 2), 1, 0))
        pads = [tuple(p) for p in case.pads]
        call = lambda xs, k, sync: ttf.conv(xs, k, strides=case.stride, padding=pads,
                                            kernel_dilation=case.dilation,
                                            feature_group_count=case.groups, lam=case.lam,
                                            sync=sync)
    half = x.shape[0] // 2
    parts = [(x[:half], g[:half]), (x[half:], g[half:])]
    for sync in (True, False):
        def replica_fn(k):
            i = tf.distribute.get_replica_context().replica_id_in_sync_group
            xr = tf.switch_case(i, [lambda p=p: tf.constant(p[0]) for p in parts])
            gr = tf.switch_case(i, [lambda p=p: tf.constant(p[1]) for p in parts])
            with tf.GradientTape() as tape:
                tape.watch(k)
                loss = tf.reduce_sum(call(xr, k, sync) * gr)
            return tape.gradient(loss, k)
        kernel_t = tf.constant(kernel)
        grads = strategy.run(replica_fn, args=(kernel_t,))
        total = strategy.reduce(tf.distribute.ReduceOp.SUM, grads, axis=None).numpy()
        if case.kind != "linear":
            d = case.x.ndim - 2
            total = np.transpose(total, (d + 1, d, *range(d)))
        else:
            total = total.T
        out[f"{name}/{sync}"] = total.tolist()

# Keras on TensorFlow: TrActConv2D(sync=True) in a MirroredStrategy, same check.
import keras
import tract_core.keras as tk
case = next(c for c in CASES if c.name == "conv2d_cifar_stem")
x, g = np.moveaxis(case.x, 1, -1), np.moveaxis(case.grad_z, 1, -1)
half = x.shape[0] // 2
parts = [(x[:half], g[:half]), (x[half:], g[half:])]
for sync in (True, False):
    with strategy.scope():
        layer = tk.TrActConv2D(case.weight.shape[0], 3, padding="same", lam=case.lam,
                               sync=sync, dtype="float64")
        layer.build((None, *x.shape[1:]))
        layer.set_weights([np.transpose(case.weight, (2, 3, 1, 0)), case.bias])

    def replica_fn():
        i = tf.distribute.get_replica_context().replica_id_in_sync_group
        xr = tf.switch_case(i, [lambda p=p: tf.constant(p[0]) for p in parts])
        gr = tf.switch_case(i, [lambda p=p: tf.constant(p[1]) for p in parts])
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(xr) * gr)
        return tape.gradient(loss, layer.kernel)

    grads = strategy.run(replica_fn)
    total = strategy.reduce(tf.distribute.ReduceOp.SUM, grads, axis=None).numpy()
    out[f"keras/{sync}"] = np.transpose(total, (3, 2, 0, 1)).tolist()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def mirrored_results():
    env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(FIXTURES.parent),
                             json.dumps(CASE_NAMES)],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case_name", CASE_NAMES)
def test_mirrored_sync_equals_full_batch(mirrored_results, case_name):
    case = next(c for c in CASES if c.name == case_name)
    assert_close(np.array(mirrored_results[f"{case_name}/True"]), case.grad_weight, 1e-9)


def test_unsynced_replicas_use_local_statistics(mirrored_results):
    case = next(c for c in CASES if c.name == "conv2d_cifar_stem")
    grad = np.array(mirrored_results[f"{case.name}/False"])
    assert np.linalg.norm(grad - case.grad_weight) / np.linalg.norm(case.grad_weight) > 1e-3


@pytest.mark.parametrize("sync", [True, False])
def test_keras_layer_sync_in_mirrored_strategy(mirrored_results, sync):
    case = next(c for c in CASES if c.name == "conv2d_cifar_stem")
    grad = np.array(mirrored_results[f"keras/{sync}"])
    error = np.linalg.norm(grad - case.grad_weight) / np.linalg.norm(case.grad_weight)
    assert error <= 1e-9 if sync else error > 1e-3
