"""TrAct in Equinox: a per-example model, vmapped over the batch, trained with optax.

Equinox models are written for one example and ``jax.vmap``-ed over the batch. TrAct's
statistics are over the whole batch, and ``tract_core.jax.conv`` pools them across the
vmap (a ``custom_vmap`` batching rule), so the stem below gets exactly the gradient a
batched call would give. Runs in a few seconds on a CPU:

    python examples/equinox_example.py
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import tract_core.jax as tj

_PAD_MODES = {"REFLECT": "reflect", "REPLICATE": "edge", "CIRCULAR": "wrap"}


class TrActConv(eqx.Module):
    """An ``eqx.nn.Conv`` (Conv1d/2d/3d, any option) with TrAct's weight gradient.

    Keeps the Equinox layer for its parameters and initialisation; a per-example call,
    x: (C, *spatial) -> (out_channels, *out_spatial), like the layer itself. The forward
    and the input and bias gradients are the layer's own (bit for bit on CPU; the conv
    runs channels-last, which a GPU conv library may round differently).
    """

    conv: eqx.nn.Conv
    lam: float = eqx.field(static=True)

    def __init__(self, conv: eqx.nn.Conv, *, lam: float = 0.1):
        if not isinstance(conv, eqx.nn.Conv):  # ConvTranspose, Linear, ...: not a Conv
            raise TypeError(f"conv must be an eqx.nn.Conv (for an eqx.nn.Linear call "
                            f"tract_core.jax.dense), got {type(conv).__name__}")
        self.conv, self.lam = conv, lam

    def __call__(self, x, *, key=None):
        conv, d = self.conv, self.conv.num_spatial_dims
        if x.ndim != d + 1:
            raise ValueError(f"x must have shape (in_channels, *spatial) with {d} spatial "
                             f"axes, got shape {x.shape}")
        padding = conv.padding
        if conv.padding_mode != "ZEROS":  # as Equinox does it: pad, then no padding
            if isinstance(padding, str):
                window = [r * (k - 1) + 1 for k, r in zip(conv.kernel_size, conv.dilation)]
                padding = jax.lax.padtype_to_pads(x.shape[1:], window, conv.stride, padding)
            x = jnp.pad(x, [(0, 0), *padding], _PAD_MODES[conv.padding_mode])
            padding = "VALID"
        # Equinox: weight (O, I / groups, *window), channels-first; tract_core.jax: the
        # Flax layout (*window, I / groups, O).
        kernel = jnp.transpose(conv.weight, (*range(2, d + 2), 1, 0))
        z = tj.conv(jnp.moveaxis(x, 0, -1)[None], kernel, None, strides=conv.stride,
                    padding=padding, kernel_dilation=conv.dilation,
                    feature_group_count=conv.groups, lam=self.lam)
        z = jnp.moveaxis(z[0], -1, 0)
        # The bias added as Equinox adds it, (O, 1, ..., 1): the same bias gradient sum.
        return z + conv.bias if conv.use_bias else z


class SmallNet(eqx.Module):
    """TrAct stem on raw pixels, ReLU, global average pool, linear head."""

    stem: TrActConv
    head: eqx.nn.Linear

    def __init__(self, *, channels=3, width=16, classes=10, lam=0.1, dtype=jnp.float32, key):
        stem_key, head_key = jax.random.split(key)
        self.stem = TrActConv(eqx.nn.Conv2d(channels, width, 3, padding=1, dtype=dtype,
                                            key=stem_key), lam=lam)
        self.head = eqx.nn.Linear(width, classes, dtype=dtype, key=head_key)

    def __call__(self, image):
        features = jax.nn.relu(self.stem(image)).mean(axis=(1, 2))
        return self.head(features)


def loss_fn(model, images, labels):
    logits = jax.vmap(model)(images)  # per-example model, batched by vmap
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_step(optimizer):
    @eqx.filter_jit
    def step(model, opt_state, images, labels):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, images, labels)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    return step


def random_batches(seed, steps, batch=32, size=16, classes=10):
    """Random images in [0, 1) and labels, from numpy (no XLA compile for the data)."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        images = rng.random((batch, 3, size, size), dtype=np.float32)
        yield jnp.asarray(images), jnp.asarray(rng.integers(0, classes, batch))


def main(steps=5, seed=0):
    """Train for a few steps on random batches; returns the losses."""
    model = SmallNet(key=jax.random.key(seed))
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
    step = make_step(optimizer)
    losses = []
    for i, (images, labels) in enumerate(random_batches(seed + 1, steps)):
        model, opt_state, loss = step(model, opt_state, images, labels)
        losses.append(float(loss))
        print(f"step {i}: loss {losses[-1]:.4f}")
    return losses


if __name__ == "__main__":
    main()
