"""Cholesky solves on each array library's own linear algebra, and index constants.

The array API standard has ``linalg.cholesky`` but no triangular solve, so the one
operation the core cannot write portably lives here: one small class per library,
chosen from the array's namespace, importing only what the caller already imported
(the way einops picks its backends). ``constant`` moves the core's precomputed numpy
index arrays to the arrays' device; for eager PyTorch it does so once per device, so a
backward on a GPU copies nothing from the host.
"""

from __future__ import annotations

import math

import array_api_compat


class _Generic:
    """Any array-API namespace (numpy, cupy, array-api-strict): factor, then two solves."""

    # conv_moments: sum per-image matmuls rather than one matmul over a transposed copy.
    prefers_batched_matmul = False
    frame_by_slices = False  # conv_gram's frame: gathered (see _Torch)
    gram_by_halves = False  # wide Grams in blocks of 192 columns (see _Torch)

    def __init__(self, xp):
        self.xp = xp

    def has_float64(self, device):
        """Whether float64 arrays can live on ``device`` (the core's statistics dtype)."""
        return True

    def constant(self, key, array, dtype, device):
        """``array`` (numpy) on ``device``; ``key`` names it for backends that cache."""
        return self.xp.asarray(array, dtype=dtype, device=device)

    def spd_solve(self, a, rhs):
        xp = self.xp
        finite = xp.all(xp.isfinite(a))
        if not bool(finite):  # eager libraries only: let NaN/Inf through as NaN
            device = array_api_compat.device(rhs)
            return xp.full(rhs.shape, math.nan, dtype=rhs.dtype, device=device)
        chol = xp.linalg.cholesky(a)
        # Triangular systems solved as general ones: no triangular solve in the standard.
        half = xp.linalg.solve(chol, rhs)
        return xp.linalg.solve(xp.linalg.matrix_transpose(chol), half)


class _Torch(_Generic):
    prefers_batched_matmul = True  # measured on CPU: ~1.5 ms less for a CIFAR ViT-4 stem
    # conv_gram's frame from static slices, not a gather. Measured on CPU, frame alone:
    # 7x7/2 ImageNet stem 24-27 ms vs 31-34, 3x3 CIFAR stem 2.8 vs 2.8-4.1 (XLA runs the
    # gather faster: JAX 7x7/2 Gram 132 ms vs 158 with slices).
    frame_by_slices = True
    # Wide Grams by recursive halves. Measured on CPU against blocks of 192 columns:
    # 5-18% faster for n = 588 to 3072 (ViT-16's 768: 25.9 vs 27.2 ms); under XLA the
    # halves ran slower (JAX 39 vs 29 ms, TensorFlow 32.5 vs 29 ms), so only here.
    gram_by_halves = True

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

    @staticmethod
    def frame_strips(x):
        """conv_gram's frame strips as one product per position, on the rows reading
        outside, on CPU (measured, 7x7/2 stem: frame 14-19% faster); elsewhere masked
        boxes, whose fewer operations suit a GPU, where launches cost more than flops."""
        return x.device.type == "cpu"

    def spd_solve(self, a, rhs):
        torch = self.torch
        # cholesky_ex never raises nor syncs with the host: failures and NaN/Inf become NaN.
        chol, info = torch.linalg.cholesky_ex(a)
        if rhs.device.type == "cpu" and rhs.shape[-1] >= _MANY_RIGHT_HAND_SIDES:
            # rhs^T A^-1 by right-side triangular solves: measured on CPU (torch's MKL),
            # 0.5-0.95x the time of cholesky_solve for n = 27 to 3072 with m >= 64
            # right-hand sides (ViT-16: 3.3-3.4 vs 4.7-4.9 ms), but 1.7-5x the time for m <= 24.
            rows = torch.linalg.solve_triangular(chol.mT, rhs.mT, upper=True, left=False)
            out = torch.linalg.solve_triangular(chol, rows, upper=False, left=False).mT
        else:
            out = torch.cholesky_solve(rhs, chol)
        failed = (info != 0)[..., None, None]
        poison = a.sum(dim=(-2, -1), keepdim=True) * 0  # NaN/Inf anywhere in a -> NaN
        return torch.where(failed, torch.nan, out) + poison


_MANY_RIGHT_HAND_SIDES = 64  # from here _Torch solves on CPU from the right


class _Jax(_Generic):
    # constant: jnp.asarray, a compile-time constant under jit (a cache would leak tracers).

    def __init__(self, xp):
        import jax
        from jax import lax

        self.xp = xp
        self.lax = lax
        self.jax = jax

    def has_float64(self, device):
        # Without jax_enable_x64 (or a jax.enable_x64 context while tracing) JAX turns
        # float64 into float32; the JAX adapter traces its backward with float64 enabled.
        return self.jax.dtypes.canonicalize_dtype(self.jax.numpy.float64) == "float64"

    def spd_solve(self, a, rhs):
        # jnp's Cholesky returns NaN where the factorization fails; that flows on.
        chol = self.xp.linalg.cholesky(a)
        solve = self.lax.linalg.triangular_solve
        half = solve(chol, rhs, left_side=True, lower=True)
        return solve(chol, half, left_side=True, lower=True, transpose_a=True)


_BY_NAMESPACE = {}  # a plain memo: torch.compile traces through it without warnings


def backend(xp):
    """The Cholesky-solve backend for array namespace ``xp``.

    A namespace that brings its own ``spd_solve(a, rhs)`` (an adapter's shim for a
    library outside array-api-compat, such as TensorFlow) is its own backend.
    """
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
