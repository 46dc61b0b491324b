"""Argument types shared by the ``beeline`` sub-commands."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T", int, float, str)


def csv_of(convert: Callable[[str], T], valid: Callable[[T], bool], what: str) -> Callable[[str], tuple[T, ...]]:
    """An argparse ``type`` for a non-empty comma-separated list whose items all satisfy ``valid``."""

    def parse(value: str) -> tuple[T, ...]:
        try:
            items = tuple(convert(v) for v in value.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a comma-separated list of {what}: {value!r}") from None
        if not items or not all(valid(i) for i in items):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}: {value!r}")
        return items

    return parse
