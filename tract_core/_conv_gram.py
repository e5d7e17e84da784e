"""The Gram ``X^T X`` of a convolution's patches, without extracting every patch.

Overlapping patches share their products. Split x into its stride phases, so that tap t
of an axis reads phase (t d mod s) at offset e_t = floor(t d / s) with unit stride.
Entry ((c1, t1), (c2, t2)) of the Gram is then a correlation of two phase images at the
shift e_t2 - e_t1, summed over the window [e_t1, e_t1 + L) of each axis (L output
positions). The part of every window common to all taps, [E, L) with E the largest
offset, is one correlation per shift for all entries at once (a conv weight-gradient
kernel or FFTs; by symmetry only shifts >= 0 on the first axis). The rest lies on a
frame of output positions at most E wide, whose patches are gathered and added with a
mask. Disjoint patches (ViT, E = 0) are a reshape and one Gram.

The index arithmetic is numpy, computed once per geometry (`_GramPlan`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

import numpy as np

from . import _patches
from ._backends import Array, Namespace, backend, namespace, statistics_dtype


def conv_gram(x: Array, kernel_size: Sequence[int], stride: Sequence[int],
              dilation: Sequence[int], groups: int = 1, *,
              xp: Namespace | None = None) -> Array:
    """Gram ``X^T X`` of a convolution's patches, one per group.

    Args:
        x: (N, C, *spatial) channels-first input, already padded.
        kernel_size, stride, dilation: one int per spatial axis.
        groups: feature groups; C must be divisible by it.

    Returns:
        (groups, n_g, n_g) in the statistics dtype, n_g = C / groups * prod(kernel_size),
        equal to the Gram of `tract_core.conv_patches`.
    """
    xp = xp or namespace(x)
    device = backend(xp).device(x)
    x = xp.astype(x, statistics_dtype(xp, x.dtype, device), copy=False)
    kernel_size, stride, dilation = tuple(kernel_size), tuple(stride), tuple(dilation)
    n_g = x.shape[1] // groups * math.prod(kernel_size)
    if x.shape[0] == 0 or n_g == 0:  # no patches, or patches of no entries
        return xp.zeros((groups, n_g, n_g), dtype=x.dtype, device=device)
    if groups > 1:
        size = x.shape[1] // groups
        return xp.concat([conv_gram(x[:, i * size:(i + 1) * size], kernel_size, stride,
                                    dilation, 1, xp=xp) for i in range(groups)], axis=0)
    _, channels, *spatial = x.shape
    out = _patches.conv_output_shape(spatial, kernel_size, stride, dilation)
    reach = [max(e for _, e in axis) for axis in _tap_phases(kernel_size, stride, dilation)]
    if not any(reach) or any(n <= e for n, e in zip(out, reach)):
        # No overlap between taps' windows (ViT patches), or no common window.
        patches = _patches.conv_patches(x, kernel_size, stride, dilation, xp=xp)
        return _patches.rows_gram(xp, patches)
    geometry = (channels, tuple(spatial), kernel_size, stride, dilation)
    plan = _gram_plan(*geometry)
    found = backend(xp)
    stacked = _phase_stack(xp, x, plan, stride)  # (N, P * C, *span)
    common = stacked[(slice(None), slice(None), *(slice(e, n) for e, n in zip(reach, out)))]
    ahead = stacked[(slice(None), slice(None), slice(reach[0], None))]  # first-axis shift >= 0
    shifts = (reach[0] + 1, *(2 * e + 1 for e in reach[1:]))
    correlations = xp.reshape(found.correlate(common, ahead, shifts), (-1,))
    index = found.constant((geometry, "pairs"), plan.pair_index.reshape(-1), None, device)
    result = xp.reshape(xp.take(correlations, index, axis=0), plan.pair_index.shape)
    frame = _frame(xp, x, plan, geometry)
    keyed = found.constant((geometry, "keyed"), plan.row_keyed, None, device)
    result = result + xp.where(keyed, frame, xp.linalg.matrix_transpose(frame))
    return ((result + xp.linalg.matrix_transpose(result)) / 2)[None, ...]


@dataclasses.dataclass(frozen=True)
class _GramPlan:
    """Index arithmetic of `conv_gram` for one geometry."""

    span: tuple  # phase-image length per axis, L + E
    phases: tuple  # the stride phases read, as tuples of per-axis phases
    pair_index: np.ndarray  # (n, n) flat index into the correlations
    row_keyed: np.ndarray  # (n, n) bool: frame term of (r1, r2) keyed on r1's tap
    frame_index: np.ndarray  # (F, n) flat index into one image, per frame position
    frame_mask: np.ndarray  # (F, n) 1 where that tap reads outside the common window


def _tap_phases(kernel_size, stride, dilation):
    """Per axis, each tap t's (phase, offset): input t * dilation = stride * offset + phase."""
    return [[((t * d) % s, (t * d) // s) for t in range(k)]
            for k, s, d in zip(kernel_size, stride, dilation)]


_PLANS = {}  # a plain memo (torch.compile traces dicts, but warns on lru_cache)


def _gram_plan(*geometry):
    """The cached `_GramPlan` for (channels, spatial, kernel_size, stride, dilation)."""
    plan = _PLANS.get(geometry)
    if plan is None:
        if len(_PLANS) >= 64:
            _PLANS.clear()
        plan = _PLANS[geometry] = _make_gram_plan(*geometry)
    return plan


def _make_gram_plan(channels, spatial, kernel_size, stride, dilation):
    out = _patches.conv_output_shape(spatial, kernel_size, stride, dilation)
    taps = _tap_phases(kernel_size, stride, dilation)
    reach = tuple(max(e for _, e in axis) for axis in taps)
    phases = tuple(itertools.product(*(sorted({p for p, _ in axis}) for axis in taps)))
    phase_of = {p: i for i, p in enumerate(phases)}
    tap_list = list(itertools.product(*taps))  # row-major over kernel offsets
    tap_phase = np.array([phase_of[tuple(p for p, _ in tap)] for tap in tap_list])
    tap_offset = np.array([[e for _, e in tap] for tap in tap_list]).reshape(len(tap_list), -1)
    # Columns in (channel, tap) order; each reads channel `stacked` of the phase stack.
    stacked = (tap_phase[None, :] * channels + np.arange(channels)[:, None]).reshape(-1)
    offset = np.tile(tap_offset, (channels, 1))  # (n, d)
    shift = offset[None, :, :] - offset[:, None, :]  # (n, n, d): e2 - e1
    # Entry (r1, r2) with a negative first-axis shift is read from (r2, r1) at the
    # opposite shift (the Gram is symmetric).
    row_keyed = shift[..., 0] >= 0
    first = np.where(row_keyed, stacked[:, None], stacked[None, :])
    second = np.where(row_keyed, stacked[None, :], stacked[:, None])
    shift = np.where(row_keyed[..., None], shift, -shift)
    pair_index = (first * len(phases) * channels + second) * (reach[0] + 1) + shift[..., 0]
    for axis in range(1, len(out)):
        pair_index = pair_index * (2 * reach[axis] + 1) + shift[..., axis] + reach[axis]
    # The frame: output positions some of whose taps read outside the common window.
    positions = np.stack(np.nonzero(_frame_positions(out, reach)), axis=1)
    q = positions[:, None, :] + tap_offset[None, :, :]  # (F, taps, d) in phase coordinates
    mask = ((q < np.asarray(reach)) | (q >= np.asarray(out))).any(axis=-1)
    tap_start = np.array(list(itertools.product(
        *(range(0, k * d, d) for k, d in zip(kernel_size, dilation)))))
    read = positions[:, None, :] * np.asarray(stride) + tap_start[None, :, :]
    flat = read @ np.array([math.prod(spatial[a + 1:]) for a in range(len(spatial))])
    frame_index = np.arange(channels)[None, :, None] * math.prod(spatial) + flat[:, None, :]
    return _GramPlan(
        span=tuple(n + e for n, e in zip(out, reach)), phases=phases,
        pair_index=_small_index(pair_index), row_keyed=row_keyed,
        frame_index=_small_index(frame_index.reshape(len(positions), -1)),
        frame_mask=np.tile(mask, (1, channels)).astype(np.float64))


def _frame_positions(out, reach):
    """Boolean (*out): output positions outside [E, L - E) on some axis."""
    inside = np.ones(out, dtype=bool)
    for axis, (n, e) in enumerate(zip(out, reach)):
        keep = np.zeros(n, dtype=bool)
        keep[e:n - e] = True
        inside &= keep.reshape((-1,) + (1,) * (len(out) - axis - 1))
    return ~inside


def _small_index(index):
    """int32 indices where they fit (the default integer of JAX without x64)."""
    return index.astype(np.int32 if index.size == 0 or index.max() < 2**31 else np.int64)


_FRAME_CHUNK = 1 << 21  # frame patch entries gathered at once (16 MiB in float64)


def _frame(xp, x, plan, geometry):
    """sum_p mask[p, r1] X[p, r1] X[p, r2] over the frame positions p, their patches
    gathered in chunks of positions to bound memory."""
    n_batch, n_cols = x.shape[0], plan.frame_index.shape[1]
    device, constant = backend(xp).device(x), backend(xp).constant
    frame = xp.zeros((n_cols, n_cols), dtype=x.dtype, device=device)
    flat = xp.reshape(x, (n_batch, math.prod(x.shape[1:])))
    step = max(1, _FRAME_CHUNK // (n_batch * n_cols))
    for lo in range(0, plan.frame_index.shape[0], step):
        chunk = (geometry, lo, step)
        index = constant((chunk, "frame"), plan.frame_index[lo:lo + step].reshape(-1), None,
                         device)
        rows = xp.reshape(xp.take(flat, index, axis=1), (n_batch, -1, n_cols))
        mask = constant((chunk, "mask"), plan.frame_mask[lo:lo + step], x.dtype, device)
        frame = frame + xp.matmul(xp.linalg.matrix_transpose(
            xp.reshape(rows * mask, (-1, n_cols))), xp.reshape(rows, (-1, n_cols)))
    return frame


def _phase_stack(xp, x, plan, stride):
    """The stride phases of x side by side: (N, P * C, *span), phase-major channels.

    Phase p of an axis is x[p::s] cropped or zero-filled to the span. When every phase is
    used and the input covers s * span on every axis, this is one reshape and transpose.
    """
    n_batch, channels, *spatial = x.shape
    d = len(spatial)
    if len(plan.phases) == math.prod(stride) > 1 and all(
            size >= s * n for size, s, n in zip(spatial, stride, plan.span)):
        x = x[(slice(None), slice(None), *(slice(0, s * n) for s, n in zip(stride, plan.span)))]
        split = [v for s, n in zip(stride, plan.span) for v in (n, s)]
        x = xp.reshape(x, (n_batch, channels, *split))  # (N, C, L0, s0, L1, s1, ...)
        order = (0, *(3 + 2 * a for a in range(d)), 1, *(2 + 2 * a for a in range(d)))
        return xp.reshape(xp.permute_dims(x, order),
                          (n_batch, len(plan.phases) * channels, *plan.span))
    images = []
    for phase in plan.phases:
        image = x[(slice(None), slice(None), *(slice(p, None, s) for p, s in zip(phase, stride)))]
        for axis, length in enumerate(plan.span):  # crop or zero-fill each axis to its span
            have = image.shape[2 + axis]
            image = image[(slice(None),) * (2 + axis) + (slice(0, length),)]
            if have < length:
                fill = list(image.shape)
                fill[2 + axis] = length - have
                zeros = xp.zeros(tuple(fill), dtype=x.dtype, device=backend(xp).device(x))
                image = xp.concat([image, zeros], axis=2 + axis)
        images.append(image)
    return xp.concat(images, axis=1) if len(images) > 1 else images[0]
