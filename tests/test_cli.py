"""The command line: exit codes, the printed table, --json, every kind of bad input.

Most tests call :func:`equiv.cli.main` in the test process (the JAX step compiles
once per shape for the whole module); one runs the script end to end as a user
does, and one checks that the installed console command is this same ``main``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from equiv.cli import main

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "compare_frameworks.py"
LEAVES = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
BACKENDS = ("torch", "manual", "jax", "reference")
PAIRS = (
    "manual vs torch",
    "jax vs torch",
    "jax vs manual",
    "torch vs reference",
    "manual vs reference",
    "jax vs reference",
)

# The notebook's last printed table (../shared/seed/notebook.txt): the parameters
# after three SGD steps from torch.manual_seed(0), printed to 4 decimals.
NOTEBOOK_AFTER_STEP_3 = {
    "fc1.weight": [
        [0.0171, 0.2728, -0.3823, -0.3625],
        [-0.1416, 0.1264, -0.0283, 0.4303],
        [-0.0572, 0.1295, -0.1692, -0.1017],
    ],
    "fc1.bias": [-0.5022, -0.3446, -0.1910],
    "fc2.weight": [[0.0217, 0.2695, 0.3465], [-0.3883, -0.2426, 0.2103]],
    "fc2.bias": [0.6073, 0.0631],
}

# (arguments, a fragment of the one line on stderr). Every kind of bad input.
BAD_INPUTS = [
    (["--sizes", "4,0,2"], "every width must be at least 1"),
    (["--sizes", "4,-3,2"], "every width must be at least 1"),
    (["--sizes", "4"], "sizes needs at least an input and an output width"),
    (["--sizes", "4,x,2"], "argument --sizes: expected comma-separated integer widths"),
    (["--sizes", ""], "argument --sizes: expected comma-separated integer widths"),
    (["--sizes"], "argument --sizes: expected one argument"),
    (["--dtype", "float16"], "unknown dtype 'float16'; expected one of float32, float64"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--device", "cuda:99"], "device 'cuda:99' is not available"),
    (["--lr", "abc"], "argument --lr: expected a finite number such as 0.1, got 'abc'"),
    (["--lr", "nan"], "argument --lr: expected a finite number such as 0.1, got 'nan'"),
    (["--lr", "0"], "learning_rate must be a positive number, got 0.0"),
    (["--lr", "-1"], "learning_rate must be >= 0, got -1.0"),
    (["--batch", "0"], "batch_size must be an int of at least 1, got 0"),
    (["--batch", "2.5"], "argument --batch: invalid int value: '2.5'"),
    (["--steps", "0"], "steps must be an int of at least 1, got 0"),
    (["--steps", "x"], "argument --steps: invalid int value: 'x'"),
    (["--seed", "-1"], "argument --seed: expected an integer from 0 to 2**64-1, got '-1'"),
    (["--seed", str(2**64)], "argument --seed: expected an integer from 0 to 2**64-1"),
    (["--rtol", "1e-5"], "give --rtol and --atol both, or neither"),
    (["--atol", "1e-8"], "give --rtol and --atol both, or neither"),
    (["--rtol", "-1", "--atol", "0"], "rtol and atol must be non-negative"),
    (["--rtol", "inf", "--atol", "0"], "argument --rtol: expected a finite number"),
    (["--precision", "fast"], "unknown precision 'fast'"),
    (  # a model option the model does not use is refused, not ignored (a user trial)
        ["--label-smoothing", "0.3"],
        "--label-smoothing applies to the cross_entropy or cross_entropy_probs loss only, "
        "and --loss is mse",
    ),
    (["--loss", "mse", "--huber-delta", "3"], "--huber-delta applies to the huber loss only"),
    (["--smooth-l1-beta", "2"], "--smooth-l1-beta applies to the smooth_l1 loss only"),
    (["--negative-slope", "0.2"], "--negative-slope applies to the leaky_relu activation only"),
    (["--activation", "tanh", "--elu-alpha", "2"], "and --activation is tanh"),
    (["--backends", "torch,tensorflow"], "backends must be distinct names from torch, manual, jax"),
    (["--backends", "torch,torch"], "backends must be distinct names from torch, manual, jax"),
    (["--backends", ""], "backends must be distinct names from torch, manual, jax"),
    (["--json", "{tmp}/missing/report.json"], "the folder '{tmp}/missing' does not exist"),
    (["--json", "{tmp}"], "is a folder; give a file path such as report.json"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--entry", "model"], "--entry describes a --params file; give --params too"),
    (["--file-layout", "flax"], "--file-layout describes a --params file; give --params too"),
    (["--params", "{tmp}/none.pt"], "cannot read --params '{tmp}/none.pt': No such file"),
]


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def _plain_terminal(monkeypatch):
    # The report is laid out as when piped: 80 columns, no colour.
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)


def _table_rows(out: str) -> list[list[str]]:
    return [
        line.split()
        for line in out.splitlines()
        if len(line.split()) == 9 and line.split()[-1] in ("ok", "FAIL")
    ]


def test_default_run_agrees_and_shows_every_leaf_and_pair(capsys):
    code, out, err = _run([], capsys)
    assert (code, err) == (0, "")
    rows = _table_rows(out)
    assert len(rows) == 9 * len(PAIRS)  # loss, 4 gradients, 4 parameters; 6 pairs each
    assert {row[0] for row in rows} == {"loss", *LEAVES}
    assert {" ".join(row[1:4]) for row in rows} == set(PAIRS)
    assert all(row[-1] == "ok" for row in rows)
    lines = out.splitlines()
    assert lines[-1] == "[equiv] PASS: all 54 comparisons agree"
    assert "run       batch 2, seed 0, 1 SGD step at lr 0.1" in lines
    assert "settings  dtype float32, device cpu, precision exact" in lines
    assert not re.search(r"\x1b\[", out)


def test_json_report(tmp_path, capsys):
    path = tmp_path / "report.json"
    code, _, err = _run(["--steps", "2", "--json", str(path)], capsys)
    assert (code, err) == (0, "")
    text = path.read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert {"agree", "loss", "params", "diffs", "config", "settings"} <= set(data)
    assert data["agree"] is True
    assert set(data["loss"]) == set(BACKENDS)
    assert all(
        len(values) == 2 and all(isinstance(v, float) for v in values)
        for values in data["loss"].values()
    )
    for backend in BACKENDS:
        params = data["params"][backend]
        assert list(params) == list(LEAVES)
        assert np.array(params["fc1.weight"]).shape == (3, 4)
        assert np.array(params["fc2.bias"]).shape == (2,)
    assert len(data["diffs"]) == 2 * 9 * len(PAIRS)
    diff = data["diffs"][0]
    assert {
        "stage",
        "step",
        "name",
        "actual",
        "expected",
        "max_abs",
        "max_rel",
        "ratio",
        "passed",
    } <= set(diff)
    assert data["config"]["sizes"] == [4, 3, 2] and data["config"]["seed"] == 0
    assert data["settings"]["device"] == "cpu" and data["settings"]["precision"] == "exact"
    assert os.listdir(tmp_path) == ["report.json"]  # the temporary file was renamed, not left
    assert text.endswith("}\n")


def test_json_replaces_an_existing_file(tmp_path, capsys):
    path = tmp_path / "report.json"
    path.write_text("old")
    assert _run(["--no-bias", "--json", str(path)], capsys)[0] == 0
    data = json.loads(path.read_text())
    assert data["config"]["bias"] is False
    assert sorted(os.listdir(tmp_path)) == ["report.json"]


def test_json_write_failure_is_exit_2_and_leaves_no_temporary_file(tmp_path, capsys, monkeypatch):
    def refuse(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)  # the folder passed the check, the rename fails
    path = tmp_path / "report.json"
    code, out, err = _run(["--json", str(path)], capsys)
    assert code == 2 and "PASS" in out  # the report was printed; only the file is missing
    assert err == f"[equiv] cannot write --json {str(path)!r}: Permission denied\n"
    assert os.listdir(tmp_path) == []


def test_three_steps_reproduce_the_notebook(tmp_path, capsys):
    path = tmp_path / "report.json"
    assert _run(["--steps", "3", "--json", str(path)], capsys)[0] == 0
    params = json.loads(path.read_text())["params"]
    for backend in BACKENDS:
        for name, printed in NOTEBOOK_AFTER_STEP_3.items():
            # "equal to the printed 4 decimals": within half a unit of the last digit
            np.testing.assert_allclose(params[backend][name], printed, rtol=0, atol=5e-5 + 1e-12)


def test_steps_show_a_summary_per_step(capsys):
    code, out, _ = _run(["--steps", "3"], capsys)
    assert code == 0
    summary = out.split("worst ratio to the bound per step, stage and pair", 1)[1]
    steps = [line.split()[:2] for line in summary.splitlines() if re.match(r"\s+\d+\s+\w+\s", line)]
    assert steps == [[str(s), st] for s in (1, 2, 3) for st in ("loss", "grads", "params")]
    assert "params after step 3" in [line.strip() for line in out.splitlines()]


@pytest.mark.parametrize(
    ("argv", "code"),
    [(["--rtol", "1e-3", "--atol", "1e-6"], 0), (["--rtol", "0", "--atol", "0"], 1)],
)
def test_user_tolerance_pass_and_fail(argv, code, capsys, tmp_path):
    """With zero tolerance, float32 results honestly differ from the float64 reference
    (rounding): a real disagreement, exit 1. A loose fixed tolerance passes, exit 0."""
    path = tmp_path / "r.json"
    got, out, err = _run([*argv, "--json", str(path)], capsys)
    assert (got, err) == (code, "")
    data = json.loads(path.read_text())
    assert data["agree"] is (code == 0)
    failing = {
        (d["stage"], d["name"], d["actual"], d["expected"])
        for d in data["diffs"]
        if not d["passed"]
    }
    if code == 0:
        assert not failing and "FAIL" not in out
        return
    # Every float32 backend differs from the float64 reference somewhere, by rounding.
    assert {(a, b) for _, _, a, b in failing} >= {
        (n, "reference") for n in ("torch", "manual", "jax")
    }
    assert ("params", "fc1.weight", "torch", "reference") in failing
    # The hand-derived pass on torch tensors is bitwise torch autograd: zero tolerance holds.
    assert not {f for f in failing if f[2:] == ("manual", "torch")}
    # Between torch and JAX, at zero tolerance exactly the leaves that differ at all fail.
    for d in data["diffs"]:
        if (d["actual"], d["expected"]) == ("jax", "torch"):
            assert d["passed"] is (d["max_abs"] == 0.0)
    lines = out.splitlines()
    assert lines[-1] == f"[equiv] FAIL: {len(failing)} of 54 comparisons disagree"
    assert any(
        line.startswith(f"[equiv] {len(failing)} of 54 comparisons disagree (") for line in lines
    )
    assert "  Mismatched elements: 1 / 1 (100.0%)" in lines  # the scalar loss vs reference
    shown = {(row[0], *row[1:4:2], row[-1]) for row in _table_rows(out)}
    assert ("loss", "torch", "reference", "FAIL") in shown
    assert ("loss", "manual", "torch", "ok") in shown


def test_no_bias_and_chosen_backends(capsys):
    code, out, _ = _run(["--no-bias", "--backends", "torch,jax"], capsys)
    assert code == 0
    rows = _table_rows(out)
    assert {row[0] for row in rows} == {"loss", "fc1.weight", "fc2.weight"}
    assert {" ".join(row[1:4]) for row in rows} == {
        "jax vs torch",
        "torch vs reference",
        "jax vs reference",
    }
    assert "manual" not in out


def test_float64_and_native_precision(capsys):
    code, out, _ = _run(["--dtype", "float64", "--precision", "native", "--sizes", "3,5,1"], capsys)
    assert code == 0
    assert "settings  dtype float64, device cpu, precision native" in out.splitlines()
    assert "jax_enable_x64=True" in out


@pytest.mark.parametrize(
    ("argv", "fragment"), BAD_INPUTS, ids=[" ".join(a) or "empty" for a, _ in BAD_INPUTS]
)
def test_bad_input_is_one_line_and_exit_2(argv, fragment, capsys, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, out, err = _run(argv, capsys)
    assert code == 2
    assert out == ""  # nothing was computed or printed
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("[equiv] ") and "  " not in err, err
    assert fragment.replace("{tmp}", str(tmp_path)) in err
    assert "Traceback" not in err


def test_help_and_version(capsys):
    code, out, _ = _run(["--help"], capsys)
    assert code == 0 and out.startswith("usage: equiv-compare")
    for option in (
        "--sizes",
        "--batch",
        "--seed",
        "--lr",
        "--steps",
        "--dtype",
        "--device",
        "--json",
        "--no-bias",
        "--precision",
        "--rtol",
        "--atol",
        "--backends",
    ):
        assert option in out
    code, out, _ = _run(["--version"], capsys)
    assert code == 0 and re.fullmatch(r"equiv-compare \d+\.\d+\.\d+\S*\n", out)


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR")}
    env["PYTHONWARNINGS"] = "error"
    return env


def test_script_end_to_end(tmp_path):
    path = tmp_path / "out.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", str(path)],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=tmp_path,
        timeout=120,
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.splitlines()[-1] == "[equiv] PASS: all 54 comparisons agree"
    assert not re.search(r"\x1b\[", done.stdout)  # piped: no colour codes
    assert all(len(line.rstrip()) <= 80 for line in done.stdout.splitlines() if "─" in line)
    assert json.loads(path.read_text())["agree"] is True


def test_console_command_is_installed_and_runs_main():
    # In process: the installed entry point is this main (a second subprocess would
    # only time the imports again).
    (entry,) = importlib.metadata.entry_points(group="console_scripts", name="equiv-compare")
    assert entry.value == "equiv.cli:main"
    assert entry.load() is main
    assert shutil.which("equiv-compare", path=str(Path(sys.executable).parent)), "not installed"


def test_plot_path_errors_name_the_plot_option(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["--plot", str(tmp_path / "x.txt")]) == 2  # refused before the comparison
    assert "matplotlib writes no 'txt' images" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert main(["--plot", str(tmp_path / "missing" / "x.png")]) == 2
    assert capsys.readouterr().err.startswith("[equiv] --plot ")
    assert main(["--plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("[equiv] --plot ") and "such as divergence.png" in err


def test_a_link_into_a_missing_folder_or_a_read_only_file_fails_before_running(
    tmp_path, capsys, monkeypatch
):
    import os

    import equiv.cli

    monkeypatch.setattr(equiv.cli, "compare_backends", lambda **kw: pytest.fail("it ran"))
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "missing" / "report.json")
    assert main(["--json", str(link)]) == 2
    assert "the folder" in capsys.readouterr().err
    locked = tmp_path / "locked.json"
    locked.write_text("{}")
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, m: False if str(p) == str(locked) else real_access(p, m)
    )
    assert main(["--json", str(locked)]) == 2
    assert capsys.readouterr().err.strip().endswith("is read-only")
    # Without write permission bits, refused before running for root too (whom
    # os.access lets write anything: found in review, the whole run went first).
    monkeypatch.setattr(os, "access", real_access)
    bare = tmp_path / "bare.json"
    bare.write_text("{}")
    bare.chmod(0o444)
    assert main(["--json", str(bare)]) == 2
    assert capsys.readouterr().err.strip().endswith("is read-only")


def test_a_closed_output_pipe_keeps_the_verdict_as_exit_status(tmp_path, monkeypatch):
    # Found in a user trial: `equiv-compare | head -1` exited 1 ("some leaf disagrees")
    # although everything agreed. The reader is gone: exit 0, the --json still written.
    read, write = os.pipe()
    os.close(read)
    closed = open(write, "w", encoding="utf-8")  # noqa: SIM115 (main's sys.stdout)
    monkeypatch.setattr(sys, "stdout", closed)
    path = tmp_path / "out.json"
    try:
        assert main(["--json", str(path)]) == 0
    finally:
        closed.close()
    assert json.loads(path.read_text())["agree"] is True
    # The twin: a disagreement still exits 1 with the pipe closed.
    read, write = os.pipe()
    os.close(read)
    closed = open(write, "w", encoding="utf-8")  # noqa: SIM115
    monkeypatch.setattr(sys, "stdout", closed)
    try:
        assert (
            main(["--rtol", "0", "--atol", "0", "--dtype", "float32", "--backends", "torch,jax"])
            == 1
        )
    finally:
        closed.close()


def test_model_options_are_taken_where_the_model_uses_them(capsys):
    # The twin of the refusals above: each option with the loss or activation it
    # belongs to (one layer of several is enough) runs and is in the report's header.
    argv = ["--sizes", "4,3,3,2", "--activation", "relu,leaky_relu", "--negative-slope", "0.2"]
    code, out, _ = _run(argv + ["--loss", "huber", "--huber-delta", "3"], capsys)
    assert code == 0 and "negative_slope=0.2" in out and "huber_delta=3" in out, out
    code, out, _ = _run(["--loss", "cross_entropy", "--label-smoothing", "0.1"], capsys)
    assert code == 0 and "label_smoothing=0.1" in out, out


def test_params_file_is_where_the_run_starts(tmp_path, capsys):
    # A user's own weights: the run starts from the file's parameters (its sizes,
    # bias and dtype), in any layout, with the batches still drawn from --seed.
    import jax
    import torch

    from equiv import MLPSpec, TorchMLP, compare_backends, save_jax, torch_to_jax
    from equiv.problem import make_problem

    spec = MLPSpec((5, 7, 3), activation="tanh", dtype="float64")
    torch.manual_seed(11)
    state = TorchMLP(spec).state_dict()
    with jax.enable_x64(True):
        save_jax(torch_to_jax(state, layout="nnx"), tmp_path / "w.safetensors", layout="nnx")
    torch.save({"model": state, "epoch": 4}, tmp_path / "train.pt")
    expected = compare_backends(problem=make_problem(spec, seed=2, params=state))
    for argv in (
        ["--params", str(tmp_path / "w.safetensors")],
        ["--params", str(tmp_path / "train.pt"), "--entry", "model", "--sizes", "5,7,3"],
    ):
        report = tmp_path / "report.json"
        code, out, err = _run(
            [*argv, "--activation", "tanh", "--seed", "2", "--json", str(report)], capsys
        )
        assert (code, err) == (0, ""), err
        assert "sizes 5-7-3" in out and "float64" in out
        assert f"initial params from {argv[1]}, batches from seed 2" in " ".join(out.split())
        data = json.loads(report.read_text())
        assert data["config"]["params"] == argv[1]
        assert data["loss"]["torch"] == [float(expected.trajectories["torch"].losses[0])]
    # The twin: drawn from the seed, the run starts elsewhere.
    code, _, _ = _run(
        [
            "--sizes",
            "5,7,3",
            "--dtype",
            "float64",
            "--activation",
            "tanh",
            "--seed",
            "2",
            "--json",
            str(report),
        ],
        capsys,
    )
    assert code == 0
    assert json.loads(report.read_text())["loss"]["torch"] != data["loss"]["torch"]


def test_params_files_named_otherwise_get_the_command_lines_advice(tmp_path, capsys):
    # Found in a user trial: the CLI repeated the library's Python advice ("pass the
    # module itself", "file_layout='flax'"), and a bfloat16 file's said "Pass spec=" first.
    import torch

    from equiv import MLPSpec, TorchMLP

    torch.manual_seed(0)
    state = TorchMLP(MLPSpec((4, 3, 2))).state_dict()
    # A module's own names, which only the module can put in order.
    own = {"inp.weight": "fc1.weight", "inp.bias": "fc1.bias"}
    own |= {"head.weight": "fc2.weight", "head.bias": "fc2.bias"}
    torch.save({name: state[ours] for name, ours in own.items()}, tmp_path / "own.pt")
    flax_names = {}
    for i in range(2):
        flax_names[f"Dense_{i}.kernel"] = state[f"fc{i + 1}.weight"].T.contiguous()
        flax_names[f"Dense_{i}.bias"] = state[f"fc{i + 1}.bias"]
    torch.save(flax_names, tmp_path / "flax.pt")
    torch.save({k: v.bfloat16() for k, v in state.items()}, tmp_path / "bf16.pt")
    for name, fragment in (
        ("own.pt", "('inp.weight', 'inp.bias', 'head.weight', 'head.bias') are a module's own"),
        ("flax.pt", "its names are the flax layout's: add --file-layout flax"),
        (
            "bf16.pt",
            "holds bfloat16 parameters, and a comparison runs in float32 or float64: add "
            "--dtype float32",
        ),
    ):
        code, out, err = _run(["--params", str(tmp_path / name)], capsys)
        assert (code, out) == (2, "") and fragment in err, err
        assert "spec=" not in err and "pass the module itself" not in err, err
    assert (
        "equiv.load_torch(path, out=module), then equiv.save_torch(module"
        in _run(["--params", str(tmp_path / "own.pt")], capsys)[2]
    )
    # The twin: the flax-named file with the option it was told to add.
    assert _run(["--params", str(tmp_path / "flax.pt"), "--file-layout", "flax"], capsys)[0] == 0


def test_a_sequentials_state_dict_file_is_read_by_its_indices(tmp_path, capsys):
    # Found in a user trial: torch.save(seq.state_dict()) ('0.weight', '2.weight') was
    # refused without the module, though its indices give the order its layers run in.
    import torch

    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    torch.save(seq.state_dict(), tmp_path / "seq.pt")
    report = tmp_path / "report.json"
    code, out, err = _run(["--params", str(tmp_path / "seq.pt"), "--json", str(report)], capsys)
    assert code == 0, err
    # Read as layers 1 and 2: a (3, 5) and a (2, 3) weight, in that order.
    assert json.loads(report.read_text())["config"]["sizes"] == [5, 3, 2]
    # Its twin: the same layers in the other order do not chain (3 inputs after 2 outputs).
    torch.save({"0.weight": seq[2].weight, "2.weight": seq[0].weight}, tmp_path / "bad.pt")
    code, out, err = _run(["--params", str(tmp_path / "bad.pt")], capsys)
    assert (code, out) == (2, "") and "fc2.weight" in err, err


def test_params_file_options_that_contradict_it_are_refused(tmp_path, capsys):
    import torch

    from equiv import MLPSpec, TorchMLP, save_torch

    save_torch(TorchMLP(MLPSpec((4, 3, 2))), tmp_path / "m.safetensors")
    torch.save({"model": TorchMLP(MLPSpec((4, 3, 2))).state_dict()}, tmp_path / "t.pt")
    path = str(tmp_path / "m.safetensors")
    for argv, fragment in (
        (
            ["--sizes", "4,3,3"],
            f"--sizes says sizes 4,3,3, but --params '{path}' holds sizes 4,3,2",
        ),
        (["--dtype", "float64"], f"--dtype says float64, but --params '{path}' holds float32"),
        (["--no-bias"], f"--no-bias says no bias, but --params '{path}' holds bias: leave"),
        (["--entry", "model"], "is a safetensors file, which holds one flat mapping"),
        # Found in a user trial: "drop file_layout", the library's argument's name.
        (
            ["--file-layout", "flax"],
            "records layout 'torch', but --file-layout flax was given; leave out "
            "--file-layout to use the recorded one",
        ),
    ):
        code, out, err = _run(["--params", path, *argv], capsys)
        assert (code, out) == (2, "") and fragment in err, err
    code, out, err = _run(["--params", str(tmp_path / "t.pt")], capsys)
    assert (code, out) == (2, "") and "; add --entry model, which holds one" in err, err
    assert "entry=" not in err  # the command line's option, not the library's argument
    torch.save({"my model": TorchMLP(MLPSpec((4, 3, 2))).state_dict()}, tmp_path / "s.pt")
    code, out, err = _run(["--params", str(tmp_path / "s.pt")], capsys)
    assert "add --entry 'my model', which holds one" in err, err  # quoted for the shell
    assert _run(["--params", path], capsys)[0] == 0  # the twin: nothing contradicts it


def test_a_multi_line_message_is_one_line_without_its_indentation(tmp_path, capsys):
    # Found in a user trial: "float32):   missing: ..." (the lines' indentation kept).
    import torch

    state = {"fc1.weight": torch.ones(3, 4), "fc2.weight": torch.ones(2, 3)}
    torch.save({**state, "fc2.bias": torch.ones(2)}, tmp_path / "m.pt")
    code, out, err = _run(["--params", str(tmp_path / "m.pt")], capsys)
    assert (code, out) == (2, "") and err.count("\n") == 1, err
    assert "(bias=True, float32): missing: 'fc1.bias' (expected shape (3,)) The" in err, err


def test_json_dash_writes_to_standard_output(tmp_path, capsys, monkeypatch):
    # Found when a test wrote --json - as a file named "-": the usual spelling of
    # standard output now is one, and the text report goes to standard error.
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(["--json", "-"], capsys)
    assert code == 0 and os.listdir(tmp_path) == []
    data = json.loads(out)
    assert data["agree"] is True and data["config"]["sizes"] == [4, 3, 2]
    assert "[equiv] PASS: all 54 comparisons agree" in err


def test_bias_on_some_layers_only(tmp_path, capsys):
    # Found in a user trial: --no-bias was all or nothing, so a model with a bias on
    # some layers only was read from an equiv safetensors file only.
    import torch

    from equiv import MLPSpec, TorchMLP, save_torch

    mixed = TorchMLP(MLPSpec((4, 8, 8, 2), bias=(True, False, True)))
    torch.save(mixed.state_dict(), tmp_path / "mixed.pt")
    save_torch(mixed, tmp_path / "mixed.safetensors")
    torch.save(TorchMLP(MLPSpec((4, 8, 8, 2))).state_dict(), tmp_path / "full.pt")
    code, out, _ = _run(["--sizes", "4,8,8,2", "--bias", "1,0,1", "--json", "-"], capsys)
    assert code == 0 and json.loads(out)["config"]["bias"] == [True, False, True], out
    # A .pt file of such a model is read with --bias, and told it without.
    code, out, err = _run(["--params", str(tmp_path / "mixed.pt"), "--bias", "1,0,1"], capsys)
    assert code == 0 and "PASS" in out, err
    code, out, err = _run(["--params", str(tmp_path / "mixed.pt")], capsys)
    assert (code, out) == (2, "") and err.rstrip().endswith("say so: add --bias 1,0,1"), err
    assert "spec=" not in err  # the command line's option, not the library's argument
    code, out, err = _run(["--params", str(tmp_path / "mixed.pt"), "--bias", "1,1,1"], capsys)
    assert (code, out) == (2, "") and err.rstrip().endswith("--bias 1,0,1 (not 1,1,1)"), err
    # A file that records its biases, or holds every one, contradicts another pattern.
    for name, pattern, holds in (
        ("mixed.safetensors", "1,1,1", "bias 1,0,1"),
        ("full.pt", "1,0,1", "bias"),
    ):
        path = str(tmp_path / name)
        code, out, err = _run(["--params", path, "--bias", pattern], capsys)
        assert (code, out) == (2, ""), err
        assert f"--bias says bias {pattern}, but --params '{path}' holds {holds}: leave" in err
    # A pattern the file does not hold, with the read without it failing too, is told
    # the file's (found in review: the error named no pattern).
    code, out, err = _run(["--params", str(tmp_path / "mixed.pt"), "--bias", "1,1,0"], capsys)
    assert (code, out) == (2, "") and err.rstrip().endswith("--bias 1,0,1 (not 1,1,0)"), err
    # Another layout's option beside the right pattern: leave the option out.
    code, out, err = _run(
        ["--params", str(tmp_path / "mixed.pt"), "--bias", "1,0,1", "--file-layout", "flax"],
        capsys,
    )
    assert "it reads without --file-layout flax: leave that out" in err, err
    # Uniform patterns are every layer's, as --no-bias and the default say it (found in
    # review: --bias 0,0 was recorded as [false, false]); one value is every layer's.
    for pattern, bias in (("0,0", False), ("1,1", True), ("0", False)):
        code, out, _ = _run(["--bias", pattern, "--json", "-"], capsys)
        assert code == 0 and json.loads(out)["config"]["bias"] is bias, (pattern, out)
    # The twins: the pattern the file holds passes, uniform patterns as every layer's.
    recorded = str(tmp_path / "mixed.safetensors")
    assert _run(["--params", recorded, "--bias", "1,0,1"], capsys)[0] == 0
    assert _run(["--params", str(tmp_path / "full.pt"), "--bias", "1,1,1"], capsys)[0] == 0


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--bias", "1,0,1"], "--bias gives 3 entries for 2 Linear layers (sizes 4,3,2)"),
        (["--sizes", "4,8,8,2", "--bias", "1,0"], "--bias gives 2 entries for 3 Linear layers"),
        (["--bias", "1,x"], "'x' is not 1 or 0: give one 1 (a bias) or 0 (none) per Linear"),
        (["--bias", "1,0", "--no-bias"], "--no-bias: not allowed with argument --bias"),
    ],
)
def test_bias_patterns_that_cannot_be_read_are_refused(argv, fragment, capsys):
    code, out, err = _run(argv, capsys)
    assert (code, out) == (2, "") and fragment in err, err


def test_small_command_line_slips_are_told(tmp_path, capsys):
    # Found in a user trial.
    import torch

    code, out, err = _run(["--activation", "tanh,"], capsys)
    assert (code, out) == (2, "") and "'tanh,' has an empty name" in err, err
    code, out, err = _run(["--loss", "cross_entropy", "--sizes", "4,3,1"], capsys)
    assert (code, out) == (2, "") and "cross_entropy over 1 class is 0 for every input" in err
    assert "for one output use --loss bce_with_logits" in err, err  # the option, not Python
    # An nn.Sequential's file read with another layout's option: leave the option out
    # (it was told to convert the file in Python).
    seq = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    torch.save(seq.state_dict(), tmp_path / "seq.pt")
    path = str(tmp_path / "seq.pt")
    code, out, err = _run(["--params", path, "--file-layout", "flax"], capsys)
    assert (code, out) == (2, ""), err
    assert "it reads without --file-layout flax: leave that out" in err, err
    # The twins: the file without the option, the names with none empty, 2 classes.
    assert _run(["--params", path], capsys)[0] == 0
    assert _run(["--activation", "tanh,relu", "--sizes", "4,3,3,2"], capsys)[0] == 0
    code, out, _ = _run(["--loss", "cross_entropy", "--sizes", "4,3,2", "--json", "-"], capsys)
    assert code == 0 and json.loads(out)["config"]["loss"] == "cross_entropy"


def test_a_half_precision_params_file_is_compared_as_the_float32_copy_asked_for(tmp_path, capsys):
    # A bfloat16 file, compared with --dtype float32, starts from its values exactly
    # (every bfloat16 is a float32): the loss is the one of the upcast state's problem.
    import torch

    from equiv import MLPSpec, TorchMLP, compare_backends
    from equiv.problem import make_problem

    torch.manual_seed(3)
    half = {k: v.bfloat16() for k, v in TorchMLP(MLPSpec((4, 3, 2))).state_dict().items()}
    torch.save(half, tmp_path / "bf16.pt")
    report = tmp_path / "report.json"
    argv = ["--params", str(tmp_path / "bf16.pt"), "--seed", "2", "--json", str(report)]
    code, out, err = _run([*argv, "--dtype", "float32"], capsys)
    assert (code, err) == (0, ""), err
    upcast = {k: v.float() for k, v in half.items()}
    expected = compare_backends(problem=make_problem(MLPSpec((4, 3, 2)), seed=2, params=upcast))
    data = json.loads(report.read_text())
    assert data["loss"]["torch"] == [float(expected.trajectories["torch"].losses[0])]
    # The twin: without --dtype the command says what to add; a half --dtype is refused.
    code, out, err = _run(argv, capsys)
    assert code == 2 and "add --dtype float32" in err, err
    code, out, err = _run([*argv, "--dtype", "bfloat16"], capsys)
    assert code == 2 and "unknown dtype 'bfloat16'; expected one of float32, float64" in err


def test_a_half_precision_dtype_is_told_how_half_precision_files_are_compared(capsys):
    code, out, err = _run(["--dtype", "bfloat16"], capsys)
    assert code == 2 and "is compared as --dtype float32, exactly" in err, err
    code, out, err = _run(["--dtype", "float8"], capsys)  # the twin: no such advice
    assert code == 2 and "compared as" not in err and "unknown dtype 'float8'" in err
