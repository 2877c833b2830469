"""The optional extras are installed where the suite runs (README: ``pip install -e ".[all]"``).

Tests of the flax, nnx, equinox, safetensors and matplotlib paths skip when their
library is missing, which a partial install may want; without this check a missing
extra in CI would turn them into silent skips. Set ``EQUIV_ALLOW_MISSING_EXTRAS=1``
to run the suite on a partial install on purpose.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

EXTRAS = ["flax", "equinox", "safetensors", "matplotlib", "hypothesis"]


def missing_extras() -> list[str]:
    return [name for name in EXTRAS if importlib.util.find_spec(name) is None]


@pytest.mark.skipif(
    os.environ.get("EQUIV_ALLOW_MISSING_EXTRAS") == "1", reason="a partial install, on purpose"
)
def test_every_optional_extra_is_installed():
    missing = missing_extras()
    assert not missing, (
        f"missing optional extras {missing}: their tests would be skipped, not run. Install "
        'them with pip install -e ".[all]", or set EQUIV_ALLOW_MISSING_EXTRAS=1'
    )


def test_a_missing_extra_is_noticed(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "equinox" else real(name, *a)
    )
    assert missing_extras() == ["equinox"]
