"""Seeded random layer geometries for the differential fuzz (tests/test_fuzz.py), the
independent float64 reference it checks TrAct's weight gradient against, and the
coverage table of docs/guide/verified.md.

Pure Python and numpy: the generator and the table need no framework, so the table is
checked in every test environment. Cases are deterministic given TRACT_FUZZ_SEED (default 0);
TRACT_FUZZ_SCALE (default 1) multiplies the number of random cases, for longer local
runs. A failing case's pytest id names its geometry; rerun it alone with ``-k``.

    python tests/fuzz.py --table            # the coverage table, as in the docs

The reference shares no code with tract_core: each framework's own plain convolution,
run in float64 with one-hot ("identity") filters, one per patch entry, writes out every
receptive field (the framework's padding conventions included); per feature group,
``G^T X (X^T X / b + lam I)^-1`` then comes from numpy's ``solve``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import zlib

import numpy as np

SEED = int(os.environ.get("TRACT_FUZZ_SEED", "0"))
SCALE = float(os.environ.get("TRACT_FUZZ_SCALE", "1"))

# (family, mode) -> random cases at scale 1. Compiling modes get few: each case compiles.
PLAN = {
    ("torch", "eager"): 240,
    ("torch", "inplace"): 24,
    ("torch", "compile"): 3,
    ("jax", "jit"): 40,
    ("jax", "vmap"): 16,
    ("flax", "nnx"): 24,
    ("tensorflow", "eager"): 24,
    ("tensorflow", "function"): 16,
    ("tensorflow", "xla"): 10,
    ("keras", "layer"): 30,
}

# Smooth [0, 255] images through real first layers, float32 against float64.
STEMS = {
    # name: (in channels, out channels, kernel, stride, torch/int padding, keras padding,
    #        image sizes, batch sizes)
    "stem7x7/2": (3, 16, 7, 2, 3, "same", (32, 48, 64), (2, 3, 4)),
    "stem3x3": (3, 16, 3, 1, 1, "same", (32, 40), (2, 3)),
    "vit16": (3, 24, 16, 16, 0, "valid", (64,), (2,)),
    "vit4": (3, 384, 4, 4, 0, "valid", (32,), (2, 4)),  # the paper's CIFAR ViT: m >= 4n
}
# Which modes run the stems (every stem once each), and which stems run compiled.
STEM_MODES = {
    ("torch", "eager"): ("stem7x7/2", "stem3x3", "vit16", "vit4", "stem7x7/2", "vit16"),
    ("torch", "compile"): ("stem7x7/2",),
    ("jax", "jit"): ("stem7x7/2", "stem3x3", "vit16", "vit4"),
    ("flax", "nnx"): ("stem7x7/2", "vit16"),
    ("tensorflow", "eager"): ("stem7x7/2", "stem3x3", "vit16", "vit4"),
    ("tensorflow", "function"): ("stem7x7/2", "vit16"),
    ("keras", "layer"): ("stem7x7/2", "stem3x3", "vit16", "vit4"),
}

MODE_TITLES = {
    ("torch", "eager"): "PyTorch eager",
    ("torch", "inplace"): "PyTorch, in-place op after",
    ("torch", "compile"): "PyTorch `torch.compile`",
    ("jax", "jit"): "JAX `jit`",
    ("jax", "vmap"): "JAX `vmap` per example",
    ("flax", "nnx"): "Flax NNX",
    ("tensorflow", "eager"): "TF eager",
    ("tensorflow", "function"): "TF `tf.function`, unknown batch",
    ("tensorflow", "xla"): "TF `jit_compile`",
    ("keras", "layer"): "Keras layers",
}

FAMILIES = ("torch", "jax", "flax", "tensorflow", "keras")


# --------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class Case:
    """One random layer. Sizes in the torch convention: x (N, C, *spatial), weight
    (M, C/groups, *kernel); dense x (N, *lead, n), weight (m, n). ``padding`` is spelled
    as the family's API takes it; ``pads`` is what it resolves to, (lo, hi) per axis."""

    family: str
    mode: str
    index: int
    kind: str  # 'dense' or 'conv'
    batch: int
    in_features: int  # n (dense) or C (conv)
    out_features: int  # m or M
    lead: tuple = ()  # dense: extra leading axes after the batch axis
    spatial: tuple = ()
    kernel: tuple = ()
    stride: tuple = ()
    dilation: tuple = ()
    padding: object = 0
    pads: tuple = ()
    groups: int = 1
    padding_mode: str = "zeros"  # torch's padding_mode
    bias: bool = True
    layout: str = "contiguous"  # torch: contiguous/channels_last/sliced; keras: data_format
    dtype: str = "float32"
    data: str = "normal"  # 'normal' or a stem name (smooth [0, 255] images)
    nan: bool = False
    lam: float = 0.1
    seed: int = 0

    @property
    def d(self):
        return len(self.spatial)

    @property
    def out_spatial(self):
        return tuple(
            (s + lo + hi - dl * (k - 1) - 1) // st + 1
            for s, (lo, hi), k, st, dl in zip(self.spatial, self.pads, self.kernel,
                                              self.stride, self.dilation))

    @property
    def rows(self):
        """b: rows of X (receptive fields or tokens) over the batch."""
        if self.kind == "dense":
            return self.batch * math.prod(self.lead)
        return self.batch * math.prod(self.out_spatial)

    @property
    def row_width(self):
        """n: entries of one row (per group)."""
        if self.kind == "dense":
            return self.in_features
        return self.in_features // self.groups * math.prod(self.kernel)

    @property
    def x_shape(self):
        if self.kind == "dense":
            return (self.batch, *self.lead, self.in_features)
        return (self.batch, self.in_features, *self.spatial)

    @property
    def z_shape(self):
        if self.kind == "dense":
            return (self.batch, *self.lead, self.out_features)
        return (self.batch, self.out_features, *self.out_spatial)

    @property
    def weight_shape(self):
        if self.kind == "dense":
            return (self.out_features, self.in_features)
        return (self.out_features, self.in_features // self.groups, *self.kernel)

    @property
    def key(self):
        return f"{self.family}-{self.mode}-{self.index:03d}"

    def __str__(self):
        def axes(t):
            return "x".join(map(str, t))

        parts = [self.key]
        if self.kind == "dense":
            parts.append(f"dense,N{self.batch},lead({axes(self.lead)}),"
                         f"{self.in_features}>{self.out_features}")
        else:
            padding = self.padding if isinstance(self.padding, str) else repr(self.padding)
            parts.append(
                f"conv{self.d}d,N{self.batch},C{self.in_features}>{self.out_features},"
                f"in{axes(self.spatial)},k{axes(self.kernel)},s{axes(self.stride)},"
                f"d{axes(self.dilation)},p{padding.replace(' ', '')},g{self.groups}")
            if self.padding_mode != "zeros":
                parts.append(self.padding_mode)
        parts.append("bias" if self.bias else "nobias")
        parts.append({"float32": "f32", "float64": "f64"}[self.dtype])
        if self.layout != "contiguous":
            parts.append(self.layout)
        if self.data != "normal":
            parts.append(f"images:{self.data}")
        if self.nan:
            parts.append("nan")
        parts.append(f"lam{self.lam:g}")
        parts.append(f"b{self.rows}n{self.row_width}")
        parts.append(f"seed{self.seed}")
        return ",".join(parts)


def _rng(seed, *key):
    """A generator seeded by ``seed`` and a stable key (crc32, not hash())."""
    words = [seed] + [zlib.crc32(str(k).encode()) for k in key]
    return np.random.default_rng(words)


def _same_pads(size, k, stride, dilation, lower=False):
    """TF / lax 'SAME': total pad from ceil(size / stride); the odd pixel goes high
    ('SAME_LOWER': low)."""
    total = max((-(-size // stride) - 1) * stride + dilation * (k - 1) + 1 - size, 0)
    low = total - total // 2 if lower else total // 2
    return (low, total - low)


def _pick(rng, options, p=None):
    return options[rng.choice(len(options), p=p)]


def _conv_padding(rng, family, d, spatial, kernel, stride, dilation):
    """(padding as the family spells it, resolved pads, torch padding_mode)."""
    span = [dl * (k - 1) for k, dl in zip(kernel, dilation)]
    ints = tuple(int(rng.integers(0, s // 2 + 2)) for s in span)
    mode = "zeros"
    if family == "torch":
        kind = _pick(rng, ["int", "axes", "same", "valid"], [0.35, 0.3, 0.2, 0.15])
        if kind == "same" and max(stride) > 1:
            kind = "axes"
        if kind == "int":
            padding, pads = ints[0], ((ints[0], ints[0]),) * d
        elif kind == "axes":
            padding, pads = ints, tuple((p, p) for p in ints)
        elif kind == "same":
            padding, pads = "same", tuple((s // 2, s - s // 2) for s in span)
        else:
            padding, pads = "valid", ((0, 0),) * d
        mode = _pick(rng, ["zeros", "reflect", "replicate", "circular"], [0.55, 0.15, 0.15, 0.15])
        return padding, pads, mode
    strings = {"jax": ["SAME", "VALID", "SAME_LOWER"],
               "tensorflow": ["SAME", "VALID", "SAME_LOWER"],
               "flax": ["SAME", "VALID", "CIRCULAR", "REFLECT"] + (["CAUSAL"] if d == 1 else []),
               "keras": ["same", "valid"] + (["causal"] if d == 1 else [])}[family]
    if family == "keras" or rng.random() < 0.5:
        padding = _pick(rng, strings)
        upper = padding.upper()
        if upper == "VALID":
            pads = ((0, 0),) * d
        elif upper == "CAUSAL":
            pads = ((span[0], 0),)
        else:
            pads = tuple(_same_pads(s, k, st, dl, lower=upper == "SAME_LOWER")
                         for s, k, st, dl in zip(spatial, kernel, stride, dilation))
        return padding, pads, mode
    if rng.random() < 0.3:
        return ints[0], ((ints[0], ints[0]),) * d, mode
    pads = tuple((int(rng.integers(0, s + 2)), int(rng.integers(0, s + 2))) for s in span)
    # Per axis an int or a (lo, hi) pair, as the adapters take it; a pair for Flax.
    padding = tuple(lo if lo == hi and family != "flax" and rng.random() < 0.5 else (lo, hi)
                    for lo, hi in pads)
    return padding, pads, mode


def _conv_case(rng, family, mode, index):
    while True:
        d = int(rng.choice([1, 2, 3], p=[0.35, 0.45, 0.2]))
        max_size, max_k = {1: (13, 5), 2: (9, 4), 3: (5, 3)}[d]
        spatial = tuple(int(rng.integers(2, max_size + 1)) for _ in range(d))
        kernel = tuple(int(rng.integers(1, max_k + 1)) for _ in range(d))
        stride = tuple(int(rng.integers(1, 4)) if rng.random() < 0.4 else 1 for _ in range(d))
        dilation = tuple(2 if rng.random() < 0.2 else 1 for _ in range(d))
        shape = rng.random()
        if shape < 0.15:  # disjoint patches, as a ViT's patch embedding
            stride, dilation = kernel, (1,) * d
        elif shape < 0.25:  # gaps between the patches
            stride = tuple(k + int(rng.integers(0, 3)) for k in kernel)
            dilation = (1,) * d
        if family in ("tensorflow", "keras") and max(stride) > 1 and max(dilation) > 1:
            continue  # tf.nn.convolution and Keras refuse strides with dilation
        grouping = _pick(rng, ["one", "groups", "depthwise"], [0.6, 0.25, 0.15])
        if grouping == "one":
            groups, c_g = 1, int(rng.integers(1, 5))
            m = int(rng.integers(1, 6))
        elif grouping == "groups":
            groups, c_g = int(rng.integers(2, 4)), int(rng.integers(1, 3))
            m = groups * int(rng.integers(1, 3))
        else:
            groups, c_g = int(rng.integers(2, 5)), 1
            m = groups * int(rng.integers(1, 3))
        padding, pads, padding_mode = _conv_padding(rng, family, d, spatial, kernel, stride,
                                                    dilation)
        if padding_mode == "reflect" or padding == "REFLECT":
            if any(max(p) >= s for p, s in zip(pads, spatial)):
                continue  # reflection needs pads smaller than the input
        if padding_mode == "circular" and any(max(p) > s for p, s in zip(pads, spatial)):
            continue
        batch = int(rng.choice([0, 1, 2, 3, 4], p=[0.1, 0.3, 0.25, 0.2, 0.15]))
        if mode == "compile":
            batch = max(batch, 1)
        case = Case(family, mode, index, "conv", batch, groups * c_g, m, spatial=spatial,
                    kernel=kernel, stride=stride, dilation=dilation, padding=padding,
                    pads=pads, groups=groups, padding_mode=padding_mode)
        if min(case.out_spatial) < 1:
            continue  # the kernel does not fit: the plain layer refuses it too
        return case


def _dense_case(rng, family, mode, index):
    n, m = int(rng.integers(1, 13)), int(rng.integers(1, 7))
    lead = _pick(rng, [(), (int(rng.integers(1, 4)),),
                       (int(rng.integers(1, 3)), int(rng.integers(1, 4)))], [0.5, 0.3, 0.2])
    batch = int(rng.choice([0, 1, 2, 3, 4], p=[0.1, 0.3, 0.25, 0.2, 0.15]))
    if mode == "compile":
        batch = max(batch, 1)
    return Case(family, mode, index, "dense", batch, n, m, lead=tuple(lead))


def _random_case(family, mode, index, seed):
    rng = _rng(seed, family, mode, index)
    dense = rng.random() < 0.2
    case = (_dense_case if dense else _conv_case)(rng, family, mode, index)
    if family == "torch":
        layout = _pick(rng, ["contiguous", "channels_last", "sliced"], [0.5, 0.25, 0.25])
        if case.kind == "dense" and layout == "channels_last":
            layout = "contiguous"
    elif family == "keras" and case.kind == "conv":
        layout = _pick(rng, ["contiguous", "channels_first"], [0.7, 0.3])
    else:
        layout = "contiguous"
    dtype = "float64" if rng.random() < 0.4 and mode != "compile" else "float32"
    lam = float(_pick(rng, [0.01, 0.1, 1.0], [0.2, 0.6, 0.2]))
    nan = bool(rng.random() < 0.06 and case.batch > 0 and mode not in ("compile", "inplace"))
    return dataclasses.replace(case, bias=bool(rng.random() < 0.7), layout=layout,
                               dtype=dtype, lam=lam, nan=nan, seed=seed)


def _stem_case(family, mode, index, name, occurrence, seed):
    channels, out, k, s, p, keras_padding, sizes, batches = STEMS[name]
    rng = _rng(seed, family, mode, "stem", name, occurrence)
    size = int(rng.choice(sizes))
    spatial, kernel, stride, dilation = (size, size), (k, k), (s, s), (1, 1)
    if family == "keras":
        padding = keras_padding
        pads = tuple(_same_pads(size, k, s, 1) for _ in range(2)) if padding == "same" \
            else ((0, 0),) * 2
    elif family == "torch":
        padding, pads = p, ((p, p),) * 2
    else:
        padding, pads = ((p, p), (p, p)), ((p, p),) * 2
    layout = "contiguous"
    if family == "torch" and occurrence % 2:
        layout = "channels_last"
    return Case(family, mode, index, "conv", int(rng.choice(batches)), channels, out,
                spatial=spatial, kernel=kernel, stride=stride, dilation=dilation,
                padding=padding, pads=pads, bias=True, layout=layout, dtype="float32",
                data=name, lam=0.1, seed=seed)


def cases(family, mode, scale=None, seed=None):
    """The seeded cases of one family and mode: random ones, then the image stems.
    Defaults: TRACT_FUZZ_SCALE and TRACT_FUZZ_SEED."""
    seed = SEED if seed is None else seed
    count = max(1, round(PLAN[(family, mode)] * (SCALE if scale is None else scale)))
    out = [_random_case(family, mode, i, seed) for i in range(count)]
    convs = [case for case in out if case.kind == "conv" and not case.nan]
    if mode != "compile" and convs and not any(case.batch == 0 for case in convs):
        # Every mode meets an empty conv batch (a loader's last batch, filtered).
        out.append(dataclasses.replace(convs[0], index=len(out), batch=0))
    for j, name in enumerate(STEM_MODES.get((family, mode), ())):
        out.append(_stem_case(family, mode, len(out), name, j, seed))
    return out


def modes(family):
    return [mode for fam, mode in PLAN if fam == family]


# --------------------------------------------------------------------------- data


def _cubic_upsample(a, size, axis):
    """Keys cubic interpolation (a = -0.5) of ``a`` along ``axis`` to ``size`` samples."""
    n = a.shape[axis]
    t = np.linspace(0, n - 1, size)
    i = np.floor(t).astype(int)
    f = t - i
    weights = [
        ((-0.5 * f + 1.0) * f - 0.5) * f,
        (1.5 * f - 2.5) * f * f + 1.0,
        ((-1.5 * f + 2.0) * f + 0.5) * f,
        (0.5 * f - 0.5) * f * f,
    ]
    a = np.moveaxis(a, axis, -1)
    out = sum(w * a[..., np.clip(i + o, 0, n - 1)] for w, o in zip(weights, (-1, 0, 1, 2)))
    return np.moveaxis(out, -1, axis)


def smooth_images(rng, batch, channels, size):
    """Photo-like pixels in [0, 255]: coarse noise, bicubic-upsampled (neighbours strongly
    correlated), colour channels correlated; rounded to integers half the time."""
    coarse = max(2, size // 8)
    base = rng.uniform(0, 1, (batch, 1, coarse, coarse))
    tint = rng.uniform(-0.15, 0.15, (batch, channels, coarse, coarse))
    a = base + tint
    for axis in (2, 3):
        a = _cubic_upsample(a, size, axis)
    a = np.clip(a * 255.0, 0.0, 255.0)
    return np.round(a) if rng.random() < 0.5 else a


def arrays(case):
    """x, weight, bias (None without), cotangent R: float64 numpy in the torch layout,
    x and the parameters already rounded to the case's dtype. The loss is sum(z * R)."""
    rng = _rng(case.seed, case.key, "data")
    dtype = np.dtype(case.dtype)
    if case.data != "normal":
        x = smooth_images(rng, case.batch, case.in_features, case.spatial[0])
        fan_in = case.row_width
        weight = rng.uniform(-1, 1, case.weight_shape) / math.sqrt(fan_in)
    else:
        x = rng.standard_normal(case.x_shape)
        weight = rng.standard_normal(case.weight_shape)
    if case.nan:
        x.reshape(-1)[rng.integers(0, x.size)] = np.nan
    bias = rng.standard_normal(case.out_features) if case.bias else None
    r = rng.standard_normal(case.z_shape)

    def cast(a):
        return None if a is None else a.astype(dtype).astype(np.float64)

    return cast(x), cast(weight), cast(bias), cast(r)


def identity_weight(channels, kernel):
    """(C * K, C, *kernel) one-hot filters, torch layout: output channel c * K + j picks
    entry j of channel c's window, so the conv writes out every patch in the torch
    weight's column order (channel-major, then the window in C order)."""
    size = math.prod(kernel)
    weight = np.zeros((channels * size, channels, *kernel))
    for c in range(channels):
        for j, where in enumerate(np.ndindex(*kernel)):
            weight[(c * size + j, c, *where)] = 1.0
    return weight


def channels_last_kernel(weight):
    """Torch layout (M, C/g, *k) -> Keras / lax layout (*k, C/g, M); dense (m, n) -> (n, m)."""
    if weight.ndim == 2:
        return weight.T
    d = weight.ndim - 2
    return np.transpose(weight, (*range(2, d + 2), 1, 0))


def torch_layout_kernel(kernel):
    """Inverse of channels_last_kernel."""
    if kernel.ndim == 2:
        return kernel.T
    d = kernel.ndim - 2
    return np.transpose(kernel, (d + 1, d, *range(d)))


def reference_weight_grad(case, patch_rows, grad_rows):
    """TrAct's weight gradient in float64, torch layout.

    Args:
        patch_rows: (b, C * K) receptive fields (dense: (b, n)), columns channel-major.
        grad_rows: (b, M) dL/dz in the same row order.

    Per group j: X_j the group's columns, G_j its output channels,
    ``G_j^T X_j (X_j^T X_j / b + lam I)^-1``; no rows give zeros.
    """
    g = case.groups
    b, width = patch_rows.shape
    n_g, m_g = width // g, case.out_features // g
    out = np.zeros((case.out_features, n_g))
    if b == 0:
        return out.reshape(case.weight_shape)
    for j in range(g):
        x = patch_rows[:, j * n_g:(j + 1) * n_g]
        grad = grad_rows[:, j * m_g:(j + 1) * m_g]
        system = x.T @ x / b + case.lam * np.eye(n_g)
        if not np.isfinite(system).all():
            out[j * m_g:(j + 1) * m_g] = np.nan
            continue
        # (G^T X) A^-1 = (A^-1 X^T G)^T for symmetric A.
        out[j * m_g:(j + 1) * m_g] = np.linalg.solve(system, x.T @ grad).T
    return out.reshape(case.weight_shape)


def relative_error(actual, expected):
    """Relative error in the Frobenius norm (absolute where the reference is zero)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = np.linalg.norm(expected)
    return float(np.linalg.norm(actual - expected) / (scale if scale > 0 else 1.0))


# Weight gradient against the float64 reference: float64 to rounding, float32 to its
# input and output rounding amplified by the system's condition.
RTOL = {"float64": 1e-8, "float32": 1e-3}


# --------------------------------------------------------------------------- table

# Table rows: (label, predicate on a case).
OPTIONS = [
    ("Dense, 2-D input", lambda c: c.kind == "dense" and not c.lead),
    ("Dense, extra leading axes", lambda c: c.kind == "dense" and bool(c.lead)),
    ("Conv 1-D", lambda c: c.kind == "conv" and c.d == 1),
    ("Conv 2-D", lambda c: c.kind == "conv" and c.d == 2),
    ("Conv 3-D", lambda c: c.kind == "conv" and c.d == 3),
    ("Asymmetric kernel", lambda c: len(set(c.kernel)) > 1),
    ("Stride > 1", lambda c: c.kind == "conv" and max(c.stride) > 1),
    ("Kernel smaller than stride", lambda c: c.kind == "conv" and any(
        k < s for k, s in zip(c.kernel, c.stride))),
    ("Disjoint patches (stride >= kernel)", lambda c: c.kind == "conv" and all(
        s >= k for k, s in zip(c.kernel, c.stride)) and max(c.dilation) == 1),
    ("Dilation > 1", lambda c: c.kind == "conv" and max(c.dilation) > 1),
    ("Padding: one int", lambda c: c.kind == "conv" and isinstance(c.padding, int)),
    ("Padding: per axis / (lo, hi) pairs", lambda c: isinstance(c.padding, tuple)),
    ("Padding: uneven lo != hi", lambda c: any(lo != hi for lo, hi in c.pads)),
    ("Padding: same / SAME", lambda c: str(c.padding).upper() == "SAME"),
    ("Padding: SAME_LOWER", lambda c: c.padding == "SAME_LOWER"),
    ("Padding: valid / VALID", lambda c: str(c.padding).upper() == "VALID"),
    ("Padding: causal", lambda c: str(c.padding).upper() == "CAUSAL"),
    ("Padding mode reflect", lambda c: c.padding_mode == "reflect" or c.padding == "REFLECT"),
    ("Padding mode replicate", lambda c: c.padding_mode == "replicate"),
    ("Padding mode circular", lambda c: c.padding_mode == "circular" or c.padding == "CIRCULAR"),
    ("Groups > 1", lambda c: c.groups > 1 and c.in_features > c.groups),
    ("Depthwise (C/groups = 1)", lambda c: c.groups > 1 and c.in_features == c.groups),
    ("No bias", lambda c: not c.bias),
    ("Empty batch (N = 0)", lambda c: c.batch == 0),
    ("b < n (b x b form)", lambda c: 0 < c.rows < c.row_width),
    ("b >= n", lambda c: c.rows >= c.row_width),
    ("Whitened rows (float32, m >= 4n, rows not overlapping)", lambda c: (
        c.dtype == "float32" and c.rows >= c.row_width
        and c.out_features // c.groups >= 4 * c.row_width
        and (c.kind == "dense" or all(k <= s and (k == 1 or d == 1)
                                      for k, s, d in zip(c.kernel, c.stride, c.dilation))))),
    ("Odd spatial size", lambda c: any(s % 2 for s in c.spatial)),
    ("Channels-last input", lambda c: c.layout == "channels_last"),
    ("Channels-first layer", lambda c: c.layout == "channels_first"),
    ("Sliced (non-contiguous) input", lambda c: c.layout == "sliced"),
    ("float32", lambda c: c.dtype == "float32"),
    ("float64", lambda c: c.dtype == "float64"),
    ("NaN in the input", lambda c: c.nan),
    ("Smooth [0, 255] images (stems, ViT)", lambda c: c.data != "normal"),
    ("**All cases**", lambda c: True),
]


def coverage_table():
    """The markdown table of docs/guide/verified.md: cases per option and mode."""
    columns = list(PLAN)
    every = {column: cases(*column, scale=1, seed=0) for column in columns}
    head = "| Option | " + " | ".join(MODE_TITLES[c] for c in columns) + " |"
    rule = "|---|" + "---:|" * len(columns)
    lines = [head, rule]
    for label, test in OPTIONS:
        counts = [sum(1 for c in every[column] if test(c)) for column in columns]
        lines.append(f"| {label} | " + " | ".join(str(n) if n else "·" for n in counts) + " |")
    return "\n".join(lines)


def main(argv):
    if argv[1:] == ["--table"]:
        print(coverage_table())
        return 0
    if argv[1:2] == ["--list"]:
        for family, mode in PLAN:
            for case in cases(family, mode):
                print(case)
        return 0
    print("usage: python tests/fuzz.py --table | --list", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
