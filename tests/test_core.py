"""The backend-neutral core, one test body per property, run on every array library."""

import contextlib
import itertools
import subprocess
import sys

import array_api_compat
import numpy as np
import pytest
from conftest import CONV_CASES, LINEAR_CASES, assert_close, case_id, to_numpy

import tract_core as tc
from tract_core import _backends

NP_PAD_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def rows_of(case):
    """(groups, b, n) patches and (groups, b, m) output gradients of a fixture case, numpy."""
    if case.kind == "linear":
        n, m = case.x.shape[-1], case.grad_z.shape[-1]
        return case.x.reshape(1, -1, n), case.grad_z.reshape(1, -1, m)
    padded = np.pad(case.x, [(0, 0), (0, 0), *case.pads], mode=NP_PAD_MODE[case.padding_mode])
    patches = tc.conv_patches(padded, case.kernel, case.stride, case.dilation, case.groups)
    g, m = case.groups, case.grad_z.shape[1]
    grads = np.moveaxis(case.grad_z, 1, -1).reshape(-1, g, m // g).transpose(1, 0, 2)
    return patches, grads


def asarray(xp, array, dtype=None):
    return xp.asarray(np.ascontiguousarray(array), dtype=dtype or xp.float64)


@pytest.mark.parametrize("case", LINEAR_CASES + CONV_CASES, ids=case_id)
def test_weight_grad_matches_fixture(xp, case):
    patches, grads = rows_of(case)
    out = tc.weight_grad(asarray(xp, patches), asarray(xp, grads), case.lam)
    assert out.dtype == xp.float64
    # Pixel-range cases with b < n have condition numbers near 1e7: float64 round-off.
    assert_close(out, case.grad_weight.reshape(out.shape), 1e-9, case.name)


@pytest.mark.parametrize("case", LINEAR_CASES + CONV_CASES, ids=case_id)
def test_weight_grad_float32_stays_accurate(xp, case):
    """Standardized and [0, 255] inputs alike: fp32 within 2e-4 of the float64 result."""
    patches, grads = rows_of(case)
    out = tc.weight_grad(asarray(xp, patches, xp.float32), asarray(xp, grads, xp.float32),
                         case.lam)
    assert out.dtype == xp.float32
    assert_close(out, case.grad_weight.reshape(out.shape), 2e-4, case.name)


@pytest.mark.parametrize("case", LINEAR_CASES + CONV_CASES, ids=case_id)
def test_packed_statistics_of_parts_precondition_to_the_union_batch(xp, case):
    """Packed [G^T X, X^T X, b] of three row ranges (one maybe empty), summed and scaled as
    a loss scaler would, give the fixture's gradient over all rows."""
    patches, grads = rows_of(case)
    g, b, n_g = patches.shape
    m = g * grads.shape[-1]
    cuts = sorted([0, b, *np.random.default_rng(b).integers(0, b + 1, 2).tolist()])
    total = 0
    for lo, hi in itertools.pairwise(cuts):
        grad_w = np.swapaxes(grads[:, lo:hi], -1, -2) @ patches[:, lo:hi]
        gram = np.swapaxes(patches[:, lo:hi], -1, -2) @ patches[:, lo:hi]
        packed = tc.pack_statistics(asarray(xp, grad_w), asarray(xp, gram), hi - lo, case.lam)
        assert packed.shape == (tc.packed_size(m, n_g, g),)
        total = total + packed * 1024.0
    out = tc.unpack_and_precondition(total / 1024.0, m, n_g, g)
    assert_close(out, case.grad_weight.reshape(out.shape), 1e-9, case.name)


@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
def test_conv_patches_reproduce_the_convolution(xp, case):
    """Rows dotted with the flattened weight give the fixture's forward output."""
    padded = np.pad(case.x, [(0, 0), (0, 0), *case.pads], mode=NP_PAD_MODE[case.padding_mode])
    patches = to_numpy(tc.conv_patches(asarray(xp, padded), case.kernel, case.stride,
                                       case.dilation, case.groups))
    g, m = case.groups, case.weight.shape[0]
    z_rows = patches @ np.swapaxes(case.weight.reshape(g, m // g, -1), -1, -2)
    z = z_rows.transpose(1, 0, 2).reshape(case.x.shape[0], *case.z.shape[2:], m)
    z = np.moveaxis(z, -1, 1) + (case.bias.reshape(m, *[1] * len(case.kernel))
                                 if case.has_bias else 0)
    assert_close(z, case.z, 1e-13, case.name)


def test_push_through_and_gram_forms_agree(xp):
    """b < n: the b x b form equals the n x n Gram form (float64, well conditioned); a
    replica sum (here the identity) takes the n x n form."""
    rng = np.random.default_rng(1)
    x, g = rng.standard_normal((3, 5, 12)), rng.standard_normal((3, 5, 4))
    plain = np.swapaxes(g, -1, -2) @ x
    gram_form = tc.precondition(asarray(xp, plain), tc.gram(asarray(xp, x)), 5, 0.3)
    pushed = tc.weight_grad(asarray(xp, x), asarray(xp, g), 0.3)
    summed = tc.weight_grad(asarray(xp, x), asarray(xp, g), 0.3, replica_sum=lambda *s: s)
    assert_close(pushed, to_numpy(gram_form), 1e-12)
    assert_close(summed, to_numpy(gram_form), 1e-12)


def test_conv_weight_grad_forms_agree(xp):
    """A conv with fewer patches than entries (b < n): the b x b form from the patches
    equals the n x n form of its statistics, and both match a float64 reference."""
    rng = np.random.default_rng(11)
    x, grads = rng.standard_normal((1, 4, 6, 6)), rng.standard_normal((1, 2, 2, 2))
    patches = tc.conv_patches(x, (5, 5), (1, 1), (1, 1))[0]  # b = 4 rows of n = 100
    rows = grads.reshape(2, 4).T
    expected = rows.T @ patches @ np.linalg.inv(patches.T @ patches / 4 + 0.2 * np.eye(100))
    args = ((5, 5), (1, 1), (1, 1), 1, 0.2)
    pushed = tc.conv_weight_grad(asarray(xp, x), asarray(xp, grads), *args)
    summed = tc.conv_weight_grad(asarray(xp, x), asarray(xp, grads), *args,
                                 replica_sum=lambda *s: s)
    assert_close(pushed, expected[None], 1e-10, "push-through")
    assert_close(summed, expected[None], 1e-10, "n x n")


@pytest.mark.parametrize("m", [3, 100])
def test_precondition_solves_the_system(xp, m):
    """precondition(P, K, b, lam) @ (K / b + lam I) == P: the defining equation."""
    rng = np.random.default_rng(2)
    x, plain = rng.standard_normal((40, 6)), rng.standard_normal((m, 6))
    out = to_numpy(tc.precondition(asarray(xp, plain), tc.gram(asarray(xp, x)), 40, 0.1))
    np.testing.assert_allclose(out @ (x.T @ x / 40 + 0.1 * np.eye(6)), plain, rtol=1e-12,
                               atol=1e-13)


def test_backends_agree_to_float64_roundoff():
    """numpy, torch and jax arrays give the same weight gradient (1e-9, issue 2)."""
    rng = np.random.default_rng(3)
    results = []
    for shape in [((64, 10), (64, 3)), ((7, 10), (7, 3))]:
        x, g = rng.standard_normal(shape[0]) * 50, rng.standard_normal(shape[1])
        results.append([tc.weight_grad(x, g, 0.1)])
        for name in ("torch", "jax"):
            try:
                factory = __import__("conftest").XP_FACTORIES[name]
                xp = factory()
            except pytest.skip.Exception:
                continue
            results[-1].append(to_numpy(tc.weight_grad(asarray(xp, x), asarray(xp, g), 0.1)))
    for group in results:
        for other in group[1:]:
            np.testing.assert_allclose(other, group[0], rtol=1e-9, atol=0)


@pytest.mark.parametrize("lam", [0, 0.0, -0.1, float("nan"), float("inf"), True, "0.1", None,
                                 np.array([0.1, 0.2])])
def test_bad_lam_raises_value_error_naming_lam(xp, lam):
    x = asarray(xp, np.ones((4, 2)))
    with pytest.raises(ValueError, match="lam"):
        tc.weight_grad(x, x, lam)
    with pytest.raises(ValueError, match="lam"):
        tc.check_lam(lam)


def test_numpy_scalar_lam_is_accepted():
    assert tc.check_lam(np.float32(0.25)) == 0.25
    assert tc.check_lam(1) == 1.0


def test_shape_and_dtype_errors_name_the_argument(xp):
    x = asarray(xp, np.ones((4, 3)))
    with pytest.raises(ValueError, match="grad_z"):
        tc.weight_grad(x, asarray(xp, np.ones((5, 2))))
    with pytest.raises(ValueError, match="grad_z"):
        tc.weight_grad(x, asarray(xp, np.ones((2, 4, 2))))
    with pytest.raises(ValueError, match="x must"):
        tc.weight_grad(asarray(xp, np.ones(4)), asarray(xp, np.ones(4)))
    with pytest.raises(TypeError, match="dtype"):
        tc.weight_grad(x, asarray(xp, np.ones((4, 2)), xp.float32))
    with pytest.raises(TypeError, match="floating"):
        tc.weight_grad(asarray(xp, np.ones((4, 3)), xp.int64), asarray(xp, np.ones((4, 2)),
                                                                       xp.int64))


@pytest.mark.parametrize("b", [40, 3])
def test_low_precision_accumulates_in_float64(xp, b):
    """float16 in, float16 out; computed in float64, so close to the float64 result."""
    rng = np.random.default_rng(4)
    x, g = rng.standard_normal((b, 6)), rng.standard_normal((b, 2))
    out = tc.weight_grad(asarray(xp, x, xp.float16), asarray(xp, g, xp.float16), 0.1)
    assert out.dtype == xp.float16
    x16, g16 = x.astype(np.float16).astype(float), g.astype(np.float16).astype(float)
    expected = g16.T @ x16 @ np.linalg.inv(x16.T @ x16 / b + 0.1 * np.eye(6))
    assert_close(out, expected, 2e-3)


@pytest.mark.parametrize("b", [40, 3])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("m, dtype", [(2, "float64"), (24, "float32")],
                         ids=["G^T X", "whitened rows"])
def test_nan_and_inf_flow_through_as_nan(xp, b, bad, m, dtype):
    """Loss scalers need NaN/Inf gradients back, never an exception (both forms of the
    n x n product: 24 float32 outputs over 6 inputs take the whitened rows')."""
    rng = np.random.default_rng(5)
    x, g = rng.standard_normal((b, 6)), rng.standard_normal((b, m))
    x[1, 2] = bad
    dtype = getattr(xp, dtype)
    out = to_numpy(tc.weight_grad(asarray(xp, x, dtype), asarray(xp, g, dtype), 0.1))
    assert np.isnan(out).any() and not np.isfinite(out).all()
    g[0, 0], x[1, 2] = bad, 0.0
    out = to_numpy(tc.weight_grad(asarray(xp, x, dtype), asarray(xp, g, dtype), 0.1))
    assert not np.isfinite(out).all()


def smooth_pixels(rng, shape, cell=8):
    """[0, 255] images (N, C, H, W), bilinear between uniform values every ``cell``
    pixels: neighbours strongly correlated, as in photos."""
    n, c, h, w = shape
    coarse = rng.uniform(0, 255, (n, c, h // cell + 2, w // cell + 2))
    rows, cols = np.arange(h) / cell, np.arange(w) / cell
    r0, c0 = rows.astype(int), cols.astype(int)
    fr, fc = (rows - r0)[:, None], cols - c0
    at = lambda i, j: coarse[:, :, i][:, :, :, j]
    return ((1 - fr) * ((1 - fc) * at(r0, c0) + fc * at(r0, c0 + 1))
            + fr * ((1 - fc) * at(r0 + 1, c0) + fc * at(r0 + 1, c0 + 1)))


def explicit_rows(images, k, s):
    """(N * L, C * k * k) patch rows of an unpadded k x k / s conv, by numpy windows."""
    windows = np.lib.stride_tricks.sliding_window_view(images, (k, k), axis=(2, 3))
    windows = windows[:, :, ::s, ::s]  # (N, C, H', W', k, k)
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(-1, images.shape[1] * k * k)


@pytest.mark.parametrize("m", [8, 256], ids=["m8", "m256"])
@pytest.mark.parametrize("k, s, size", [(7, 2, 38), (3, 1, 16), (4, 4, 32), (16, 16, 64)],
                         ids=["stem7x7s2", "stem3x3", "patch4", "patch16"])
def test_float32_pixel_range_smooth_images_match_float64(xp, k, s, size, m):
    """Smooth [0, 255] images give systems of condition 1e7-1e8: the float32 gradient
    must still match float64 (statistics in float64), through every core entry point;
    with m >= 4 n (m256 on the 3x3 stem and 4x4 patches) weight_grad, and for 4x4
    patches conv_weight_grad, take G^T Z of the whitened rows in float32."""
    rng = np.random.default_rng(9)
    images = np.round(smooth_pixels(rng, (3, 3, size, size)))
    x64 = explicit_rows(images, k, s)
    g64 = rng.standard_normal((x64.shape[0], m))
    b, n = x64.shape
    assert np.linalg.cond(x64.T @ x64 / b + 0.1 * np.eye(n)) > 1e6  # the hard case
    with float64_enabled(xp):
        check_smooth_images(xp, images, x64, g64, k, s, size)


def check_smooth_images(xp, images, x64, g64, k, s, size):
    (b, n), m = x64.shape, g64.shape[1]
    x32, g32 = asarray(xp, x64, xp.float32), asarray(xp, g64, xp.float32)
    x32_64 = to_numpy(x32).astype(np.float64)  # the float32 data, exactly
    expected = np.linalg.solve(x32_64.T @ x32_64 / b + 0.1 * np.eye(n),
                               x32_64.T @ to_numpy(g32).astype(np.float64)).T
    assert_close(tc.weight_grad(x32, g32, 0.1), expected, 1e-6, "weight_grad")
    # The solve amplifies the plain gradient's rounding as well: G^T X in float64 too.
    wide = tc.statistics_dtype(xp, x32.dtype)
    plain = xp.matmul(xp.linalg.matrix_transpose(xp.astype(g32, wide)), xp.astype(x32, wide))
    assert_close(tc.precondition(plain, tc.gram(x32), b, 0.1), expected, 1e-6, "precondition")
    padded = asarray(xp, images, xp.float32)
    out = (size - k) // s + 1
    grads = asarray(xp, g64.reshape(3, out, out, m).transpose(0, 3, 1, 2), xp.float32)
    direct = tc.conv_weight_grad(padded, grads, (k, k), (s, s), (1, 1))
    assert_close(direct[0], expected, 1e-6, "conv_weight_grad")
    plain, gram = tc.conv_moments(padded, grads, (k, k), (s, s), (1, 1))
    assert gram.dtype == xp.float64
    assert_close(tc.precondition(plain, gram, b, 0.1)[0], expected, 1e-6, "conv_moments")
    gram = tc.conv_gram(padded, (k, k), (s, s), (1, 1))
    assert_close(tc.precondition(plain, gram, b, 0.1)[0], expected, 1e-6, "conv_gram")


def float64_enabled(xp):
    """JAX makes float64 arrays only with 64-bit types on (its adapter enables them while
    tracing its backward); other libraries always do."""
    if array_api_compat.is_jax_namespace(xp):
        import jax

        return jax.enable_x64(True)
    return contextlib.nullcontext()


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_statistics_dtype_is_float64(xp, dtype):
    with float64_enabled(xp):
        assert tc.statistics_dtype(xp, getattr(xp, dtype)) == xp.float64
    with pytest.raises(TypeError, match="x must have a real floating dtype"):
        tc.statistics_dtype(xp, xp.int32)


def test_no_rows_give_a_zero_gradient(xp):
    """An empty batch (the last batch of a filtered loader): zeros, like G^T X."""
    empty_x, empty_g = asarray(xp, np.ones((0, 5))), asarray(xp, np.ones((0, 3)))
    assert_close(tc.weight_grad(empty_x, empty_g, 0.1), np.zeros((3, 5)), 0, "weight_grad")
    zeros = asarray(xp, np.zeros((3, 5)))
    assert_close(tc.precondition(zeros, asarray(xp, np.zeros((5, 5))), 0, 0.1),
                 np.zeros((3, 5)), 0, "precondition")
    images, grads = asarray(xp, np.ones((0, 2, 6, 6))), asarray(xp, np.ones((0, 4, 4, 4)))
    plain, gram = tc.conv_moments(images, grads, (3, 3), (1, 1), (1, 1))
    for name, value, shape in (("plain", plain, (1, 4, 18)), ("gram", gram, (1, 18, 18))):
        assert_close(value, np.zeros(shape), 0, name)
    assert_close(tc.conv_gram(images, (3, 3), (1, 1), (1, 1)), np.zeros((1, 18, 18)), 0,
                 "conv_gram")


def test_lam_must_fit_the_dtype_of_the_solve(xp, monkeypatch):
    """A lam past float32's range works in float64; where only float32 exists, an error
    naming lam rather than an infinite system."""
    rng = np.random.default_rng(3)
    # g is scaled so that the result is a normal float32 (XLA flushes subnormals to zero)
    x, g = rng.standard_normal((20, 4)), 1e30 * rng.standard_normal((20, 2))
    out = tc.weight_grad(asarray(xp, x, xp.float32), asarray(xp, g, xp.float32), 1e39)
    assert_close(out, (g.T @ x) / 1e39, 1e-6, "huge lam")
    monkeypatch.setattr(type(_backends.backend(xp)), "has_float64", lambda self, device: False)
    with pytest.raises(ValueError, match="lam must be below"):
        tc.weight_grad(asarray(xp, x, xp.float32), asarray(xp, g, xp.float32), 1e39)


def test_importing_the_core_imports_no_framework():
    code = ("import sys, tract_core; "
            "print(sorted(m for m in ('torch', 'jax', 'tensorflow', 'keras', 'flax') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
def test_conv_gram_equals_gram_of_patches(xp, case):
    """The structured Gram (phases, shifts, frame) is the Gram of the extracted patches."""
    padded = np.pad(case.x, [(0, 0), (0, 0), *case.pads], mode=NP_PAD_MODE[case.padding_mode])
    args = (case.kernel, case.stride, case.dilation, case.groups)
    structured = tc.conv_gram(asarray(xp, padded), *args)
    patches = rows_of(case)[0]
    assert_close(structured, np.swapaxes(patches, -1, -2) @ patches, 1e-13, case.name)


def random_geometries(count, seed):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        d = int(rng.integers(1, 4))
        kernel = tuple(int(k) for k in rng.integers(1, 6, d))
        stride = tuple(int(s) for s in rng.integers(1, 4, d))
        dilation = tuple(int(v) for v in rng.integers(1, 3, d))
        groups = int(rng.choice([1, 2]))
        spatial = tuple(min(int((k - 1) * dl + 1 + rng.integers(0, 12)), 14 if d < 3 else 8)
                        for k, dl in zip(kernel, dilation))
        spatial = tuple(max(s, (k - 1) * dl + 1) for s, k, dl in zip(spatial, kernel, dilation))
        yield rng.standard_normal((2, 2 * groups, *spatial)), kernel, stride, dilation, groups


def test_conv_gram_on_random_geometries():
    """Strides, dilations, kernels larger than the stride or not, 1-3 axes, groups."""
    for x, kernel, stride, dilation, groups in random_geometries(150, seed=6):
        patches = tc.conv_patches(x, kernel, stride, dilation, groups)
        expected = np.swapaxes(patches, -1, -2) @ patches
        got = tc.conv_gram(x, kernel, stride, dilation, groups)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12 * np.abs(expected).max(),
                                   err_msg=f"{kernel} {stride} {dilation} {groups} {x.shape}")


@pytest.mark.parametrize("shape", [(50, 700), (2, 30, 129), (40, 257)])
def test_wide_gram_by_halves_is_exact(xp, shape):
    """Wide Grams by recursive halves are exact (uneven splits, batch axes)."""
    x = np.random.default_rng(7).standard_normal(shape)
    assert_close(tc.gram(asarray(xp, x)), np.swapaxes(x, -1, -2) @ x, 1e-14)


@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
def test_conv_moments_are_the_products_of_the_patches(xp, case):
    """G^T X and X^T X of the fixtures' convolutions."""
    padded = np.pad(case.x, [(0, 0), (0, 0), *case.pads], mode=NP_PAD_MODE[case.padding_mode])
    grad_w, gram = tc.conv_moments(asarray(xp, padded), asarray(xp, case.grad_z), case.kernel,
                                   case.stride, case.dilation, case.groups)
    patches, grads = rows_of(case)
    assert_close(grad_w, np.swapaxes(grads, -1, -2) @ patches, 1e-13, case.name)
    assert_close(gram, np.swapaxes(patches, -1, -2) @ patches, 1e-13, case.name)


def conv_moment_geometries():
    """Random geometries, and wide ones past every library's explicit-patch bound, where
    the moments come from its conv kernel and the structured Gram."""
    yield from random_geometries(40, seed=9)
    rng = np.random.default_rng(10)
    for channels, kernel, stride, dilation, groups, spatial in [
            (4, (7, 7), (2, 2), (1, 1), 1, (23, 20)), (24, (3, 3), (1, 1), (1, 1), 2, (9, 11)),
            (8, (5, 5), (1, 2), (2, 1), 1, (17, 19)), (12, (3, 3, 3), (1, 1, 2), (1, 1, 1), 1,
                                                       (7, 8, 9)),
            (40, (5,), (3,), (1,), 1, (30,)), (200, (1, 1), (1, 1), (1, 1), 1, (4, 5))]:
        yield rng.standard_normal((3, channels, *spatial)), kernel, stride, dilation, groups


def test_conv_moments_match_explicit_patches(xp):
    """The fast paths (structured Gram, a library's conv kernel, chunks of images) against
    the explicit-patch reference, over a grid of geometries."""
    rng = np.random.default_rng(8)
    for x, kernel, stride, dilation, groups in conv_moment_geometries():
        if array_api_compat.is_jax_namespace(xp) and x.shape[1] < 4:
            continue  # eager JAX compiles every op of every shape: the wide ones only
        patches = tc.conv_patches(x, kernel, stride, dilation, groups)
        out = tc.conv_output_shape(x.shape[2:], kernel, stride, dilation)
        grad_z = rng.standard_normal((x.shape[0], 3 * groups, *out))
        grads = np.moveaxis(grad_z, 1, -1).reshape(-1, groups, 3).transpose(1, 0, 2)
        grad_w, gram = tc.conv_moments(asarray(xp, x), asarray(xp, grad_z), kernel, stride,
                                       dilation, groups)
        what = f"{kernel} {stride} {dilation} {groups} {x.shape}"
        assert_close(grad_w, np.swapaxes(grads, -1, -2) @ patches, 1e-12, what)
        assert_close(gram, np.swapaxes(patches, -1, -2) @ patches, 1e-12, what)


def test_many_images_go_in_several_chunks():
    """Batches past the bounds on patch and frame entries held at once: the same sums."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((160, 3, 40, 40))
    grad_z = rng.standard_normal((160, 4, 17, 17))
    patches = tc.conv_patches(x, (7, 7), (2, 2), (1, 1))
    expected = np.swapaxes(patches, -1, -2) @ patches
    grad_w, gram = tc.conv_moments(x, grad_z, (7, 7), (2, 2), (1, 1))
    rows = np.moveaxis(grad_z, 1, -1).reshape(1, -1, 4)
    assert_close(grad_w, np.swapaxes(rows, -1, -2) @ patches, 1e-12, "G^T X")
    assert_close(gram, expected, 1e-12, "explicit Gram")
    assert_close(tc.conv_gram(x, (7, 7), (2, 2), (1, 1)), expected, 1e-12, "structured Gram")


def test_statistics_of_another_size_are_refused_naming_the_expected_shape():
    tc.check_packed_shape((tc.packed_size(6, 27, 3),), 6, 27, 3)
    with pytest.raises(ValueError, match=r"statistics must have shape \(1351,\).*got \(1350,\)"):
        tc.check_packed_shape((1350,), 4, 25, 2)
