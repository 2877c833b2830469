"""The one prefix every equiv message starts with, and helpers that use it."""

from __future__ import annotations

PREFIX = "[equiv] "


def message(text: str) -> str:
    """Return ``text`` with the equiv prefix."""
    return PREFIX + text


def value_error(text: str) -> ValueError:
    """A ``ValueError`` whose message carries the equiv prefix."""
    return ValueError(message(text))


def type_error(text: str) -> TypeError:
    """A ``TypeError`` whose message carries the equiv prefix."""
    return TypeError(message(text))
