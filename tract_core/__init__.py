"""TrAct: train a vision model's first layer as if its pre-activations were an embedding.

Only the first layer's weight gradient changes (Petersen, Borgelt, Ermon, NeurIPS 2024)::

    dW = G^T X (X^T X / b + lam I)^-1

The core below is written once against the array API and runs on numpy, torch, jax and
cupy arrays. Framework adapters live in ``tract_core.torch``, ``tract_core.jax``,
``tract_core.tensorflow``, ``tract_core.keras`` and ``tract_core.flax``; importing this
package imports none of those frameworks.
"""

from ._conv_gram import conv_gram
from ._core import (
    check_lam,
    check_packed_shape,
    conv_moments,
    conv_weight_grad,
    gram,
    moments,
    pack_statistics,
    packed_size,
    precondition,
    statistics_dtype,
    to_channels_last_kernel,
    unpack_and_precondition,
    uses_push_through,
    weight_grad,
)
from ._patches import conv_output_shape, conv_patches, disjoint_patches

__all__ = [
    "check_lam",
    "check_packed_shape",
    "conv_gram",
    "conv_moments",
    "conv_output_shape",
    "conv_patches",
    "conv_weight_grad",
    "disjoint_patches",
    "gram",
    "moments",
    "pack_statistics",
    "packed_size",
    "precondition",
    "statistics_dtype",
    "to_channels_last_kernel",
    "unpack_and_precondition",
    "uses_push_through",
    "weight_grad",
]
__version__ = "0.1.0"  # the one place; pyproject.toml and the wheel read it here
