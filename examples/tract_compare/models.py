"""The compared models, written here (torchvision is not a dependency).

Each model takes the data set's channels, image size and class count, and names its
first layer in ``first_layer``: the layer TrAct trains (see :func:`wrap_first_layer`).
"""

from __future__ import annotations

import torch
from torch import nn

import tract_core.torch as tt


class SmallCNN(nn.Module):
    """conv5x5 -> 32, pool, conv3x3 -> 64, pool, FC 128, FC classes (ReLU between).

    Images under 16 pixels (digits' 8x8) skip the first pool: 2x2 features are too coarse.
    """

    first_layer = "conv1"

    def __init__(self, in_channels=1, image_size=28, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.first_pool = 2 if image_size >= 16 else 1
        side = image_size // self.first_pool // 2
        self.hidden = nn.Linear(64 * side * side, 128)
        self.head = nn.Linear(128, classes)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), self.first_pool)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.head(torch.relu(self.hidden(x.flatten(1))))


class BasicBlock(nn.Module):
    """ResNet's two 3x3 convs with batch norm and a (projected, if needed) shortcut."""

    def __init__(self, in_channels, channels, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                nn.BatchNorm2d(channels))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """The CIFAR ResNet-18: a 3x3 stride-1 stem (no max-pool), stages of 64..512 channels.

    Works for any image size: the stages halve it three times, then global average pooling.
    ``width``: the stem's channels (64; each stage doubles it), e.g. 16 for a model with
    1/16 of the flops.
    """

    first_layer = "stem"

    def __init__(self, in_channels=3, image_size=32, classes=10, width=64):
        super().__init__()
        del image_size  # global pooling makes the head size-independent
        self.stem = nn.Conv2d(in_channels, width, 3, 1, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        blocks, previous = [], width
        for channels, stride in [(width, 1), (2 * width, 2), (4 * width, 2), (8 * width, 2)]:
            blocks += [BasicBlock(previous, channels, stride),
                       BasicBlock(channels, channels, 1)]
            previous = channels
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(previous, classes)

    def forward(self, x):
        x = self.blocks(torch.relu(self.bn(self.stem(x))))
        return self.head(x.mean(dim=(2, 3)))


class SmallViT(nn.Module):
    """A small vision transformer: patch embedding conv, class token, pre-norm encoder."""

    first_layer = "patch_embed"

    def __init__(self, in_channels=3, image_size=32, classes=10, patch=4, dim=96, depth=3,
                 heads=4, mlp_ratio=2):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not a multiple of patch {patch}")
        tokens = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, mlp_ratio * dim, dropout=0.0,
                                           activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, tokens, dim)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.encoder(x))[:, 0])


MODELS = {"cnn": SmallCNN, "resnet18": ResNet18, "vit": SmallViT}


def build_model(name, in_channels, image_size, classes, patch=4, width=64) -> nn.Module:
    """A fresh model ``name`` (a key of MODELS) for the given input shape and classes.

    ``patch`` is the ViT's patch size, ``width`` the ResNet's stem channels (each ignored
    by the other models).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    if name == "vit":
        return SmallViT(in_channels, image_size, classes, patch=patch)
    if name == "resnet18":
        return ResNet18(in_channels, image_size, classes, width=width)
    return MODELS[name](in_channels, image_size, classes)


def wrap_first_layer(model, lam) -> nn.Module:
    """Swap ``model``'s first layer for its TrAct twin (same Parameters); returns model."""
    name = model.first_layer
    setattr(model, name, tt.wrap(getattr(model, name), lam=lam))
    return model
