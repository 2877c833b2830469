"""The pytest plugin installed with equiv (entry point ``pytest11``).

It registers the ``equivalence`` marker, so ``pytest -m equivalence`` selects
cross-framework tests in any project that installs equiv, and provides fixtures:

* ``equiv_seed``: a seed derived from the test's own name, stable across runs
  and independent of test order.
* ``assert_equivalent``: :func:`equiv.assert_backends_agree` with that seed as
  the default.

Example test in your project::

    import pytest
    from equiv import MLPSpec

    @pytest.mark.equivalence
    def test_my_mlp(assert_equivalent):
        assert_equivalent(MLPSpec((8, 16, 4)), batch_size=32)
"""

from __future__ import annotations

import functools
import zlib

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "equivalence: compares implementations across frameworks (select with "
        "`pytest -m equivalence`)",
    )


@pytest.fixture
def equiv_seed(request: pytest.FixtureRequest) -> int:
    """A seed derived from the test's node id (crc32), so each test has its own."""
    return zlib.crc32(request.node.nodeid.encode()) % (2**31)


@pytest.fixture
def assert_equivalent(equiv_seed: int):
    """``assert_backends_agree`` with ``seed`` defaulting to :func:`equiv_seed`."""
    from equiv.harness import assert_backends_agree

    @functools.wraps(assert_backends_agree)
    def check(spec=None, **kwargs):
        __tracebackhide__ = True  # a failure shows the test's line and the report
        kwargs.setdefault("seed", equiv_seed)
        return assert_backends_agree(spec, **kwargs)

    return check
