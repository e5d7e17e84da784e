"""JAX adapter: ``dense`` and ``conv`` whose kernel gradient is TrAct's.

    >>> import tract_core.jax as tj
    >>> z = tj.conv(images, kernel, bias, strides=1, padding="SAME", lam=0.1)

Both are ``jax.custom_vjp`` ops: the forward and the input and bias cotangents are the
plain ``lax.dot_general`` / ``lax.conv_general_dilated`` plus bias, as Flax calls them, bit
for bit; the kernel cotangent is ``G^T X (X^T X / b + lam I)^-1`` per feature group, in the
Flax layout, the Gram over every row of the call (token or receptive field). Examples
mapped by ``jax.vmap`` share one Gram (under ``jax.vmap(jax.grad(...))`` each gets its
share of the batch gradient); a vmapped kernel keeps its own. ``axis_name`` sums the Gram
over the devices of an enclosing ``jax.shard_map`` or ``jax.pmap``: see the distributed
training guide. Traceable, with no host callbacks; shapes, options and ``lam`` are static.

Exact gradient accumulation over micro-batches (``lax.scan``, ``optax.MultiSteps``): pass
``accumulating(kernel)`` as the kernel, sum or average the gradients as usual, then
`finalize` them (or put `precondition_accumulated` first in the optimizer chain).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Hashable, Sequence
from typing import NamedTuple

from tract_core._requires import requires

with requires("jax", "JAX"):
    import jax
    import jax.numpy as jnp
    from jax import lax

import tract_core as _tc
from tract_core import _args
from tract_core._backends import backend
from tract_core._jax_vmap import merge_leading, pooled_over_vmap, varying_alike

__all__ = ["AccumulatingKernel", "accumulating", "conv", "dense", "finalize",
           "precondition_accumulated"]


@dataclasses.dataclass(frozen=True)
class _Layer:
    """One op's static options (one custom_vjp each). A dense layer has no window."""

    lam: float
    precision: object = None
    axis_name: object = None
    window: tuple = ()
    strides: tuple = ()
    padding: object = "VALID"  # 'SAME', 'SAME_LOWER', 'VALID' or ((lo, hi), ...)
    dilation: tuple = ()
    groups: int = 1

    def apply(self, x, kernel, bias):
        if self.window:  # channels-last, as Flax calls it
            spatial = "DHW"[3 - len(self.window):]
            z = lax.conv_general_dilated(
                x, kernel, self.strides, self.padding, rhs_dilation=self.dilation,
                dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
                feature_group_count=self.groups, precision=self.precision)
        else:  # the very call nnx.Linear / nn.Dense make
            z = lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                                precision=self.precision)
        return z if bias is None else z + jnp.reshape(bias, (1,) * (z.ndim - 1) + (-1,))

    def core_layout(self, x, grad_z):
        """Statistics dtype; dense: rows (b, n), (b, m); conv: (N, C, *padded), (N, M, *out)."""
        dtype = _tc.statistics_dtype(jnp, jnp.result_type(x, grad_z))
        x, grad_z = x.astype(dtype), grad_z.astype(dtype)
        if not self.window:
            rows = math.prod(x.shape[:-1])  # spelled out: it may be 0
            return [jnp.reshape(a, (rows, a.shape[-1])) for a in (x, grad_z)]
        pads = _args.resolve_pads(self.padding, x.shape[1:-1], self.window, self.strides,
                                  self.dilation)  # negative pads crop
        x = lax.pad(x, jnp.zeros((), dtype), [(0, 0, 0), *((lo, hi, 0) for lo, hi in pads),
                                              (0, 0, 0)])
        return jnp.moveaxis(x, -1, 1), jnp.moveaxis(grad_z, -1, 1)

    def plain_and_gram(self, x, grad_z):
        """Segments (S, ...) -> each one's G_s^T X_s (S, ...) and all rows' Gram (g, n_g, n_g)."""
        merged = [merge_leading(a) for a in (x, grad_z)]
        if not self.window:
            return jnp.matmul(jnp.swapaxes(grad_z, -1, -2), x), _tc.gram(merged[0], xp=jnp)[None]
        geometry = (self.window, self.strides, self.dilation, self.groups)
        plain = jax.vmap(lambda x, g: backend(jnp).filter_grad(x, g, *geometry))(x, grad_z)
        return plain, _tc.conv_moments(*merged, *geometry, xp=jnp)[1]

    def replica_sum(self, gram, count):
        """The core's replica_sum over axis_name (one program: the same count everywhere)."""
        return lax.psum(gram, self.axis_name), count * lax.axis_size(self.axis_name)


def _block_diagonal(grad_z, groups):
    """(S, N, M, *out) -> (S * N, S * M, *out): segment s feeds output copy s (per group)."""
    s, n, m, *out = grad_z.shape
    eye = jnp.reshape(jnp.eye(s, dtype=grad_z.dtype), (s, 1, 1, s, 1, *(1,) * len(out)))
    grad_z = jnp.reshape(grad_z, (s, n, groups, 1, m // groups, *out)) * eye
    return jnp.reshape(grad_z, (s * n, s * m, *out))


def _shares(layer, x, grad_z, kernel):
    """Segments (S, ...) -> (S, *kernel.shape): G_s^T X_s A^-1, A from all rows' Gram."""
    replica_sum = None if layer.axis_name is None else layer.replica_sum
    x, grad_z = jax.vmap(layer.core_layout)(x, grad_z)
    segments, g, m_g = x.shape[0], layer.groups, kernel.shape[-1] // layer.groups
    n_g = kernel.shape[-2] * math.prod(layer.window)
    rows = math.prod(grad_z.shape[:2] + grad_z.shape[3:])  # (S, N, M, *out)
    # The shares are the blocks of the core's result for G block-diagonal over the segments;
    # that G is S times larger, so the n x n form uses each G_s^T X_s and the Gram instead.
    if segments == 1 or _tc.uses_push_through(rows, n_g, replica_sum):
        x, grads = merge_leading(x), _block_diagonal(grad_z, g)
        if layer.window:  # out: (g, S * M/g, n_g)
            out = _tc.conv_weight_grad(x, grads, layer.window, layer.strides, layer.dilation,
                                       g, layer.lam, replica_sum=replica_sum, xp=jnp)
        else:
            out = _tc.weight_grad(x, grads, layer.lam, replica_sum=replica_sum, xp=jnp)[None]
    else:
        plain, gram = layer.plain_and_gram(x, grad_z)
        if replica_sum is not None:
            gram, rows = replica_sum(gram, rows)
        plain = jnp.reshape(plain, (segments, g, m_g, n_g))  # sizes spelled out: S may be 0
        plain = jnp.reshape(jnp.swapaxes(plain, 0, 1), (g, segments * m_g, n_g))
        out = _tc.precondition(plain, gram, rows, layer.lam, xp=jnp)
    # Torch layout (g, S, M/g, C/g, *window) -> Flax's (S, *window, C/g, M).
    out = jnp.reshape(out, (g, segments, m_g, kernel.shape[-2], *layer.window))
    out = jnp.transpose(out, (1, *range(4, 4 + len(layer.window)), 3, 0, 2))
    return jnp.reshape(out, (segments, *kernel.shape))


@functools.cache
def _tract_op(layer):
    """The custom_vjp op for one static layer configuration."""

    def kernel_grads(kernel, x, grad_z):
        # float64 statistics and full-precision matmuls (TF32 loses digits), set where
        # this is traced: its vjp and the vmap rules are traced late.
        with jax.enable_x64(True), jax.default_matmul_precision("highest"):
            return (_shares(layer, x, grad_z, kernel).astype(kernel.dtype),)

    pooled_kernel_grads = pooled_over_vmap(kernel_grads, layer.axis_name)

    def backward(residuals, grad_z):
        x, kernel, bias = residuals
        grad_x, grad_bias = jax.vjp(lambda x, b: layer.apply(x, kernel, b), x, bias)[1](grad_z)
        return grad_x, pooled_kernel_grads(kernel, x[None], grad_z[None])[0][0], grad_bias

    op = jax.custom_vjp(layer.apply)
    op.defvjp(lambda x, kernel, bias: (layer.apply(x, kernel, bias), (x, kernel, bias)),
              backward)
    return op


@functools.partial(jax.tree_util.register_dataclass, data_fields=["kernel", "statistics"],
                   meta_fields=["groups"])
@dataclasses.dataclass(frozen=True)
class AccumulatingKernel:
    """A kernel whose TrAct gradient accumulates exactly over micro-batches.

    A pytree of two arrays: ``kernel`` and ``statistics``, zeros of
    `tract_core.packed_size` entries. The gradient of a loss through `dense` or `conv`
    is again an ``AccumulatingKernel``: zero for the kernel (until `finalize`) and the
    call's `tract_core.pack_statistics`, ``[G^T X, X^T X + lam b I, b]``, for the
    statistics. Sums and means of such gradients (``lax.scan``, ``optax.MultiSteps``,
    over devices) stay exact: `finalize` turns them into the union batch's
    ``(sum G^T X)(sum X^T X / sum b + lam I)^-1``. The statistics are float64 with
    ``jax_enable_x64``, else float32.
    """

    kernel: jax.Array
    statistics: jax.Array
    groups: int = 1


def accumulating(kernel: jax.typing.ArrayLike, *,
                 feature_group_count: int = 1) -> AccumulatingKernel:
    """``kernel`` with zero statistics, for exact accumulation (see `AccumulatingKernel`).

    Args:
        kernel: (n, m) for `dense` or (*window, C/g, M) for `conv`, Flax layout.
        feature_group_count: the conv's feature groups g (one Gram each).

    Returns:
        The pytree to keep in the parameters in place of ``kernel``.
    """
    kernel = jnp.asarray(kernel)
    shape, groups = kernel.shape, feature_group_count
    if kernel.ndim < 2 or not _args.is_int(groups) or groups < 1 or shape[-1] % groups:
        raise ValueError(f"kernel must have shape (n, m) or (*window, C/g, M) with M divisible "
                         f"by feature_group_count; got shape {shape} and feature_group_count "
                         f"{groups!r}")
    dtype = _tc.statistics_dtype(jnp, kernel.dtype, name="kernel")
    size = _tc.packed_size(shape[-1], math.prod(shape[:-1]), int(groups))
    return AccumulatingKernel(kernel, jnp.zeros(size, dtype), int(groups))


def _finalized(node: AccumulatingKernel) -> AccumulatingKernel:
    shape, g = node.kernel.shape, node.groups
    with jax.enable_x64(True), jax.default_matmul_precision("highest"):
        out = _tc.unpack_and_precondition(node.statistics, shape[-1], math.prod(shape[:-1]),
                                          g, xp=jnp)
        out = _tc.to_channels_last_kernel(out, shape, xp=jnp).astype(node.kernel.dtype)
    return dataclasses.replace(node, kernel=out, statistics=jnp.zeros_like(node.statistics))


def finalize(grads):
    """Accumulated gradients with every `AccumulatingKernel`'s kernel gradient written.

    Call it on the summed (or averaged) gradients of the micro-batches, before anything
    reads them (clipping, the optimizer). Each kernel gradient becomes TrAct's on the
    union of the micro-batches, scaled as the plain accumulated gradient; the statistics
    gradients become zero, so the optimizer leaves the statistics at zero. (Without
    ``finalize`` the optimizer steps the statistics, and the layer's next output is NaN.)

    Args:
        grads: any pytree of gradients holding `AccumulatingKernel` nodes.

    Returns:
        The same structure.
    """
    return jax.tree.map(lambda node: _finalized(node) if isinstance(node, AccumulatingKernel)
                        else node, grads,
                        is_leaf=lambda node: isinstance(node, AccumulatingKernel))


class _Finalizing(NamedTuple):
    """A stateless optax GradientTransformation (its ``init``/``update`` pair)."""

    init: Callable
    update: Callable


def precondition_accumulated() -> _Finalizing:
    """An optax transformation that applies `finalize` to the updates: first in the inner
    chain of ``optax.MultiSteps``, before clipping and the optimizer.

    Returns:
        A stateless ``optax.GradientTransformation`` (an ``(init, update)`` pair, made
        without importing optax).
    """
    return _Finalizing(lambda params: (),
                       lambda updates, state, params=None: (finalize(updates), state))


@functools.cache
def _accumulating_op(layer):
    """The custom_vjp op whose statistics input receives the call's packed statistics."""

    def statistics(x, grad_z):
        with jax.enable_x64(True), jax.default_matmul_precision("highest"):
            x, grad_z = layer.core_layout(x, grad_z)
            if layer.window:
                geometry = (layer.window, layer.strides, layer.dilation, layer.groups)
                moment, gram = _tc.conv_moments(x, grad_z, *geometry, xp=jnp)
                rows = grad_z.shape[0] * math.prod(grad_z.shape[2:])
            else:
                moment, gram = (a[None] for a in _tc.moments(x, grad_z, xp=jnp))
                rows = x.shape[0]
            return _tc.pack_statistics(moment, gram, rows, layer.lam, xp=jnp)

    def forward(x, kernel, bias, sums):
        # The statistics parameter stays zero when finalize runs before the optimizer; if
        # not, an optimizer stepped it with the sums: the output turns NaN, as nothing can
        # raise under jit, rather than train on a zero kernel gradient.
        skipped = jnp.any(sums != 0)
        z = layer.apply(x, kernel, bias)
        return z + jnp.where(skipped, jnp.nan, 0).astype(z.dtype)

    def backward(residuals, grad_z):
        x, kernel, bias, sums = residuals
        grad_x, grad_bias = jax.vjp(lambda x, b: layer.apply(x, kernel, b), x, bias)[1](grad_z)
        return grad_x, jnp.zeros_like(kernel), grad_bias, statistics(x, grad_z).astype(sums.dtype)

    op = jax.custom_vjp(forward)
    op.defvjp(lambda *args: (forward(*args), args), backward)
    return op


def _unpack(kernel, axis_name, groups=1):
    """(kernel array, statistics or None): an `AccumulatingKernel` checked against the
    call's options."""
    if not isinstance(kernel, AccumulatingKernel):
        return kernel, None
    if axis_name is not None:
        raise ValueError("axis_name must be None with an accumulating kernel: the statistics "
                         "are summed over devices with the gradients")
    if groups != kernel.groups:
        raise ValueError(f"the accumulating kernel must come from accumulating(kernel, "
                         f"feature_group_count={groups!r}): got groups {kernel.groups}")
    shape = jnp.shape(kernel.kernel)
    if len(shape) >= 2:  # else dense/conv refuse the kernel's shape
        _tc.check_packed_shape(jnp.shape(kernel.statistics), shape[-1],
                               math.prod(shape[:-1]), groups)
    return kernel.kernel, kernel.statistics


def _call(x, kernel, bias, lam, precision, axis_name, *conv_options, statistics=None):
    """The op of these static options applied, the arrays checked now, not in the backward."""
    _args.check_bias_shape(None if bias is None else jnp.shape(bias), jnp.shape(kernel)[-1])
    _tc.statistics_dtype(jnp, jnp.result_type(kernel), name="kernel")  # real floating
    for name, array in (("x", x), ("bias", bias)):
        if array is not None and jnp.iscomplexobj(array):
            raise TypeError(f"{name} must be real, got dtype {jnp.result_type(array)}")
    if conv_options and jnp.result_type(x) != jnp.result_type(kernel):
        raise TypeError(f"x (dtype {jnp.result_type(x)}) and kernel (dtype "
                        f"{jnp.result_type(kernel)}) must have the same dtype, as "
                        f"lax.conv_general_dilated requires")
    precision, axis_name = (tuple(v) if isinstance(v, list) else v for v in (precision, axis_name))
    layer = _Layer(_tc.check_lam(lam), precision, axis_name, *conv_options)
    try:
        hash(layer)  # the op's configuration is static
    except TypeError:
        raise ValueError(f"precision and axis_name must be static: None, hashable values (an "
                         f"axis name, a Precision) or tuples of them, got {precision!r} and "
                         f"{axis_name!r}") from None
    if statistics is not None:
        return _accumulating_op(layer)(*varying_alike(x, kernel, bias, statistics))
    return _tract_op(layer)(*varying_alike(x, kernel, bias))


def dense(x: jax.typing.ArrayLike, kernel: jax.typing.ArrayLike | AccumulatingKernel,
          bias: jax.typing.ArrayLike | None = None, *, lam: float = 0.1,
          precision: lax.PrecisionLike = None, axis_name: Hashable | None = None) -> jax.Array:
    """``x @ kernel + bias`` with TrAct's kernel gradient.

    Args:
        x: (..., n), real (an integer x is promoted, as by lax); each position is a row.
        kernel: (n, m), Flax layout, a real floating dtype, or `accumulating` of one.
        bias: (m,) or None.
        lam: finite float > 0, static (0.1 in the paper, 0.2 for long runs).
        precision: ``lax.dot_general``'s, for the forward and the input gradient.
        axis_name: None or the mapped axis name (or tuple of names) of an enclosing
            ``jax.shard_map`` or ``jax.pmap``, static; see the module docstring.

    Returns:
        (..., m), exactly ``lax.dot_general(x, kernel, ...) + bias`` as ``nnx.Linear``
        computes it. Kernel cotangent: ``(G^T X (X^T X / b + lam I)^-1)^T``, X the rows.
    """
    kernel, statistics = _unpack(kernel, axis_name)
    shape = jnp.shape(kernel)
    if len(shape) != 2:
        raise ValueError(f"kernel must have shape (n, m), got shape {shape}")
    if jnp.ndim(x) < 1 or jnp.shape(x)[-1] != shape[0]:
        raise ValueError(f"x must have shape (..., {shape[0]}) to match kernel {shape}, got "
                         f"shape {jnp.shape(x)}")
    return _call(x, kernel, bias, lam, precision, axis_name, statistics=statistics)


def conv(x: jax.typing.ArrayLike, kernel: jax.typing.ArrayLike | AccumulatingKernel,
         bias: jax.typing.ArrayLike | None = None, *, strides: int | Sequence[int] = 1,
         padding: str | int | Sequence[int | tuple[int, int]] = "VALID",
         kernel_dilation: int | Sequence[int] = 1, feature_group_count: int = 1,
         lam: float = 0.1, precision: lax.PrecisionLike = None,
         axis_name: Hashable | None = None) -> jax.Array:
    """Channels-last convolution (1-D, 2-D or 3-D) with TrAct's kernel gradient.

    Args:
        x: (N, *spatial, C), the kernel's dtype (as ``lax.conv_general_dilated`` needs).
        kernel: (*window, C / feature_group_count, M) (Flax, HWIO), real floating, or
            `accumulating` of one.
        bias: (M,) or None. strides, kernel_dilation: int or one per spatial axis.
        padding: 'SAME', 'VALID', 'SAME_LOWER', an int, or per spatial axis an int or a
            (lo, hi) pair (negative pads crop, as in lax).
        feature_group_count: feature groups, one Gram each.
        lam, precision, axis_name: as for `dense` (precision: the conv's).

    Returns:
        (N, *out_spatial, M), exactly ``lax.conv_general_dilated`` plus bias as ``nnx.Conv``
        computes it. Kernel cotangent: TrAct's per group, b = N x output positions.
    """
    kernel, statistics = _unpack(kernel, axis_name, feature_group_count)
    shape, d = jnp.shape(kernel), jnp.ndim(kernel) - 2
    if d not in (1, 2, 3) or 0 in shape[:-2] or jnp.ndim(x) != d + 2:
        raise ValueError(f"x must have shape (N, *spatial, C) and kernel (*window, C/groups, "
                         f"M) with the same 1 to 3 spatial axes, each window size >= 1, got "
                         f"shapes {jnp.shape(x)} and {shape}")
    groups = feature_group_count
    if (not _args.is_int(groups) or groups < 1 or shape[-1] % groups
            or jnp.shape(x)[-1] != shape[-2] * groups):
        raise ValueError(f"feature_group_count ({groups!r}) must be an int >= 1 dividing the "
                         f"kernel output channels ({shape[-1]}), and x channels "
                         f"({jnp.shape(x)[-1]}) must equal kernel input channels "
                         f"({shape[-2]}) x feature_group_count")
    strides, padding = _args.per_axis(strides, d, "strides"), _args.conv_padding(padding, d)
    dilation = _args.per_axis(kernel_dilation, d, "kernel_dilation")
    z = _call(x, kernel, bias, lam, precision, axis_name, shape[:-2], strides, padding,
              dilation, int(groups), statistics=statistics)
    if 0 in z.shape[1:-1]:  # lax's output is empty: refused now, not in the backward
        raise ValueError(f"kernel window {shape[:-2]} with kernel_dilation {dilation} does not "
                         f"fit x's spatial shape {jnp.shape(x)[1:-1]} padded with {padding!r}")
    return z
