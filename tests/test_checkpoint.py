"""Checkpoints: round trips, cross-side loads, refused pickles, bad files, atomic writes."""

from __future__ import annotations

import os
import pickle
import re
import warnings

import jax
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("safetensors")
import safetensors.torch  # noqa: E402

from equiv import checkpoint  # noqa: E402
from equiv.checkpoint import load_jax, load_torch, save_jax, save_torch  # noqa: E402
from equiv.convert import LAYOUTS, Layout, jax_to_torch, torch_to_jax  # noqa: E402
from equiv.spec import MLPSpec  # noqa: E402
from equiv.torch_mlp import TORCH_DTYPES  # noqa: E402

SPEC = MLPSpec((4, 3, 2))
SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def random_state(spec: MLPSpec, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(shape, generator=gen, dtype=TORCH_DTYPES[spec.dtype])
        for name, shape in spec.param_shapes().items()
    }


def assert_states_identical(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        assert torch.equal(actual[name], expected[name]), name


def assert_trees_identical(actual, expected) -> None:
    flat_a, tree_a = jax.tree.flatten(actual)
    flat_e, tree_e = jax.tree.flatten(expected)
    assert tree_a == tree_e
    for a, e in zip(flat_a, flat_e, strict=True):
        assert a.dtype == e.dtype
        np.testing.assert_array_equal(a, e)


# ---------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_torch_round_trip(suffix, dtype, tmp_path, equiv_seed):
    state = random_state(SPEC.replace(dtype=dtype), equiv_seed)
    path = tmp_path / f"mlp{suffix}"
    save_torch(state, path)
    assert_states_identical(load_torch(path), state)
    assert os.listdir(tmp_path) == [path.name]  # no temporary file left behind


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_jax_round_trip(layout, dtype, tmp_path, equiv_seed):
    state = random_state(SPEC.replace(dtype=dtype), equiv_seed)
    path = tmp_path / "mlp.safetensors"
    with jax.enable_x64(dtype == "float64"):
        params = torch_to_jax(state, layout=layout)
        save_jax(params, path, layout=layout)
        assert_trees_identical(load_jax(path, layout=layout), params)


@pytest.mark.parametrize("read_as", ["flax", "equinox", "torch"])
@pytest.mark.parametrize("written_as", ["torch", "flax", "nnx"])
def test_files_cross_between_layouts(written_as, read_as, tmp_path, equiv_seed):
    state = random_state(SPEC, equiv_seed)
    path = tmp_path / "mlp.safetensors"
    save_jax(torch_to_jax(state, layout=written_as), path, layout=written_as)
    assert_trees_identical(load_jax(path, layout=read_as), torch_to_jax(state, layout=read_as))
    assert_states_identical(load_torch(path), state)


def test_torch_pickle_loads_into_jax(tmp_path, equiv_seed):
    state = random_state(SPEC, equiv_seed)
    save_torch(state, tmp_path / "mlp.pt")
    assert_trees_identical(load_jax(tmp_path / "mlp.pt"), torch_to_jax(state))


def _flax_keys(state: dict) -> dict:
    """A state_dict's tensors under the flax layout's file keys, as another tool writes."""
    keys = {}
    for i in (1, 2):
        keys[f"Dense_{i - 1}.kernel"] = state[f"fc{i}.weight"].T.contiguous()
        keys[f"Dense_{i - 1}.bias"] = state[f"fc{i}.bias"]
    return keys


def test_foreign_safetensors_file_uses_file_layout(tmp_path, equiv_seed):
    state = random_state(SPEC, equiv_seed)
    path = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file(_flax_keys(state), path)  # no equiv metadata
    assert_states_identical(load_torch(path, file_layout="flax"), state)
    with pytest.raises(
        ValueError, match="the names of the 'flax' layout: say so, file_layout='flax'"
    ):
        load_torch(path)  # read as the default torch layout: nothing matches


def test_pickle_with_another_layouts_names_is_read_in_file_layout(tmp_path, equiv_seed):
    # A pickle records no layout, so file_layout names it, as for a foreign safetensors file.
    state = random_state(SPEC, equiv_seed)
    path = tmp_path / "flax_names.pt"
    torch.save(_flax_keys(state), path)
    assert_states_identical(load_torch(path, file_layout="flax"), state)
    assert_trees_identical(load_jax(path, file_layout="flax"), torch_to_jax(state))
    with pytest.raises(
        ValueError, match="the names of the 'flax' layout: say so, file_layout='flax'"
    ):
        load_torch(path)  # read as the default torch layout: nothing matches


def test_file_layout_contradicting_the_file_is_refused(tmp_path):
    path = tmp_path / "mlp.safetensors"
    save_torch(random_state(SPEC, 0), path)
    with pytest.raises(ValueError) as info:
        load_torch(path, file_layout="flax")
    assert str(info.value) == (
        f"[equiv] {path} records layout 'torch', but file_layout='flax' was given; drop "
        "file_layout to use the recorded one"
    )


def test_a_layout_of_ones_own_reads_back_from_what_the_file_records(tmp_path, equiv_seed):
    mine = Layout("mine", "block{i}/w", "block{i}/b", transpose=True)
    state = random_state(SPEC, equiv_seed)
    path = tmp_path / "mine.safetensors"
    save_jax(torch_to_jax(state, layout=mine), path, layout=mine)
    assert_states_identical(load_torch(path), state)  # no file_layout needed
    assert_trees_identical(load_jax(path, layout=mine), torch_to_jax(state, layout=mine))
    assert_states_identical(load_torch(path, file_layout=mine), state)
    other = Layout("mine", "block{i}/w", "block{i}/b", transpose=False)  # same name
    with pytest.raises(ValueError) as info:
        load_torch(path, file_layout=other)
    assert str(info.value).startswith(f"[equiv] {path} records layout Layout(name='mine', ")
    assert "transpose=True), but file_layout=Layout(name='mine', " in str(info.value)


def test_a_file_recording_only_a_layouts_name_reads_with_that_layout_given(tmp_path):
    mine = Layout("mine", "block{i}.w", "block{i}.b", transpose=False)
    path = tmp_path / "named.safetensors"
    state = random_state(SPEC, 0)
    files = {mine.path(n)[0]: t for n, t in state.items()}
    safetensors.torch.save_file(files, path, metadata={checkpoint.LAYOUT_KEY: "mine"})
    assert_states_identical(load_torch(path, file_layout=mine), state)
    with pytest.raises(ValueError, match="records layout 'mine' but not its paths"):
        load_torch(path)


# ---------------------------------------------------------------------------
# Pickles are never unpickled beyond tensors


class _Exploit:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        # Unpickling this would create the marker file: code run by a data file.
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"fc1.weight": torch.zeros(3, 4), "payload": _Exploit(str(marker))}, path)
    with pytest.raises(ValueError) as info:
        load_torch(path)
    # The global is named as pickle wrote it: io.open here, _io.open on the GPU
    # machine's Python 3.12.3 with torch 2.11.
    assert re.fullmatch(
        re.escape(
            f"[equiv] {path} holds more than tensors and was not unpickled (a pickle can run "
            "code; torch.load(weights_only=True) refused it: WeightsUnpickler error: "
            "Unsupported global: GLOBAL "
        )
        + r"_?io\.open was not an allowed global by default\)",
        str(info.value),
    ), str(info.value)
    assert not marker.exists()
    assert "safe_globals" not in str(info.value)  # a function it would call is not offered
    with pytest.raises(ValueError):
        load_jax(path)
    assert not marker.exists()


def test_plain_pickle_file_is_refused(tmp_path):
    path = tmp_path / "plain.pth"
    path.write_bytes(pickle.dumps(_Exploit(str(tmp_path / "pwned")), protocol=2))
    with pytest.raises(ValueError, match=r"^\[equiv\] .*not unpickled"):
        load_torch(path)
    assert not (tmp_path / "pwned").exists()


def test_pickle_of_a_non_state_dict_is_refused(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(ValueError) as info:
        load_torch(path)
    assert str(info.value) == (
        f"[equiv] {path} holds a list, not a state_dict of tensors; save model.state_dict() "
        "(for a training checkpoint, the entry holding it)"
    )


def test_a_pickled_dict_keyed_by_other_than_names_is_refused(tmp_path):
    path = tmp_path / "numbered.pt"
    torch.save({0: torch.zeros(3, 4), "fc1.bias": torch.zeros(3)}, path)
    with pytest.raises(ValueError) as info:
        load_torch(path)
    assert str(info.value) == (
        f"[equiv] {path} holds a state_dict whose keys are not all names: 0 (int); equiv "
        "reads parameters by name ('fc1.weight', ...)"
    )


# ---------------------------------------------------------------------------
# Bad files: one clear error each


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_truncated_file_is_refused(suffix, tmp_path):
    path = tmp_path / f"mlp{suffix}"
    save_torch(random_state(SPEC, 0), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    kind = "safetensors" if suffix == ".safetensors" else "torch"
    with pytest.raises(ValueError) as info:
        load_torch(path)
    assert str(info.value).startswith(f"[equiv] {path} is not a readable {kind} file: ")


def test_a_pt_file_cut_anywhere_is_refused_by_name(tmp_path):
    # Found in a user trial: torch 2.13 raises a bare OSError "[Errno 22] Invalid
    # argument" for most cut points of a zip, which escaped without the file's name.
    path = tmp_path / "mlp.pt"
    save_torch(random_state(MLPSpec((16, 64, 8)), 0), path)
    data = path.read_bytes()
    for at in range(0, len(data), len(data) // 40):
        path.write_bytes(data[:at])
        with pytest.raises(ValueError, match=rf"^\[equiv\] {re.escape(str(path))} is not a"):
            load_torch(path)


WHERE = st.floats(0, 1, exclude_max=True)  # a fraction of the file's length
CORRUPTIONS = st.one_of(
    st.tuples(st.just("truncate"), WHERE, st.just(b"")),
    st.tuples(st.just("replace"), WHERE, st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("insert"), WHERE, st.binary(min_size=1, max_size=16)),
)


def corrupt(data: bytes, how: tuple[str, float, bytes]) -> bytes:
    kind, where, new = how
    at = int(where * len(data))
    if kind == "truncate":
        return data[:at]
    if kind == "replace":
        return data[:at] + new + data[at + len(new) :]
    return data[:at] + new + data[at:]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@settings(max_examples=60, deadline=None, derandomize=True)
@given(how=CORRUPTIONS, header=st.booleans())
def test_a_damaged_file_loads_or_gives_one_clear_error(suffix, how, header, tmp_path_factory):
    # Any damage either loads (it hit the tensors' bytes) or raises the one ValueError;
    # before, a changed byte in a .pt file escaped torch.load as UnicodeDecodeError,
    # KeyError, IndexError or "Unknown endianness type" (found by fuzzing).
    path = tmp_path_factory.mktemp("damaged") / f"mlp{suffix}"
    save_torch(random_state(SPEC, 0), path)
    data = path.read_bytes()
    if header:  # most damage that matters is in the first bytes: names, shapes, dtypes
        kind, where, new = how
        how = (kind, where * min(1.0, 256 / len(data)), new)
    path.write_bytes(corrupt(data, how))
    for load in (lambda: load_torch(path, spec=SPEC), lambda: load_jax(path, layout="flax")):
        try:
            load()
        except ValueError as error:
            assert str(error).startswith(f"[equiv] {path}") or str(error).startswith(
                f"[equiv] checkpoint {path}"
            ), repr(error)


def test_garbage_safetensors_is_refused(tmp_path):
    path = tmp_path / "mlp.safetensors"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match=r"^\[equiv\] .* is not a readable safetensors file"):
        load_torch(path)


def test_bad_entries_are_all_named(tmp_path):
    state = random_state(SPEC, 0)
    state["fc1.bias"] = state["fc1.bias"].double()
    state["fc2.weight"] = torch.zeros(3, 3)
    del state["fc2.bias"]
    state["fc9.weight"] = torch.zeros(1, 1)
    path = tmp_path / "bad.safetensors"
    safetensors.torch.save_file(state, path)
    with pytest.raises(ValueError) as info:
        load_torch(path, spec=SPEC)
    assert str(info.value).splitlines() == [
        f"[equiv] checkpoint {path} does not match the MLP (4, 3, 2) (bias=True, float32):",
        "  wrong dtype: 'fc1.bias' expected float32, got float64",
        "  wrong shape: 'fc2.weight' expected (2, 3), got (3, 3)",
        "  missing: 'fc2.bias' (expected shape (2,))",
        "  unexpected: 'fc9.weight' (shape (1, 1))",
        "The torch layout names parameters fc1.weight, fc1.bias, ...",
        "the parameters have several dtypes (float64: fc1.bias; the others float32); equiv's "
        "MLP has one: cast them to one first (module.to(dtype), tensor.to(dtype), "
        "array.astype(dtype))",
    ]


def test_bad_entries_in_a_flax_file_use_flax_names(tmp_path):
    params = torch_to_jax(random_state(SPEC, 0), layout="flax")
    path = tmp_path / "mlp.safetensors"
    save_jax(params, path, layout="flax")
    with pytest.raises(ValueError) as info:
        load_jax(path, spec=MLPSpec((4, 5, 2)))
    assert str(info.value).splitlines()[1:3] == [
        "  wrong shape: 'Dense_0.kernel' expected (4, 5), got (4, 3)",
        "  wrong shape: 'Dense_0.bias' expected (5,), got (3,)",
    ]


def test_float64_file_outside_x64_is_refused(tmp_path):
    path = tmp_path / "mlp.safetensors"
    save_torch(random_state(SPEC.replace(dtype="float64"), 0), path)
    with jax.enable_x64(False), pytest.raises(ValueError, match="x64 mode is off"):
        load_jax(path)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p: save_torch(random_state(SPEC, 0), p / "m.npz"), "unsupported suffix '.npz'"),
        (lambda p: save_jax({}, p / "m.pt"), "unsupported suffix '.pt'"),
        (lambda p: load_torch(p / "m.h5"), "unsupported suffix '.h5'"),
    ],
)
def test_unsupported_suffix_is_refused(call, message, tmp_path):
    with pytest.raises(ValueError, match=r"^\[equiv\] .*" + message):
        call(tmp_path)


def test_bad_state_is_refused_before_writing(tmp_path):
    state = random_state(SPEC, 0)
    del state["fc1.bias"]
    with pytest.raises(ValueError, match="missing: 'fc1.bias'"):
        save_torch(state, tmp_path / "mlp.safetensors")
    assert os.listdir(tmp_path) == []


def test_wrong_types_are_refused(tmp_path):
    with pytest.raises(TypeError, match=r"^\[equiv\] params must be a dict-like"):
        save_jax([np.zeros(2)], tmp_path / "m.safetensors")
    with pytest.raises(TypeError, match=r"^\[equiv\] path must be a str"):
        load_torch(3)


# ---------------------------------------------------------------------------
# Nothing half-written


def _failing_writer(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"half a file")
    raise OSError("disk full")


@pytest.mark.parametrize("existing", [False, True])
def test_failed_write_leaves_nothing_half_written(existing, tmp_path, monkeypatch):
    path = tmp_path / "mlp.safetensors"
    old = random_state(SPEC, 1)
    if existing:
        save_torch(old, path)
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_writer)
    with pytest.raises(OSError, match="disk full"):
        save_torch(random_state(SPEC, 2), path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ([path.name] if existing else [])
    if existing:
        assert_states_identical(load_torch(path), old)


def test_written_file_has_an_ordinary_mode(tmp_path):
    path = tmp_path / "mlp.safetensors"
    save_torch(random_state(SPEC, 0), path)
    assert os.stat(path).st_mode & 0o777 == 0o644


def test_jax_tree_written_equals_torch_conversion(tmp_path, equiv_seed):
    # save_jax writes the layout's own names; load_torch brings torch's back.
    state = random_state(SPEC, equiv_seed)
    path = tmp_path / "mlp.safetensors"
    save_jax(torch_to_jax(state, layout="flax"), path)
    with open(path, "rb") as f:
        header = f.read(400)
    assert b"Dense_0.kernel" in header and b'"equiv.layout":"flax"' in header
    assert_states_identical(jax_to_torch(load_jax(path)), state)


def test_module_is_accepted(tmp_path):
    from equiv.torch_mlp import TorchMLP

    model = TorchMLP(SPEC)
    checkpoint.save_torch(model, tmp_path / "m.safetensors")
    assert_states_identical(load_torch(tmp_path / "m.safetensors"), dict(model.state_dict()))


def test_writing_through_a_link_keeps_the_link(tmp_path):
    target = tmp_path / "real.safetensors"
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    save_torch(random_state(SPEC, 0), link)
    assert link.is_symlink() and target.is_file()
    assert_states_identical(load_torch(link), random_state(SPEC, 0))


def test_a_read_only_file_is_refused_and_kept(tmp_path, monkeypatch):
    path = tmp_path / "mlp.safetensors"
    save_torch(random_state(SPEC, 0), path)
    os.chmod(path, 0o444)
    # As root every file is writable (access() says so, and an ordinary write would
    # succeed): the refusal is what any other user sees.
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if str(p) == str(path) else real_access(p, mode)
    )
    with pytest.raises(PermissionError, match="the file is read-only"):
        save_torch(random_state(SPEC, 1), path)
    assert_states_identical(load_torch(path), random_state(SPEC, 0))


def test_a_missing_folder_is_named_not_the_temporary_file(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        save_torch(random_state(SPEC, 0), tmp_path / "nodir" / "x.safetensors")
    assert str(info.value).endswith(f"the folder {tmp_path / 'nodir'} does not exist")
    assert ".tmp" not in str(info.value)


def test_tied_tensors_are_written_as_copies(tmp_path):
    state = random_state(MLPSpec((3, 3, 3)), 0)
    state["fc2.weight"] = state["fc1.weight"]  # one tensor under two names
    for suffix in (".safetensors", ".pt"):
        save_torch(state, tmp_path / f"tied{suffix}")
        assert_states_identical(load_torch(tmp_path / f"tied{suffix}"), state)


def test_tied_tensors_in_an_outside_pt_file_load_untied(tmp_path):
    # A file from plain torch.save keeps the tie; load_torch must not hand it on, or an
    # in-place step on one parameter would silently change the other.
    state = random_state(MLPSpec((3, 3, 3)), 0)
    state["fc2.weight"] = state["fc1.weight"]
    torch.save(state, tmp_path / "tied.pt")
    raw = torch.load(tmp_path / "tied.pt", weights_only=True)
    assert raw["fc1.weight"].data_ptr() == raw["fc2.weight"].data_ptr()  # the trap is real
    loaded = load_torch(tmp_path / "tied.pt")
    assert_states_identical(loaded, state)
    loaded["fc1.weight"].add_(1.0)
    torch.testing.assert_close(loaded["fc2.weight"], state["fc2.weight"], rtol=0, atol=0)


def test_loading_copies_once_and_adopts_the_file_only_when_asked(tmp_path, monkeypatch):
    import equiv.convert

    state = random_state(SPEC, 0)
    path = tmp_path / "flax.safetensors"
    save_jax(torch_to_jax(state, layout="flax"), path, layout="flax")
    copied = []
    real_fill = equiv.convert._fill
    monkeypatch.setattr(
        equiv.convert, "_fill", lambda pairs: copied.extend(pairs) or real_fill(pairs)
    )
    adopted = load_jax(path, layout="flax", copy=False)
    assert copied == []  # the file's (in, out) kernels are the tree's
    same = load_jax(path, layout="flax")  # one plain copy of each leaf, no transpose
    assert len(copied) == len(SPEC.param_names())
    assert all(source.is_contiguous() for _, source in copied)
    copied.clear()
    other = load_jax(path, layout="torch", copy=False)  # only the weights need a copy
    assert [target.shape for target, _ in copied] == [(3, 4), (2, 3)]
    assert not any(source.is_contiguous() for _, source in copied)  # transposing
    for tree, layout in ((adopted, "flax"), (same, "flax"), (other, "torch")):
        assert_states_identical(jax_to_torch(tree, layout=layout), state)


def test_a_file_of_other_names_says_what_it_holds_and_what_to_do(tmp_path):
    path = tmp_path / "own.pt"
    layer = torch.nn.Linear(3, 2)
    torch.save({"head.weight": layer.weight, "head.bias": layer.bias}, path)
    with pytest.raises(ValueError) as info:
        load_torch(path)
    text = str(info.value)
    assert text.startswith(f"[equiv] checkpoint {path}: none of its 2 entries is a parameter")
    assert "found 'head.weight', 'head.bias'" in text and "load_torch(path, out=module)" in text


def _save_either(state: dict, path) -> None:
    if path.suffix == ".pt":
        torch.save(state, path)
    else:
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("prefix", ["", "layers.", "model.net."])
def test_a_sequentials_state_dict_file_reads_without_the_module(tmp_path, suffix, prefix):
    # Found in a user trial: torch.save(seq.state_dict()) ('0.weight', '2.weight': the
    # activations between hold no parameters) was refused without the module itself.
    torch.manual_seed(0)
    seq = torch.nn.Sequential(
        torch.nn.Linear(5, 4),
        torch.nn.Tanh(),
        torch.nn.Linear(4, 3),
        torch.nn.Tanh(),
        torch.nn.Linear(3, 2),
    )
    path = tmp_path / f"seq{suffix}"
    _save_either({prefix + k: v for k, v in seq.state_dict().items()}, path)
    expected = {
        f"fc{i}.{kind}": getattr(seq[j], kind)
        for i, j in ((1, 0), (2, 2), (3, 4))
        for kind in ("weight", "bias")
    }
    assert_states_identical(load_torch(path), expected)
    flax = load_jax(path)
    for i, j in ((1, 0), (2, 2), (3, 4)):  # indices 0, 2, 4 are layers 1, 2, 3
        np.testing.assert_array_equal(flax[f"Dense_{i - 1}"]["kernel"], seq[j].weight.detach().T)


@pytest.mark.parametrize(
    ("keys", "found"),
    [
        (("0.weight", "2.weight"), "'0.weight' as fc1.weight, '2.weight' as fc2.weight"),
        (("0.weight", "1.bias"), "found '0.weight', '1.bias'"),  # a bias without a weight
        (("a.0.weight", "b.2.weight"), "found 'a.0.weight', 'b.2.weight'"),  # two prefixes
        # Found in a user trial: a ModuleList of two 8x8 layers called last-first was
        # read swapped. Layers numbered without a gap say no order, whatever the shapes.
        (("layers.0.weight", "layers.1.weight"), "number Linear layers 0 and 1 with no module"),
        (("0.weight", "1.weight", "3.weight"), "'1.weight' has shape (3,), not a Linear"),
    ],
)
def test_numbered_entries_that_are_no_sequential_are_refused(tmp_path, keys, found):
    # The twins of the test above: layers in the wrong order (the shapes do not chain),
    # a bias alone, entries under two prefixes, a ModuleList's, a LayerNorm's weight.
    first, second = torch.nn.Linear(5, 3), torch.nn.Linear(3, 2)
    tensors = [second.weight, first.bias if "bias" in keys[1] else first.weight]
    if len(keys) == 3:
        tensors = [first.weight, torch.nn.LayerNorm(3).weight, second.weight]
    torch.save(dict(zip(keys, tensors, strict=True)), tmp_path / "m.pt")
    with pytest.raises(ValueError) as info:
        load_jax(tmp_path / "m.pt")
    assert found in str(info.value), str(info.value)


def test_a_modulelist_file_loads_by_the_modules_calls_not_its_indices(tmp_path):
    # With out=module, the module's calls say which layer is which: a ModuleList run
    # last-first is read that way, where the indices alone would be refused above.
    class Reversed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(3, 2), torch.nn.Linear(5, 3)])

        def forward(self, x):
            return self.layers[0](torch.tanh(self.layers[1](x)))

    torch.manual_seed(0)
    source, target = Reversed(), Reversed()
    torch.save(source.state_dict(), tmp_path / "m.pt")
    load_torch(tmp_path / "m.pt", out=target)
    assert_states_identical(target.state_dict(), source.state_dict())


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_file_of_a_module_holding_equivs_names_reads_under_its_prefix(tmp_path, suffix):
    # Found in a user trial: model.fc1.weight (a Lightning module's self.model) was read
    # only with out=. The twin: names under two prefixes are not one module's.
    state = random_state(SPEC, 0)
    path = tmp_path / f"held{suffix}"
    _save_either({f"model.{k}": v for k, v in state.items()}, path)
    assert_states_identical(load_torch(path), state)
    np.testing.assert_array_equal(load_jax(path)["Dense_1"]["bias"], state["fc2.bias"])
    _save_either({f"{'ab'[i % 2]}.{k}": v for i, (k, v) in enumerate(state.items())}, path)
    with pytest.raises(ValueError, match="none of its 4 entries is a parameter"):
        load_torch(path)


def _stack(seed: int, activation=torch.nn.Tanh) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), activation(), torch.nn.Linear(3, 2))


class Named(torch.nn.Module):
    """A Linear stack under names of its own, not equiv's."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.act, self.head = (
            torch.nn.Linear(4, 3),
            torch.nn.Tanh(),
            torch.nn.Linear(3, 2),
        )

    def forward(self, x):
        return self.head(self.act(self.inp(x)))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("target", ["sequential", "named"])
def test_a_modules_own_state_dict_file_loads_into_it_in_place(suffix, target, tmp_path):
    # Found as a gap in user trials: a plain torch.save(seq.state_dict()) had no
    # route back but load_state_dict by hand.
    source = _stack(0) if target == "sequential" else Named()
    path = tmp_path / f"own{suffix}"
    if suffix == ".pt":
        torch.save(source.state_dict(), path)
    else:
        safetensors.torch.save_file(source.state_dict(), path)
    torch.manual_seed(1)
    out = _stack(1) if target == "sequential" else Named()
    before = {k: v.data_ptr() for k, v in out.state_dict().items()}
    state = load_torch(path, out=out)
    for name, tensor in out.state_dict().items():
        assert torch.equal(tensor, source.state_dict()[name]), name
        assert tensor.data_ptr() == before[name], name  # in place
    assert sorted(state) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    assert (
        state["fc2.weight"].data_ptr()
        == before["2.weight" if target == "sequential" else "head.weight"]
    )


@pytest.mark.parametrize("written_as", list(LAYOUTS))
def test_any_equiv_file_loads_into_a_sequential(written_as, tmp_path, equiv_seed):
    state = random_state(SPEC, 3)
    path = tmp_path / f"{written_as}.safetensors"
    save_jax(torch_to_jax(state, layout=written_as), path, layout=written_as)
    out = _stack(0)
    load_torch(path, out=out)
    assert torch.equal(out[0].weight, state["fc1.weight"])
    assert torch.equal(out[2].bias, state["fc2.bias"])


def test_loading_into_a_module_of_another_shape_or_dtype_is_refused_untouched(tmp_path):
    path = tmp_path / "seq.pt"
    torch.save(_stack(0).state_dict(), path)
    wider = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    kept = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(ValueError) as info:
        load_torch(path, out=wider)
    # Found in a user trial: this said "out does not match the MLP (4, 3, 2)", the
    # file's, without naming the file.
    assert str(info.value).splitlines()[:2] == [
        f"[equiv] cannot copy {path} (the MLP (4, 3, 2), bias=True, float32) into out (the "
        "MLP (4, 5, 2), bias=True, float32):",
        "  'fc1.weight': (3, 4) in the file, (5, 4) in out",
    ]
    assert str(info.value).endswith(
        "They are different models: copy into a module of the "
        "same architecture, or convert without out= to get new tensors"
    )
    assert all(torch.equal(v, kept[k]) for k, v in wider.state_dict().items())
    # torch's load_state_dict casts silently; equiv says the dtypes differ.
    with pytest.raises(ValueError, match="'fc1.weight': float32 in the file, float64 in out"):
        load_torch(path, out=_stack(0).double())
    # A file of another module's own names is not guessed into this one.
    other = tmp_path / "named.pt"
    torch.save(Named().state_dict(), other)
    with pytest.raises(ValueError, match="none of its 4 entries is a parameter"):
        load_torch(other, out=_stack(0))


def test_torch_save_files_under_the_suffixes_in_use_are_read(tmp_path):
    # Hugging Face's pytorch_model.bin and a Lightning-style .ckpt are torch.save zips.
    state = random_state(SPEC, 2)
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert_states_identical(load_torch(tmp_path / "pytorch_model.bin"), state)
    torch.save({"state_dict": state, "epoch": 1, "global_step": 10}, tmp_path / "last.ckpt")
    assert_states_identical(load_torch(tmp_path / "last.ckpt", entry="state_dict"), state)
    with pytest.raises(ValueError, match="pass entry='state_dict', which holds one"):
        load_torch(tmp_path / "last.ckpt")
    (tmp_path / "model.h5").write_bytes(b"\x89HDF")
    with pytest.raises(ValueError, match=r"unsupported suffix '\.h5'; expected \.safetensors"):
        load_torch(tmp_path / "model.h5")


def test_a_file_of_a_module_that_holds_the_stack_reads_into_the_stack(tmp_path):
    # A Lightning module's state_dict names its self.model's parameters model.0.weight.
    class Holder(torch.nn.Module):
        def __init__(self, seed):
            super().__init__()
            self.model = _stack(seed)

    holder = Holder(0)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": holder.state_dict(), "epoch": 2}, path)
    out = _stack(1)
    load_torch(path, entry="state_dict", out=out)
    assert all(torch.equal(v, holder.model.state_dict()[k]) for k, v in out.state_dict().items())
    # equiv's own MLP held the same way.
    from equiv.torch_mlp import TorchMLP

    holder.model = TorchMLP(SPEC)
    torch.save({"state_dict": holder.state_dict()}, path)
    target = TorchMLP(SPEC)
    load_torch(path, entry="state_dict", out=target)
    assert torch.equal(target.fc2.weight, holder.model.fc2.weight)
    holder.model = _stack(0)
    # The twin: a key outside that prefix is neither dropped nor guessed at.
    torch.save({**holder.state_dict(), "head.weight": torch.ones(2, 2)}, tmp_path / "more.pt")
    with pytest.raises(ValueError, match="under the prefix 'model.', and 1 is not: 'head.weight'"):
        load_torch(tmp_path / "more.pt", out=_stack(1))


def test_a_training_checkpoints_entry_loads_and_is_offered_when_missing(tmp_path):
    # The commonest .pt file: torch.save({"model": ..., "optimizer": ..., "epoch": ...}).
    model = _stack(0)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    path = tmp_path / "train.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3}, path)
    out = _stack(1)
    load_torch(path, entry="model", out=out)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in out.state_dict().items())
    state = random_state(SPEC, 4)
    torch.save({"model": state, "step": 7}, tmp_path / "equiv_train.pt")
    params = load_jax(tmp_path / "equiv_train.pt", layout="flax", entry="model")
    assert_states_identical(jax_to_torch(params, layout="flax"), state)
    with pytest.raises(ValueError) as info:
        load_torch(path, out=out)
    assert str(info.value) == (
        f"[equiv] {path} holds a dict of 'model' (OrderedDict), 'optimizer' (dict), 'epoch' "
        "(int), not a state_dict of tensors; pass entry='model', which holds one"
    )
    with pytest.raises(
        ValueError, match="entry 'optimizer' holds a dict of 'state' .* entry='model'"
    ):
        load_torch(path, entry="optimizer")
    with pytest.raises(ValueError, match="no entry 'model/fc1': at model, its keys are '0.weight'"):
        load_torch(path, entry="model/fc1")
    nested = tmp_path / "ema.pt"
    torch.save({"ema": {"model": model.state_dict()}, "head": {"w": torch.zeros(2)}}, nested)
    with pytest.raises(
        ValueError, match=r"pass entry='ema/model', the largest that holds one \(others: 'head'\)"
    ):
        load_torch(nested)
    assert torch.equal(load_torch(nested, entry="ema/model", out=out)["fc2.bias"], model[2].bias)
    safetensors.torch.save_file(model.state_dict(), tmp_path / "flat.safetensors")
    with pytest.raises(ValueError, match="safetensors file, which holds one flat mapping"):
        load_torch(tmp_path / "flat.safetensors", entry="model", out=out)
    empty = tmp_path / "empty_dict.pt"
    torch.save({}, empty)
    with pytest.raises(ValueError, match=f"checkpoint {empty}: found no layer parameters"):
        load_torch(empty)


def test_empty_files_bad_layouts_and_half_precision_are_explained(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="not a readable torch file: EOFError"):
        load_torch(empty)
    keras = tmp_path / "keras.safetensors"
    safetensors.torch.save_file(
        {"fc1.weight": torch.ones(2, 3)}, keras, metadata={checkpoint.LAYOUT_KEY: "keras"}
    )
    with pytest.raises(ValueError) as info:
        load_torch(keras)
    assert str(info.value).startswith(
        f"[equiv] {keras} records layout 'keras' but not its paths: pass "
        "file_layout=Layout('keras', ...)"
    )
    eight = tmp_path / "eight.safetensors"
    safetensors.torch.save_file(
        {
            "fc1.weight": torch.ones(2, 3).to(torch.float8_e4m3fn),
            "fc1.bias": torch.ones(2).to(torch.float8_e4m3fn),
        },
        eight,
    )
    with pytest.raises(
        ValueError,
        match="holds float8_e4m3fn parameters, but equiv carries float32, float64, bfloat16, "
        "float16 only",
    ) as info:
        load_torch(eight)
    assert "spec=" not in str(info.value)  # no spec could help (user trial)
    half = tmp_path / "half.safetensors"
    safetensors.torch.save_file(
        {"fc1.weight": torch.ones(2, 3).half(), "fc1.bias": torch.ones(2).half()}, half
    )
    assert load_torch(half)["fc1.weight"].dtype == torch.float16  # the twin: float16 reads


# ---------------------------------------------------------------------------
# Review fixes: views of larger buffers, tensors without dense values, layout
# metadata that disagrees with the names or is damaged, layouts whose keys hold
# a ".", folders given as files


def _views_of_one_buffer(spec: MLPSpec, seed: int) -> dict[str, torch.Tensor]:
    """The parameters of ``spec`` as views of one large flat buffer (as a flat
    parameter buffer or ``torch.split`` hands them out)."""
    flat = torch.randn(1_000_000, generator=torch.Generator().manual_seed(seed))
    state, start = {}, 0
    for name, shape in spec.param_shapes().items():
        size = int(np.prod(shape))
        state[name] = flat[start : start + size].view(shape)
        start += size
    return state


def _stored_bytes(path) -> int:
    """The bytes of tensor data a ``torch.save`` file holds (its ``data/`` entries)."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        return sum(i.file_size for i in archive.infolist() if "/data/" in i.filename)


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_views_of_a_large_buffer_are_written_without_the_buffer(suffix, tmp_path, equiv_seed):
    # Before, torch.save wrote each view's whole storage: 4 MB for 23 parameters.
    views = _views_of_one_buffer(SPEC, equiv_seed)
    save_torch(views, tmp_path / f"views{suffix}")
    assert _stored_bytes(tmp_path / f"views{suffix}") == 23 * 4
    loaded = load_torch(tmp_path / f"views{suffix}")
    assert_states_identical(loaded, views)
    assert loaded["fc1.weight"].untyped_storage().nbytes() == 12 * 4
    # The twin: an ordinary state_dict makes a file of the same size.
    save_torch({n: t.clone() for n, t in views.items()}, tmp_path / f"plain{suffix}")
    assert os.path.getsize(tmp_path / f"views{suffix}") == os.path.getsize(
        tmp_path / f"plain{suffix}"
    )


def test_an_ordinary_state_dict_is_handed_to_torch_save_uncopied(tmp_path, monkeypatch):
    state = random_state(SPEC, 0)
    handed = {}
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: handed.update(obj) or real_save(obj, f))
    save_torch(state, tmp_path / "mlp.pt")
    assert {n: t.data_ptr() for n, t in handed.items()} == {
        n: t.data_ptr() for n, t in state.items()
    }
    handed.clear()
    save_torch(_views_of_one_buffer(SPEC, 0), tmp_path / "views.pt")
    assert all(t.untyped_storage().nbytes() == t.nbytes for t in handed.values())


def test_a_view_in_an_outside_pt_file_loads_without_its_buffer(tmp_path, monkeypatch):
    # A plain torch.save of one view keeps its whole buffer; load_torch copies the view
    # out, and hands every other tensor on as torch.load made it.
    state = random_state(SPEC, 0)
    state["fc1.weight"] = _views_of_one_buffer(SPEC, 0)["fc1.weight"]
    torch.save(state, tmp_path / "view.pt")
    raw = {}
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: raw.update(real_load(*a, **k)) or raw)
    loaded = load_torch(tmp_path / "view.pt")
    assert_states_identical(loaded, state)
    assert raw["fc1.weight"].untyped_storage().nbytes() == 4_000_000  # the trap is real
    assert loaded["fc1.weight"].untyped_storage().nbytes() == 12 * 4
    assert all(loaded[n] is raw[n] for n in ("fc1.bias", "fc2.weight", "fc2.bias"))


_NO_DENSE_VALUES = {
    "meta": (lambda t: torch.empty_like(t, device="meta"), "on the meta device"),
    "sparse_coo": (lambda t: t.to_sparse(), "sparse_coo"),
    "sparse_csr": (lambda t: t.to_sparse_csr(), "sparse_csr"),
    "sparse_bsr": (lambda t: t.to_sparse_bsr((1, 1)), "sparse_bsr"),
    "nested": (lambda t: torch.nested.nested_tensor([t]), "nested"),
}
_BETA = pytest.mark.filterwarnings(
    "ignore:Sparse (CSR|BSR|CSC) tensor support is in beta:UserWarning",
    "ignore:The PyTorch API of nested tensors is in prototype:UserWarning",
)


def test_torchs_sparse_invariants_warning_does_not_hide_the_refusal(tmp_path, monkeypatch):
    # Seen on the GPU machine (torch 2.11): torch.load warns that a sparse COO tensor's
    # invariants are not checked, and under -W error (this suite's setting) the file was
    # "not a readable torch file". Here torch.load is made to warn so on any torch. The
    # twin: another warning from torch.load still reaches the caller.
    path = tmp_path / "odd.pt"
    state = random_state(SPEC, 0)
    torch.save({**state, "fc1.weight": state["fc1.weight"].to_sparse()}, path)
    real_load = torch.load

    def warning_load(message):
        def load(*args, **kwargs):
            warnings.warn(message, UserWarning, stacklevel=2)
            return real_load(*args, **kwargs)

        return load

    monkeypatch.setattr(torch, "load", warning_load(checkpoint._SPARSE_INVARIANTS + ". Memory"))
    with pytest.raises(ValueError, match="holds tensors without dense values: 'fc1.weight'"):
        load_torch(path)
    monkeypatch.setattr(torch, "load", warning_load("some other warning"))
    with pytest.raises(ValueError, match="not a readable torch file: UserWarning: some other"):
        load_torch(path)


@_BETA
@pytest.mark.parametrize("kind", list(_NO_DENSE_VALUES))
def test_a_pt_file_without_dense_values_is_refused_by_name(kind, tmp_path):
    # Before, meta tensors loaded without a word and sparse ones raised
    # NotImplementedError from the untying step.
    make, what = _NO_DENSE_VALUES[kind]
    state = random_state(SPEC, 0)
    path = tmp_path / "odd.pt"
    torch.save({**state, "fc1.weight": make(state["fc1.weight"])}, path)
    with pytest.raises(ValueError) as info:
        load_torch(path)
    assert str(info.value) == (
        f"[equiv] {path} holds tensors without dense values: 'fc1.weight' ({what}); equiv "
        "reads dense tensors with values: save them so (tensor.to_dense() for a sparse one; "
        "a module on the meta device needs module.to_empty(device='cpu') and its weights "
        "loaded first)"
    )
    with pytest.raises(ValueError, match="without dense values"):
        load_jax(path)
    # The twin: the same file with dense tensors (what the advice says) loads.
    torch.save(state, path)
    assert_states_identical(load_torch(path), state)


@_BETA
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("kind", [k for k in _NO_DENSE_VALUES if k != "meta"])
def test_saving_tensors_without_dense_values_is_refused_by_name(kind, suffix, tmp_path):
    # Before: RuntimeError "unsupported memory format option Contiguous" (sparse) or
    # "NestedTensorImpl doesn't support sizes". Meta tensors were refused already.
    make, what = _NO_DENSE_VALUES[kind]
    state = random_state(SPEC, 0)
    path = tmp_path / f"mlp{suffix}"
    with pytest.raises(ValueError) as info:
        save_torch({**state, "fc2.weight": make(state["fc2.weight"])}, path)
    assert str(info.value) == (
        f"[equiv] cannot write {path}: tensors without dense values: 'fc2.weight' ({what}); "
        "pass dense tensors with values (tensor.to_dense() for a sparse one; a module on "
        "the meta device needs module.to_empty(device='cpu') and its weights loaded first)"
    )
    assert os.listdir(tmp_path) == []
    if kind != "nested":  # the twin: the advice, followed, is accepted
        save_torch({**state, "fc2.weight": make(state["fc2.weight"]).to_dense()}, path)
        assert_states_identical(load_torch(path), state)


def test_saving_meta_tensors_stays_refused(tmp_path):
    state = {n: torch.empty_like(t, device="meta") for n, t in random_state(SPEC, 0).items()}
    for suffix in (".safetensors", ".pt"):
        # Every entry named with the file, as for sparse tensors (its own message,
        # "'fc1.weight' is on the meta device", before the converters refused sparse).
        with pytest.raises(ValueError, match=r"cannot write .*mlp.* 'fc1.weight' \(on the meta"):
            save_torch(state, tmp_path / f"mlp{suffix}")
    assert os.listdir(tmp_path) == []


def test_metadata_that_disagrees_with_the_names_is_reported_as_damage(tmp_path):
    # Before, load_torch(path) advised file_layout='torch', and load_torch(path,
    # file_layout='torch') advised dropping it: a circle.
    import safetensors.numpy

    state = random_state(SPEC, 0)
    path = tmp_path / "m.safetensors"
    arrays = {n: t.numpy() for n, t in state.items()}
    safetensors.numpy.save_file(arrays, path, metadata={checkpoint.LAYOUT_KEY: "flax"})
    repair = (
        "Repair it: rewrite its tensors without metadata, safetensors.torch.save_file("
        "safetensors.torch.load_file(path), path), read that with file_layout='torch', "
        "and save it again with equiv.save_torch or equiv.save_jax"
    )
    headline = (
        f"[equiv] {path} records layout 'flax', but its entries ('fc1.bias', 'fc1.weight', "
        "'fc2.bias', ...) have the names of the 'torch' layout: its metadata and its "
        "names disagree, as in a damaged or hand-edited file"
    )
    for load in (load_torch, load_jax):
        with pytest.raises(ValueError) as info:
            load(path)
        assert str(info.value) == f"{headline}. {repair}"
    with pytest.raises(ValueError) as info:
        load_torch(path, file_layout="torch")
    assert str(info.value) == (
        f"{headline} (file_layout does not override what a file records). {repair}"
    )
    # The twin: the repair, followed, reads the file.
    safetensors.torch.save_file(safetensors.torch.load_file(path), path)
    assert_states_identical(load_torch(path, file_layout="torch"), state)


_INTACT = {"weight_path": "Dense_{j}/kernel", "bias_path": "Dense_{j}/bias", "transpose": "True"}
_DAMAGED = {
    # Layout refuses these itself now (equiv.convert.Layout.__post_init__); before,
    # KeyError, IndexError, TypeError and AttributeError escaped.
    "unknown field": ({"weight_path": "Dense_{j}/{k}"}, "holds a brace other than '{i}'"),
    "positional field": ({"weight_path": "Dense_{j}/{}"}, "holds a brace other than '{i}'"),
    "indexed field": ({"bias_path": "Dense_{j}/{i[0]}"}, "holds a brace other than '{i}'"),
    "attribute field": ({"bias_path": "Dense_{j}/{i.x}"}, "holds a brace other than '{i}'"),
    "no layer field": ({"weight_path": "{}"}, "layout path '{}' must hold exactly one"),
    "one path twice": ({"bias_path": "Dense_{j}/kernel"}, "Dense_0/kernel: the same path"),
    "bad transpose": ({"transpose": "yes"}, "its transpose is 'yes', not 'True' or 'False'"),
    "missing path": ({"bias_path": None}, "it has no equiv.layout.bias_path"),
}


@pytest.mark.parametrize("case", list(_DAMAGED))
def test_damaged_layout_metadata_is_one_error_naming_the_file(case, tmp_path):
    # Before: KeyError: 'k' (or IndexError, TypeError...) out of load_jax, or a
    # damaged definition silently replaced by the built-in layout of its name.
    change, reason = _DAMAGED[case]
    params = torch_to_jax(random_state(SPEC, 0), layout="flax")
    path = tmp_path / "mlp.safetensors"
    save_jax(params, path, layout="flax")
    tensors = safetensors.torch.load_file(path)
    fields = {**_INTACT, **change}
    metadata = {checkpoint.LAYOUT_KEY: "flax"} | {
        f"{checkpoint.LAYOUT_KEY}.{field}": value
        for field, value in fields.items()
        if value is not None
    }
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    for load in (load_jax, load_torch):
        with pytest.raises(ValueError) as info:
            load(path)
        text = str(info.value)
        assert text.startswith(f"[equiv] {path} records a damaged layout 'flax': "), text
        assert reason in text and text.endswith(
            ". Rewrite the file with equiv.save_torch or equiv.save_jax"
        )
    # The twin: the intact definition reads back.
    intact = {f"{checkpoint.LAYOUT_KEY}.{f}": v for f, v in _INTACT.items()}
    safetensors.torch.save_file(tensors, path, metadata={checkpoint.LAYOUT_KEY: "flax", **intact})
    assert_trees_identical(load_jax(path), params)


ROUND_TRIP_LAYOUTS = [
    *LAYOUTS.values(),
    Layout("odd", "w{i}", "b/{i}", False),  # weight and bias nested differently
    Layout("dotted", "block.{j}/kernel", "block.{j}/bias", True),  # a key holding "."
    Layout("listed", "layers/{j}/kernel", "layers/{j}/bias", True, index_keys=True),
]


@pytest.mark.parametrize("layout", ROUND_TRIP_LAYOUTS, ids=lambda layout: layout.name)
def test_every_layout_save_jax_accepts_reads_back(layout, tmp_path, equiv_seed):
    # Before, the odd and dotted layouts saved, then failed to load ("unexpected: 'b.1'").
    state = random_state(MLPSpec((4, 3, 3, 2)), equiv_seed)
    params = torch_to_jax(state, layout=layout)
    path = tmp_path / "mlp.safetensors"
    save_jax(params, path, layout=layout)
    assert_trees_identical(load_jax(path, layout=layout), params)
    assert_states_identical(load_torch(path), state)  # from what the file records


def test_a_layout_whose_paths_join_into_one_key_is_refused_when_saving(tmp_path):
    # Before, "a.1" was written once for two parameters: the file silently lost one.
    clashing = Layout("x", "a.{i}", "a/{i}", False)
    state = random_state(SPEC, 0)
    path = tmp_path / "x.safetensors"
    with pytest.raises(ValueError) as info:
        save_jax(torch_to_jax(state, layout=clashing), path, layout=clashing)
    assert str(info.value) == (
        f"[equiv] cannot write {path}: the 'x' layout's paths do not read back from a "
        "file, which joins a path's keys with '.': fc1.bias is stored as 'a.1', which "
        "reads back as fc1.weight; fc2.bias is stored as 'a.2', which reads back as "
        "fc2.weight; choose paths that stay apart when joined"
    )
    assert os.listdir(tmp_path) == []
    apart = Layout("y", "a.{i}", "a{i}/b", False)  # the twin: keys "a.1" and "a1.b"
    save_jax(torch_to_jax(state, layout=apart), path, layout=apart)
    assert_states_identical(load_torch(path), state)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_loading_a_folder_is_refused_by_name(suffix, tmp_path):
    # Before: "No such device (os error 19)" from safetensors.
    folder = tmp_path / f"dir{suffix}"
    folder.mkdir()
    with pytest.raises(IsADirectoryError) as info:
        load_torch(folder)
    assert str(info.value) == (
        f"[equiv] {folder} is a folder, not a checkpoint file: give the path of a file"
    )
    path = tmp_path / f"file{suffix}"  # the twin: a file of that suffix loads
    save_torch(random_state(SPEC, 0), path)
    assert_states_identical(load_torch(path), random_state(SPEC, 0))


def _in_file_mapping(array, path) -> bool:
    """Whether a JAX array's buffer lies in a memory map of ``path`` (Linux)."""
    pointer = array.unsafe_buffer_pointer()
    target = os.path.realpath(path)
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == target:
                low, high = (int(x, 16) for x in fields[0].split("-"))
                if low <= pointer < high:
                    return True
    return False


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc")
@pytest.mark.parametrize("writer", ["save_torch", "save_jax"])
@pytest.mark.parametrize("sizes", [(64, 128, 32), (32, 64, 16), (48, 16), (128, 256, 64)])
def test_copy_false_adopts_the_memory_map_of_equivs_own_files(writer, sizes, tmp_path):
    # Found in a user trial: safetensors put a save_torch file's data 24 bytes past a
    # 64-byte boundary, so XLA copied every leaf that load_jax(copy=False) handed it.
    # equiv's writers now pad the header. The twin: the same tensors written by plain
    # safetensors at an unaligned start are copied.
    import safetensors.torch

    # Every tensor a multiple of 64 bytes; before, the data started 0, 56, 40 and 8
    # bytes past a boundary in these four.
    spec = MLPSpec(sizes)
    state = random_state(spec, 0)
    path = tmp_path / "m.safetensors"
    if writer == "save_torch":
        save_torch(state, path)
    else:
        save_jax(torch_to_jax(state, layout="torch"), path, layout="torch")
    params = load_jax(path, layout="torch", copy=False)
    assert all(_in_file_mapping(params[name], path) for name in spec.param_names())
    assert_states_identical(jax_to_torch(params, layout="torch"), state)
    plain = tmp_path / "plain.safetensors"
    for pad in range(8):  # a metadata length that leaves the data unaligned
        safetensors.torch.save_file(state, plain, metadata={"x": "y" * pad})
        with open(plain, "rb") as file:
            if (8 + int.from_bytes(file.read(8), "little")) % 64:
                break
    params = load_jax(plain, layout="torch", copy=False)
    assert not any(_in_file_mapping(params[name], plain) for name in spec.param_names())


def test_a_file_under_the_other_formats_suffix_is_told_to_be_renamed(tmp_path):
    # Found in a user trial: a safetensors file named .pt was "more than tensors".
    state = random_state(SPEC, 0)
    save_torch(state, tmp_path / "real.safetensors")
    (tmp_path / "named.pt").write_bytes((tmp_path / "real.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"is a safetensors file under a \.pt name: rename"):
        load_torch(tmp_path / "named.pt")
    save_torch(state, tmp_path / "real.pt")
    (tmp_path / "named.safetensors").write_bytes((tmp_path / "real.pt").read_bytes())
    with pytest.raises(ValueError, match=r"is a torch.save file under a \.safetensors name"):
        load_torch(tmp_path / "named.safetensors")
    (tmp_path / "named.pt").rename(tmp_path / "renamed.safetensors")
    assert_states_identical(load_torch(tmp_path / "renamed.safetensors"), state)  # the twin


def test_a_float64_file_into_a_float32_module_is_told_about_torch_not_jax(tmp_path):
    from equiv.torch_mlp import TorchMLP

    # Found in a user trial: the advice was to turn on JAX's x64 mode.
    path = tmp_path / "m.safetensors"
    save_torch(random_state(SPEC.replace(dtype="float64"), 0), path)
    with pytest.raises(
        ValueError, match=r"Convert one side: out.double\(\) before the copy"
    ) as info:
        load_torch(path, out=TorchMLP(SPEC))
    assert "x64" not in str(info.value)
    load_torch(path, out=TorchMLP(SPEC.replace(dtype="float64")))  # the twin


@pytest.mark.parametrize("prefix", ["", "params/"], ids=["params", "variables"])
def test_flax_params_flattened_with_slashes_are_read(tmp_path, prefix, equiv_seed):
    # Found in a user trial: flax.traverse_util.flatten_dict(params, sep="/") written
    # with safetensors could not be read in any layout. The twin: another name is not.
    state = random_state(SPEC, equiv_seed)
    flat = {}
    for i in (1, 2):
        flat[f"{prefix}Dense_{i - 1}/kernel"] = state[f"fc{i}.weight"].T.contiguous()
        flat[f"{prefix}Dense_{i - 1}/bias"] = state[f"fc{i}.bias"]
    safetensors.torch.save_file(flat, tmp_path / "flax.safetensors")
    assert_states_identical(load_torch(tmp_path / "flax.safetensors", file_layout="flax"), state)
    flat[f"{prefix}Dense_0/scale"] = flat.pop(f"{prefix}Dense_0/bias")
    safetensors.torch.save_file(flat, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="Dense_0/scale"):
        load_torch(tmp_path / "other.safetensors", file_layout="flax")


def _mixed(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2, bias=False)
    )


@pytest.mark.parametrize("layout", ["torch", "flax"])
def test_a_file_records_which_layers_have_a_bias(tmp_path, layout):
    # Found in a user trial: a model with a bias on some layers only was refused by
    # save_torch, and its file could not be read back without spec=.
    seq = _mixed(0)
    path = tmp_path / "m.safetensors"
    if layout == "torch":
        save_torch(seq, path)
    else:
        save_jax(
            jax_convert(seq, layout), path, layout, spec=MLPSpec((4, 3, 2), bias=(True, False))
        )
    with safetensors.safe_open(path, framework="pt") as f:
        assert f.metadata()[checkpoint.BIAS_KEY] == "True,False"
    state = load_torch(path)
    assert list(state) == ["fc1.weight", "fc1.bias", "fc2.weight"]
    assert torch.equal(state["fc2.weight"], seq[2].weight.detach())
    assert "bias" not in load_jax(path)["Dense_1"]
    # The twin: the same entries in a file that records nothing are ambiguous.
    safetensors.torch.save_file(load_torch(path), tmp_path / "bare.safetensors")
    with pytest.raises(ValueError, match=r"missing: 'fc2.bias'[\s\S]*bias=\(True, False\)"):
        load_torch(tmp_path / "bare.safetensors")


def jax_convert(module, layout):
    from equiv.convert import torch_to_jax as convert

    return convert(module, layout=layout)


def test_a_recorded_bias_that_the_entries_contradict_is_damage(tmp_path):
    path = tmp_path / "m.safetensors"
    save_torch(_mixed(0), path)
    tensors = safetensors.torch.load_file(path)
    with safetensors.safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    safetensors.torch.save_file(
        {**tensors, "fc2.bias": torch.zeros(2)}, tmp_path / "extra.safetensors", metadata
    )
    with pytest.raises(ValueError, match="unexpected: 'fc2.bias'"):
        load_torch(tmp_path / "extra.safetensors")
    safetensors.torch.save_file(
        tensors, tmp_path / "bad.safetensors", {**metadata, checkpoint.BIAS_KEY: "yes,no"}
    )
    with pytest.raises(ValueError, match=r"records equiv.bias='yes,no'.*damaged"):
        load_torch(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_file_loads_into_a_module_with_a_bias_on_some_layers(tmp_path, suffix):
    # The module says which layers have a bias where the file cannot (a .pt records
    # nothing): its own state_dict file reads into it, and a JAX tree copies into it.
    source, target = _mixed(0), _mixed(1)
    path = tmp_path / f"seq{suffix}"
    _save_either(source.state_dict(), path)
    load_torch(path, out=target)
    assert_states_identical(target.state_dict(), source.state_dict())
    target = _mixed(1)
    jax_to_torch(jax_convert(source, "flax"), layout="flax", out=target)
    assert_states_identical(target.state_dict(), source.state_dict())
    # The twin: a file that lost the bias the module has is still told it is missing.
    _save_either({k: v for k, v in source.state_dict().items() if k != "0.bias"}, path)
    with pytest.raises(ValueError, match="missing: 'fc1.bias'"):
        load_torch(path, out=target)


def test_a_file_with_entries_beside_the_modules_names_them(tmp_path):
    # Found in a user trial: a Lightning state_dict holding a loss's weight beside the
    # model's was told to pass the module, which it had. The twin: the model's alone.
    source = _stack(0)
    state = {f"model.{k}": v for k, v in source.state_dict().items()}
    torch.save({"state_dict": {**state, "loss_fn.weight": torch.ones(2)}}, tmp_path / "l.ckpt")
    with pytest.raises(ValueError) as info:
        load_torch(tmp_path / "l.ckpt", entry="state_dict", out=_stack(1))
    assert str(info.value) == (
        f"[equiv] checkpoint {tmp_path / 'l.ckpt'}: 4 of its 5 entries are the module's "
        "parameters under the prefix 'model.', and 1 is not: 'loss_fn.weight'. Keep only the "
        "module's: load_torch reads a dict of them, saved with torch.save({k: v for k, v in "
        "state.items() if k.startswith('model.')}, path)"
    )
    torch.save({"state_dict": state}, tmp_path / "l.ckpt")
    target = _stack(1)
    load_torch(tmp_path / "l.ckpt", entry="state_dict", out=target)
    assert_states_identical(target.state_dict(), source.state_dict())


@pytest.mark.parametrize("prefix", ["", "net/"])
def test_a_slash_joined_flax_file_read_as_torch_is_told_its_layout(tmp_path, prefix):
    # Found in a user trial: flatten_dict(sep="/") keys got the advice for a module's own
    # names (pass the module), where file_layout="flax" reads them.
    state = random_state(SPEC, 0)
    flat = {}
    for i in (1, 2):
        flat[f"{prefix}Dense_{i - 1}/kernel"] = state[f"fc{i}.weight"].T.contiguous()
        flat[f"{prefix}Dense_{i - 1}/bias"] = state[f"fc{i}.bias"]
    path = tmp_path / "flax.safetensors"
    safetensors.torch.save_file(flat, path)
    with pytest.raises(ValueError, match="These are the names of the 'flax' layout"):
        load_torch(path)
    assert checkpoint.layout_of_keys(flat) == "flax"
    assert_states_identical(load_torch(path, file_layout="flax"), state)  # the twin


def test_a_checkpoint_holding_a_class_tells_how_to_allow_it(tmp_path):
    # Found in a user trial: a Lightning checkpoint's hyper_parameters held an
    # argparse.Namespace; the refusal did not say how to read the state_dict beside it.
    import argparse

    seq = _stack(0)
    path = tmp_path / "h.ckpt"
    torch.save({"state_dict": seq.state_dict(), "hparams": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(ValueError) as info:
        load_torch(path, entry="state_dict")
    assert str(info.value).endswith(
        "If you trust the file, allow that class, which holds plain attributes: with "
        "torch.serialization.safe_globals([argparse.Namespace]): equiv.load_torch(path, ...)"
    )
    with torch.serialization.safe_globals([argparse.Namespace]):  # the advice, followed
        out = load_torch(path, entry="state_dict", out=_stack(1))
    assert torch.equal(out["fc2.weight"], seq[2].weight)


def test_an_entry_picks_one_modules_prefix_in_a_state_dict(tmp_path):
    # Found in a user trial: a Lightning state_dict holding model.* and ema_model.*
    # (a module and its moving average) could not be read at all.
    model, ema = _stack(0), _stack(1)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state |= {f"ema_model.{k}": v for k, v in ema.state_dict().items()}
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "epoch": 3}, path)
    for entry, source in (("state_dict/model", model), ("state_dict/ema_model", ema)):
        got = load_torch(path, entry=entry)
        assert torch.equal(got["fc2.weight"], source[2].weight), entry
    # The twin: a prefix no key has is named with the keys there.
    with pytest.raises(ValueError, match="no entry 'state_dict/mode': at state_dict, its keys"):
        load_torch(path, entry="state_dict/mode")


def test_of_equal_entries_the_shallowest_is_offered(tmp_path):
    # Found in a user trial: with "model" and "ema/model" of one size, the moving
    # average was offered as "the largest". The twin: a larger one is still first.
    model = _stack(0).state_dict()
    torch.save({"ema": {"model": model}, "model": model, "epoch": 1}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match=r"pass entry='model', of the largest, the shallowest"):
        load_torch(tmp_path / "c.pt")
    deep = torch.nn.Sequential(*_stack(1)[:2], torch.nn.Linear(3, 3), torch.nn.Tanh(), _stack(2)[2])
    torch.save({"ema": {"model": deep.state_dict()}, "model": model}, tmp_path / "d.pt")
    with pytest.raises(ValueError, match=r"pass entry='ema/model', the largest that"):
        load_torch(tmp_path / "d.pt")


def test_a_file_of_a_sequential_numbered_otherwise_is_named_another_modules(tmp_path):
    # Found in a user trial: a Sequential with a Dropout between its layers (0, 3) read
    # into one without (0, 2) was said not to match "the MLP (5, 16)", with spec= advice.
    torch.manual_seed(0)
    source = torch.nn.Sequential(
        torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Dropout(), torch.nn.Linear(4, 3)
    )
    torch.save(source.state_dict(), tmp_path / "drop.pt")
    target = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    with pytest.raises(ValueError) as info:
        load_torch(tmp_path / "drop.pt", out=target)
    assert str(info.value).endswith(
        "2 of its 4 entries are the module's parameters, and 2 are not: '3.weight', "
        "'3.bias'; the module's '2.weight', '2.bias' are not in it. The file is another "
        "module's, whose layers are named otherwise: load it into that module, or without "
        "out= (an nn.Sequential's file is read by its indices)"
    )
    # The twin, as advised: read by its indices, then copied into the module.
    copy_into = jax_to_torch(torch_to_jax(load_torch(tmp_path / "drop.pt")), out=target)
    assert torch.equal(copy_into["fc2.weight"], source[3].weight)


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
def test_a_state_dict_written_by_pickle_dump_is_told_apart_from_one_holding_code(
    protocol, tmp_path
):
    # Found in a user trial: a state_dict written with pickle.dump was said to "hold
    # more than tensors", quoting torch's request to file an issue.
    path = tmp_path / "pickled.pt"
    state = _stack(0).state_dict()
    with open(path, "wb") as f:
        pickle.dump(state, f, protocol=protocol)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's warning about the protocol is ours to tell
        with pytest.raises(ValueError) as info:
            load_torch(path)
    assert str(info.value) == (
        f"[equiv] {path} is a pickle (protocol {protocol}) as pickle.dump writes it, not a "
        "torch.save file, and was not unpickled (a pickle can run code; "
        "torch.load(weights_only=True) reads torch.save's files only). If you trust it, "
        "save it again with torch: with open(path, 'rb') as f: "
        "torch.save(pickle.load(f), 'model.pt')"
    )
    # The twin: the same state_dict through torch.save, legacy format included, loads.
    for legacy in (False, True):
        torch.save(state, path, _use_new_zipfile_serialization=not legacy)
        assert torch.equal(load_torch(path)["fc2.weight"], state["2.weight"])


def test_a_file_of_other_bytes_is_not_a_torch_file_whatever_its_name(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"garbage" * 3)
    with pytest.raises(ValueError) as info:
        load_torch(path, out=_stack(0))
    assert str(info.value) == (
        f"[equiv] {path} is not a file torch.save writes (a zip archive, or in its legacy "
        "format a pickle of protocol 2): it starts with b'garbagegarba'"
    )


def test_a_file_lacking_a_bias_out_has_is_told_so_not_to_pass_a_spec(tmp_path):
    # Found in a user trial: read into a module that has fc2.bias, a file without it
    # was told to pass spec=MLPSpec(..., bias=(True, False)), which out contradicts.
    path = tmp_path / "lost.pt"
    state = _stack(0).state_dict()
    del state["2.bias"]
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        load_torch(path, out=_stack(1))
    message = str(info.value)
    assert "spec=" not in message, message
    assert message.endswith(
        f"out has a bias where checkpoint {path} has none ('fc2.bias'): it is another "
        "model's, or lost them; copy it into a module without a bias there "
        "(nn.Linear(..., bias=False)), or read it without out="
    )
    # The twin, as advised: a module without that bias reads it.
    target = torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2, bias=False)
    )
    load_torch(path, out=target)
    assert torch.equal(target[2].weight, state["2.weight"])


def test_a_file_in_another_layout_is_told_to_pass_file_layout_not_layout(tmp_path, equiv_seed):
    # Found in a user trial: load_jax(path, layout="flax") of a flax file without
    # equiv's metadata was told to say layout='flax', which it had (layout= is the
    # layout returned; file_layout= the file's).
    state = random_state(SPEC, equiv_seed)
    path = tmp_path / "flax.safetensors"
    safetensors.torch.save_file(_flax_keys(state), path)
    with pytest.raises(ValueError) as info:
        load_jax(path, layout="flax")
    assert str(info.value).endswith(
        "These are the names of the 'flax' layout: say so, file_layout='flax' (the file's "
        "layout; load_jax's layout= is the one it returns)"
    )
    assert_trees_identical(load_jax(path, layout="flax", file_layout="flax"), torch_to_jax(state))


def test_a_file_of_a_modules_own_layer_names_is_told_the_layout_that_reads_it(tmp_path):
    # Found in a user trial: a checkpoint under a module's own names (fc_in, fc_mid,
    # fc_out) was told to pass the module; an equiv.Layout of those names reads it
    # without one, and the message now writes it out. The twin: that layout reads it.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    own = {"fc_in": net[0], "fc_out": net[2]}
    state = {f"{n}.{k}": getattr(m, k).detach() for n, m in own.items() for k in ("weight", "bias")}
    path = tmp_path / "own.pt"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        load_torch(path)
    advice = (
        "file_layout=equiv.Layout('own', '{name}.weight', '{name}.bias', False, "
        "layers=('fc_in', 'fc_out'))"
    )
    assert advice in str(info.value)
    layout = Layout("own", "{name}.weight", "{name}.bias", False, layers=("fc_in", "fc_out"))
    read = load_torch(path, file_layout=layout)
    assert torch.equal(read["fc1.weight"], net[0].weight.detach())
    assert torch.equal(read["fc2.bias"], net[2].bias.detach())


def test_the_layout_advice_lists_numbered_layers_in_natural_order(tmp_path):
    # Found in review: a safetensors file keeps its keys sorted, layer10 before layer2,
    # and the advice listed them so: following it loaded layer10 as fc2.
    state = {}
    for i in (1, 2, 10):
        state[f"layer{i}.weight"] = torch.zeros(3, 3)
        state[f"layer{i}.bias"] = torch.zeros(3)
    path = tmp_path / "layers.safetensors"
    safetensors.torch.save_file(state, path)
    with pytest.raises(ValueError, match=r"layers=\('layer1', 'layer2', 'layer10'\)"):
        load_torch(path)
