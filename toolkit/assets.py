"""Data files the toolkit ships beside its code: Modelfile templates and the sample corpus.

In a checkout they are the top-level `modelfiles/` and `corpora/` folders, where users see and edit them. A
built wheel (`pip install .`) carries the same files inside the package as `toolkit/modelfiles/` and
`toolkit/corpora/` (pyproject.toml maps those package folders onto the top-level ones, so nothing is copied
by hand). `folder` is the one lookup: the package's copy when there is one, else the checkout's.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
SHIPPED = ("modelfiles", "corpora")


def folder(name: str) -> Path:
    """The shipped folder `name` (one of SHIPPED): inside the installed package, else at the checkout's root."""
    if name not in SHIPPED:
        raise ValueError(f"{name!r} is not shipped with the toolkit (known: {', '.join(SHIPPED)})")
    packaged = PACKAGE / name
    return packaged if packaged.is_dir() else PACKAGE.parent / name
