"""Which layers a forward calls first, for the first-layer helpers of Flax NNX and Equinox.

Modules there have no call hooks, so the classes' ``__call__`` are swapped for recording
wrappers for the duration of one (abstract) forward and restored after it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator


@contextlib.contextmanager
def recording_calls(layers: dict) -> Iterator[list]:
    """Within the block, the paths of ``layers`` ({id(module): (path, module)}) in the
    order they are first called are appended to the list it yields."""
    order = []
    owners = {next(c for c in type(m).__mro__ if "__call__" in vars(c))
              for _, m in layers.values()}

    def recording(call):
        @functools.wraps(call)
        def recorded(self, *args, **kwargs):
            if id(self) in layers and layers[id(self)][0] not in order:
                order.append(layers[id(self)][0])
            return call.__get__(self, type(self))(*args, **kwargs)  # also method descriptors
        return recorded

    calls = {cls: vars(cls)["__call__"] for cls in owners}
    try:
        for cls, call in calls.items():
            type.__setattr__(cls, "__call__", recording(call))  # past frozen metaclasses
        yield order
    finally:
        for cls, call in calls.items():
            type.__setattr__(cls, "__call__", call)
