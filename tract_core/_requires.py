"""An adapter whose framework is missing says which extra installs it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def requires(extra: str, framework: str, *modules: str) -> Iterator[None]:
    """Re-raise a missing ``modules`` (default: ``extra``) naming ``tract-core[extra]``."""
    try:
        yield
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] not in (modules or (extra,)):
            raise
        raise ModuleNotFoundError(
            f"tract_core.{extra} needs {framework}: pip install 'tract-core[{extra}]'",
            name=error.name) from error
