"""The notebook (shared/seed/notebook.txt) replayed: its printed tables are the external record.

The notebook builds the 4-3-2 ReLU MLP after ``torch.manual_seed(0)``, draws ``x`` then
``y`` with ``torch.randn`` for each run of its training cell, and steps
``torch.optim.SGD(lr=0.1)`` on ``nn.MSELoss``. Its cell was run three times: the forward
hook of the first run prints the initial parameters, the table after it the parameters
after step 1; the hook of the third run prints the parameters after step 2 and the tables
after it (torch's, then the hand-derived one's) the parameters after step 3.

The tables below are copied verbatim from the notebook. Two of its prints were cut off
mid-tensor (``tensor([ 0.5239, -`` and ``tensor([0.6073, 0.``): only the printed entries
are compared, and the cut-off text must begin the next entry.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import equiv
from equiv import manual

INITIAL = {  # forward hook, first run
    "fc1.weight": """tensor([[-0.0037,  0.2682, -0.4115, -0.3680],
        [-0.1926,  0.1341, -0.0099,  0.3964],
        [-0.0444,  0.1323, -0.1511, -0.0983]])""",
    "fc1.bias": "tensor([-0.4777, -0.3311, -0.2061])",
    "fc2.weight": """tensor([[ 0.0214,  0.2282,  0.3464],
        [-0.3914, -0.2514,  0.2097]])""",
    "fc2.bias": "tensor([ 0.4794, -0.1188])",
}
AFTER_STEP_1 = {  # "=== PyTorch로 업데이트된 최종 파라미터 ===", first run
    "fc1.weight": """tensor([[-0.0037,  0.2682, -0.4115, -0.3680],
        [-0.1416,  0.1264, -0.0283,  0.4303],
        [-0.0444,  0.1323, -0.1511, -0.0983]])""",
    "fc1.bias": "tensor([-0.4777, -0.3446, -0.2061])",
    "fc2.weight": """tensor([[ 0.0214,  0.2695,  0.3464],
        [-0.3914, -0.2426,  0.2097]])""",
    "fc2.bias": "tensor([ 0.5239, -",  # cut off in the notebook
}
AFTER_STEP_2 = {  # forward hook, third run
    "fc1.weight": """tensor([[-0.0037,  0.2682, -0.4115, -0.3680],
        [-0.1416,  0.1264, -0.0283,  0.4303],
        [-0.0444,  0.1323, -0.1511, -0.0983]])""",
    "fc1.bias": "tensor([-0.4777, -0.3446, -0.2061])",
    "fc2.weight": """tensor([[ 0.0214,  0.2695,  0.3464],
        [-0.3914, -0.2426,  0.2097]])""",
    "fc2.bias": "tensor([ 0.5725, -0.0086])",
}
AFTER_STEP_3 = {  # "=== PyTorch로 업데이트된 최종 파라미터 ===", third run
    "fc1.weight": """tensor([[ 0.0171,  0.2728, -0.3823, -0.3625],
        [-0.1416,  0.1264, -0.0283,  0.4303],
        [-0.0572,  0.1295, -0.1692, -0.1017]])""",
    "fc1.bias": "tensor([-0.5022, -0.3446, -0.1910])",
    "fc2.weight": """tensor([[ 0.0217,  0.2695,  0.3465],
        [-0.3883, -0.2426,  0.2103]])""",
    "fc2.bias": "tensor([0.6073, 0.",  # cut off in the notebook
}
MANUAL_AFTER_STEP_3 = {  # "=== 수동 연산으로 업데이트된 최종 파라미터 ===": W1, b1, W2, b2
    "fc1.weight": """tensor([[ 0.0171,  0.2728, -0.3823, -0.3625],
        [-0.1416,  0.1264, -0.0283,  0.4303],
        [-0.0572,  0.1295, -0.1692, -0.1017]])""",
    "fc1.bias": "tensor([-0.5022, -0.3446, -0.1910])",
    "fc2.weight": """tensor([[ 0.0217,  0.2695,  0.3465],
        [-0.3883, -0.2426,  0.2103]])""",
    "fc2.bias": "tensor([0.6073, 0.0631])",
}
# (backend, step, table); step 0 is the initial parameters.
TABLES = [
    ("torch", 0, INITIAL),
    ("torch", 1, AFTER_STEP_1),
    ("torch", 2, AFTER_STEP_2),
    ("torch", 3, AFTER_STEP_3),
    ("manual", 3, MANUAL_AFTER_STEP_3),
]


def printed_entries(text: str) -> tuple[list[str], str | None]:
    """The complete numbers of a printed tensor, in order, and the cut-off tail if any."""
    complete = text.endswith(")")
    body = text.removeprefix("tensor(").removesuffix(")")
    pieces = [p.strip() for p in body.replace("[", " ").replace("]", " ").split(",")]
    return (pieces, None) if complete else (pieces[:-1], pieces[-1])


def assert_matches_print(actual, text: str, name: str) -> None:
    """``actual`` prints as ``text`` to torch's 4 decimals (``{:.4f}``), entry by entry."""
    values = [f"{v:.4f}" for v in np.asarray(actual, dtype=np.float64).ravel().tolist()]
    complete, tail = printed_entries(text)
    assert values[: len(complete)] == complete, f"{name}: {values} printed as {text}"
    if tail is None:
        assert len(values) == len(complete), f"{name}: {values} printed as {text}"
    else:
        assert values[len(complete)].startswith(tail), f"{name}: {values} printed as {text}"


@pytest.fixture(scope="module")
def comparison() -> equiv.Comparison:
    """The default comparison with three steps: the notebook's three runs."""
    return equiv.compare_backends(equiv.MLPSpec((4, 3, 2)), batch_size=2, seed=0, steps=3)


class SimpleMLP(nn.Module):
    """The notebook's model, verbatim."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 3)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x)))


@pytest.fixture(scope="module")
def notebook_run() -> dict:
    """The notebook's own code, run three times: an implementation independent of equiv."""
    out: dict = {"params": [], "grads": [], "losses": []}
    with torch.random.fork_rng(devices=[]):  # leave the global torch RNG as it was
        torch.manual_seed(0)
        model = SimpleMLP()
        out["params"].append({k: v.clone() for k, v in model.state_dict().items()})
        for _ in range(3):
            x = torch.randn(2, 4)
            y = torch.randn(2, 2)
            criterion = nn.MSELoss()
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            loss = criterion(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            out["grads"].append({k: p.grad.clone() for k, p in model.named_parameters()})
            optimizer.step()
            out["losses"].append(loss.detach().clone())
            out["params"].append({k: v.clone() for k, v in model.state_dict().items()})
    return out


@pytest.mark.parametrize(("backend", "step", "table"), TABLES)
def test_parameters_equal_the_printed_tables(comparison, backend, step, table):
    trajectory = comparison.trajectories[backend]
    params = comparison.problem.params if step == 0 else trajectory.params[step - 1]
    assert list(params) == list(table)
    for name, text in table.items():
        assert_matches_print(params[name], text, f"{backend} {name} after step {step}")


@pytest.mark.parametrize(("backend", "step", "table"), TABLES)
def test_notebook_code_reproduces_its_printed_tables(notebook_run, backend, step, table):
    # The notebook's own code under today's torch prints what it printed then.
    for name, text in table.items():
        assert_matches_print(notebook_run["params"][step][name], text, f"notebook {name}")


@pytest.mark.parametrize(
    ("params_step", "table", "why"),
    [
        (0, AFTER_STEP_1, "the initial parameters are not the parameters after step 1"),
        (3, AFTER_STEP_2, "step 3 moved fc1.weight rows 0 and 2 and every bias"),
        (1, INITIAL, "step 1 moved fc1.weight row 1"),
    ],
)
def test_print_check_rejects_the_wrong_table(comparison, params_step, table, why):
    params = (
        comparison.problem.params
        if params_step == 0
        else comparison.trajectories["torch"].params[params_step - 1]
    )
    with pytest.raises(AssertionError):
        for name, text in table.items():
            assert_matches_print(params[name], text, name)


@pytest.mark.parametrize("tail", ["-", "0."])
def test_print_check_rejects_one_entry_off_by_a_printed_digit(tail):
    # 0.5239 is printed; 0.5240 must fail, and so must a cut-off tail of the wrong sign.
    assert_matches_print(np.array([0.5239, -0.02]), "tensor([ 0.5239, -", "ok")
    with pytest.raises(AssertionError):
        assert_matches_print(np.array([0.5240, -0.02]), "tensor([ 0.5239, -", "off")
    with pytest.raises(AssertionError):
        assert_matches_print(
            np.array([0.5239, 0.02 if tail == "-" else -0.02]), f"tensor([ 0.5239, {tail}", "tail"
        )


def test_equiv_torch_backend_is_the_notebook_bit_for_bit(comparison, notebook_run, bitwise_diff):
    torch_run = comparison.trajectories["torch"]
    assert bitwise_diff(comparison.problem.params, notebook_run["params"][0]) == []
    for step in range(3):
        assert bitwise_diff(torch_run.grads[step], notebook_run["grads"][step]) == []
        assert bitwise_diff(torch_run.params[step], notebook_run["params"][step + 1]) == []
        assert (
            bitwise_diff({"loss": torch_run.losses[step]}, {"loss": notebook_run["losses"][step]})
            == []
        )


@pytest.mark.parametrize("step", [1, 2, 3])
def test_hand_derived_on_torch_equals_autograd_exactly(comparison, step, bitwise_diff):
    # The notebook printed a difference of 0.0: gradients, updated parameters and
    # the loss of the hand-derived pass are torch's bit for bit.
    torch_run, manual_run = comparison.trajectories["torch"], comparison.trajectories["manual"]
    for stage in ("loss", "grads", "params"):
        a, b = torch_run.stage(stage, step), manual_run.stage(stage, step)
        assert all(torch.equal(torch.from_numpy(a[k]), torch.from_numpy(b[k])) for k in a)
        assert bitwise_diff(a, b) == [], (stage, step)


def test_hand_derived_on_torch_directly_equals_notebook_autograd(notebook_run):
    # The same claim without the harness: manual.loss_and_grads and sgd_update on
    # the notebook's tensors, step after step from the notebook's initial parameters.
    spec = equiv.MLPSpec((4, 3, 2))
    problem = equiv.make_problem(spec, batch_size=2, seed=0, steps=3)
    params = {k: v.clone() for k, v in notebook_run["params"][0].items()}
    for step, (x, y) in enumerate(problem.batches):
        loss, grads = manual.loss_and_grads(params, x, y, spec)
        params = manual.sgd_update(params, grads, 0.1)
        assert torch.equal(loss, notebook_run["losses"][step])
        assert all(torch.equal(grads[k], notebook_run["grads"][step][k]) for k in grads)
        assert all(torch.equal(params[k], notebook_run["params"][step + 1][k]) for k in params)


@pytest.mark.parametrize("backend", ["torch", "manual", "jax", "reference"])
def test_loss_per_backend(comparison, backend):
    # Every backend's loss at every step is compared with every other backend's and
    # with the float64 reference (3 comparisons per backend and step), and all pass.
    trajectory = comparison.trajectories[backend]
    assert len(trajectory.losses) == 3
    expected_dtype = np.float64 if backend == "reference" else np.float32
    assert all(loss.dtype == expected_dtype and loss.shape == () for loss in trajectory.losses)
    for step in (1, 2, 3):
        leaves = [
            leaf
            for leaf in comparison.report.leaves
            if leaf.stage == "loss"
            and leaf.step == step
            and backend in (leaf.actual, leaf.expected)
        ]
        assert len(leaves) == 3 and all(leaf.passed for leaf in leaves), leaves
    losses = [float(v) for v in trajectory.losses]
    assert losses[0] > losses[1] > losses[2]  # the notebook's model learns


def test_notebook_loss_equals_torch_backend_loss(comparison, notebook_run):
    for step in range(3):
        assert float(comparison.trajectories["torch"].losses[step]) == float(
            notebook_run["losses"][step]
        )


def test_whole_comparison_agrees(comparison):
    comparison.assert_agree()
    # 3 steps · (1 loss + 4 grads + 4 params) · 6 pairs (3 between backends, 3 vs reference)
    assert len(comparison.report.leaves) == 3 * 9 * 6
