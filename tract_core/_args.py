"""Argument checks shared by the adapters: per-axis values, padding, bias shapes.

No framework is imported here.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

PAD_STRINGS = ("SAME", "SAME_LOWER", "VALID")


def is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def per_axis(value, count, name, minimum=1):
    """An int or a length-``count`` sequence of ints (each >= minimum) as a tuple."""
    values = (value,) * count if is_int(value) else value
    if (isinstance(values, Sequence) and not isinstance(values, str) and len(values) == count
            and all(is_int(v) and v >= minimum for v in values)):
        return tuple(int(v) for v in values)
    raise ValueError(f"{name} must be an int >= {minimum} or a sequence of {count} such ints "
                     f"(one per spatial axis), got {value!r}")


def conv_padding(padding, count, minimum=None):
    """'SAME'/'SAME_LOWER'/'VALID' (upper-cased), or ((lo, hi), ...) per spatial axis.

    Accepts an int or per-axis ints or (lo, hi) pairs; ``minimum`` bounds each pad
    (None: negative pads, which crop as in ``lax``, are allowed).
    """
    def fits(v):
        return is_int(v) and (minimum is None or v >= minimum)

    if isinstance(padding, str):
        if padding.upper() in PAD_STRINGS:
            return padding.upper()
    elif fits(padding):
        return ((int(padding), int(padding)),) * count
    elif isinstance(padding, Sequence) and len(padding) == count:
        pairs = tuple((p, p) if is_int(p) else tuple(p) if isinstance(p, Sequence) else None
                      for p in padding)
        if all(p is not None and len(p) == 2 and all(fits(v) for v in p) for p in pairs):
            return tuple((int(lo), int(hi)) for lo, hi in pairs)
    bound = "" if minimum is None else f" >= {minimum}"
    raise ValueError(f"padding must be 'SAME', 'VALID', 'SAME_LOWER', an int{bound}, or a "
                     f"sequence of {count} ints or (lo, hi) pairs{bound} (one per spatial "
                     f"axis), got {padding!r}")


def check_bias_shape(shape, m):
    if shape is not None and tuple(shape) != (m,):
        raise ValueError(f"bias must have shape ({m},) (one per output feature), "
                         f"got shape {tuple(shape)}")


def resolve_pads(padding, spatial, window, strides, dilation):
    """(lo, hi) per spatial axis from `conv_padding`'s result. 'SAME' as XLA, TF
    and Keras resolve it (the odd pixel goes high), 'SAME_LOWER' (it goes low)."""
    if not isinstance(padding, str):
        return tuple(padding)
    if padding == "VALID":
        return ((0, 0),) * len(spatial)
    pads = []
    for size, k, s, d in zip(spatial, window, strides, dilation):
        total = max((-(-size // s) - 1) * s + d * (k - 1) + 1 - size, 0)
        low = total // 2 if padding == "SAME" else total - total // 2
        pads.append((low, total - low))
    return tuple(pads)
