"""The harness: failing counterparts of issue 2, argument checks, copies, JSON.

Faulty JAX ports are built here by hand (a converter that guesses the layout from
shapes, an MSE summed instead of averaged, a wrong learning rate), recorded with
:class:`equiv.harness.Trajectory` and compared with the real backends through
:func:`equiv.harness.compare_trajectories`: each must be reported as a disagreement
naming the right leaf and stage, in the torch-style message layout.
"""

from __future__ import annotations

import functools
import json
import platform
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import equiv
from equiv import MLPSpec, OptimizerSpec, compare_backends, harness, jax_mlp, make_problem
from equiv.convert import jax_to_torch, torch_to_jax
from equiv.harness import REFERENCE, Comparison, Trajectory, compare_trajectories

HEADLINE = re.compile(r"\[equiv\] (\d+) of (\d+) comparisons disagree \(([^)]*)\)( \[.*\])?")


def correct_to_jax(params, spec):
    return torch_to_jax(params, layout="flax", spec=spec)


def guessing_to_jax(params, spec):
    """A converter that guesses the layout from shapes: it transposes a weight only
    when it is not already (in, out)-shaped, so a square weight is never transposed."""
    tree = {}
    for i in range(1, spec.num_layers + 1):
        weight = params[f"fc{i}.weight"].numpy()
        kernel = weight if weight.shape == (spec.sizes[i - 1], spec.sizes[i]) else weight.T
        tree[f"Dense_{i - 1}"] = {
            "kernel": jnp.asarray(kernel),
            "bias": jnp.asarray(params[f"fc{i}.bias"].numpy()),
        }
    return tree


def summed_mse(params, x, y, spec):
    """The bug: MSE summed over the elements instead of averaged (float32 only here)."""
    diff = jax_mlp.forward(params, x, spec) - y
    return jnp.sum(diff * diff)


def jax_trajectory(problem, learning_rate, *, loss_fn=jax_mlp.loss_fn, to_jax=correct_to_jax):
    """A JAX port run by hand: ``jax.value_and_grad`` of ``loss_fn`` and ``optax.sgd``."""
    spec = problem.spec
    params = to_jax(problem.params, spec)
    optimizer = optax.sgd(learning_rate)
    state = optimizer.init(params)
    value_and_grad = jax.jit(jax.value_and_grad(functools.partial(loss_fn, spec=spec)))
    out = Trajectory("jax", spec.dtype)
    for x, y in problem.batches:
        loss, grads = value_and_grad(params, jnp.asarray(x.numpy()), jnp.asarray(y.numpy()))
        updates, state = optimizer.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        out.record(
            loss,
            jax_to_torch(grads, layout="flax", spec=spec),
            jax_to_torch(params, layout="flax", spec=spec),
        )
    return out


def run_with(problem, learning_rate, jax_run):
    """torch, manual, the given JAX trajectory and the reference, in the harness's order."""
    runs = {name: harness.RUNNERS[name](problem, learning_rate) for name in ("torch", "manual")}
    runs["jax"] = jax_run
    runs[REFERENCE] = harness.run_reference(problem, learning_rate)
    return runs


def failed(report):
    return {(d.stage, d.step, d.name, d.actual, d.expected) for d in report.failures}


def block(text: str, where: str, name: str, shape, dtype: str, pair: str) -> list[str]:
    """The lines of one leaf's block, found by its heading line."""
    lines = text.splitlines()
    heading = f"{where}, {name}, shape {tuple(shape)}, {dtype}: {pair}"
    assert heading in lines, f"no block {heading!r} in:\n{text}"
    i = lines.index(heading)
    return lines[i : i + 5]


def mismatched_line(k: int, n: int) -> str:
    return f"  Mismatched elements: {k} / {n} ({100 * k / n:.1f}%)"


# ---- the correct port first: the builder itself is not the fault ----------------------


def test_hand_built_jax_port_agrees(equiv_seed):
    problem = equiv.make_problem(equiv.MLPSpec((4, 3, 3, 2)), batch_size=4, seed=equiv_seed)
    report = compare_trajectories(problem, run_with(problem, 0.1, jax_trajectory(problem, 0.1)))
    assert report.agree, report.failure_text()
    report.assert_agree()  # returns None, raises nothing


# ---- (a) a forgotten transpose on a square layer -------------------------------------


def test_forgotten_transpose_on_a_square_layer_is_named(equiv_seed):
    spec = equiv.MLPSpec((4, 3, 3, 2))  # fc2 is square: (3, 3)
    problem = equiv.make_problem(spec, batch_size=4, seed=equiv_seed)
    faulty = jax_trajectory(problem, 0.1, to_jax=guessing_to_jax)
    report = compare_trajectories(problem, run_with(problem, 0.1, faulty))
    assert not report.agree
    # Only pairs with the faulty port fail.
    assert all("jax" in (d.actual, d.expected) for d in report.failures)
    # After the step the JAX fc2.weight is the transpose of torch's, off by O(1):
    # the largest failure among the parameters, by far.
    params = [d for d in report.failures if d.stage == "params" and d.expected == "torch"]
    worst = max(params, key=lambda d: d.max_abs)
    assert (worst.name, worst.where, worst.actual) == ("fc2.weight", "params after step 1", "jax")
    w2 = problem.params["fc2.weight"].numpy()
    assert worst.max_abs >= 0.5 * float(np.max(np.abs(w2 - w2.T)))
    with pytest.raises(AssertionError) as info:
        report.assert_agree()
    text = str(info.value)
    assert HEADLINE.fullmatch(text.splitlines()[0])
    lines = block(text, "params after step 1", "fc2.weight", (3, 3), "float32", "jax vs torch")
    assert lines[1].startswith("  Mismatched elements: ")
    assert lines[2].startswith("  Greatest absolute difference: ")
    assert lines[3].startswith("  Greatest relative difference: ")
    assert lines[4].startswith("  Ratio to the bound: ")
    # The forward pass saw the wrong layer, so the loss fails too.
    assert ("loss", 1, "loss", "jax", "torch") in failed(report)


# ---- (b) MSE summed instead of averaged --------------------------------------------


def test_summed_mse_is_reported_on_the_loss_and_every_gradient(equiv_seed):
    problem = equiv.make_problem(equiv.MLPSpec((4, 3, 2)), batch_size=3, seed=equiv_seed)
    faulty = jax_trajectory(problem, 0.1, loss_fn=summed_mse)
    runs = run_with(problem, 0.1, faulty)
    report = compare_trajectories(problem, runs)
    assert not report.agree
    # The loss is 3·2 = 6 times the mean: the loss leaf fails at step 1.
    loss = next(d for d in report.failures if d.stage == "loss" and d.actual == "jax")
    torch_loss = float(runs["torch"].losses[0])
    assert loss.max_abs == pytest.approx(5 * torch_loss, rel=1e-5)
    # Every gradient leaf with a non-zero entry fails, with every such entry mismatched,
    # and each is listed in the message, not only the first.
    torch_grads = runs["torch"].grads[0]
    expected = {name for name, g in torch_grads.items() if np.any(g != 0)}
    assert {d.name for d in report.failures if d.stage == "grads"} == expected
    assert len(expected) >= 2
    with pytest.raises(AssertionError) as info:
        report.assert_agree()
    text = str(info.value)
    match = HEADLINE.fullmatch(text.splitlines()[0])
    assert match and int(match[1]) == len(report.failures) and int(match[2]) == len(report.leaves)
    assert match[3] == "jax vs manual; jax vs reference; jax vs torch"
    headings = [line for line in text.splitlines() if not line.startswith(("  ", "[equiv]"))]
    assert len(headings) == len(report.failures)
    for name in expected:
        g = torch_grads[name]
        for pair in ("jax vs torch", "jax vs manual"):
            lines = block(text, "grads at step 1", name, g.shape, "float32", pair)
            assert lines[1] == mismatched_line(int(np.count_nonzero(g)), g.size)
        lines = block(text, "grads at step 1", name, g.shape, "float32/float64", "jax vs reference")
        assert lines[1] == mismatched_line(int(np.count_nonzero(g)), g.size)


# ---- (c) a wrong learning rate ------------------------------------------------------


@pytest.fixture(scope="module")
def wrong_learning_rate():
    """The notebook's problem; the JAX port steps with 0.01 instead of 0.1."""
    problem = equiv.make_problem(equiv.MLPSpec((4, 3, 2)), batch_size=2, seed=0)
    runs = run_with(problem, 0.1, jax_trajectory(problem, 0.01))
    return problem, runs, compare_trajectories(problem, runs)


def test_wrong_learning_rate_fails_only_the_updated_parameters(wrong_learning_rate):
    problem, runs, report = wrong_learning_rate
    grads = runs["torch"].grads[0]
    # A step of 0.09·g with |g| >= 1e-3 is far beyond float32 rounding of these parameters.
    assert min(float(np.min(np.abs(g[g != 0]))) for g in grads.values()) >= 1e-3
    expected = {
        ("params", 1, name, a, b)
        for name in problem.spec.param_names()
        for a, b in [("jax", "torch"), ("jax", "manual"), ("jax", REFERENCE)]
    }
    assert failed(report) == expected  # loss and gradients agree: the step is what's wrong
    with pytest.raises(AssertionError) as info:
        report.assert_agree()
    text = str(info.value)
    # 4 leaves · 3 pairs fail, of 1 step · 9 leaves · 6 pairs.
    assert text.splitlines()[0] == (
        "[equiv] 12 of 54 comparisons disagree (jax vs manual; jax vs reference; jax vs torch)"
    )
    for name, g in grads.items():
        for pair, dtype in [("jax vs torch", "float32"), ("jax vs reference", "float32/float64")]:
            lines = block(text, "params after step 1", name, g.shape, dtype, pair)
            assert lines[1] == mismatched_line(int(np.count_nonzero(g)), g.size)


def test_comparison_assert_agree_raises_with_the_report(wrong_learning_rate):
    problem, runs, report = wrong_learning_rate
    comparison = Comparison(problem, 0.1, runs, report)
    assert comparison.agree is False
    with pytest.raises(AssertionError) as info:
        comparison.assert_agree()
    # The report's headline, the arbiter's summary, then the report's blocks.
    head, _, blocks = report.failure_text().partition("\n")
    raised = str(info.value)
    assert raised.startswith(head + "\n  arbiter: ")
    assert raised.endswith("\n  every failing comparison:\n" + blocks)
    summary = raised[len(head) : -len(blocks)].splitlines()[1:]
    causes = [f"  likely cause: {hint}" for hint in comparison.hints()]
    assert causes  # a learning rate off: named
    assert summary == [*comparison.arbiter_verdict(), *causes, "  every failing comparison:"]


def test_failing_comparison_is_json_ready(wrong_learning_rate):
    problem, runs, report = wrong_learning_rate
    data = json.loads(json.dumps(Comparison(problem, 0.1, runs, report).to_dict(), allow_nan=False))
    assert data["agree"] is False
    assert sum(not d["passed"] for d in data["diffs"]) == len(report.failures) == 12


# ---- user tolerances ---------------------------------------------------------------


def test_zero_tolerance_passes_bitwise_equal_backends_and_fails_the_rest():
    comparison = equiv.compare_backends(rtol=0.0, atol=0.0)
    assert not comparison.agree
    # torch and manual are bitwise equal on the notebook; float32 vs float64 never is.
    assert all(
        d.passed for d in comparison.report.leaves if {d.actual, d.expected} == {"torch", "manual"}
    )
    assert any(d.expected == REFERENCE for d in comparison.report.failures)


@pytest.mark.parametrize(
    ("kwargs", "given"),
    [({"rtol": 1e-5}, "rtol=1e-05, atol=None"), ({"atol": 1e-8}, "rtol=None, atol=1e-08")],
)
def test_half_a_tolerance_raises(kwargs, given):
    message = "[equiv] give rtol and atol both, or neither to use derived tolerances; got " + given
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        equiv.compare_backends(**kwargs)
    problem = equiv.make_problem(equiv.MLPSpec())
    runs = {
        "torch": harness.run_torch(problem, 0.1),
        REFERENCE: harness.run_reference(problem, 0.1),
    }
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        compare_trajectories(problem, runs, **kwargs)


# ---- bad arguments ------------------------------------------------------------------


@pytest.mark.parametrize("backends", [("torch", "tensorflow"), ("torch", "torch"), (), ("Torch",)])
def test_unknown_backend_raises(backends):
    message = (
        f"[equiv] backends must be distinct names from torch, manual, jax; got {list(backends)}"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        equiv.compare_backends(backends=backends)


def test_a_subset_of_backends_runs():
    comparison = equiv.compare_backends(backends=("jax",))
    assert set(comparison.trajectories) == {"jax", REFERENCE}
    assert {(d.actual, d.expected) for d in comparison.report.leaves} == {("jax", REFERENCE)}


@pytest.mark.parametrize("device", ["tpu", "cpu:x", "", "CUDA", "mps"])
def test_unknown_device_raises(device):
    message = (
        f"[equiv] unknown device {device!r}; expected 'cpu', 'cuda', 'cuda:N', 'gpu' or 'gpu:N'"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        equiv.compare_backends(device=device)


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="this machine has a cuda:7")
def test_missing_device_raises():
    with pytest.raises(
        ValueError, match=r"^\[equiv\] device 'cuda:7' is not available: torch sees"
    ):
        equiv.compare_backends(device="cuda:7")


# ---- every backend starts from its own copy ------------------------------------------


def test_problem_is_unchanged_by_a_run(bitwise_diff, equiv_seed):
    problem = equiv.make_problem(equiv.MLPSpec((4, 3, 2)), batch_size=2, seed=equiv_seed, steps=2)
    before = {k: v.clone() for k, v in problem.params.items()}
    batches = [(x.clone(), y.clone()) for x, y in problem.batches]
    comparison = equiv.compare_backends(problem=problem)
    assert comparison.agree
    assert bitwise_diff(problem.params, before) == []
    assert all(
        torch.equal(x, x0) and torch.equal(y, y0)
        for (x, y), (x0, y0) in zip(problem.batches, batches, strict=True)
    )
    # The parameters did move, in every backend, and no two backends share a buffer.
    for name, trajectory in comparison.trajectories.items():
        assert bitwise_diff(trajectory.params[0], before) != [], name
    runs = list(comparison.trajectories.values())
    for i, a in enumerate(runs):
        for b in runs[i + 1 :]:
            for leaf in a.params[-1]:
                assert not np.shares_memory(a.params[-1][leaf], b.params[-1][leaf])


# ---- JSON ---------------------------------------------------------------------------


def test_comparison_to_dict_is_json_and_holds_the_results():
    comparison = equiv.compare_backends(steps=2)
    data = comparison.to_dict()
    assert {"agree", "loss", "params", "diffs"} <= set(data)
    back = json.loads(json.dumps(data, allow_nan=False))
    assert back["agree"] is True
    assert set(back["loss"]) == set(back["params"]) == {"torch", "manual", "jax", REFERENCE}
    for name, trajectory in comparison.trajectories.items():
        assert back["loss"][name] == [float(v) for v in trajectory.losses]
        assert list(back["params"][name]) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
        for leaf, value in trajectory.params[-1].items():
            restored = np.array(back["params"][name][leaf], dtype=value.dtype)
            assert restored.tobytes() == value.tobytes()  # the final parameters, exactly
    assert isinstance(back["params"]["torch"]["fc1.weight"][0], list)  # nested lists
    assert len(back["diffs"]) == len(comparison.report.leaves) == 2 * 9 * 6
    first = back["diffs"][0]
    assert {"stage", "step", "name", "actual", "expected", "passed", "max_abs", "max_rel"} <= set(
        first
    )


def test_comparison_to_dict_records_the_versions_and_device():
    # Found in a user trial: two CI runs' JSON reports differed and nothing in them
    # said which torch, jaxlib or chip gave each.
    environment = equiv.compare_backends().to_dict()["environment"]
    versions = environment["versions"]
    assert versions["torch"] == torch.__version__
    assert versions["jax"] == jax.__version__
    assert versions["jaxlib"] == jax.lib.__version__
    assert versions["numpy"] == np.__version__
    assert versions["equiv"] == equiv.__version__
    assert versions["python"] == platform.python_version()
    assert environment["device"]["name"] == "cpu"
    assert "torch" not in environment["device"]  # a GPU's chip only where one ran


def test_progress_reports_each_phase_in_order():
    phases = []
    equiv.compare_backends(progress=phases.append)
    assert phases == ["torch", "manual", "jax", "reference", "compare"]


def test_spec_must_be_an_mlpspec():
    with pytest.raises(TypeError, match=r"^\[equiv\] spec must be an equiv.MLPSpec .* got tuple"):
        equiv.compare_backends((4, 3, 2))
    with pytest.raises(TypeError, match="got tuple"):
        equiv.TorchMLP((4, 3, 2))
    with pytest.raises(TypeError, match="got tuple"):
        equiv.make_problem((4, 3, 2))


def test_spec_and_problem_must_not_disagree():
    problem = equiv.make_problem(equiv.MLPSpec((4, 3, 2)))
    equiv.compare_backends(equiv.MLPSpec((4, 3, 2)), problem=problem).assert_agree()
    with pytest.raises(ValueError, match="differs from problem.spec"):
        equiv.compare_backends(equiv.MLPSpec((5, 3, 2)), problem=problem)


def test_make_problem_says_what_does_not_fit():
    spec = equiv.MLPSpec((4, 3, 2))
    params = dict(equiv.make_problem(spec).params)
    params["fc1.weight"] = params["fc1.weight"].double()
    params["fc2.bias"] = params["fc2.bias"].numpy()
    with pytest.raises(ValueError) as error:
        equiv.make_problem(spec, params=params)
    text = str(error.value)
    assert "fc1.weight: (3, 4) float64, expected (3, 4) float32" in text
    assert "fc2.bias: a ndarray, expected a torch tensor" in text


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_seed_range_matches_torch(seed):
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*64\)"):
        equiv.make_problem(equiv.MLPSpec(), seed=seed)


@pytest.mark.parametrize(
    "spec,learning_rate,optimizer",
    [
        (MLPSpec((4, 8, 8, 3)), 30.0, None),
        (
            MLPSpec((4, 8, 8, 3), dtype="float64"),
            1e6,
            OptimizerSpec("sgd", learning_rate=1e6, momentum=0.9),
        ),
        (MLPSpec((4, 8, 8, 3), activation="leaky_relu"), 30.0, None),
    ],
    ids=["float32-sgd", "float64-momentum", "float32-leaky-relu"],
)
def test_a_diverging_run_gets_a_report_not_an_exception(spec, learning_rate, optimizer):
    # Allowances between two diverging backends overflow float32, and the carried
    # optimizer bounds become NaN: neither may crash the comparison. In the leaky
    # ReLU run, a leaf that did not move at step 5 has gradient terms of size inf
    # (float64 overflowed): 0 · inf once made its bound NaN.
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        comparison = compare_backends(
            spec, batch_size=4, seed=0, steps=10, learning_rate=learning_rate, optimizer=optimizer
        )
    assert comparison.report.leaves


@pytest.mark.parametrize(
    "spec,steps,note",
    [
        (
            MLPSpec((4, 8, 8, 3)),
            5,
            "every backend's loss overflows float32 at step 4, where the float64 reference "
            "holds values up to 1.58e+59: float32 cannot hold this run",
        ),
        (
            MLPSpec((4, 8, 8, 3), activation="gelu_tanh", dtype="float64"),
            5,
            "the run diverged: its loss holds inf or NaN at step 5 in every backend and the "
            "float64 reference",
        ),
    ],
    ids=["float32-overflow", "float64-diverged"],
)
def test_an_overflowing_run_is_named_as_such_not_blamed_on_a_trap(spec, steps, note):
    # Past the overflow, differences are inf - inf and 0 · inf, and the trap
    # diagnostics read nonsense into them (a learning-rate factor of NaN, a weight
    # decay of 1e187): the only hint is the overflow's.
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        comparison = compare_backends(spec, batch_size=4, seed=0, steps=steps, learning_rate=30.0)
        assert not comparison.agree
        hints = comparison.hints()
    assert len(hints) == 1 and hints[0].startswith(note), hints
    assert "--steps" in hints[0] and "lower the learning rate" in hints[0]


def test_adams_second_moment_underflow_is_named_not_blamed_on_the_learning_rate():
    # Found in review: gradients of 1e-21 at eps = 0. v = (1 - β₂)·g² is subnormal or 0
    # in float32 and the update m̂/(√v̂ + eps) divides by 0 in every float32 backend,
    # while the float64 reference is finite. The hint said "lower the learning rate".
    # The twin: the same problem at eps = 1e-8 agrees (and an overflow at a large
    # learning rate keeps its own advice, above).
    import dataclasses

    problem = make_problem(MLPSpec((2, 4, 1), activation="tanh"), batch_size=4, seed=0)
    ((x, y),) = problem.batches
    x = x.clone()
    x[:, 0] *= 1e-20
    problem = dataclasses.replace(problem, batches=((x, y),))
    bare = OptimizerSpec("adam", learning_rate=1.0, eps=0.0)
    comparison = compare_backends(problem=problem, optimizer=bare)
    assert not comparison.agree
    (hint,) = comparison.hints()
    assert "Adam's second moment v = (1-β₂)·g² underflowed" in hint, hint
    assert "divides by 0" in hint and "use a larger eps" in hint
    assert "lower the learning rate" not in hint
    default = OptimizerSpec("adam", learning_rate=1.0, eps=1e-8)
    assert compare_backends(problem=problem, optimizer=default).agree


def test_adam_at_eps_0_on_exactly_zero_gradients_is_named_a_0_over_0():
    # Found in review: dead ReLU units' gradients of exactly 0 at eps = 0 were called an
    # underflow, "gradients as small as 0". The twin: eps = 1e-8 agrees (and gradients
    # of 1e-21 keep the underflow's hint, above).
    spec = MLPSpec((4, 16, 16, 2), activation="relu")
    run = dict(batch_size=4, seed=0, learning_rate=1.0, steps=6)
    bare = OptimizerSpec("adam", learning_rate=1.0, eps=0.0)
    with np.errstate(all="ignore"):  # the float64 reference's 0/0 too
        comparison = compare_backends(spec, optimizer=bare, **run)
        hints = comparison.hints()
    assert not comparison.agree
    assert any("gradients of exactly 0 there" in h and "is 0/0" in h for h in hints), hints
    assert not any("as small as 0" in h for h in hints), hints
    default = OptimizerSpec("adam", learning_rate=1.0, eps=1e-8)
    assert compare_backends(spec, optimizer=default, **run).agree


def test_a_flushed_adam_second_moment_is_named_not_called_a_weight_decay():
    # Found in review: gradients of 3e-20 give v = 5.6e-40, subnormal in float32; XLA
    # flushes it to 0 and at eps = 1e-20 JAX's update was 2.8·lr against torch's
    # 0.74·lr. The hint named a weight decay of 1.9e-8, fitted to rounding. The twin:
    # at eps = 1e-8 the same run agrees.
    from equiv.problem import Problem

    spec = MLPSpec((64, 32, 1, 128), activation="leaky_relu")
    base = make_problem(spec, batch_size=4, seed=92)
    params = {k: v * (1e-12 if k.startswith("fc3.") else 1.0) for k, v in base.params.items()}
    problem = Problem(spec=spec, params=params, batches=base.batches)

    def adam(eps):
        return OptimizerSpec("adam", learning_rate=0.0342, betas=(0.1, 0.3), eps=eps)

    comparison = compare_backends(problem=problem, optimizer=adam(1e-20))
    assert not comparison.agree
    hints = comparison.hints()
    assert "jax's Adam second moment v is 0 where reference's is" in hints[0], hints
    assert not any("weight decays differ" in h for h in hints), hints
    assert compare_backends(problem=problem, optimizer=adam(1e-8)).agree


def test_a_relu_run_that_overflows_float64_still_agrees():
    # Loss 1e212 by step 11: the float64 kink envelope overflows (inf - inf = NaN),
    # which once raised "slack must be finite", and the upstream gradient overflows to
    # inf, where the hand-derived backward gave inf · 0 = NaN at dead units while
    # torch's and JAX's ReLU backward select 0. Neither is a disagreement.
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        comparison = compare_backends(
            MLPSpec((4, 8, 8, 3), dtype="float64"),
            batch_size=4,
            seed=0,
            steps=12,
            learning_rate=30.0,
        )
    assert comparison.trajectories["torch"].stage("loss", 12)["loss"] > 1e200
    assert comparison.agree, comparison.report.failures[:3]


def test_compiled_train_steps_are_cached_but_bounded():
    # Unbounded, every configuration of a long sweep kept its compiled code (36 memory
    # mappings each) until Linux's 65,530 ran out at about 1,800 of them.
    from equiv import jax_mlp

    opt = OptimizerSpec("sgd", learning_rate=0.1)
    first = jax_mlp.make_train_step(MLPSpec((2, 1)), opt)[0]
    assert jax_mlp.make_train_step(MLPSpec((2, 1)), opt)[0] is first  # reused
    for width in range(2, jax_mlp._TRAIN_STEP_CACHE + 3):
        jax_mlp.make_train_step(MLPSpec((2, width, 1)), opt)
    assert jax_mlp.make_train_step.cache_info().currsize <= jax_mlp._TRAIN_STEP_CACHE
    assert jax_mlp.make_train_step(MLPSpec((2, 1)), opt)[0] is not first  # evicted


def _hints_with_torch_grad(value: float) -> list[str]:
    """Hints when torch's fc1.weight[0, 0] gradient at step 1 is ``value``."""
    from equiv.harness import REFERENCE, RUNNERS, Comparison, compare_trajectories

    problem = equiv.make_problem(MLPSpec((4, 3, 2)), batch_size=2, seed=0)
    runs = {n: RUNNERS[n](problem, 0.1) for n in ("torch", REFERENCE)}
    grads = runs["torch"].grads[0]
    grads["fc1.weight"] = grads["fc1.weight"].copy()
    grads["fc1.weight"][0, 0] = value
    with np.errstate(invalid="ignore"):
        report = compare_trajectories(problem, runs, learning_rate=0.1)
    return Comparison(problem, 0.1, runs, report).hints()


def _hints_with_jax_loss(value: float, unjitted=None) -> list[str]:
    """Hints when JAX's loss at step 1 is ``value`` (its compiled step's), with its
    op-by-op replay replaced by ``unjitted`` where given."""
    from equiv.harness import RUNNERS

    problem = equiv.make_problem(MLPSpec((4, 3, 2)), batch_size=2, seed=0)
    runs = {n: RUNNERS[n](problem, 0.1) for n in ("torch", "jax", REFERENCE)}
    runs["jax"].losses[0] = np.array(value, np.float32)
    if unjitted is not None:
        runs["jax"].unjitted = unjitted
    with np.errstate(invalid="ignore"):
        report = compare_trajectories(problem, runs, learning_rate=0.1)
    return Comparison(problem, 0.1, runs, report).hints()


def test_an_inf_that_compilation_made_is_told_from_the_formulas():
    # The replay from the same parameters op by op gives the true loss (2.51): XLA's
    # compilation, not the formula, made the inf.
    (hint,) = _hints_with_jax_loss(float("-inf"))
    assert hint.startswith("loss: jax's loss holds inf or NaN at 1 entry where"), hint
    assert "op by op (jax.disable_jit) from the same parameters they are finite" in hint
    assert "(at most 2.51)" in hint and "XLA's compilation changed the arithmetic" in hint


def test_an_inf_that_the_formula_makes_op_by_op_too_is_not_blamed_on_compilation():
    def formula_nan(params, x, y):
        return np.array(np.nan, np.float32), {}

    (hint,) = _hints_with_jax_loss(float("-inf"), formula_nan)
    assert "inf or NaN too: the formula itself, not XLA's compilation" in hint, hint
    assert "changed the arithmetic" not in hint


def test_a_replay_that_fails_says_so_in_the_hint():
    def broken(params, x, y):
        raise RuntimeError("no device")

    (hint,) = _hints_with_jax_loss(float("-inf"), broken)
    assert hint.endswith("(Its op-by-op replay failed: RuntimeError: no device.)"), hint


def test_the_op_by_op_replay_reproduces_the_compiled_step_in_the_runs_settings():
    # Replayed outside the comparison's scope (x64 is off there by default), the
    # float64 step must still be float64 and equal the compiled one to rounding.
    spec = MLPSpec((4, 3, 2), dtype="float64", loss="cross_entropy")
    comparison = compare_backends(spec, backends=("jax",), reference=False)
    trajectory = comparison.trajectories["jax"]
    x, y = comparison.problem.batches[0]
    params = {k: v.numpy() for k, v in comparison.problem.params.items()}
    loss, grads = trajectory.unjitted(params, x.numpy(), harness.jax_labels(y))
    assert loss.dtype == np.float64 and grads["fc1.weight"].dtype == np.float64
    np.testing.assert_allclose(loss, trajectory.losses[0], rtol=1e-14)
    for name, value in trajectory.grads[0].items():
        np.testing.assert_allclose(grads[name], value, rtol=1e-13, atol=1e-300)


def test_jaxs_fused_cross_entropy_minus_inf_is_named_as_compilation():
    # Found by scripts/random_sweep.py --seed 32: at step 10 (logits about 1e27) JAX's
    # jitted float64 cross-entropy is -inf, as XLA fuses the 1-wide layer's product
    # into log_softmax's o - max(o) as a fused multiply-add; op by op it is 1.68e27.
    optimizer = OptimizerSpec("sgd", learning_rate=2.5098313625827853, momentum=0.5, dampening=0.5)
    spec = MLPSpec(
        (8, 64, 1, 8),
        activation=["identity", "silu"],
        loss="cross_entropy",
        bias=False,
        dtype="float64",
    )
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        comparison = compare_backends(
            spec, batch_size=2, seed=992507487, steps=10, optimizer=optimizer
        )
    if np.isfinite(comparison.trajectories["jax"].losses[9]):
        pytest.skip("this JAX/XLA computes the fused loss finitely: the trap is gone")
    hint = comparison.hints()[0]
    assert hint.startswith("loss: jax's loss holds inf or NaN"), hint
    assert "at step 10" in hint and "XLA's compilation changed the arithmetic" in hint, hint


def test_inf_or_nan_on_one_side_only_is_named_with_its_place():
    # JAX's float32 gelu_tanh backward gives NaN where torch's and the float64
    # reference's gradients are 0 (|z| beyond 1e13 in a diverging run): the hint says
    # which side and how large the other side is there.
    hints = _hints_with_torch_grad(float("nan"))
    assert hints and hints[0].startswith(
        "fc1.weight: torch's gradients hold inf or NaN at 1 entry where reference's is finite"
    ), hints
    assert "at step 1" in hints[0]


def test_a_finite_difference_gets_no_overflow_hint():
    assert not any("inf or NaN" in h for h in _hints_with_torch_grad(123.0))


def test_a_drifted_backend_does_not_cancel_anothers_size_excess():
    # Sizes are merged as excesses over each start's own values: a backend that
    # drifted to large values (B) must not cancel the excess of another's (A), which
    # merging the sizes and the values separately, then subtracting, did (found in
    # review: a per-element term 100 times too small).
    from equiv.harness import Sizes, _elementwise_sizes, _larger_sizes
    from equiv.tolerance import Tolerance

    tol = Tolerance(scaled=1e-6)
    a = Sizes({"g": 1.0}, {"g": 99.0}, {"g": np.array([99.0, 0.0])})
    b = Sizes({"g": 1000.0}, {"g": 0.0}, {"g": None})
    _, extra = _elementwise_sizes(tol, _larger_sizes(a, b), "g")
    np.testing.assert_allclose(extra, [9.9e-5, 0.0])
    assert _elementwise_sizes(tol, b, "g")[1] is None  # no excess: no per-element term


def test_the_scale_is_no_smaller_than_the_leafs_greatest_float64_value():
    # Excesses are measured above the float64 leaf's greatest value, so the bound's
    # scale must reach it (else an element's size is undercounted); an overflowed one
    # gives no floor (it would allow everything).
    from equiv.harness import Sizes, _elementwise_sizes
    from equiv.tolerance import Tolerance

    tol = Tolerance(scaled=1e-6, floor=1e-30)
    assert (
        _elementwise_sizes(tol, Sizes({"g": 3e-15}, {"g": 0.0}, {"g": None}), "g")[0].floor == 3e-15
    )
    for top in (float("inf"), float("nan"), 1e-40):
        assert (
            _elementwise_sizes(tol, Sizes({"g": top}, {"g": 0.0}, {"g": None}), "g")[0].floor
            == 1e-30
        )


def _sigmoid_tail_case() -> Comparison:
    """Found by ``scripts/random_sweep.py --seed 30``: at step 2 fc2.bias's gradients
    are about 5e-31 (a sigmoid at z = -71), off by 0.04% between backends, while the
    leaf's greatest float64 value (2.8e-15) is cancellation that float32 returns as 0.
    Scaled by the float32 leaves' own 5e-31, manual vs JAX was off by 1.7 times the
    bound; each backend was within its bound of the float64 step, scaled by 2.8e-15."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return compare_backends(
            MLPSpec((33, 64, 33, 64, 8), activation=["gelu", "gelu", "sigmoid"], loss="smooth_l1"),
            batch_size=2,
            seed=1705773391,
            steps=2,
            optimizer=OptimizerSpec(
                "adamw", learning_rate=2.5097136770306268, betas=(0.8, 0.99), eps=1e-6
            ),
        )


def test_tiny_gradients_under_a_sigmoid_tail_agree():
    comparison = _sigmoid_tail_case()
    assert comparison.agree, comparison.report.failures[:3]


def test_an_error_beyond_the_floored_scale_in_those_gradients_is_caught():
    # The twin: the floor raises the bound to c·√k·(u₁+u₂)·2.8e-15 and no further, so
    # manual's gradient at that element moved by 10 times it fails.
    comparison = _sigmoid_tail_case()
    (leaf,) = [
        d
        for d in comparison.report.leaves
        if (d.stage, d.step, d.name, d.actual, d.expected)
        == ("grads", 2, "fc2.bias", "jax", "manual")
    ]
    runs = comparison.trajectories
    grads = runs["manual"].grads[1]
    grads["fc2.bias"] = grads["fc2.bias"].copy()
    grads["fc2.bias"][19] += np.float32(10 * leaf.allowed)
    with np.errstate(all="ignore"):
        report = compare_trajectories(
            comparison.problem,
            runs,
            learning_rate=comparison.learning_rate,
            optimizer=comparison.optimizer,
        )
    failed = {(d.stage, d.step, d.name, d.actual) for d in report.failures}
    assert ("grads", 2, "fc2.bias", "manual") in failed, report.failures[:3]


def _comparison_of_a_reversed_sum(a: float):
    """A float64 port that sums a cancelling pre-activation ``a - a - 30`` from the
    other end (0 instead of -30, so tanh's slope 1 instead of 0), against the
    reference: at a = 1e200 the error sizes of the gradients overflow float64 (that of
    fc2.weight is the output's 1e200 times the hidden unit's reach 5e185), though every
    value is finite."""
    import torch

    from equiv.harness import REFERENCE, RUNNERS, Comparison, compare_trajectories
    from equiv.problem import Problem

    f64 = torch.float64
    spec = MLPSpec((3, 1, 1), activation="tanh", dtype="float64", bias=False)
    weight = torch.tensor([[a, -a, 1.0]], dtype=f64)
    x, y = torch.tensor([[1.0, 1.0, -30.0]], dtype=f64), torch.tensor([[0.5]], dtype=f64)
    params = {"fc1.weight": weight, "fc2.weight": torch.tensor([[1.0]], dtype=f64)}
    problem = Problem(spec, params, ((x, y),))
    flipped = Problem(spec, {**params, "fc1.weight": weight.flip(1)}, ((x.flip(1), y),))
    port = RUNNERS["torch"](flipped, 0.1)
    port.grads[0]["fc1.weight"] = port.grads[0]["fc1.weight"][:, ::-1].copy()
    port.params[0]["fc1.weight"] = port.params[0]["fc1.weight"][:, ::-1].copy()
    runs = {"port": port, REFERENCE: RUNNERS[REFERENCE](problem, 0.1)}
    with np.errstate(all="ignore"):
        report = compare_trajectories(problem, runs, learning_rate=0.1)
    return Comparison(problem, 0.1, runs, report)


def test_error_sizes_beyond_float64_are_named_not_blamed():
    # Every value is finite, but the analysis cannot bound the loss's error: the
    # port's differences (its sum is as correct as the reference's) get that note, and
    # no trap is read into them.
    comparison = _comparison_of_a_reversed_sum(1e200)
    assert comparison.overflowed_at() is None
    assert comparison.unbounded_at() == (1, "grads") == comparison.analysis_limit()
    assert not comparison.agree
    hints = comparison.hints()
    assert len(hints) == 1 and hints[0].startswith(
        "the rounding errors of the gradients at step 1 are beyond what equiv can bound"
    ), hints


def test_error_sizes_within_float64_bound_the_same_port():
    # The twin: at a = 1e20 the sizes are finite, the port agrees and nothing is noted.
    comparison = _comparison_of_a_reversed_sum(1e20)
    assert comparison.unbounded_at() is None and comparison.agree
    assert comparison.unbounded_note() is None


def test_sizes_of_large_finite_values_do_not_overflow():
    # Squares of 1e160 overflow; the sizes are scaled before squaring, so a run whose
    # values are large but whose errors are not stays within analysis.
    from equiv import manual

    spec = MLPSpec((2, 2, 1), activation="tanh", dtype="float64")
    params = {
        "fc1.weight": np.array([[1e160, 2e160], [3e160, -1e160]]),
        "fc1.bias": np.zeros(2),
        "fc2.weight": np.array([[1e-170, 1e-170]]),
        "fc2.bias": np.zeros(1),
    }
    x, y = np.array([[1.0, 1.0]]), np.array([[0.0]])
    loss, grads = manual.magnitudes(params, x, y, spec)
    assert np.isfinite(loss) and all(np.isfinite(g).all() for g in grads.values())


def test_a_dead_units_tiny_size_is_not_called_unbounded():
    # Found by the false-alarm sweep: a dead ReLU unit's size is the underflow floor
    # tiny/u² (1.8e-276); scaling the next layer's sums by it alone made the bias term's
    # square overflow, the loss "unbounded" and the bound allow nothing (ratio 1.68).
    # The twin is test_error_sizes_beyond_float64_are_named_not_blamed.
    comparison = compare_backends(
        MLPSpec((27, 27, 1, 6, 23, 1), dtype="float64"),
        batch_size=21,
        seed=2814,
        learning_rate=0.0556,
    )
    assert comparison.unbounded_at() is None
    comparison.assert_agree()


def _diverging(spec: MLPSpec, optimizer: OptimizerSpec, *, batch_size: int, seed: int):
    """``compare(steps)`` for a random sweep's diverging case, its warnings silenced."""

    def compare(steps: int):
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return compare_backends(
                spec, batch_size=batch_size, seed=seed, steps=steps, optimizer=optimizer
            )

    return compare


def test_a_lone_nan_before_the_overflow_is_named_first():
    # Found by a random sweep: at step 7 JAX's float32 silu backward gives NaN where
    # upstream · z overflows (torch's and the reference's gradients are finite, at most
    # 4.2e28), a step before every backend's loss overflows. The hints name JAX's NaN
    # first, then the overflow. The twin: six steps, before any NaN, agree.
    compare = _diverging(
        MLPSpec(
            (2, 3, 17, 3, 2), activation=("silu", "silu", "leaky_relu"), loss="mse_sum", bias=False
        ),
        OptimizerSpec("sgd", learning_rate=0.5936480514802078, momentum=0.9),
        batch_size=2,
        seed=884335394,
    )

    comparison = compare(9)
    assert comparison.overflowed_at() == (8, "loss")
    hints = comparison.hints()
    assert len(hints) == 2 and hints[1] == comparison.overflow_note(), hints
    assert "jax" not in comparison.backend_overflows()  # the reference is in range there
    assert hints[0].startswith("fc1.weight: jax's gradients hold inf or NaN"), hints
    assert "at step 7" in hints[0]
    reference = comparison.trajectories["reference"].grads[6]["fc1.weight"]
    assert np.isfinite(reference).all() and np.abs(reference).max() < 3.4e38
    # The twin: up to step 6 the silu gradient is finite everywhere and nothing fails.
    compare(6).assert_agree()


def test_a_backend_that_overflows_on_the_references_trajectory_is_not_evidence():
    # Found by a random sweep (--seed 40): at steps 15 and 16 XLA flushed a subnormal
    # ELU slope to 0 (allowed: the bound models kernels that flush), so JAX's run
    # parted from the others. At step 17 torch's and the hand-derived float32 loss and
    # gradients are NaN (inf · 0 at dead units) where the reference, on their
    # trajectory, holds 5.3e186; JAX's are finite. Those are overflow: named, and not
    # evidence. The twin: sixteen steps agree; and a lone NaN against a reference in
    # range stays evidence (test_a_lone_nan_before_the_overflow_is_named_first).
    compare = _diverging(
        MLPSpec(
            (3, 5, 5, 64, 1, 8), activation=("relu", "identity", "gelu", "elu"), loss="mse_sum"
        ),
        OptimizerSpec("sgd", learning_rate=2.8557490502314473),
        batch_size=1,
        seed=80821462,
    )

    comparison = compare(17)
    assert not comparison.agree  # the verdict still fails: float32 cannot hold this run
    assert comparison.backend_overflows() == {"torch": (17, "loss"), "manual": (17, "loss")}
    assert comparison.analysis_limit() is None  # JAX's run is finite: no run-wide limit
    assert [d for d in comparison.leaves_before_limit() if not d.passed] == []
    assert comparison.trajectories["reference"].losses[16] > 1e186
    hints = comparison.hints()
    # The float64 size is read back, not written in: this chaotic run amplifies any
    # change in rounding (5.31e186 when the test was written, 5.26e186 in a fresh
    # environment of 2026-12-03).
    held = re.match(
        r"torch holds inf or NaN in its loss at step 17, where the float64 values from its "
        r"own parameters reach (\S+): beyond what float32 holds",
        hints[0],
    )
    assert len(hints) == 2 and held and float(held[1]) > 1e186, hints
    compare(16).assert_agree()


def test_a_backend_that_overflows_on_a_parted_trajectory_is_not_evidence():
    # Found by a random sweep (--seed 41): JAX's run parted from torch's within the
    # bound (the parameters were 4e14 against torch's 1.8e17 at step 9), and at step 10
    # JAX's float32 loss is inf and its gradients NaN where torch's are 2.5e23 and 0.
    # The float64 loss at JAX's own parameters is 6.8e74: overflow, not evidence. The
    # twin: nine steps agree.
    compare = _diverging(
        MLPSpec(
            (5, 2, 5, 3),
            activation=("relu", "elu"),
            loss="mse_sum",
            bias=False,
            negative_slope=0.2,
            elu_alpha=0.5,
        ),
        OptimizerSpec("sgd", learning_rate=0.4952769398271648),
        batch_size=7,
        seed=1333182695,
    )

    comparison = compare(10)
    assert not comparison.agree and comparison.analysis_limit() is None
    assert comparison.backend_overflows() == {"jax": (10, "loss")}
    assert [d for d in comparison.leaves_before_limit() if not d.passed] == []
    assert np.isfinite(comparison.trajectories["torch"].losses[9])
    assert comparison.hints()[0].startswith(
        "jax holds inf or NaN in its loss at step 10, where the float64 values from its own "
        "parameters reach 6.84e+74"
    )
    compare(9).assert_agree()


def test_float64_values_that_overflow_at_finite_parameters_are_named_not_blamed():
    # Found by a random sweep: at step 6 a cancelling sum of 1e123 terms put an ELU unit
    # on its linear side in torch, the hand-derived pass and the reference, whose float64
    # losses overflowed, and on its flat side in JAX, whose loss came out 2.7e243. The
    # parameters are finite; the analysis cannot compute there: the note, no blame. The
    # twin: five steps agree.
    compare = _diverging(
        MLPSpec(
            (64, 33, 33, 64, 8),
            activation=("gelu_tanh", "sigmoid", "elu"),
            loss="mse_sum",
            dtype="float64",
        ),
        OptimizerSpec(
            "sgd", learning_rate=2.6246923134582816, momentum=0.9, nesterov=True, weight_decay=1e-3
        ),
        batch_size=1,
        seed=1541419810,
    )

    comparison = compare(6)
    assert comparison.overflowed_at() is None  # JAX's loss is finite
    assert comparison.analysis_limit() == comparison.unbounded_at() == (6, "loss")
    assert not comparison.agree
    assert all(d.step == 6 for d in comparison.report.failures)
    assert comparison.hints() == [comparison.unbounded_note()]
    evidence = comparison.leaves_before_limit()  # steps 1 to 5: all pass
    assert evidence and all(d.passed and d.step < 6 for d in evidence)
    assert len(evidence) < len(comparison.report.leaves)
    five = compare(5)
    five.assert_agree()
    assert five.leaves_before_limit() == five.report.leaves  # no limit: every leaf


def _adam_with_l2_decay(steps: int):
    """A float64 Adam run (amsgrad, L2 ``weight_decay`` 1e-2, learning rate 4.9) in
    which fc4's gradient at step 2 is exactly 0 in torch (tanh saturated to 1) and
    5e-13 in JAX, against a decay term λ·p of 0.05 (random sweep)."""
    spec = MLPSpec(
        (2, 1, 5, 64, 33, 1),
        activation=("leaky_relu", "sigmoid", "tanh", "tanh"),
        dtype="float64",
        bias=False,
    )
    optimizer = OptimizerSpec(
        "adam", learning_rate=4.882322026732382, amsgrad=True, weight_decay=1e-2
    )
    return compare_backends(spec, batch_size=1, seed=1521633558, steps=steps, optimizer=optimizer)


def test_adam_l2_decay_sizes_the_second_moment_by_the_gradient_it_takes():
    # The moments take g + λ·p: the second moment's bound is carried by max|g + λ·p|,
    # not max|g| (0 here, where it allowed 1.2e-17 and JAX's was 4.8e-17 off).
    comparison = _adam_with_l2_decay(2)
    comparison.assert_agree()
    # The twin: a second moment off by ten times what is now allowed is caught.
    leaf = "exp_avg_sq.fc4.weight"
    allowed = next(
        d.allowed
        for d in comparison.report.leaves
        if (d.stage, d.step, d.name, d.actual, d.expected) == ("state", 2, leaf, "jax", "torch")
    )
    runs = dict(comparison.trajectories)
    off = runs["jax"].states[1]["exp_avg_sq"]["fc4.weight"]
    off[19, 54] += 10 * allowed
    report = compare_trajectories(comparison.problem, runs, optimizer=comparison.optimizer)
    failed = {(d.stage, d.step, d.name) for d in report.failures if "jax" in (d.actual, d.expected)}
    assert ("state", 2, leaf) in failed, report.failure_text()
