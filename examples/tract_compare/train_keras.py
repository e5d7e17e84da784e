"""One training run in Keras 3: plain Keras layers vs ``tract_core.keras``'s first layer.

Any Keras backend (KERAS_BACKEND: jax, the default here, since the examples' environment
has no TensorFlow; torch; tensorflow): the loop calls ``train_on_batch`` once per batch,
so nothing in it is backend-specific. The loop has train.py's shape: per epoch a fresh
permutation in batches (the last one smaller), one optimizer step per batch with a
per-step cosine schedule (``CosineDecay``) down to 0 at the end, then the test accuracy.

Vanilla and TrAct runs with the same seed and config start from the same weights (every
initializer is seeded from the run's seed, and ``tract_core.keras.wrap`` copies the plain
first layer's config, seeds included), see the same batches in the same order (one numpy
Generator per run, see ``loop``) and use the same schedule: only the first layer's kernel
gradient differs. Images are channels-last (N, H, W, C).

As in torch, weights start uniform in +-1/sqrt(fan_in) (the ViT's attention keeps Keras's
own initialisation), weight decay is coupled (its gradient is added to the loss's) and
Adam's epsilon is 1e-8. Keras's SGD folds the learning rate into the momentum buffer
(torch applies it after), a small difference while the rate decays.
"""

from __future__ import annotations

import os

# Before Keras is imported: it reads its backend once. The examples' environment has JAX
# but no TensorFlow, Keras's own default.
os.environ.setdefault("KERAS_BACKEND", "jax")

import math
import time

import keras
import numpy as np
from keras import layers, ops

import tract_core.keras as tk

from . import loop
from .config import MODEL_NAMES, RunConfig, run_key

BACKEND = keras.backend.backend()
FRAMEWORK = f"keras-{BACKEND}"  # the runs' ``framework``: the backend changes the numbers
FIRST_LAYER = {"cnn": "conv1", "resnet18": "stem", "vit": "patch_embed"}


def set_threads(threads: int) -> None:
    """The backend's CPU threads (JAX: the command line pinned the cores before import)."""
    if BACKEND == "torch":
        import torch

        torch.set_num_threads(threads)
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:
            pass  # TensorFlow has started already: its pools are fixed


def environment() -> dict:
    """The record's framework fields: threads, Keras and its backend's version."""
    if BACKEND == "torch":
        import torch

        return {"threads": torch.get_num_threads(), "keras": keras.__version__,
                "torch": torch.__version__}
    if BACKEND == "jax":
        import jax

        return {"threads": loop.cpu_cores(), "keras": keras.__version__,
                "jax": jax.__version__}
    import tensorflow as tf

    return {"threads": tf.config.threading.get_intra_op_parallelism_threads()
            or loop.cpu_cores(), "keras": keras.__version__, "tensorflow": tf.__version__}


# --------------------------------------------------------------------------- models


@keras.saving.register_keras_serializable(package="tract_compare")
class NumpyInit(keras.initializers.Initializer):
    """U(-scale, scale) or N(0, scale^2) drawn with ``numpy.random.default_rng(seed)``.

    numpy, not Keras's random ops: nothing to compile (on JAX an eager draw compiles once
    per shape). The seed is in the config, so ``tract_core.keras.wrap``'s copy of a layer
    starts from the same weights.
    """

    def __init__(self, scale, seed, distribution="uniform"):
        self.scale, self.seed, self.distribution = float(scale), int(seed), distribution

    def __call__(self, shape, dtype=None):
        rng = np.random.default_rng(self.seed)
        if self.distribution == "uniform":
            values = rng.uniform(-self.scale, self.scale, shape)
        else:
            values = rng.normal(0.0, self.scale, shape)
        return ops.convert_to_tensor(values, dtype=dtype or "float32")

    def get_config(self):
        return {"scale": self.scale, "seed": self.seed, "distribution": self.distribution}


class _Seeds:
    """Initializers seeded in the order layers are made, from one run seed: the same
    model code gives the same weights."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def _seed(self):
        return int(self.rng.integers(2**31))

    def uniform(self, fan_in):
        """torch's default init of conv/linear weights and biases: U(+-1/sqrt(fan_in))."""
        return NumpyInit(1.0 / math.sqrt(fan_in), self._seed())

    def normal(self, stddev):
        return NumpyInit(stddev, self._seed(), distribution="normal")


def _conv(seeds, in_channels, filters, kernel, *, stride=1, padding=0, use_bias=True,
          activation=None, name=None):
    """Conv2D with torch's int padding (both sides) and torch's default init.

    Returns a function of the input tensor, and the Conv2D layer itself (unbuilt). A
    stride-1 'same' padding is Keras's "same"; others pad explicitly, as torch does (for
    stride 2, Keras's "same" would pad one side only).
    """
    init = seeds.uniform(in_channels * kernel * kernel)
    same = stride == 1 and 2 * padding == kernel - 1
    conv = layers.Conv2D(filters, kernel, strides=stride, padding="same" if same else "valid",
                         use_bias=use_bias, activation=activation, kernel_initializer=init,
                         bias_initializer=init, name=name)

    def apply(x, layer=None):
        if padding and not same:
            x = layers.ZeroPadding2D(padding)(x)
        return (layer or conv)(x)

    return apply, conv


def _dense(seeds, in_features, units, activation=None, name=None):
    init = seeds.uniform(in_features)
    return layers.Dense(units, activation=activation, kernel_initializer=init,
                        bias_initializer=init, name=name)


def _batch_norm():
    """torch's BatchNorm2d defaults: running averages with weight 0.1, eps 1e-5."""
    return layers.BatchNormalization(momentum=0.9, epsilon=1e-5)


def _first(conv, lam):
    """The first layer as the model uses it: the plain layer, or (lam given) its twin."""
    return conv if lam is None else tk.wrap(conv, lam=lam)


def small_cnn(seeds, in_channels, image_size, classes, lam=None):
    """conv5x5 -> 32, pool, conv3x3 -> 64, pool, FC 128, FC classes (models.SmallCNN)."""
    inputs = keras.Input((image_size, image_size, in_channels))
    first_pool = 2 if image_size >= 16 else 1
    apply, conv1 = _conv(seeds, in_channels, 32, 5, padding=2, activation="relu", name="conv1")
    x = apply(inputs, _first(conv1, lam))
    if first_pool > 1:
        x = layers.MaxPooling2D(first_pool)(x)
    apply, _ = _conv(seeds, 32, 64, 3, padding=1, activation="relu", name="conv2")
    x = layers.Flatten()(layers.MaxPooling2D(2)(apply(x)))
    side = image_size // first_pool // 2
    x = _dense(seeds, 64 * side * side, 128, activation="relu", name="hidden")(x)
    return inputs, _dense(seeds, 128, classes, name="head")(x)


def _basic_block(seeds, x, in_channels, channels, stride):
    """ResNet's two 3x3 convs with batch norm and a (projected, if needed) shortcut."""
    apply, _ = _conv(seeds, in_channels, channels, 3, stride=stride, padding=1, use_bias=False)
    out = layers.ReLU()(_batch_norm()(apply(x)))
    apply, _ = _conv(seeds, channels, channels, 3, padding=1, use_bias=False)
    out = _batch_norm()(apply(out))
    if stride != 1 or in_channels != channels:
        apply, _ = _conv(seeds, in_channels, channels, 1, stride=stride, use_bias=False)
        x = _batch_norm()(apply(x))
    return layers.ReLU()(layers.Add()([out, x]))


def resnet18(seeds, in_channels, image_size, classes, lam=None):
    """The CIFAR ResNet-18 (models.ResNet18): 3x3 stride-1 stem, stages of 64..512."""
    inputs = keras.Input((image_size, image_size, in_channels))
    apply, stem = _conv(seeds, in_channels, 64, 3, padding=1, use_bias=False, name="stem")
    x = layers.ReLU()(_batch_norm()(apply(inputs, _first(stem, lam))))
    width = 64
    for channels, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        x = _basic_block(seeds, x, width, channels, stride)
        x = _basic_block(seeds, x, channels, channels, 1)
        width = channels
    x = layers.GlobalAveragePooling2D()(x)
    return inputs, _dense(seeds, 512, classes, name="head")(x)


class ClassTokenAndPosition(layers.Layer):
    """(N, tokens, dim) -> (N, 1 + tokens, dim): a learned class token first, plus a
    learned position embedding (initialised N(0, 0.02^2), as in models.SmallViT)."""

    def __init__(self, position_init=None, **kwargs):
        super().__init__(**kwargs)
        self.position_init = position_init or keras.initializers.RandomNormal(stddev=0.02)

    def build(self, input_shape):
        tokens, dim = input_shape[1:]
        self.cls_token = self.add_weight(shape=(1, 1, dim), initializer="zeros",
                                         name="cls_token")
        self.pos_embed = self.add_weight(shape=(1, tokens + 1, dim),
                                         initializer=self.position_init, name="pos_embed")

    def call(self, x):
        cls = ops.broadcast_to(self.cls_token, (ops.shape(x)[0], 1, ops.shape(x)[2]))
        return ops.concatenate([cls, x], axis=1) + self.pos_embed


def small_vit(seeds, in_channels, image_size, classes, lam=None, patch=4, dim=96, depth=3,
              heads=4, mlp_ratio=2):
    """A small vision transformer (models.SmallViT): patch conv, class token, pre-norm
    encoder (GELU, no dropout), final norm, head on the class token."""
    if image_size % patch:
        raise ValueError(f"image size {image_size} is not a multiple of patch {patch}")
    inputs = keras.Input((image_size, image_size, in_channels))
    apply, embed = _conv(seeds, in_channels, dim, patch, stride=patch, name="patch_embed")
    x = layers.Reshape(((image_size // patch) ** 2, dim))(apply(inputs, _first(embed, lam)))
    x = ClassTokenAndPosition(seeds.normal(0.02))(x)
    for _ in range(depth):
        y = layers.LayerNormalization(epsilon=1e-5)(x)
        # Keras's own initialisation: it clones one initializer (seed included) for the
        # query, key and value kernels, so a seeded one would make them equal.
        x = layers.Add()([x, layers.MultiHeadAttention(heads, dim // heads)(y, y)])
        y = layers.LayerNormalization(epsilon=1e-5)(x)
        y = _dense(seeds, dim, mlp_ratio * dim, activation="gelu")(y)
        x = layers.Add()([x, _dense(seeds, mlp_ratio * dim, dim)(y)])
    x = layers.LayerNormalization(epsilon=1e-5)(x)
    return inputs, _dense(seeds, dim, classes, name="head")(x[:, 0])


MODELS = {"cnn": small_cnn, "resnet18": resnet18, "vit": small_vit}
assert tuple(MODELS) == MODEL_NAMES


class CoupledDecayModel(keras.Model):
    """A functional model whose training loss adds ``weight_decay / 2 * sum(w^2)`` over
    its trainable weights: torch's coupled weight decay (Keras's own is decoupled)."""

    def __init__(self, inputs, outputs, weight_decay=0.0, **kwargs):
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self.weight_decay = weight_decay

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = super().compute_loss(x, y, y_pred, sample_weight, training)
        if self.weight_decay and training:
            penalty = sum(ops.sum(ops.square(w)) for w in self.trainable_weights)
            loss = loss + 0.5 * self.weight_decay * penalty
        return loss


def build_model(name, in_channels, image_size, classes, *, seed, lam=None, patch=4,
                weight_decay=0.0) -> keras.Model:
    """A fresh model ``name`` (a key of MODELS), weights drawn from ``seed``.

    ``lam``: None for the plain model, else the first layer is TrAct's with this lambda
    (same weights as the plain model of the same seed). x: (N, H, W, C) -> (N, classes).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    keras.utils.set_random_seed(seed)  # what Keras draws itself (attention weights)
    seeds = _Seeds(seed)
    options = {"patch": patch} if name == "vit" else {}
    inputs, outputs = MODELS[name](seeds, in_channels, image_size, classes, lam=lam, **options)
    return CoupledDecayModel(inputs, outputs, weight_decay=weight_decay, name=name)


# --------------------------------------------------------------------------- training


def make_optimizer(name, lr, total_steps) -> keras.optimizers.Optimizer:
    """SGD with momentum 0.9 or Adam, cosine from lr to 0 over ``total_steps`` steps."""
    schedule = keras.optimizers.schedules.CosineDecay(lr, decay_steps=total_steps, alpha=0.0)
    if name == "sgd":
        return keras.optimizers.SGD(schedule, momentum=0.9)
    if name == "adam":
        return keras.optimizers.Adam(schedule, epsilon=1e-8)  # torch's epsilon
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {name!r}")


def compiled_model(config: RunConfig, method: str, seed: int, data) -> keras.Model:
    """The run's model, compiled with its optimizer and loss (and nothing trained)."""
    model = build_model(config.model, data.channels, data.image_size, data.classes,
                        seed=seed, lam=config.lam if method == "tract" else None,
                        patch=config.patch, weight_decay=config.weight_decay)
    total_steps = config.epochs * loop.steps_per_epoch(len(data.y_train), config.batch_size)
    smoothing = config.label_smoothing
    model.compile(
        optimizer=make_optimizer(config.optimizer, config.lr, total_steps),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=smoothing),
        # The cross-entropy alone (the loss includes the weight decay term).
        metrics=[keras.metrics.CategoricalCrossentropy(
            name="cross_entropy", from_logits=True, label_smoothing=smoothing)])
    return model


def make_step(config: RunConfig, method: str, seed: int, data):
    """The run's compiled model and ``step(images (B, H, W, C), idx) -> cross-entropy``."""
    model = compiled_model(config, method, seed, data)
    y_train = np.eye(data.classes, dtype=np.float32)[data.y_train]  # one-hot

    def one_step(images, idx):
        logs = model.train_on_batch(images, y_train[idx], return_dict=True)
        return logs["cross_entropy"]

    return model, one_step


def stepper(config: RunConfig, method: str, seed: int, data):
    """``step(idx)``: one training step on the training images ``idx`` (for timing)."""
    _, one_step = make_step(config, method, seed, data)
    x_train = loop.channels_last(data.x_train)
    return lambda idx: float(one_step(x_train[idx], idx))


def train_run(config: RunConfig, method: str, seed: int, data, progress=False) -> dict:
    """Train one model and return its record: the run key plus accuracies and timings.

    Args:
        config: the run's settings (``framework`` is this module's FRAMEWORK, e.g.
            "keras-jax"). method: "vanilla" or "tract". seed: int (weights, batch order,
            augmentation).
        data: a ``data.Dataset`` (numpy (N, C, H, W); made channels-last here).
        progress: show a tqdm bar (only where stderr is a terminal).

    Returns:
        ``run_key(...)`` plus test_acc (final, %), history (test accuracy after each
        epoch), train_loss (mean cross-entropy per epoch), seconds (training, testing and
        compiling time), threads and the Keras and backend versions.
    """
    if config.framework != FRAMEWORK:
        raise ValueError(f"Keras runs on {BACKEND} here ({FRAMEWORK!r}); this config is "
                         f"{config.framework!r}")
    record = run_key(config, method, seed)
    start = time.perf_counter()
    model, one_step = make_step(config, method, seed, data)
    history, train_loss = loop.run_epochs(config, method, seed, data, one_step,
                                          model.predict_on_batch, progress)
    record.update(test_acc=history[-1], history=history, train_loss=train_loss,
                  seconds=round(time.perf_counter() - start, 2), keras_backend=BACKEND,
                  **environment())
    return record
