"""A third-party logger's level changed for one call and restored after (`logger_level`).

Only the CLI configures logging (handlers, -v / -q); a stage that must quiet or open up a library's own
logger for the length of one call does it through this context manager, so a program that imports the
toolkit keeps the levels it chose.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def logger_level(name: str, level: int) -> Iterator[logging.Logger]:
    """`logging.getLogger(name)` at `level` inside the block, at its own level again after it."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield logger
    finally:
        logger.setLevel(before)
