"""One training run in JAX: Flax NNX models, optax, one ``jax.jit``-compiled train step.

The loop has train.py's shape: per epoch a fresh permutation in batches (the last one
smaller), one optimizer step per batch with a per-step cosine schedule down to 0 at the
end, then the test accuracy. Vanilla and TrAct runs with the same seed and config start
from the same initialisation (``tract_core.flax.wrap`` shares the plain layer's
parameters and draws nothing), see the same batches in the same order (one numpy
Generator per run, see ``loop``) and use the same schedule: only the first layer's kernel
gradient differs. Images are channels-last (N, H, W, C).

The models are those of models.py, written in NNX; their weights and biases start as
torch's defaults do (uniform in +-1/sqrt(fan_in), see ``TorchInit``), batch norm and layer
norm use torch's epsilon and momentum.
"""

from __future__ import annotations

import functools
import math
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import tract_core.flax as tflax

from . import loop
from .config import MODEL_NAMES, RunConfig, run_key


def set_threads(threads: int) -> None:
    """Nothing to do here: the command line pins the CPU cores before JAX starts."""
    del threads  # see loop.limit_cpu_threads


def environment() -> dict:
    """The record's framework fields: the cores XLA may use and the library versions."""
    return {"threads": loop.cpu_cores(), "jax": jax.__version__, "flax": flax.__version__,
            "optax": optax.__version__}


# --------------------------------------------------------------------------- models


class TorchInit:
    """torch's default initialisation, drawn with numpy in the order layers are made.

    Conv and linear weights and biases: U(-1/sqrt(fan_in), +1/sqrt(fan_in)), as torch's
    defaults; the attention projections alike (fan_in = dim). numpy, not jax.random:
    nothing to compile (an eager jax draw compiles once per parameter shape).
    """

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def uniform(self, fan_in):
        """A Flax initializer (key, shape, dtype) -> U(+-1/sqrt(fan_in)); ignores key."""
        bound = 1.0 / math.sqrt(fan_in)
        return lambda key, shape, dtype=jnp.float32: jnp.asarray(
            self.rng.uniform(-bound, bound, shape), dtype)

    def normal(self, shape, stddev):
        return jnp.asarray(self.rng.normal(0.0, stddev, shape), jnp.float32)


def _conv(init, in_channels, out_channels, kernel, *, rngs, stride=1, padding=0,
          use_bias=True):
    """nnx.Conv with torch's padding (int: both sides) and torch's default init."""
    uniform = init.uniform(in_channels * kernel * kernel)
    return nnx.Conv(in_channels, out_channels, (kernel, kernel), strides=stride,
                    padding=padding, use_bias=use_bias, kernel_init=uniform,
                    bias_init=uniform, rngs=rngs)


def _linear(init, in_features, out_features, *, rngs):
    uniform = init.uniform(in_features)
    return nnx.Linear(in_features, out_features, kernel_init=uniform, bias_init=uniform,
                      rngs=rngs)


def _batch_norm(features, *, rngs):
    """torch's BatchNorm2d defaults: running averages with weight 0.1, eps 1e-5."""
    return nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, rngs=rngs)


def _max_pool(x, size):
    return x if size == 1 else nnx.max_pool(x, (size, size), strides=(size, size))


class SmallCNN(nnx.Module):
    """conv5x5 -> 32, pool, conv3x3 -> 64, pool, FC 128, FC classes (models.SmallCNN).

    Images under 16 pixels skip the first pool. x: (N, H, W, C) -> (N, classes).
    """

    first_layer = "conv1"

    def __init__(self, init, in_channels, image_size, classes, *, rngs):
        self.conv1 = _conv(init, in_channels, 32, 5, padding=2, rngs=rngs)
        self.conv2 = _conv(init, 32, 64, 3, padding=1, rngs=rngs)
        self.first_pool = 2 if image_size >= 16 else 1
        side = image_size // self.first_pool // 2
        self.hidden = _linear(init, 64 * side * side, 128, rngs=rngs)
        self.head = _linear(init, 128, classes, rngs=rngs)

    def __call__(self, x):
        x = _max_pool(jax.nn.relu(self.conv1(x)), self.first_pool)
        x = _max_pool(jax.nn.relu(self.conv2(x)), 2)
        return self.head(jax.nn.relu(self.hidden(x.reshape(len(x), -1))))


class BasicBlock(nnx.Module):
    """ResNet's two 3x3 convs with batch norm and a (projected, if needed) shortcut."""

    def __init__(self, init, in_channels, channels, stride, *, rngs):
        self.conv1 = _conv(init, in_channels, channels, 3, stride=stride, padding=1,
                           use_bias=False, rngs=rngs)
        self.bn1 = _batch_norm(channels, rngs=rngs)
        self.conv2 = _conv(init, channels, channels, 3, padding=1, use_bias=False, rngs=rngs)
        self.bn2 = _batch_norm(channels, rngs=rngs)
        projected = stride != 1 or in_channels != channels
        self.shortcut = nnx.Sequential(
            _conv(init, in_channels, channels, 1, stride=stride, use_bias=False, rngs=rngs),
            _batch_norm(channels, rngs=rngs)) if projected else None

    def __call__(self, x):
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        skip = x if self.shortcut is None else self.shortcut(x)
        return jax.nn.relu(self.bn2(self.conv2(out)) + skip)


class ResNet18(nnx.Module):
    """The CIFAR ResNet-18 (models.ResNet18): 3x3 stride-1 stem, stages of 64..512."""

    first_layer = "stem"

    def __init__(self, init, in_channels, image_size, classes, *, rngs):
        del image_size  # global pooling makes the head size-independent
        self.stem = _conv(init, in_channels, 64, 3, padding=1, use_bias=False, rngs=rngs)
        self.bn = _batch_norm(64, rngs=rngs)
        blocks, width = [], 64
        for channels, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            blocks += [BasicBlock(init, width, channels, stride, rngs=rngs),
                       BasicBlock(init, channels, channels, 1, rngs=rngs)]
            width = channels
        self.blocks = nnx.Sequential(*blocks)
        self.head = _linear(init, 512, classes, rngs=rngs)

    def __call__(self, x):
        x = self.blocks(jax.nn.relu(self.bn(self.stem(x))))
        return self.head(x.mean(axis=(1, 2)))


class EncoderLayer(nnx.Module):
    """Pre-norm transformer encoder layer (torch's norm_first=True, GELU, no dropout)."""

    def __init__(self, init, dim, heads, hidden, *, rngs):
        self.norm1 = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            heads, dim, kernel_init=init.uniform(dim), bias_init=nnx.initializers.zeros,
            decode=False, keep_rngs=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs)
        self.fc1 = _linear(init, dim, hidden, rngs=rngs)
        self.fc2 = _linear(init, hidden, dim, rngs=rngs)

    def __call__(self, x):  # (N, tokens, dim)
        x = x + self.attention(self.norm1(x))
        return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False))


class SmallViT(nnx.Module):
    """A small vision transformer (models.SmallViT): patch conv, class token, encoder."""

    first_layer = "patch_embed"

    def __init__(self, init, in_channels, image_size, classes, *, rngs, patch=4, dim=96,
                 depth=3, heads=4, mlp_ratio=2):
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not a multiple of patch {patch}")
        tokens = (image_size // patch) ** 2
        self.patch_embed = _conv(init, in_channels, dim, patch, stride=patch, rngs=rngs)
        self.cls_token = nnx.Param(jnp.zeros((1, 1, dim)))
        self.pos_embed = nnx.Param(init.normal((1, tokens + 1, dim), 0.02))
        self.encoder = nnx.Sequential(*(EncoderLayer(init, dim, heads, mlp_ratio * dim,
                                                     rngs=rngs) for _ in range(depth)))
        self.norm = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs)
        self.head = _linear(init, dim, classes, rngs=rngs)

    def __call__(self, x):
        x = self.patch_embed(x)  # (N, H / patch, W / patch, dim)
        x = x.reshape(len(x), -1, x.shape[-1])
        cls = jnp.broadcast_to(self.cls_token[...], (len(x), 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...]
        return self.head(self.norm(self.encoder(x))[:, 0])


MODELS = {"cnn": SmallCNN, "resnet18": ResNet18, "vit": SmallViT}
assert tuple(MODELS) == MODEL_NAMES


def build_model(name, in_channels, image_size, classes, *, seed, patch=4) -> nnx.Module:
    """A fresh model ``name`` (a key of MODELS), its parameters drawn from ``seed``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    # The layers still take Rngs, but their initializers are TorchInit's (numpy).
    init, rngs = TorchInit(seed), nnx.Rngs(seed)
    if name == "vit":
        return SmallViT(init, in_channels, image_size, classes, rngs=rngs, patch=patch)
    return MODELS[name](init, in_channels, image_size, classes, rngs=rngs)


def wrap_first_layer(model, lam) -> nnx.Module:
    """Swap ``model``'s first layer for its TrAct twin (same Params); returns model."""
    name = model.first_layer
    setattr(model, name, tflax.wrap(getattr(model, name), lam=lam))
    return model


# --------------------------------------------------------------------------- training


def make_optimizer(name, lr, total_steps, weight_decay) -> optax.GradientTransformation:
    """SGD with momentum 0.9 or Adam, cosine from lr to 0 over ``total_steps`` steps.

    Weight decay is added to the gradient before the optimizer, as torch's
    ``weight_decay`` does for SGD and Adam (coupled, every parameter).
    """
    schedule = optax.cosine_decay_schedule(lr, decay_steps=total_steps, alpha=0.0)
    if name == "sgd":
        optimizer = optax.sgd(schedule, momentum=0.9)
    elif name == "adam":
        optimizer = optax.adam(schedule)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {name!r}")
    return optax.chain(optax.add_decayed_weights(weight_decay), optimizer)


def loss_fn(graphdef, params, rest, images, labels, label_smoothing=0.0):
    """Mean cross-entropy of a batch in training mode, and the updated non-Param state.

    images: (B, H, W, C) float32; labels: (B,) int. ``rest`` holds the batch-norm
    statistics (empty for models without): the forward pass updates them.
    """
    # copy: fresh Variables of this trace; batch norm may not update ``rest``'s own,
    # which jit made one trace further out.
    model = nnx.merge(graphdef, params, rest, copy=True)
    logits = model(images)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    loss = optax.softmax_cross_entropy(logits, targets).mean()
    _, _, rest = nnx.split(model, nnx.Param, ...)
    return loss, rest


@functools.cache
def train_step(graphdef, optimizer):
    """The jitted step for one model structure and optimizer (shared by a config's seeds,
    so each method compiles once per batch shape)."""

    @jax.jit
    def step(params, rest, opt_state, images, labels, label_smoothing):
        (loss, rest), grads = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(
            graphdef, params, rest, images, labels, label_smoothing)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state, loss

    return step


@functools.cache
def _predict(graphdef):
    """Jitted logits in evaluation mode (batch norm on its running statistics)."""
    return jax.jit(lambda params, rest, images: nnx.merge(graphdef, params, rest)(images))


@functools.cache
def _optimizer(name, lr, total_steps, weight_decay):
    return make_optimizer(name, lr, total_steps, weight_decay)  # cached: the step's key


def make_step(config: RunConfig, method: str, seed: int, data):
    """The run's training step ``step(images (B, H, W, C), idx) -> loss`` and its
    evaluation-mode ``predict(images) -> logits``, from the seed's initialisation."""
    model = build_model(config.model, data.channels, data.image_size, data.classes,
                        seed=seed, patch=config.patch)
    if method == "tract":
        wrap_first_layer(model, config.lam)
    model.eval()
    eval_graphdef = nnx.graphdef(model)
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    steps_per_epoch = loop.steps_per_epoch(len(data.y_train), config.batch_size)
    optimizer = _optimizer(config.optimizer, config.lr, config.epochs * steps_per_epoch,
                           config.weight_decay)
    state = {"params": params, "rest": rest, "opt_state": optimizer.init(params)}
    step, predict = train_step(graphdef, optimizer), _predict(eval_graphdef)

    def one_step(images, idx):
        state["params"], state["rest"], state["opt_state"], loss = step(
            state["params"], state["rest"], state["opt_state"], images, data.y_train[idx],
            config.label_smoothing)
        return loss

    return one_step, lambda images: predict(state["params"], state["rest"], images)


def stepper(config: RunConfig, method: str, seed: int, data):
    """``step(idx)``: one training step on the training images ``idx`` (for timing)."""
    one_step, _ = make_step(config, method, seed, data)
    x_train = loop.channels_last(data.x_train)
    return lambda idx: float(one_step(x_train[idx], idx))


def train_run(config: RunConfig, method: str, seed: int, data, progress=False) -> dict:
    """Train one model and return its record: the run key plus accuracies and timings.

    Args:
        config: the run's settings (``framework="jax"``). method: "vanilla" or "tract".
            seed: int (initialisation, batch order, augmentation).
        data: a ``data.Dataset`` (numpy (N, C, H, W); made channels-last here).
        progress: show a tqdm bar (only where stderr is a terminal).

    Returns:
        ``run_key(...)`` plus test_acc (final, %), history (test accuracy after each
        epoch), train_loss (mean per epoch), seconds (training, testing and compiling
        time), threads and the jax, flax and optax versions.
    """
    if config.framework != "jax":
        raise ValueError(f"train_jax.py trains jax runs; this config is {config.framework!r}")
    record = run_key(config, method, seed)
    start = time.perf_counter()
    one_step, predict = make_step(config, method, seed, data)
    history, train_loss = loop.run_epochs(config, method, seed, data, one_step, predict,
                                          progress)
    record.update(test_acc=history[-1], history=history, train_loss=train_loss,
                  seconds=round(time.perf_counter() - start, 2), **environment())
    return record
