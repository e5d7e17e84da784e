"""Seeded differential fuzz: random layer geometries through every adapter and mode.

Each case (tests/fuzz.py) runs the TrAct layer and its plain layer in the same dtype and
mode, and checks:

(a) the forward value, the input gradient and the bias gradient equal the plain layer's
    bit for bit (TrAct changes only the weight gradient);
(b) the weight gradient matches an independent float64 reference (receptive fields
    from the framework's own plain conv with one-hot filters, numpy's solve): relative
    Frobenius error <= 1e-8 in float64, <= 1e-3 in float32, smooth [0, 255] images
    included;
(c) a NaN in the input gives a NaN weight gradient, not an exception.

A family runs where its framework is in TRACT_REQUIRE (every installed one without it);
With keras required, the Keras layers run on KERAS_BACKEND. Failing cases print their
geometry; rerun one with ``-k torch-eager-017``. TRACT_FUZZ_SEED and TRACT_FUZZ_SCALE
give other and more cases. ``torch.compile`` cases run in a fresh subprocess: compiled
graphs and caches in a warm process hide failures a user's first step meets.
"""

import contextlib
import dataclasses
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import fuzz
import numpy as np
import pytest
from conftest import REQUIRED, need

ROOT = pathlib.Path(__file__).parent.parent
MODULES = {"torch": "torch", "jax": "jax", "flax": "flax", "tensorflow": "tensorflow",
           "keras": "keras"}


def _families():
    """The families to run: the frameworks named in TRACT_REQUIRE; with keras among them
    only the Keras layers, with flax only the Flax layers (plain JAX has its own list)."""
    if REQUIRED:
        if "keras" in REQUIRED:
            return ["keras"]
        if "flax" in REQUIRED:
            return ["flax"]
        return [f for f in ("torch", "jax", "tensorflow") if f in REQUIRED]
    return [f for f in fuzz.FAMILIES if importlib.util.find_spec(MODULES[f]) is not None]


FAMILIES = _families()
CASES = [case for family in FAMILIES for mode in fuzz.modes(family) if mode != "compile"
         for case in fuzz.cases(family, mode)]
COMPILE_CASES = fuzz.cases("torch", "compile") if "torch" in FAMILIES else []


# --------------------------------------------------------------------------- checks


def _describe_difference(a, p):
    if a.shape != p.shape:
        return f"shape {a.shape} != {p.shape}"
    if a.dtype != p.dtype:
        return f"dtype {a.dtype} != {p.dtype}"
    diff = np.abs(a.astype(np.float64) - p.astype(np.float64))
    diff = diff[np.isfinite(diff)]
    nan_mismatch = int((np.isnan(a) != np.isnan(p)).sum())
    worst = float(diff.max()) if diff.size else 0.0
    return f"max |diff| {worst:.3g}, NaN pattern differs at {nan_mismatch}"


def rounding_failure(name, a, p, tolerance, scale=None):
    """Why ``a`` is not ``p`` to rounding, or None: the relative error over the finite
    entries (or, given ``scale``, the largest ``|a - p|`` over the entry's ``scale``),
    the same NaN/Inf elsewhere."""
    finite = np.isfinite(p)
    if not np.array_equal(a[~finite], p[~finite], equal_nan=True):
        return f"{name}: NaN/Inf differ from the plain layer's"
    if scale is None:
        error = fuzz.relative_error(a[finite], p[finite])
    else:
        diff = np.abs(a.astype(np.float64) - p) / np.where(scale > 0, scale, 1.0)
        error = float(np.max(diff[finite], initial=0.0))
    if not error <= tolerance:
        return f"{name} relative error {error:.3g} against the plain layer's"
    return None


def bias_grad_scale(case):
    """Per output channel, the sum of |dL/dz| over the rows: the scale of a bias
    gradient's rounding, which summed in two orders may differ by much more than its
    own size where the terms cancel."""
    r = np.abs(fuzz.arrays(case)[3])
    channel = 1 if case.kind == "conv" else r.ndim - 1
    return r.sum(axis=tuple(i for i in range(r.ndim) if i != channel))


def empty_batch_results(case):
    """What the plain layer should give for an empty batch (TF's CPU conv returns its
    input's shape there, and its filter gradient can fail)."""
    dtype = np.dtype(case.dtype)
    return {"z": np.zeros(case.z_shape, dtype), "grad_x": np.zeros(case.x_shape, dtype),
            "grad_b": np.zeros(case.out_features, dtype) if case.bias else None}


def check(case, got, plain, reference, close=()):
    """got/plain: dicts of numpy arrays z, grad_x, grad_b (None without bias) and grad_w
    (torch layout); reference: the float64 weight gradient. Names in ``close`` come from
    a plain computation summed in another order: equal to rounding. All failures in one
    message."""
    failures = []
    for name in ("z", "grad_x", "grad_b"):
        a, p = got[name], plain[name]
        if p is None and a is None:
            continue
        if a is None or p is None:
            failures.append(f"{name}: {'missing' if a is None else 'unexpected'}")
        elif name in close and a.shape == p.shape and a.dtype == p.dtype:
            scale = bias_grad_scale(case) if name == "grad_b" else None
            failure = rounding_failure(name, a, p, 1e3 * np.finfo(a.dtype).eps, scale)
            if failure:
                failures.append(failure)
        elif (a.shape != p.shape or a.dtype != p.dtype
              or not np.array_equal(a, p, equal_nan=True)):
            failures.append(f"{name} != plain layer's ({_describe_difference(a, p)})")
    grad_w = got["grad_w"]
    if grad_w is None:
        failures.append("no weight gradient")
    else:
        if grad_w.dtype != np.dtype(case.dtype):
            failures.append(f"grad_w dtype {grad_w.dtype}, expected {case.dtype}")
        if grad_w.shape != reference.shape:
            failures.append(f"grad_w shape {grad_w.shape} != {reference.shape}")
        elif np.isnan(reference).any():
            if not np.isnan(grad_w).any():
                failures.append("NaN in the input but no NaN in grad_w")
        else:
            error = fuzz.relative_error(grad_w, reference)
            if not error <= fuzz.RTOL[case.dtype]:
                failures.append(f"grad_w relative error {error:.3g} > "
                                f"{fuzz.RTOL[case.dtype]:g} against float64")
    assert not failures, f"{case}: " + "; ".join(failures)


def _rows_last(a):
    """(N, C, *spatial) -> (N * prod(spatial), C): one row per position."""
    return np.moveaxis(a, 1, -1).reshape(-1, a.shape[1])


def reference(case, patch_rows, grad_torch_layout):
    """The float64 weight gradient; grad in the torch layout of z."""
    if case.kind == "dense":
        grads = grad_torch_layout.reshape(-1, case.out_features)
    else:
        grads = _rows_last(grad_torch_layout)
    return fuzz.reference_weight_grad(case, patch_rows, grads)


def channels_last(a):
    return np.moveaxis(a, 1, -1)


def channels_first(a):
    return np.moveaxis(a, -1, 1)


# --------------------------------------------------------------------------- torch


def _torch():
    torch = need("torch")
    return torch, importlib.import_module("tract_core.torch")


def torch_layer(case, dtype, tract, weight, bias):
    torch, tt = _torch()
    nn = torch.nn
    if case.kind == "dense":
        layer = nn.Linear(case.in_features, case.out_features, bias=case.bias)
    else:
        cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[case.d]
        layer = cls(case.in_features, case.out_features, case.kernel, stride=case.stride,
                    padding=case.padding, dilation=case.dilation, groups=case.groups,
                    bias=case.bias, padding_mode=case.padding_mode)
    layer = layer.to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
        if case.bias:
            layer.bias.copy_(torch.from_numpy(bias))
    return tt.wrap(layer, lam=case.lam) if tract else layer


def torch_input(case, x, dtype):
    """x in the case's memory layout, a leaf that requires grad."""
    torch, _ = _torch()
    t = torch.from_numpy(x).to(dtype)
    if case.layout == "channels_last":
        t = t.movedim(1, -1).contiguous().movedim(-1, 1)
    elif case.layout == "sliced":
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=dtype)
        big[..., ::2] = t
        t = big[..., ::2]
    return t.detach().requires_grad_(True)


def torch_run(case, layer, x, r, dtype, inplace=False):
    torch, _ = _torch()
    x = torch_input(case, x, dtype)
    z = layer(x)
    if inplace:  # as AlexNet/VGG stems: nn.ReLU(inplace=True) right after the layer
        z = torch.nn.functional.relu(z, inplace=True)
    z.backward(torch.from_numpy(r).to(dtype))
    return torch_results(z, x.grad, layer.weight.grad,
                         layer.bias.grad if case.bias else None)


def torch_results(z, grad_x, grad_w, grad_b):
    def numpy(t):
        return None if t is None else t.detach().cpu().numpy()

    return {"z": numpy(z), "grad_x": numpy(grad_x), "grad_w": numpy(grad_w),
            "grad_b": numpy(grad_b)}


def torch_patch_rows(case, x):
    """Receptive fields by torch's own plain conv (its padding and padding_mode), float64."""
    if case.kind == "dense":
        return x.reshape(-1, case.in_features)
    torch, _ = _torch()
    eye = fuzz.identity_weight(case.in_features, case.kernel)
    cls = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[case.d]
    conv = cls(case.in_features, eye.shape[0], case.kernel, stride=case.stride,
               padding=case.padding, dilation=case.dilation, bias=False,
               padding_mode=case.padding_mode).double()
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(eye))
        return _rows_last(conv(torch.from_numpy(x)).numpy())


def run_torch(case):
    torch, _ = _torch()
    dtype = getattr(torch, case.dtype)
    x, w, b, r = fuzz.arrays(case)
    inplace = case.mode == "inplace"
    failure = plain_conv_failure(case, x, w, r, "torch")
    got = torch_run(case, torch_layer(case, dtype, True, w, b), x, r, dtype, inplace)
    plain = got if failure else torch_run(case, torch_layer(case, dtype, False, w, b), x, r,
                                          dtype, inplace)
    grad = r * (plain["z"] > 0) if inplace else r  # relu's mask from the plain output
    # TrAct's node sums a conv's bias gradient, which the conv kernel sums in its own order.
    close = () if case.kind == "dense" else ("grad_b",)
    check(case, got, plain, reference(case, torch_patch_rows(case, x), grad), close)
    if failure:  # TrAct's weight gradient checked; no right plain values to compare
        pytest.skip(failure)


def torch_compile_worker(keys, out_path):
    """Run in a fresh process: each case compiled (fullgraph) before anything else."""
    torch, _ = _torch()
    by_key = {case.key: case for case in fuzz.cases("torch", "compile")}
    results = {}

    def compiled_step(case, tract):
        dtype = getattr(torch, case.dtype)
        x, w, b, r = fuzz.arrays(case)
        layer = torch_layer(case, dtype, tract, w, b)
        # dynamic=False: automatic dynamic shapes, on from a third compile of the same
        # code, fail in Inductor for the plain nn.ConvNd too (a PyTorch bug). The reset:
        # each case compiles as a first one, below PyTorch's recompile limit per code.
        torch._dynamo.reset()
        compiled = torch.compile(layer, fullgraph=True, dynamic=False)
        xt = torch_input(case, x, dtype)
        z = compiled(xt)
        z.backward(torch.from_numpy(r).to(dtype))
        return torch_results(z, xt.grad, layer.weight.grad,
                             layer.bias.grad if case.bias else None)

    for key in keys:
        case = by_key[key]
        try:
            out = compiled_step(case, tract=True)
            np.savez(f"{out_path}.{len(results)}.npz",
                     **{k: v for k, v in out.items() if v is not None})
            results[key] = {"file": f"{out_path}.{len(results)}.npz"}
        except Exception as error:  # recorded per case, reported by the parent's test
            results[key] = {"error": f"{type(error).__name__}: {str(error)[:2000]}"}
            try:  # does PyTorch compile the plain layer? (no: its bug, not TrAct's)
                compiled_step(case, tract=False)
            except Exception as plain_error:
                results[key]["plain_error"] = f"{type(plain_error).__name__}: {plain_error}"[:300]
    pathlib.Path(out_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def compiled_results(tmp_path_factory):
    """All compile cases in one fresh interpreter, with an empty inductor cache."""
    tmp = tmp_path_factory.mktemp("torch_compile")
    out = tmp / "results.json"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor"),
           "TRITON_CACHE_DIR": str(tmp / "triton")}
    proc = subprocess.run(
        [sys.executable, __file__, "--torch-compile", str(out),
         *[case.key for case in COMPILE_CASES]],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and out.exists(), proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", COMPILE_CASES, ids=str)
def test_torch_compile_fresh_process(case, compiled_results):
    torch, _ = _torch()
    result = compiled_results[case.key]
    if "plain_error" in result:
        pytest.skip(f"PyTorch does not compile the plain layer either: {result['plain_error']}")
    assert "error" not in result, f"{case}: torch.compile(fullgraph=True): {result.get('error')}"
    with np.load(result["file"]) as data:
        got = {name: (data[name] if name in data.files else None)
               for name in ("z", "grad_x", "grad_w", "grad_b")}
    dtype = getattr(torch, case.dtype)
    x, w, b, r = fuzz.arrays(case)
    plain = torch_run(case, torch_layer(case, dtype, False, w, b), x, r, dtype)
    # Inductor fuses the plain ops its own way: the compiled values are compared with
    # the eager plain layer to float rounding, not bit for bit.
    failures = []
    for name in ("z", "grad_x", "grad_b"):
        if plain[name] is not None:
            error = fuzz.relative_error(got[name], plain[name])
            if not error <= 1e-5:
                failures.append(f"{name} relative error {error:.3g} against the eager plain layer")
    error = fuzz.relative_error(got["grad_w"], reference(case, torch_patch_rows(case, x), r))
    if not error <= fuzz.RTOL[case.dtype]:
        failures.append(f"grad_w relative error {error:.3g} against float64")
    assert not failures, f"{case}: " + "; ".join(failures)


# --------------------------------------------------------------------------- JAX


def _jax():
    jax = need("jax")
    return jax, importlib.import_module("tract_core.jax")


_DIMENSION_NUMBERS = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"),
                      3: ("NDHWC", "DHWIO", "NDHWC")}


def jax_ops(case):
    """(TrAct op, plain op) of the case: f(x, kernel, bias), channels-last."""
    jax, tj = _jax()
    jnp, lax = jax.numpy, jax.lax
    if case.kind == "dense":
        def plain(x, k, b):  # as nnx.Linear computes it
            z = lax.dot_general(x, k, (((x.ndim - 1,), (0,)), ((), ())))
            return z if b is None else z + jnp.reshape(b, (1,) * (z.ndim - 1) + (-1,))

        return (lambda x, k, b: tj.dense(x, k, b, lam=case.lam)), plain
    padding = case.padding if isinstance(case.padding, str) else [tuple(p) for p in case.pads]

    def plain(x, k, b):  # as nnx.Conv computes it
        z = lax.conv_general_dilated(x, k, case.stride, padding, rhs_dilation=case.dilation,
                                     dimension_numbers=_DIMENSION_NUMBERS[case.d],
                                     feature_group_count=case.groups)
        return z if b is None else z + jnp.reshape(b, (1,) * (z.ndim - 1) + (-1,))

    def tract(x, k, b):
        return tj.conv(x, k, b, strides=case.stride, padding=case.padding,
                       kernel_dilation=case.dilation, feature_group_count=case.groups,
                       lam=case.lam)

    return tract, plain


def jax_patch_rows(case, x):
    """Receptive fields by lax's own conv (its 'SAME' etc.), float64."""
    if case.kind == "dense":
        return x.reshape(-1, case.in_features)
    jax, _ = _jax()
    eye = fuzz.channels_last_kernel(fuzz.identity_weight(case.in_features, case.kernel))
    padding = case.padding if isinstance(case.padding, str) else [tuple(p) for p in case.pads]
    with jax.enable_x64(True):
        out = jax.lax.conv_general_dilated(
            jax.numpy.asarray(channels_last(x)), jax.numpy.asarray(eye), case.stride, padding,
            rhs_dilation=case.dilation, dimension_numbers=_DIMENSION_NUMBERS[case.d],
            precision=jax.lax.Precision.HIGHEST)
        return np.asarray(out).reshape(-1, eye.shape[-1])


def _layout_for_jax(case, a):
    return a if case.kind == "dense" else channels_last(a)


def jax_results(case, z, grad_x, grad_k, grad_b):
    def back(a):
        return None if a is None else (np.asarray(a) if case.kind == "dense"
                                       else channels_first(np.asarray(a)))

    return {"z": back(z), "grad_x": back(grad_x),
            "grad_w": fuzz.torch_layout_kernel(np.asarray(grad_k)),
            "grad_b": None if grad_b is None else np.asarray(grad_b)}


def run_jax(case):
    jax, _ = _jax()
    jnp = jax.numpy
    x, w, b, r = fuzz.arrays(case)
    # float32 as users run it, 64-bit types off; float64 needs them on.
    with jax.enable_x64(case.dtype == "float64"):
        dtype = jnp.dtype(case.dtype)
        args = [jnp.asarray(_layout_for_jax(case, x), dtype),
                jnp.asarray(fuzz.channels_last_kernel(w), dtype),
                None if b is None else jnp.asarray(b, dtype),
                jnp.asarray(_layout_for_jax(case, r), dtype)]
        outs = {}
        for name, op in zip(("tract", "plain"), jax_ops(case)):
            if case.mode == "vmap":
                def one(x_i, r_i, k, b, op=op):
                    z, vjp = jax.vjp(lambda x, k, b: op(x[None], k, b)[0], x_i, k, b)
                    return (z, *vjp(r_i))

                z, gx, gk, gb = jax.jit(jax.vmap(one, in_axes=(0, 0, None, None)))(
                    args[0], args[3], args[1], args[2])
                # Per-example shares of the pooled statistics sum to the batch gradient.
                gk = gk.sum(0)
                gb = None if gb is None else gb.sum(0)
            else:
                def run(x, k, b, r, op=op):
                    z, vjp = jax.vjp(op, x, k, b)
                    return (z, *vjp(r))

                z, gx, gk, gb = jax.jit(run)(*args)
            outs[name] = jax_results(case, z, gx, gk, gb)
    check(case, outs["tract"], outs["plain"], reference(case, jax_patch_rows(case, x), r))


# --------------------------------------------------------------------------- Flax NNX


def flax_layer(case, tract, dtype, kernel, bias):
    jax, _ = _jax()
    need("flax")
    from flax import nnx

    import tract_core.flax as tflax

    options = dict(use_bias=case.bias, param_dtype=dtype, rngs=nnx.Rngs(0),
                   kernel_init=nnx.initializers.zeros)
    if case.kind == "dense":
        cls = tflax.TrActLinear if tract else nnx.Linear
        extra = dict(lam=case.lam) if tract else {}
        layer = cls(case.in_features, case.out_features, **extra, **options)
    else:
        cls = tflax.TrActConv if tract else nnx.Conv
        extra = dict(lam=case.lam) if tract else {}
        padding = case.padding if isinstance(case.padding, (str, int)) else [
            tuple(p) for p in case.padding]
        layer = cls(case.in_features, case.out_features, case.kernel, case.stride,
                    padding=padding, kernel_dilation=case.dilation,
                    feature_group_count=case.groups, **extra, **options)
    layer.kernel[...] = jax.numpy.asarray(kernel, dtype)
    if case.bias:
        layer.bias[...] = jax.numpy.asarray(bias, dtype)
    return layer


def flax_patch_rows(case, x):
    """Receptive fields by nnx.Conv itself (its 'CIRCULAR', 'REFLECT', ...), float64."""
    if case.kind == "dense":
        return x.reshape(-1, case.in_features)
    jax, _ = _jax()
    eye = fuzz.identity_weight(case.in_features, case.kernel)
    with jax.enable_x64(True):
        layer = flax_layer(dataclasses.replace(case, out_features=eye.shape[0], groups=1,
                                               bias=False), False, np.float64,
                           fuzz.channels_last_kernel(eye), None)
        layer.precision = jax.lax.Precision.HIGHEST
        out = layer(jax.numpy.asarray(channels_last(x)))
        return np.asarray(out).reshape(-1, eye.shape[0])


def run_flax(case):
    jax, _ = _jax()
    from flax import nnx

    x, w, b, r = fuzz.arrays(case)
    with jax.enable_x64(case.dtype == "float64"):
        dtype = jax.numpy.dtype(case.dtype)
        xj = jax.numpy.asarray(_layout_for_jax(case, x), dtype)
        rj = jax.numpy.asarray(_layout_for_jax(case, r), dtype)
        outs = {}
        for name, tract in (("tract", True), ("plain", False)):
            layer = flax_layer(case, tract, dtype, fuzz.channels_last_kernel(w), b)
            graphdef, state = nnx.split(layer)

            def run(state, x, r, graphdef=graphdef):
                z, vjp = jax.vjp(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
                grad_state, grad_x = vjp(r)
                return z, grad_x, grad_state

            z, gx, gs = jax.jit(run)(state, xj, rj)
            outs[name] = jax_results(case, z, gx, gs["kernel"][...],
                                     gs["bias"][...] if case.bias else None)
    check(case, outs["tract"], outs["plain"], reference(case, flax_patch_rows(case, x), r))


# --------------------------------------------------------------------------- TensorFlow


def _tf():
    tf = need("tensorflow")
    return tf, importlib.import_module("tract_core.tensorflow")


def tf_plain_conv(case, x, kernel):
    """The plain channels-last conv as Keras's TF backend runs it: explicit pads by
    tf.pad then 'VALID'; grouped convolutions through XLA (TF's CPU kernels lack them)."""
    tf, _ = _tf()
    data_format = {1: "NWC", 2: "NHWC", 3: "NDHWC"}[case.d]
    padding = case.padding
    if padding not in ("SAME", "VALID"):
        x = tf.pad(x, [(0, 0), *case.pads, (0, 0)])
        padding = "VALID"

    def convolution(x, kernel):
        return tf.nn.convolution(x, kernel, case.stride, padding, data_format=data_format,
                                 dilations=case.dilation)

    if kernel.shape[-2] != x.shape[-1]:
        convolution = tf.function(convolution, jit_compile=True, autograph=False)
    return convolution(x, kernel)


def plain_conv_failure(case, x, w, r, backend, runs=30):
    """Why the library's own convolution in the case's dtype is wrong here, or None.
    oneDNN's float32 CPU kernels, in TF and in PyTorch, give wrong values for some
    geometries, the plain layer's as much as TrAct's forward, at times only now and then
    (one input channel and an output one position wide whose window stops short of the
    input's end): the plain op and its input gradient, ``runs`` times (PyTorch's on a
    contiguous input and on a channels-last view, as Keras passes it), against the same
    op in float64 (other kernels)."""
    if case.kind != "conv" or case.dtype == "float64" or case.groups > 1 or case.batch == 0:
        return None
    if max(case.stride) > 1 and max(case.dilation) > 1:  # not one TF op
        return None
    padded = np.pad(np.nan_to_num(channels_last(x)), [(0, 0), *case.pads, (0, 0)])
    if backend == "tensorflow":
        tf, _ = _tf()
        operands = (padded, fuzz.channels_last_kernel(w), channels_last(r))

        def run(dtype):
            x, kernel, grad_z = (tf.constant(a, getattr(tf, dtype)) for a in operands)
            with tf.GradientTape() as tape:
                tape.watch(x)
                z = tf.nn.convolution(x, kernel, case.stride, "VALID", dilations=case.dilation,
                                      data_format={1: "NWC", 2: "NHWC", 3: "NDHWC"}[case.d])
            return z.numpy(), tape.gradient(z, x, output_gradients=grad_z).numpy()
    elif backend == "torch":
        torch, _ = _torch()
        conv = getattr(torch.nn.functional, f"conv{case.d}d")

        def run(dtype):
            out = []
            for view in (True, False):
                x = torch.tensor(padded, dtype=getattr(torch, dtype)).movedim(-1, 1)
                x = (x if view else x.contiguous()).requires_grad_(True)
                z = conv(x, torch.tensor(w, dtype=x.dtype), None, case.stride, 0, case.dilation)
                z.backward(torch.tensor(r, dtype=x.dtype))
                out += [z.detach().numpy(), x.grad.numpy()]
            return out
    else:
        return None
    exact = run("float64")
    for _ in range(runs):
        for name, got, want in zip(("output", "input gradient") * 2, run(case.dtype), exact):
            error = fuzz.relative_error(got, want)
            if not error <= 1e-3:
                return (f"{backend}'s {case.dtype} convolution is wrong here, the plain "
                        f"layer's too ({name}: relative error {error:.3g} against float64)")
    return None


def tf_ops(case):
    tf, ttf = _tf()
    if case.kind == "dense":
        def plain(x, k, b):
            z = tf.matmul(x, k) if x.shape.rank == 2 else tf.tensordot(
                x, k, axes=[[x.shape.rank - 1], [0]])
            return z if b is None else z + b

        return (lambda x, k, b: ttf.dense(x, k, b, lam=case.lam)), plain

    def plain(x, k, b):
        z = tf_plain_conv(case, x, k)
        return z if b is None else z + b

    def tract(x, k, b):
        return ttf.conv(x, k, b, strides=case.stride, padding=case.padding,
                        kernel_dilation=case.dilation, feature_group_count=case.groups,
                        lam=case.lam)

    return tract, plain


def tf_patch_rows(case, x):
    """Receptive fields by TF's own convolution of the explicitly padded input, float64
    (TF's float64 3-D 'SAME' convolution on CPU is wrong for some strides, plain too)."""
    if case.kind == "dense":
        return x.reshape(-1, case.in_features)
    tf, _ = _tf()
    eye = fuzz.channels_last_kernel(fuzz.identity_weight(case.in_features, case.kernel))
    padded = np.pad(channels_last(x), [(0, 0), *case.pads, (0, 0)])
    out = tf.nn.convolution(tf.constant(padded), tf.constant(eye), case.stride, "VALID",
                            dilations=case.dilation)
    return out.numpy().reshape(-1, eye.shape[-1])


def run_tensorflow(case):
    tf, _ = _tf()
    dtype = tf.as_dtype(case.dtype)
    x, w, b, r = fuzz.arrays(case)
    args = [tf.constant(_layout_for_jax(case, x), dtype),
            tf.constant(fuzz.channels_last_kernel(w), dtype),
            tf.constant(np.zeros(case.out_features) if b is None else b, dtype),
            tf.constant(_layout_for_jax(case, r), dtype)]
    outs = {}
    empty_conv = case.batch == 0 and case.kind == "conv"
    plain_failure = plain_conv_failure(case, x, w, r, "tensorflow")
    for name, op in zip(("tract", "plain"), tf_ops(case)):
        if name == "plain" and (empty_conv or plain_failure):
            continue  # replaced below

        def run(x, k, b, r, op=op):
            with tf.GradientTape() as tape:
                tape.watch([x, k, b])
                z = op(x, k, b if case.bias else None)
            grads = tape.gradient(z, [x, k, b], output_gradients=r)
            return [z, *grads]

        if case.mode == "function":  # unknown batch size
            signature = [tf.TensorSpec((None, *a.shape[1:]), dtype) if i in (0, 3)
                         else tf.TensorSpec(a.shape, dtype) for i, a in enumerate(args)]
            run = tf.function(run, input_signature=signature)
        elif case.mode == "xla":
            run = tf.function(run, jit_compile=True)
        z, gx, gk, gb = (None if t is None else t.numpy() for t in run(*args))
        outs[name] = jax_results(case, z, gx, gk, gb if case.bias else None)
    if empty_conv:  # the plain op's own bug can also fail its bias add
        outs["plain"] = empty_batch_results(case)
    if plain_failure:  # TrAct's kernel gradient checked; no right plain values to compare
        outs["plain"] = outs["tract"]
    check(case, outs["tract"], outs["plain"], reference(case, tf_patch_rows(case, x), r))
    if plain_failure:
        pytest.skip(plain_failure)


# --------------------------------------------------------------------------- Keras


def _keras():
    keras = need("keras")
    return keras, keras.backend.backend(), importlib.import_module("tract_core.keras")


def keras_layer(case, tract, dtype, data_format, weight, bias):
    keras, _, tk = _keras()
    extra = dict(lam=case.lam) if tract else {}
    if case.kind == "dense":
        cls = tk.TrActDense if tract else keras.layers.Dense
        layer = cls(case.out_features, use_bias=case.bias, dtype=dtype, **extra)
        shape = case.x_shape
    else:
        name = f"Conv{case.d}D"
        cls = getattr(tk, f"TrAct{name}") if tract else getattr(keras.layers, name)
        layer = cls(case.out_features, case.kernel, strides=case.stride, padding=case.padding,
                    data_format=data_format, dilation_rate=case.dilation, groups=case.groups,
                    use_bias=case.bias, dtype=dtype, **extra)
        shape = case.x_shape if data_format == "channels_first" else channels_last(
            np.empty(case.x_shape)).shape
    layer.build(shape)
    layer.set_weights([fuzz.channels_last_kernel(weight)] + ([bias] if case.bias else []))
    return layer


def keras_run(layer, x, r, dtype):
    """z, grad_x, grad_kernel, grad_bias (None without) of sum(z * r), numpy."""
    _, backend, _ = _keras()
    if backend == "tensorflow":
        tf = need("tensorflow")

        # As Keras trains: inside tf.function (TF 2.21's eager 3-D conv gradient fails
        # for the plain layer too).
        @tf.function
        def run(x, r):
            with tf.GradientTape() as tape:
                tape.watch(x)
                z = layer(x)
            return [z, *tape.gradient(z, [x, *layer.trainable_variables], output_gradients=r)]

        out = [t.numpy() for t in run(tf.constant(x, dtype), tf.constant(r, dtype))]
    elif backend == "torch":
        torch = need("torch")
        xt = torch.tensor(x, dtype=getattr(torch, dtype), requires_grad=True)
        z = layer(xt)
        z.backward(torch.tensor(r, dtype=z.dtype))
        out = [t.detach().cpu().numpy() for t in
               [z, xt.grad, *(v.value.grad for v in layer.trainable_variables)]]
    else:
        jax = need("jax")
        trainable = [v.value for v in layer.trainable_variables]
        frozen = [v.value for v in layer.non_trainable_variables]

        @jax.jit
        def run(trainable, x, r):
            z, vjp = jax.vjp(lambda t, x: layer.stateless_call(t, frozen, x)[0], trainable, x)
            grad_vars, grad_x = vjp(r)
            return [z, grad_x, *grad_vars]

        out = [np.asarray(t) for t in run(trainable, jax.numpy.asarray(x, dtype),
                                          jax.numpy.asarray(r, dtype))]
    return out + [None] * (4 - len(out))


def keras_patch_rows(case, x):
    """Receptive fields by Keras's own ConvND of the input padded as the case's 'same' or
    'causal' pads it, float64, channels-last (TF's CPU kernels have no channels-first
    conv, and its float64 3-D 'SAME' convolution is wrong for some strides)."""
    if case.kind == "dense":
        return x.reshape(-1, case.in_features)
    keras, _, _ = _keras()
    eye = fuzz.identity_weight(case.in_features, case.kernel)
    padded = np.pad(channels_last(x), [(0, 0), *case.pads, (0, 0)])
    layer = getattr(keras.layers, f"Conv{case.d}D")(
        eye.shape[0], case.kernel, strides=case.stride, padding="valid",
        dilation_rate=case.dilation, use_bias=False, dtype="float64")
    layer.build(padded.shape)
    layer.set_weights([fuzz.channels_last_kernel(eye)])
    out = keras.ops.convert_to_numpy(layer(keras.ops.convert_to_tensor(padded)))
    return out.reshape(-1, eye.shape[0])


def run_keras(case):
    _, backend, _ = _keras()
    x, w, b, r = fuzz.arrays(case)
    data_format = "channels_first" if case.layout == "channels_first" else "channels_last"

    def layout(a):
        return a if case.kind == "dense" or data_format == "channels_first" else (
            channels_last(a))

    def back(a):
        return a if case.kind == "dense" or data_format == "channels_first" else (
            channels_first(a))

    x64 = contextlib.nullcontext()
    if backend == "jax":
        x64 = need("jax").enable_x64(case.dtype == "float64")
    empty_conv = backend == "tensorflow" and case.batch == 0 and case.kind == "conv"
    plain_error = plain_conv_failure(case, x, w, r, backend)
    with x64:
        outs, close = {}, ()
        if backend == "tensorflow" and case.kind != "dense":
            # Inside tf.function grappler may fuse the plain layer's bias add with its
            # convolution and sum the bias gradient in another order: equal to rounding.
            close = ("grad_b",)
        for name, tract in (("tract", True), ("plain", False)):
            if empty_conv and not tract:
                outs[name] = empty_batch_results(case)
                continue
            if plain_error and not tract:  # the op itself is wrong: tract's values stand in
                outs[name] = {**outs["tract"], "grad_w": None}
                continue
            plain_format = data_format
            if not tract and backend == "tensorflow" and data_format == "channels_first":
                # TF's CPU kernels have no channels-first conv: the channels-last plain
                # layer sums its bias gradient over other axes, equal to rounding.
                plain_format, close = "channels_last", ("grad_b",)
            layer = keras_layer(case, tract, case.dtype, plain_format, w, b)
            try:
                if plain_format != data_format:
                    z, gx, gk, gb = keras_run(layer, channels_last(x), channels_last(r),
                                              case.dtype)
                    z, gx = channels_first(z), channels_first(gx)
                else:
                    z, gx, gk, gb = keras_run(layer, layout(x), layout(r), case.dtype)
                    z, gx = back(z), back(gx)
            except Exception as error:
                if tract:
                    raise
                plain_error = f"{type(error).__name__}: {error}"[:200]
                z, gx, gk, gb = outs["tract"]["z"], outs["tract"]["grad_x"], None, \
                    outs["tract"]["grad_b"]
            outs[name] = {"z": z, "grad_x": gx, "grad_b": gb,
                          "grad_w": None if gk is None else fuzz.torch_layout_kernel(gk)}
    plain, tract = outs["plain"], outs["tract"]
    if backend == "torch" and case.kind == "dense" and case.dtype == "float64":
        # Keras's torch backend computes a float64 Dense in float32 (its own bug, the
        # plain layer's), whatever dtype it returns: values agree to float32 rounding.
        for name in ("z", "grad_x"):
            failure = rounding_failure(name, tract[name], plain[name].astype(tract[name].dtype),
                                       1e-5)
            assert not failure, f"{case}: {failure}"
            plain[name] = tract[name]
    if backend == "jax":  # the reference in float64 whatever the case's dtype
        with need("jax").enable_x64(True):
            patch_rows = keras_patch_rows(case, x)
    else:
        patch_rows = keras_patch_rows(case, x)
    check(case, outs["tract"], outs["plain"], reference(case, patch_rows, r), close)
    if plain_error:  # TrAct's kernel gradient checked; nothing plain to compare it with
        pytest.skip(f"the plain Keras layer fails here: {plain_error}")


# --------------------------------------------------------------------------- tests

RUNNERS = {"torch": run_torch, "jax": run_jax, "flax": run_flax,
           "tensorflow": run_tensorflow, "keras": run_keras}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fuzz_case(case):
    RUNNERS[case.family](case)


def test_verified_table_is_generated_from_the_fuzz():
    """docs/guide/verified.md shows exactly what `python tests/fuzz.py --table` prints."""
    page = (ROOT / "docs" / "guide" / "verified.md").read_text()
    match = re.search(r"<!-- fuzz-table:start -->\n(.*?)\n<!-- fuzz-table:end -->", page,
                      re.DOTALL)
    assert match, "verified.md lacks the fuzz-table markers"
    assert match.group(1).strip() == fuzz.coverage_table().strip(), (
        "docs/guide/verified.md is stale: paste `python tests/fuzz.py --table` between its "
        "markers")


def test_cases_cover_both_sides_of_every_branch():
    """The generator keeps producing the geometries the checks are about."""
    every = [c for f in fuzz.FAMILIES for m in fuzz.modes(f) for c in fuzz.cases(f, m, 1, 0)]
    counts = {label: sum(map(test, every)) for label, test in fuzz.OPTIONS}
    for label, count in counts.items():
        assert count >= 3, f"only {count} cases cover {label!r}"
    assert len({str(c) for c in every}) == len(every), "case ids must be unique"


if __name__ == "__main__" and sys.argv[1:2] == ["--torch-compile"]:
    torch_compile_worker(sys.argv[3:], sys.argv[2])
