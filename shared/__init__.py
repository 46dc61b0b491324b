"""Concepts shared by the Beeline gateway and router.

Nothing in this package imports from ``gateway`` or ``router``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__: str = version("beeline")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+local"
