"""Imports of libraries that touch global state when imported, made without it.

``rich.style`` draws ``random.getrandbits(24)`` from Python's global generator when it
is first imported (found in a user trial: ``random.seed(1); import equiv`` moved the
user's ``random`` stream). equiv imports it here first, under Python's generator
state saved and restored, so that importing equiv changes no global state.
"""

from __future__ import annotations

import random

_state = random.getstate()
try:
    import rich.style  # noqa: F401 - imported for its side effect, undone below
finally:
    random.setstate(_state)
    del _state
