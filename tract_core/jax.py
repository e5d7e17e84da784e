"""JAX adapter: ``dense`` and ``conv`` whose kernel gradient is TrAct's.

    >>> import tract_core.jax as tj
    >>> z = tj.conv(images, kernel, bias, strides=1, padding="SAME", lam=0.1)

Both are ``jax.custom_vjp`` ops. The forward and the input and bias cotangents are the
plain op's (``lax.dot_general`` or ``lax.conv_general_dilated`` plus bias, as Flax calls
them), bit for bit; the kernel cotangent is ``G^T X (X^T X / b + lam I)^-1`` from
:mod:`tract_core`, per feature group, in the Flax layout.

The Gram sums over every row of the call (every token for dense, every receptive field for
conv). Under ``jax.vmap`` over examples (Equinox style) the examples are pooled into one
Gram, so the kernel gradient is that of one call on the stacked batch; under
``jax.vmap(jax.grad(...))`` example i gets its share ``G_i^T X_i A^-1``, A from the whole
vmapped batch, and the shares sum to the batch gradient. A vmapped kernel (an ensemble)
keeps separate statistics per kernel.

Data parallelism: without ``axis_name`` each device uses its own shard's statistics. With
``axis_name`` naming the batch axis of an enclosing ``jax.shard_map`` or ``jax.pmap``, the
Gram is ``psum``'d and b is the local rows times the axis size: each device's kernel
cotangent is its share of the full-batch gradient, and the shares sum to it. Under
``shard_map`` (check_vma) a replicated kernel is cast to device-varying before the op, a
cast that transposes to a psum, so ``jax.grad`` inside it already gives the sum (do not
psum again); under ``pmap``, psum the gradients yourself. Vmapped examples inside pool
with the devices; ``axis_name`` naming a ``jax.vmap``'s own axis raises
NotImplementedError. Recipes: the distributed training guide.

Everything is traceable, with no host callbacks; shapes, options and ``lam`` are static.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

import tract_core as _tc
from tract_core import _args
from tract_core._backends import backend
from tract_core._jax_vmap import pooled_over_vmap, varying_alike

__all__ = ["conv", "dense"]


def _channels_last_dimension_numbers(ndim):
    """(N, *spatial, C) input, (*window, C/g, M) kernel: what Flax passes to lax."""
    lhs = (0, ndim - 1, *range(1, ndim - 1))
    return lax.ConvDimensionNumbers(lhs, (ndim - 1, ndim - 2, *range(ndim - 2)), lhs)


@dataclasses.dataclass(frozen=True)
class _Layer:
    """One op's static options (one custom_vjp each) and the translation to the core's
    layouts. A dense layer has no strides."""

    lam: float
    precision: object = None
    axis_name: object = None
    strides: tuple = ()
    padding: object = "VALID"  # 'SAME', 'SAME_LOWER', 'VALID' or ((lo, hi), ...)
    dilation: tuple = ()
    groups: int = 1

    def apply(self, x, kernel, bias):
        if self.strides:
            z = lax.conv_general_dilated(
                x, kernel, self.strides, self.padding, rhs_dilation=self.dilation,
                dimension_numbers=_channels_last_dimension_numbers(x.ndim),
                feature_group_count=self.groups, precision=self.precision)
        else:  # the very call nnx.Linear / nn.Dense make
            z = lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                                precision=self.precision)
        return z if bias is None else z + jnp.reshape(bias, (1,) * (z.ndim - 1) + (-1,))

    def core_layout(self, x, grad_z, kernel):
        """In the statistics dtype: dense rows (b, n) and (b, m); conv x padded and both
        channels-first, (N, C, *padded) and (N, M, *out). An integer x is promoted."""
        dtype = _tc.statistics_dtype(jnp, jnp.result_type(x, grad_z))
        x, grad_z = x.astype(dtype), grad_z.astype(dtype)
        if not self.strides:
            rows = math.prod(x.shape[:-1])  # spelled out: it may be 0
            return [jnp.reshape(a, (rows, a.shape[-1])) for a in (x, grad_z)]
        pads = _args.resolve_pads(self.padding, x.shape[1:-1], kernel.shape[:-2],
                                  self.strides, self.dilation)  # negative pads crop
        x = lax.pad(x, jnp.zeros((), dtype), [(0, 0, 0), *((lo, hi, 0) for lo, hi in pads),
                                              (0, 0, 0)])
        return jnp.moveaxis(x, -1, 1), jnp.moveaxis(grad_z, -1, 1)

    def weight_grad(self, x, grad_z, kernel, replica_sum):
        """The core's TrAct gradient of one call, (g, M/g, n_g)."""
        if not self.strides:
            return _tc.weight_grad(x, grad_z, self.lam, replica_sum=replica_sum, xp=jnp)[None]
        return _tc.conv_weight_grad(x, grad_z, kernel.shape[:-2], self.strides, self.dilation,
                                    self.groups, self.lam, replica_sum=replica_sum, xp=jnp)

    def plain_and_gram(self, x, grad_z, kernel):
        """Core-layout x and grad_z of S segments (S, ...) -> each segment's G_s^T X_s
        (S, g, M/g, n_g) and the core's Gram of all their rows (g, n_g, n_g)."""
        merged = [_merge(a) for a in (x, grad_z)]
        if not self.strides:
            plain = jnp.matmul(jnp.swapaxes(grad_z, -1, -2), x)
            return plain[:, None], _tc.gram(merged[0], xp=jnp)[None]
        window = kernel.shape[:-2]
        plain = jax.vmap(functools.partial(backend(jnp).filter_grad, kernel_size=window,
                                           stride=self.strides, dilation=self.dilation,
                                           groups=self.groups))(x, grad_z)
        _, gram = _tc.conv_moments(*merged, window, self.strides, self.dilation, self.groups,
                                   xp=jnp)
        m_g = kernel.shape[-1] // self.groups  # spelled out: S may be 0
        return jnp.reshape(plain, (x.shape[0], self.groups, m_g, gram.shape[-1])), gram

    def replica_sum(self, gram, count):
        """The core's replica_sum over axis_name (one program: the same count everywhere)."""
        return lax.psum(gram, self.axis_name), count * lax.axis_size(self.axis_name)


def _merge(a):
    """(S, N, ...) -> (S * N, ...), sizes spelled out (S or N may be 0)."""
    return jnp.reshape(a, (a.shape[0] * a.shape[1], *a.shape[2:]))


def _block_diagonal(grad_z, groups):
    """Core-layout (S, N, M, *out) -> (S * N, S * M, *out), per group: segment s's rows
    feed only the s-th copy of the output features, so G^T X stacks the segments' G_s^T X."""
    s, n, m, *out = grad_z.shape
    eye = jnp.reshape(jnp.eye(s, dtype=grad_z.dtype), (s, 1, 1, s, 1, *(1,) * len(out)))
    grad_z = jnp.reshape(grad_z, (s, n, groups, 1, m // groups, *out)) * eye
    return jnp.reshape(grad_z, (s * n, s * m, *out))


def _shares(layer, x, grad_z, kernel):
    """x, grad_z with a leading segment axis S (vmapped examples) -> (S, g, M/g, n_g):
    ``G_s^T X_s (X^T X / b + lam I)^-1``, X and b over all segments (and devices): the
    blocks of the core's result for G block-diagonal over the segments. That G is S times
    G's size, so for b >= n rows (the core's n x n form) each segment's G_s^T X_s is
    preconditioned with the Gram of all rows instead: the same numbers."""
    replica_sum = None if layer.axis_name is None else layer.replica_sum
    core_x, core_grad = jax.vmap(layer.core_layout, (0, 0, None))(x, grad_z, kernel)
    segments, g, m_g = x.shape[0], layer.groups, kernel.shape[-1] // layer.groups
    n_g = kernel.shape[-2] * math.prod(kernel.shape[:-2])
    rows = math.prod(core_grad.shape[:2] + core_grad.shape[3:])  # (S, N, M, *out)
    if segments == 1 or _tc.uses_push_through(rows, n_g, replica_sum):
        grads = _merge(core_grad) if segments == 1 else _block_diagonal(core_grad, g)
        out = layer.weight_grad(_merge(core_x), grads, kernel, replica_sum)
    else:
        plain, gram = layer.plain_and_gram(core_x, core_grad, kernel)
        if replica_sum is not None:
            gram, rows = replica_sum(gram, rows)
        plain = jnp.reshape(jnp.swapaxes(plain, 0, 1), (g, segments * m_g, n_g))
        out = _tc.precondition(plain, gram, rows, layer.lam, xp=jnp)
    return jnp.swapaxes(jnp.reshape(out, (g, segments, m_g, n_g)), 0, 1)


@functools.cache
def _tract_op(layer):
    """The custom_vjp op for one static layer configuration."""

    def kernel_grads(x, grad_z, kernel):
        # float64 statistics (JAX makes float64 float32 unless 64-bit types are on) and
        # full-precision matmuls (TF32 loses digits pixel-scale inputs need), set where it
        # is traced: its vjp and the vmap rules are traced late.
        with jax.enable_x64(True), jax.default_matmul_precision("highest"):
            shares = _shares(layer, x, grad_z, kernel)  # (S, g, M/g, n_g), torch layout
            d = kernel.ndim - 2  # dense: n_g = n; conv: n_g = (C/g, *window)
            shares = jnp.reshape(shares, (shares.shape[0], kernel.shape[-1],
                                          kernel.shape[-2], *kernel.shape[:-2]))
            return jnp.transpose(shares, (0, *range(3, 3 + d), 2, 1)).astype(kernel.dtype)

    pooled_kernel_grads = pooled_over_vmap(kernel_grads, layer.axis_name)

    def backward(residuals, grad_z):
        x, kernel, bias = residuals
        grad_x, grad_bias = jax.vjp(lambda x, b: layer.apply(x, kernel, b), x, bias)[1](grad_z)
        return grad_x, pooled_kernel_grads(x[None], grad_z[None], kernel)[0], grad_bias

    op = jax.custom_vjp(layer.apply)
    op.defvjp(lambda x, kernel, bias: (layer.apply(x, kernel, bias), (x, kernel, bias)),
              backward)
    return op


def _static(value, name):
    """A list as a tuple, then hashable (the op's configuration is static), else ValueError."""
    value = tuple(value) if isinstance(value, list) else value
    try:
        hash(value)
    except TypeError:
        raise ValueError(f"{name} must be static: None, a hashable value (an axis name, a "
                         f"Precision) or a tuple of them, got {value!r}") from None
    return value


def _check_arrays(x, kernel, bias, *, same_dtype):
    """The bias's shape, and dtypes with a TypeError naming the argument at the call, not in
    the backward. lax's conv takes one dtype; lax.dot_general promotes an integer x."""
    _args.check_bias_shape(None if bias is None else jnp.shape(bias), jnp.shape(kernel)[-1])
    kernel_dtype = jnp.result_type(kernel)
    if not jnp.issubdtype(kernel_dtype, jnp.floating):
        raise TypeError(f"kernel must have a real floating dtype, got dtype {kernel_dtype}")
    for name, array in (("x", x), ("bias", bias)):
        if array is not None and jnp.iscomplexobj(array):
            raise TypeError(f"{name} must be real, got dtype {jnp.result_type(array)}")
    if same_dtype and jnp.result_type(x) != kernel_dtype:
        raise TypeError(f"x (dtype {jnp.result_type(x)}) and kernel (dtype {kernel_dtype}) "
                        f"must have the same dtype, as lax.conv_general_dilated requires")


def dense(x, kernel, bias=None, *, lam=0.1, precision=None, axis_name=None):
    """``x @ kernel + bias`` with TrAct's kernel gradient.

    Args:
        x: (..., n), real (an integer x is promoted, as by lax); each position is a row.
        kernel: (n, m), Flax layout, a real floating dtype. bias: (m,) or None.
        lam: finite float > 0, static (0.1 in the paper, 0.2 for long runs).
        precision: ``lax.dot_general``'s, for the forward and the input gradient.
        axis_name: None or the mapped axis name (or tuple of names) of an enclosing
            ``jax.shard_map`` or ``jax.pmap``, static; see the module docstring.

    Returns:
        (..., m), exactly ``lax.dot_general(x, kernel, ...) + bias`` as ``nnx.Linear``
        computes it. Kernel cotangent: ``(G^T X (X^T X / b + lam I)^-1)^T``, X the rows.
    """
    lam, shape = _tc.check_lam(lam), jnp.shape(kernel)
    if len(shape) != 2:
        raise ValueError(f"kernel must have shape (n, m), got shape {shape}")
    if jnp.ndim(x) < 1 or jnp.shape(x)[-1] != shape[0]:
        raise ValueError(f"x must have shape (..., {shape[0]}) to match kernel {shape}, got "
                         f"shape {jnp.shape(x)}")
    _check_arrays(x, kernel, bias, same_dtype=False)
    layer = _Layer(lam, _static(precision, "precision"), _static(axis_name, "axis_name"))
    return _tract_op(layer)(*varying_alike(x, kernel, bias))


def conv(x, kernel, bias=None, *, strides=1, padding="VALID", kernel_dilation=1,
         feature_group_count=1, lam=0.1, precision=None, axis_name=None):
    """Channels-last convolution (1-D, 2-D or 3-D) with TrAct's kernel gradient.

    Args:
        x: (N, *spatial, C), the kernel's dtype (as ``lax.conv_general_dilated`` needs).
        kernel: (*window, C / feature_group_count, M) (Flax, HWIO), real floating.
        bias: (M,) or None. strides, kernel_dilation: int or one per spatial axis.
        padding: 'SAME', 'VALID', 'SAME_LOWER', an int, or per spatial axis an int or a
            (lo, hi) pair (negative pads crop, as in lax).
        feature_group_count: feature groups, one Gram each.
        lam, precision, axis_name: as for `dense` (precision: the conv's).

    Returns:
        (N, *out_spatial, M), exactly ``lax.conv_general_dilated`` plus bias as
        ``nnx.Conv`` / ``nn.Conv`` compute it. Kernel cotangent: TrAct's per group, the
        rows every receptive field (b = N x output positions).
    """
    lam, shape, d = _tc.check_lam(lam), jnp.shape(kernel), jnp.ndim(kernel) - 2
    if d not in (1, 2, 3) or 0 in shape[:-2]:
        raise ValueError(f"kernel must have shape (*window, C/groups, M) with 1 to 3 spatial "
                         f"axes, each window size >= 1, got shape {shape}")
    if jnp.ndim(x) != d + 2:
        raise ValueError(f"x must have shape (N, *spatial, C) with {d} spatial axes to match "
                         f"kernel {shape}, got shape {jnp.shape(x)}")
    groups = feature_group_count
    if not _args.is_int(groups) or groups < 1:
        raise ValueError(f"feature_group_count must be an int >= 1, got {groups!r}")
    if jnp.shape(x)[-1] != shape[-2] * groups or shape[-1] % groups:
        raise ValueError(f"x channels ({jnp.shape(x)[-1]}) must equal kernel input channels "
                         f"({shape[-2]}) x feature_group_count ({groups}), and kernel output "
                         f"channels ({shape[-1]}) must be divisible by it")
    layer = _Layer(lam, _static(precision, "precision"), _static(axis_name, "axis_name"),
                   _args.per_axis(strides, d, "strides"), _args.conv_padding(padding, d),
                   _args.per_axis(kernel_dilation, d, "kernel_dilation"), int(groups))
    _check_arrays(x, kernel, bias, same_dtype=True)
    spatial, window = jnp.shape(x)[1:-1], shape[:-2]
    pads = _args.resolve_pads(layer.padding, spatial, window, layer.strides, layer.dilation)
    padded = [s + lo + hi for s, (lo, hi) in zip(spatial, pads)]
    if min(_tc.conv_output_shape(padded, window, layer.strides, layer.dilation)) <= 0:
        raise ValueError(f"kernel window {window} with kernel_dilation {layer.dilation} "
                         f"does not fit x's spatial shape {spatial} padded to {tuple(padded)}")
    return _tract_op(layer)(*varying_alike(x, kernel, bias))
