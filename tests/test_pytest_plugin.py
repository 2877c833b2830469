"""equiv's pytest plugin in a fresh project: the marker, the seed, the assertion fixture.

Each test writes a small test module into an empty folder (pytester) and runs
pytest on it in this process, with the plugin loaded from its ``pytest11`` entry
point exactly as in a user's project that installs equiv.
"""

from __future__ import annotations

import re

import pytest

import equiv

pytest_plugins = ["pytester"]


# Plugins this project does not need in the inner runs: hypothesis's alone adds about
# 1.7 s to every session start on this machine. Blocking an absent plugin is no error.
QUIET = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest")


def run(pytester, *args):
    return pytester.runpytest(*QUIET, *args)


@pytest.fixture(scope="module", autouse=True)
def _warm_imports():
    # pytester's in-process runs drop the modules first imported inside them; torch
    # cannot import torch._dynamo (pulled in by the first torch.optim.SGD) twice in one
    # process. Running one comparison here imports it for good, and warms JAX.
    equiv.compare_backends()


# A user's test module: one marked equivalence test, one plain test.
USER_TESTS = """
import pytest
from equiv import MLPSpec

@pytest.mark.equivalence
def test_mlp_agrees(assert_equivalent):
    comparison = assert_equivalent(MLPSpec((4, 3, 2)), batch_size=4)
    assert comparison.agree

def test_plain():
    pass
"""


def test_marker_selects_equivalence_tests(pytester):
    pytester.makepyfile(USER_TESTS)
    result = run(pytester, "--strict-markers", "-m", "equivalence")
    result.assert_outcomes(passed=1, deselected=1)
    result = run(pytester, "--strict-markers", "-m", "not equivalence")
    result.assert_outcomes(passed=1, deselected=1)


@pytest.mark.parametrize(("args", "listed"), [((), True), (("-p", "no:equiv"), False)])
def test_marker_is_registered_by_the_plugin(pytester, args, listed):
    # The failing counterpart: without equiv's plugin nobody registers the marker.
    # (Checked through --markers: running a marked test under --strict-markers in this
    # process would be answered from pytest's marker cache, filled by the outer run.)
    result = run(pytester, "--markers", *args)
    line = "@pytest.mark.equivalence: compares implementations across frameworks*"
    if listed:
        result.stdout.fnmatch_lines([line])
    else:
        result.stdout.no_fnmatch_line(line)
        result.stdout.fnmatch_lines(["@pytest.mark.skip*"])  # the listing itself did run


def test_equiv_seed_is_per_test_and_stable(pytester):
    pytester.makepyfile(
        """
        def test_a(equiv_seed):
            print("SEED a", equiv_seed)

        def test_b(equiv_seed):
            print("SEED b", equiv_seed)
        """
    )

    def seeds() -> dict[str, int]:
        result = run(pytester, "-s")
        result.assert_outcomes(passed=2)
        found = {}
        for name, value in re.findall(r"SEED (\w) (\d+)", result.stdout.str()):
            found[name] = int(value)
        return found

    first, second = seeds(), seeds()
    assert first == second  # the same across runs
    assert set(first) == {"a", "b"} and first["a"] != first["b"]  # each test its own
    assert all(0 <= seed < 2**31 for seed in first.values())


def test_assert_equivalent_draws_the_problem_from_equiv_seed(pytester):
    pytester.makepyfile(
        """
        import torch
        from equiv import MLPSpec, make_problem

        def test_seeded(assert_equivalent, equiv_seed):
            spec = MLPSpec((4, 3, 2))
            comparison = assert_equivalent(spec)
            expected = make_problem(spec, seed=equiv_seed)
            for name, value in expected.params.items():
                assert torch.equal(comparison.problem.params[name], value)
            other = make_problem(spec, seed=equiv_seed + 1)
            moved = other.params["fc1.weight"]
            assert not torch.equal(comparison.problem.params["fc1.weight"], moved)
        """
    )
    run(pytester).assert_outcomes(passed=1)


def test_failing_equivalence_test_shows_the_equiv_report(pytester):
    # Zero tolerance: float32 results honestly differ from the float64 reference.
    pytester.makepyfile(
        """
        import pytest
        from equiv import MLPSpec

        @pytest.mark.equivalence
        def test_exact(assert_equivalent):
            assert_equivalent(MLPSpec((4, 3, 2)), rtol=0.0, atol=0.0)
        """
    )
    result = run(pytester, "-m", "equivalence")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "E * AssertionError: [[]equiv] * of 54 comparisons disagree (*torch vs reference*)*",
            "E *params after step 1, fc1.weight, shape (3, 4), float32/float64: torch vs reference",
            "E *  Mismatched elements: * / 12 (*%)",
            "E *  Greatest absolute difference: * at index (*) (0 allowed there)",
            "E *  Ratio to the bound: inf (bound: atol=0, rtol=0)",
        ],
        consecutive=False,
    )
    # The test's own line is shown, equiv's frames are not (found in a user trial: 711
    # lines, assert_agree's source and `self = Comparison(...)` among them).
    out = result.stdout.str()
    assert "assert_equivalent(MLPSpec((4, 3, 2)), rtol=0.0, atol=0.0)" in out
    assert "def assert_agree" not in out and "comparison.assert_agree()" not in out


def test_a_failing_gradient_check_shows_the_callers_line_only(pytester):
    # Found in a user trial: GradCheck.assert_agree showed equiv's frame and a long
    # `self = GradCheck(projections=[...` line before the message.
    pytester.makepyfile(
        """
        from equiv import MLPSpec, check_gradients, make_problem, manual

        SPEC = MLPSpec((4, 3, 2))

        def halved(p, x, y):
            loss, grads = manual.loss_and_grads(p, x, y, SPEC.replace(dtype="float64"))
            return loss, {name: g / 2 for name, g in grads.items()}

        def test_backward():
            problem = make_problem(SPEC, batch_size=4, seed=0)
            (x, y), = problem.batches
            check_gradients(problem.params, x, y, SPEC, halved).assert_agree()
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["E *[[]equiv] gradient check failed for *", "E *likely cause: *"])
    out = result.stdout.str()
    assert "check_gradients(problem.params, x, y, SPEC, halved).assert_agree()" in out
    assert "def assert_agree" not in out and "self = GradCheck(" not in out
