"""Argument checks shared by the layer and model constructors."""

from __future__ import annotations

__all__ = ["check_positive_ints"]


def check_positive_ints(**values: object) -> None:
    """Raise ValueError naming the first argument that is not an integer >= 1 (bools are not)."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
