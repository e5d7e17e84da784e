"""What differs between array libraries, as primitives the core calls.

The core writes TrAct's math once against the array API; what the standard lacks or a
library does better is here, one small class per library, picked from the arrays'
namespace and importing only what the caller already imported (as einops picks its
backends): ``cholesky`` (NaN/Inf or a failed factorization giving NaN, with no host
round trip) and ``solve_triangular``, of which ``spd_solve`` is made once,
``has_float64``, ``device`` (where new arrays go), ``constant`` (numpy index arrays on
the device, once per device in eager PyTorch), ``filter_grad`` (the library's conv
weight-gradient kernel) and ``correlate`` (the same at stride 1, for the structured
Gram), ``few_patch_entries`` (up to which explicit patches beat that kernel),
``patch_chunk`` (patch and gradient entries cast to float64 at once), ``batch_size`` and
``sum_over_chunks`` (batches of unknown size in TensorFlow graphs). A namespace with its
own ``spd_solve`` (the TensorFlow adapter's) is its own backend.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, TypeAlias

import array_api_compat

# Type hints: TrAct's arrays are those of any array-API library (numpy, torch, JAX, CuPy)
# or TensorFlow tensors, and their namespaces are modules or namespace objects.
Array: TypeAlias = Any
Namespace: TypeAlias = Any


class _Generic:
    """Any array-API namespace (numpy, cupy, array-api-strict)."""

    few_patch_entries = math.inf  # no conv kernel: explicit patches everywhere
    patch_chunk = 1 << 21  # 16 MiB in float64: larger chunks make the casts memory-bound

    def __init__(self, xp):
        self.xp = xp

    def has_float64(self, device):
        return True

    @staticmethod
    def device(a):
        """Where arrays made to go with ``a`` are placed (``device=`` of array creation)."""
        return array_api_compat.device(a)

    def constant(self, key, array, dtype, device):
        """``array`` (numpy) on ``device``; ``key`` names it for backends that cache."""
        return self.xp.asarray(array, dtype=dtype, device=device)

    def spd_solve(self, a, rhs):
        """``a^-1 rhs`` for symmetric positive definite ``a`` (..., n, n), rhs (..., n, k):
        Cholesky ``a = L L^T``, then ``L^-T (L^-1 rhs)``."""
        factor = self.cholesky(a)
        return self.solve_triangular(factor, self.solve_triangular(factor, rhs), transpose=True)

    def cholesky(self, a):
        """Lower factor L of SPD ``a`` (..., n, n), ``a = L L^T``; all NaN where ``a`` is
        not finite."""
        xp = self.xp
        if not bool(xp.all(xp.isfinite(a))):  # eager libraries only
            return xp.full(a.shape, math.nan, dtype=a.dtype, device=self.device(a))
        return xp.linalg.cholesky(a)

    def solve_triangular(self, factor, rhs, transpose=False):
        """``L^-1 rhs``, or ``L^-T rhs`` if ``transpose``, for lower triangular ``factor`` L
        (..., n, n) and rhs (..., n, k)."""
        xp = self.xp
        # Solved as a general system: the standard has no triangular solve.
        return xp.linalg.solve(xp.linalg.matrix_transpose(factor) if transpose else factor, rhs)

    def correlate(self, g, y, shifts):
        """out[i, j, u] = sum_{n, q} g[n, i, q] y[n, j, q + u] for u < shifts per axis."""
        return correlate_by_slices(self.xp, g, y, shifts)

    @staticmethod
    def batch_size(x):
        return x.shape[0]

    @staticmethod
    def sum_over_chunks(function, arrays, images):
        """``function(*chunk)`` summed over chunks of at most ``images`` images of
        ``arrays`` (equal batch sizes; balanced chunks). No images: one empty chunk."""
        count = arrays[0].shape[0]
        chunks = max(1, -(-count // images))
        step = max(1, -(-count // chunks))
        total = None
        for lo in range(0, max(count, 1), step):
            part = function(*(a[lo:lo + step] for a in arrays))
            total = part if total is None else tuple(t + p for t, p in zip(total, part))
        return total


class _Torch(_Generic):
    # Overlapping patches of up to this many entries per group: explicit float64 patches'
    # matmuls (MKL) beat float64 conv kernels, which have no oneDNN path (7x7/2 stem,
    # n = 147: about 0.6x the time).
    few_patch_entries = 160

    def __init__(self, xp):
        import torch

        self.torch = torch
        self.xp = xp
        self.constants = {}

    def constant(self, key, array, dtype, device):
        torch = self.torch
        if torch.compiler.is_compiling():  # a graph constant: compiled once
            return torch.as_tensor(array, dtype=dtype, device=device)
        key = (key, str(device), dtype)
        found = self.constants.get(key)
        if found is None:
            if len(self.constants) >= 256:
                self.constants.clear()
            found = self.constants[key] = torch.as_tensor(array, dtype=dtype, device=device)
        return found

    @staticmethod
    def has_float64(device):
        return getattr(device, "type", device) != "mps"  # Apple GPUs have no float64

    def cholesky(self, a):
        torch = self.torch
        # cholesky_ex never raises nor syncs with the host: failures and NaN/Inf become NaN.
        factor, info = torch.linalg.cholesky_ex(a)
        failed = (info != 0)[..., None, None]
        poison = a.sum(dim=(-2, -1), keepdim=True) * 0  # NaN/Inf anywhere in a -> NaN
        return torch.where(failed, torch.nan, factor) + poison

    def solve_triangular(self, factor, rhs, transpose=False):
        solve = self.torch.linalg.solve_triangular
        return solve(factor.mT, rhs, upper=True) if transpose else solve(factor, rhs, upper=False)

    def filter_grad(self, x, grad_z, kernel_size, stride, dilation, groups):
        """The conv's ``G^T X`` as (M, C / groups, *kernel_size), x already padded."""
        d = len(kernel_size)
        weight = x.new_empty(1).expand(grad_z.shape[1], x.shape[1] // groups, *kernel_size)
        return self.torch.ops.aten.convolution_backward(
            grad_z, x, weight, None, list(stride), [0] * d, list(dilation), False,
            [0] * d, groups, [False, True, False])[1]

    def correlate(self, g, y, shifts):
        return self.filter_grad(y, g, shifts, (1,) * len(shifts), (1,) * len(shifts), 1)


class _Jax(_Generic):
    # constant: jnp.asarray, a compile-time constant under jit (a cache would leak tracers).
    few_patch_entries = 96

    def __init__(self, xp):
        import jax

        self.xp = xp
        self.jax = jax

    def has_float64(self, device):
        # Without jax_enable_x64 (or a jax.enable_x64 context while tracing) JAX turns
        # float64 into float32; the JAX adapter traces its backward with float64 enabled.
        return self.jax.dtypes.canonicalize_dtype(self.jax.numpy.float64) == "float64"

    def device(self, a):
        # A sharded array's device is its sharding, which cannot place an array of another
        # rank; None lets JAX place the new array with the computation.
        found = array_api_compat.device(a)
        return found if isinstance(found, self.jax.Device) else None

    def cholesky(self, a):
        # jnp's Cholesky returns NaN where the factorization fails; that flows on.
        return self.xp.linalg.cholesky(a)

    def solve_triangular(self, factor, rhs, transpose=False):
        return self.jax.lax.linalg.triangular_solve(factor, rhs, left_side=True, lower=True,
                                                    transpose_a=transpose)

    def filter_grad(self, x, grad_z, kernel_size, stride, dilation, groups):
        lax = self.jax.lax
        d = len(kernel_size)
        spec = "NC" + "DHW"[3 - d:]
        numbers = lax.conv_dimension_numbers(x.shape, (1, 1, *kernel_size),
                                             (spec, "OI" + spec[2:], spec))

        def conv(weight):
            return lax.conv_general_dilated(
                x, weight, stride, [(0, 0)] * d, rhs_dilation=dilation,
                dimension_numbers=numbers, feature_group_count=groups,
                precision=lax.Precision.HIGHEST)

        shape = (grad_z.shape[1], x.shape[1] // groups, *kernel_size)
        # Zeros like x: under jax.shard_map they vary over x's axes, else the weight's
        # cotangent would come out summed over those devices.
        weight = self.xp.zeros_like(x, shape=shape)
        return self.jax.vjp(conv, weight)[1](grad_z)[0]

    def correlate(self, g, y, shifts):
        # XLA's CPU convolutions are slow on a window as large as the image; FFTs are not.
        return correlate_by_fft(self.xp, g, y, shifts)


def statistics_dtype(xp: Namespace, dtype: Any, device: Any = None, name: str = "x") -> Any:
    """The dtype TrAct's products and solve run in: float64 wherever the array library
    has it on ``device``, else float32 (float64 input stays float64).

    Pixel-scale patches give systems of condition 1e7-1e8 at lam = 0.1: summed in
    float32 their Gram loses the small eigenvalues (errors of 1e-2 to 1e-1, or a failed
    Cholesky); products of float32 entries are exact in float64.
    """
    if not xp.isdtype(dtype, "real floating"):
        raise TypeError(f"{name} must have a real floating dtype, got {dtype}")
    if backend(xp).has_float64(device):
        return xp.float64
    return xp.float32 if xp.finfo(dtype).bits < 32 else dtype


def correlate_by_slices(xp, g, y, shifts):
    """out[i, j, u] = sum_{n, q} g[n, i, q] y[n, j, q + u]: one matmul per shift u.

    g: (N, I, *inner), y: (N, J, *outer) with outer = inner + shifts - 1.
    Returns (I, J, *shifts).
    """
    inner = g.shape[2:]
    rows = xp.reshape(xp.permute_dims(g, (1, 0, *range(2, g.ndim))), (g.shape[1], -1))
    out = []
    for shift in itertools.product(*(range(k) for k in shifts)):
        window = tuple(slice(u, u + n) for u, n in zip(shift, inner))
        moved = xp.permute_dims(y[(slice(None), slice(None), *window)], (1, 0, *range(2, y.ndim)))
        out.append(xp.matmul(rows, xp.linalg.matrix_transpose(
            xp.reshape(moved, (y.shape[1], -1)))))
    return xp.reshape(xp.stack(out, axis=-1), (g.shape[1], y.shape[1], *shifts))


_CORRELATE_CHUNK = 1 << 21  # entries of y transformed at once (bounds the spectra)


def correlate_by_fft(xp, g, y, shifts):
    """`correlate_by_slices` by real FFTs of at least y's size (so no lag wraps
    around), the images in chunks; the sum over images is a matmul per frequency."""
    size = [_fft_size(s) for s in y.shape[2:]]
    axes = tuple(range(2, y.ndim))
    step = max(1, _CORRELATE_CHUNK // math.prod(y.shape[1:]))
    spectrum = 0
    for lo in range(0, g.shape[0], step):
        left = xp.conj(xp.fft.rfftn(g[lo:lo + step], s=size, axes=axes))
        right = xp.fft.rfftn(y[lo:lo + step], s=size, axes=axes)
        frequencies = (*left.shape[2:],)
        left = xp.permute_dims(xp.reshape(left, (*left.shape[:2], -1)), (2, 1, 0))
        right = xp.permute_dims(xp.reshape(right, (*right.shape[:2], -1)), (2, 0, 1))
        spectrum = spectrum + xp.matmul(left, right)  # (F, I, J)
    spectrum = xp.reshape(xp.permute_dims(spectrum, (1, 2, 0)),
                          (g.shape[1], y.shape[1], *frequencies))
    out = xp.fft.irfftn(spectrum, s=size, axes=axes)
    return out[(slice(None), slice(None), *(slice(0, k) for k in shifts))]


@functools.cache
def _fft_size(length):
    """The smallest size >= length with no prime factor above 7 (fast FFT lengths)."""
    size = max(length, 1)
    while True:
        rest = size
        for prime in (2, 3, 5, 7):
            while rest % prime == 0:
                rest //= prime
        if rest == 1:
            return size
        size += 1


def namespace(*arrays):
    """The array namespace of ``arrays``: array-api-compat's, or TensorFlow's (its own
    small module, which array-api-compat does not know)."""
    if type(arrays[0]).__module__.startswith("tensorflow"):
        from ._tf_namespace import TF

        return TF
    return array_api_compat.array_namespace(*arrays)


_BY_NAMESPACE = {}  # a plain memo: torch.compile traces through it without warnings


def backend(xp):
    """The primitives for array namespace ``xp``."""
    if hasattr(xp, "spd_solve"):
        return xp
    key = getattr(xp, "__name__", None) or id(xp)  # modules: by name, which dynamo traces
    found = _BY_NAMESPACE.get(key)
    if found is None:
        if array_api_compat.is_torch_namespace(xp):
            found = _Torch(xp)
        elif array_api_compat.is_jax_namespace(xp):
            found = _Jax(xp)
        else:
            found = _Generic(xp)
        _BY_NAMESPACE[key] = found
    return found
