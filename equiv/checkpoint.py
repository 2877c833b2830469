"""Checkpoints: safetensors for both sides, torch ``.pt``/``.pth`` without unpickling code.

A file holds one MLP's parameters under the names of one layout (see
:mod:`equiv.convert`), each a JAX path's keys joined with ``.`` (``Dense_0.kernel``)
and read back by matching the whole name against the layout's paths (a key may
hold a ``.`` itself; a layout whose joined paths would collide is refused when
saving). The file records that layout in its metadata (``"equiv.layout"``, with
its paths, so that a :class:`~equiv.convert.Layout` of your own reads back too), so
a file written from torch loads into JAX and back. A safetensors file without that
entry (written by another tool), and a torch pickle, which records no layout, are
read in the layout the caller names with ``file_layout`` (``"torch"`` by default);
``file_layout`` never overrides what a file records: metadata that is damaged, or
that no name of the file matches, is reported as damage. Everything read is checked
before it is returned: names, shapes and dtypes, every problem named in one
``ValueError``.

Torch pickles (``.pt``, ``.pth``) are read only with ``torch.load(weights_only=True)``,
which refuses any object but tensors and plain containers: a pickle can run code.
Tensors without dense values (sparse, nested, on the meta device) are refused,
reading or writing; a tensor that is a view of a larger storage is copied out of
it, since ``torch.save`` writes (and ``torch.load`` keeps) the whole storage.

Writes go to a temporary file in the destination's folder, flushed to disk and
renamed over the destination with ``os.replace``: a failed write leaves the old
file (or no file), never half of a new one.

Example:
  >>> import os, tempfile, torch
  >>> state = {"fc1.weight": torch.ones(3, 4), "fc1.bias": torch.zeros(3)}
  >>> path = os.path.join(tempfile.mkdtemp(), "mlp.safetensors")
  >>> save_torch(state, path)
  >>> load_jax(path, layout="flax")["Dense_0"]["kernel"].shape
  (4, 3)
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pickle
import re
import struct
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import torch

from equiv._messages import PREFIX, message, type_error, value_error
from equiv.convert import (
    LAYOUTS,
    Layout,
    _flatten,
    _foreign_keys,
    _layout_names,
    _numbered_stack,
    _state_dict,
    biases_of,
    check_entries,
    copy_into,
    equinox_to_torch,
    get_layout,
    is_equinox_model,
    is_jax_model,
    layout_tree,
    missing_values,
    module_spec,
    torch_to_jax,
)
from equiv.files import atomic_path
from equiv.spec import MLPSpec

LAYOUT_KEY = "equiv.layout"
#: Which layers have a bias, one True or False per layer (``"True,False"``).
BIAS_KEY = "equiv.bias"
# The layout's definition, beside its name: a Layout of the caller's own has no entry
# in LAYOUTS to look the name up in.
_LAYOUT_FIELDS = ("weight_path", "bias_path", "transpose")
_SAFETENSORS = (".safetensors",)
# torch.save's zip under the suffixes in use: .bin (Hugging Face's pytorch_model.bin) and
# .ckpt (Lightning's, whose state_dict is entry="state_dict").
_PICKLES = (".pt", ".pth", ".bin", ".ckpt")
# What a file's layout metadata can get wrong: a template torch cannot fill in
# (KeyError "{k}", IndexError "{}", AttributeError "{i.x}", TypeError "{i[0]}",
# ValueError "{i:q}" or Layout's own checks).
_DAMAGE = (KeyError, IndexError, AttributeError, TypeError, ValueError)
_DENSE_ADVICE = (
    "tensor.to_dense() for a sparse one; a module on the meta device needs "
    "module.to_empty(device='cpu') and its weights loaded first"
)

PathLike = str | os.PathLike


def save_torch(
    module_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor],
    path: PathLike,
    *,
    spec: MLPSpec | None = None,
) -> None:
    """Write a torch MLP's parameters (names ``fc1.weight``...) to ``path``.

    ``.safetensors`` files record the ``torch`` layout; ``.pt``/``.pth`` (and ``.bin``,
    ``.ckpt``) files are ``torch.save`` of the state_dict (tensors only, so
    ``weights_only`` loads it).

    Raises:
      TypeError: not a module or a state_dict of tensors.
      ValueError: the parameters do not form an MLP (or ``spec``), a tensor is sparse,
        nested or on the meta device, or the suffix is none of ``.safetensors``,
        ``.pt``, ``.pth``, ``.bin`` and ``.ckpt``.
      OSError: ``path`` cannot be written (see :func:`equiv.files.atomic_path`).
    """
    kind = _kind(path, _SAFETENSORS + _PICKLES)
    if is_equinox_model(module_or_state_dict):  # its state_dict (found in a user trial)
        module_or_state_dict = equinox_to_torch(module_or_state_dict)
    given = (
        module_or_state_dict.state_dict(keep_vars=True)
        if isinstance(module_or_state_dict, torch.nn.Module)
        else module_or_state_dict
    )
    if isinstance(given, Mapping):  # every such entry named, with the file, first
        tensors = {k: v for k, v in given.items() if isinstance(v, torch.Tensor)}
        problems = _without_dense_values(tensors)
        if problems:
            raise value_error(
                f"cannot write {os.fspath(path)}: {problems}; pass dense tensors with values "
                f"({_DENSE_ADVICE})"
            )
    state = _state_dict(module_or_state_dict)
    if spec is None:
        spec = module_spec(module_or_state_dict)
    spec = check_entries(
        {(n,): t for n, t in state.items()},
        LAYOUTS["torch"],
        spec,
        what="state_dict",
        # A module's own layers say which have a bias; a state_dict's entries cannot.
        from_model=isinstance(module_or_state_dict, torch.nn.Module),
    )
    tensors, seen = {}, set()
    for n in spec.param_names():
        tensor = state[n].detach().cpu().contiguous()
        if kind in _PICKLES:
            tensor = _owning(tensor)
        # safetensors refuses tensors that share memory (tied weights): each entry of
        # the file is its own copy, as it is when read back.
        if tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        tensors[n] = tensor
    with atomic_path(path) as tmp:
        if kind in _PICKLES:
            torch.save(tensors, tmp)
        else:
            import safetensors.torch

            metadata = _metadata(LAYOUTS["torch"], spec)
            _save_aligned(safetensors.torch.save_file, tensors, tmp, metadata)


def load_torch(
    path: PathLike,
    *,
    spec: MLPSpec | None = None,
    file_layout: str | Layout | None = None,
    entry: str | None = None,
    out: torch.nn.Module | Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Read a checkpoint as a torch state_dict (``fc1.weight``...), checked.

    Args:
      path: a ``.safetensors`` file in any layout, or a ``.pt``/``.pth`` state_dict.
      spec: the expected architecture; by default read from the weights.
      file_layout: the layout of the names in a file that records none: a
        safetensors file without equiv's metadata, or a ``.pt``/``.pth`` (``"torch"``
        by default).
      entry: the key of a ``.pt`` training checkpoint's dict that holds the
        state_dict (``"model"`` for ``torch.save({"model": model.state_dict(),
        "optimizer": ..., "epoch": ...})``); ``/`` separates nested keys.
      out: a module (equiv's names, or any Linear stack that
        :func:`equiv.mlp_from_module` reads, such as an ``nn.Sequential``) or a
        state_dict to copy the file into, in place (one copy, no new tensors), as
        :func:`equiv.convert.jax_to_torch` does. A module also reads a file of its
        own ``state_dict`` (``torch.save(seq.state_dict(), path)``: names such as
        ``0.weight``), matched by the names it gives its own parameters, or of a
        module that holds it, every key under one prefix (``model.0.weight``, a
        Lightning module's ``self.model``).

    Returns:
      The state_dict: the file's tensors, or ``out``'s own tensors after the copy.

    Raises:
      ValueError: unreadable or truncated file, a pickle holding anything but
        tensors, or missing, extra, mis-shaped or mis-typed entries (the file's or
        ``out``'s).

    Example:
      >>> import os, tempfile, torch
      >>> seq = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
      >>> path = os.path.join(tempfile.mkdtemp(), "seq.pt")
      >>> torch.save(seq.state_dict(), path)
      >>> other = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
      >>> _ = load_torch(path, out=other)
      >>> torch.equal(other[2].weight, seq[2].weight)
      True
    """
    if out is None:
        return _load_state(path, spec, file_layout, entry, contiguous=True)[0]
    own = {}
    if isinstance(out, torch.nn.Module):
        from equiv.from_module import own_names  # imports convert, which this reads

        # equiv's own names map to themselves: a file of a module holding it is read
        # under its prefix too (self.model = TorchMLP(...) in a Lightning module).
        own = own_names(out) or {name: name for name in out.state_dict()}
    # Transposed weights are read as views: the copy into out transposes them once.
    # Which layers have a bias, where no spec says: read off out (a module's probe
    # forward, so only then).
    biases = biases_of(out) if spec is None else None
    state, spec = _load_state(
        path, spec, file_layout, entry, contiguous=False, own=own, biases=biases
    )
    return copy_into(out, state, spec, source=os.fspath(path), label="the file")


def _load_state(
    path,
    spec,
    file_layout,
    entry,
    *,
    contiguous: bool,
    own: Mapping[str, str] | None = None,
    biases: tuple[bool, ...] | None = None,
) -> tuple[dict[str, torch.Tensor], MLPSpec]:
    """The file's tensors under torch's names, and their spec; a transposed layout's weights as
    contiguous copies, or (``contiguous=False``) as views of the file's tensors.
    ``own`` renames a torch-layout file's keys that are a module's own names
    (:func:`equiv.from_module.own_names`) to equiv's; ``biases`` (the module's) say which
    layers have a bias where neither ``spec`` nor the file does."""
    # A module's own names settle which layer each entry is (by its calls), never
    # the entries' numbers.
    flat, layout, renamed, recorded = _read_file(path, file_layout, entry, numbered=not own)
    if own and layout.name == "torch":
        keys = [key for (key,) in flat]
        prefix = _outer_prefix(keys, own)
        flat = {(own.get(key[len(prefix) :], key),): tensor for (key,), tensor in flat.items()}
        if not all(layout.torch_name(key) for key in flat):
            _refuse_foreign_entries(keys, own, os.fspath(path))
    try:
        spec = check_entries(
            flat,
            layout,
            spec,
            what=f"checkpoint {os.fspath(path)}",
            biases=recorded or biases,
            biases_from=None if recorded or biases is None else "out",
        )
    except ValueError as error:
        if not renamed or "wrong shape" not in str(error):
            raise
        pairs = ", ".join(f"{old!r} as {new}" for new, old in list(renamed.items())[:4])
        numbered = _numbered_stack(list(renamed.values())) is not None
        raise value_error(
            f"{str(error).removeprefix(PREFIX)}\nIts entries were read under the layout's "
            f"names ({pairs}{', ...' if len(renamed) > 4 else ''})"
            + (
                "; an nn.Sequential's are read in the order of their indices. A module "
                "whose layers run in another order reads its file with "
                "equiv.load_torch(path, out=module)"
                if numbered
                else ""
            )
        ) from None
    state = {}
    for key, tensor in flat.items():
        name = layout.torch_name(key)
        if layout.transpose and name.endswith(".weight"):
            tensor = tensor.mT.contiguous() if contiguous else tensor.mT
        state[name] = tensor
    return {name: state[name] for name in spec.param_names()}, spec


def _refuse_foreign_entries(keys: list[str], own: Mapping[str, str], shown: str) -> None:
    """A ``ValueError`` naming the entries of a file read into a module (``out=``) that
    are not the module's, under the prefix that reads the most of them as its names
    (found in a user trial: a Lightning state_dict with one more entry, a loss's
    ``loss_fn.weight``, was told to pass the module, which it had)."""
    prefix, matched = _own_prefix(keys, own)
    if not matched:
        return  # none of them: check_entries names the entries and the layouts
    others = [k for k in keys if k not in matched]
    lacking = [n for n in own if prefix + n not in matched]
    listed = ", ".join(map(repr, others[:4])) + (", ..." if len(others) > 4 else "")
    absent = ", ".join(map(repr, lacking[:4])) + (", ..." if len(lacking) > 4 else "")
    where = f" under the prefix {prefix!r}" if prefix else ""
    advice = (
        # Names on both sides that the other lacks: another module's file (found in a
        # user trial: a Sequential with a Dropout between its layers numbers them 0, 3).
        "The file is another module's, whose layers are named otherwise: load it into "
        "that module, or without out= (an nn.Sequential's file is read by its indices)"
        if lacking
        else "Keep only the module's: load_torch reads a dict of them, saved with "
        f"torch.save({{k: v for k, v in state.items() if k.startswith({prefix!r})}}, path)"
    )
    raise value_error(
        f"checkpoint {shown}: {len(matched)} of its {len(keys)} entries are the module's "
        f"parameters{where}, and {len(others)} {'is' if len(others) == 1 else 'are'} not: "
        f"{listed}" + (f"; the module's {absent} are not in it" if lacking else "") + f". {advice}"
    )


def _outer_prefix(keys: list[str], own: Mapping[str, str]) -> str:
    """The prefix every key of a file has before the names a module gives its own
    parameters, where the file is the state_dict of a module that holds it
    (``model.0.weight`` for a Lightning module's ``self.model``), or ``""``. Only a
    prefix that all the keys share, and that leaves each one a name of the module's,
    is taken: nothing is dropped, and nothing is matched by a guess."""
    prefix, matched = _own_prefix(keys, own)
    return prefix if keys and len(matched) == len(keys) else ""


def _own_prefix(keys: list[str], own: Mapping[str, str]) -> tuple[str, list[str]]:
    """The prefix (``""`` included) under which the most of ``keys`` are names a module
    gives its own parameters, and those keys.

    >>> _own_prefix(["model.0.weight", "loss.weight"], {"0.weight": "fc1.weight"})
    ('model.', ['model.0.weight'])
    """
    prefixes = {""} | {k[: -len(n)] for k in keys for n in own if k.endswith("." + n)}

    def read(prefix: str) -> list[str]:
        return [k for k in keys if k.startswith(prefix) and k[len(prefix) :] in own]

    prefix = max(sorted(prefixes), key=lambda p: len(read(p)))
    return prefix, read(prefix)


def save_jax(
    params: Mapping[str, Any],
    path: PathLike,
    layout: str | Layout = "flax",
    *,
    spec: MLPSpec | None = None,
) -> None:
    """Write a JAX tree in ``layout`` to a ``.safetensors`` file, as that layout.

    Raises:
      TypeError: ``params`` is not a mapping of JAX or NumPy arrays.
      ValueError: the tree does not match ``layout`` (or ``spec``), the layout's paths
        would not read back apart from a file (joined with ``.``, two keys are one),
        or the suffix is not ``.safetensors``.
    """
    _kind(path, _SAFETENSORS)
    layout = get_layout(layout)
    own = is_jax_model(params)
    params = layout_tree(params, layout)  # an Equinox model, with layout="equinox"
    if not isinstance(params, Mapping):
        raise type_error(f"params must be a dict-like JAX tree, got {type(params).__name__}")
    flat = _flatten(params)
    bad = [".".join(p) for p, v in flat.items() if not isinstance(v, (jax.Array, np.ndarray))]
    if bad:
        raise type_error(f"params leaves must be JAX or NumPy arrays; not: {', '.join(bad)}")
    spec = check_entries(flat, layout, spec, what=f"{layout.name}-layout params", from_model=own)
    clash = _key_clash(layout, spec.param_names())
    if clash:
        raise value_error(f"cannot write {os.fspath(path)}: {clash}")
    keyed = _keyed(layout)
    arrays = {
        keyed.path(name)[0]: np.ascontiguousarray(jax.device_get(flat[layout.path(name)]))
        for name in spec.param_names()
    }
    import safetensors.numpy

    with atomic_path(path) as tmp:
        _save_aligned(safetensors.numpy.save_file, arrays, tmp, _metadata(layout, spec))


#: XLA:CPU adopts a buffer without copying only on a 64-byte boundary (as in
#: ``equiv.convert``); safetensors starts the data right after its header.
_ALIGNMENT = 64
#: Metadata that moves the data to that boundary; readers ignore it.
PAD_KEY = "equiv.pad"


def _save_aligned(save_file, tensors: Mapping[str, Any], path: str, metadata: dict) -> None:
    """``save_file(tensors, path, metadata=...)`` with the data starting on a 64-byte
    boundary, so that ``load_jax(copy=False)`` adopts the file's memory map: the
    header's length is known only once written, so a file whose data starts elsewhere
    is written again with metadata padding (spaces) that moves it there. Each tensor
    after it is on the boundary where the sizes before it are multiples of 64 bytes
    (found in a user trial: a file save_torch wrote was copied whole by copy=False).

    >>> import os, tempfile, safetensors.numpy
    >>> path = os.path.join(tempfile.mkdtemp(), "a.safetensors")
    >>> _save_aligned(safetensors.numpy.save_file, {"w": np.zeros(3, np.float32)}, path, {})
    >>> _data_start(path) % _ALIGNMENT
    0
    """
    metadata = {**metadata, PAD_KEY: ""}
    save_file(tensors, path, metadata=metadata)
    start = _data_start(path)
    if start % _ALIGNMENT == 0:
        return
    with open(path, "rb") as file:
        file.seek(8)
        used = len(file.read(start - 8).rstrip(b" "))  # the JSON, without its padding
    metadata[PAD_KEY] = " " * (-(8 + used) % _ALIGNMENT)
    save_file(tensors, path, metadata=metadata)


def _data_start(path: str) -> int:
    """Where a safetensors file's data starts: after the 8-byte header length and the
    header."""
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
    return 8 + length


def _metadata(layout: Layout, spec: MLPSpec) -> dict[str, str]:
    """The layout a file is written in, and which of its layers have a bias (a layer
    without one cannot be told from a lost entry otherwise), as safetensors metadata
    (strings only).

    >>> _metadata(LAYOUTS["torch"], MLPSpec((4, 3, 2), bias=(True, False)))[BIAS_KEY]
    'True,False'
    """
    fields = {f"{LAYOUT_KEY}.{field}": str(getattr(layout, field)) for field in _LAYOUT_FIELDS}
    if layout.layers is not None:  # a model's own names (Layout's {name}): recorded too
        fields[f"{LAYOUT_KEY}.layers"] = ",".join(layout.layers)
    biases = ",".join(map(str, spec.biases))
    return {LAYOUT_KEY: layout.name, **fields, BIAS_KEY: biases}


def _recorded_biases(metadata: Mapping[str, str], shown: str) -> tuple[bool, ...] | None:
    """Whether each layer has a bias, as a file records it (:func:`_metadata`), or None
    for a file that records nothing (written before equiv recorded it, or by another
    tool)."""
    text = metadata.get(BIAS_KEY)
    if text is None:
        return None
    read = {"True": True, "False": False}
    values = text.split(",")
    if not all(value in read for value in values):
        raise value_error(
            f"{shown} records {BIAS_KEY}={text!r}, which is not one True or False per layer: "
            "the file is damaged. Read it with spec=MLPSpec(...), which says which layers "
            "have a bias, and save it again"
        )
    return tuple(read[value] for value in values)


def _recorded_layout(
    metadata: Mapping[str, str], given: Layout | None, shown: str
) -> Layout | None:
    """The layout a file records: its definition when written with one, else the
    built-in (or given) layout of that name; None when it records none."""
    name = metadata.get(LAYOUT_KEY)
    if name is None:
        return None
    fields = {field: metadata.get(f"{LAYOUT_KEY}.{field}") for field in _LAYOUT_FIELDS}
    if all(value is None for value in fields.values()):  # the name alone
        if name in LAYOUTS:
            return LAYOUTS[name]
        if given is not None and given.name == name:
            return given
        raise value_error(
            f"{shown} records layout {name!r} but not its paths: pass "
            f"file_layout=Layout({name!r}, ...) with the paths it was written with"
        )
    try:
        return _layout_from_fields(name, fields, metadata.get(f"{LAYOUT_KEY}.layers"))
    except _DAMAGE as exc:
        reason = (
            str(exc).removeprefix(PREFIX)
            if isinstance(exc, ValueError)
            else f"{type(exc).__name__}: {exc}"
        )
        raise value_error(
            f"{shown} records a damaged layout {name!r}: {reason}. Rewrite the file with "
            "equiv.save_torch or equiv.save_jax"
        ) from None


def _layout_from_fields(
    name: str, fields: Mapping[str, str | None], layers: str | None = None
) -> Layout:
    """The :class:`Layout` a file's metadata defines, checked to read its own
    parameters back; raises one of ``_DAMAGE`` if the definition is damaged."""
    missing = [f"{LAYOUT_KEY}.{field}" for field, value in fields.items() if value is None]
    if missing:
        raise ValueError(f"it has no {', '.join(missing)}")
    if fields["transpose"] not in ("True", "False"):
        raise ValueError(f"its transpose is {fields['transpose']!r}, not 'True' or 'False'")
    paths = fields["weight_path"], fields["bias_path"]
    named = None if layers is None else tuple(layers.split(","))
    layout = Layout(name, *paths, fields["transpose"] == "True", layers=named)
    try:
        clash = _key_clash(layout, ("fc1.weight", "fc1.bias"))
    except _DAMAGE as exc:
        raise ValueError(
            f"its paths {paths[0]!r} and {paths[1]!r} cannot be filled in with a layer "
            f"number ({type(exc).__name__}: {exc})"
        ) from None
    if clash:
        raise ValueError(clash)
    return layout


def _keyed(layout: Layout) -> Layout:
    """``layout`` as a file holds it: each path's keys joined with ``.`` into one key
    (``Dense_{j}/kernel`` is ``Dense_{j}.kernel``), so that a file's key is matched
    whole against the templates, never split on a ``.`` that a key itself holds.

    >>> _keyed(Layout("d", "block.{j}/kernel", "block.{j}/bias", True)).path("fc2.bias")
    ('block.1.bias',)
    """
    return dataclasses.replace(
        layout,
        weight_path=layout.weight_path.replace("/", "."),
        bias_path=layout.bias_path.replace("/", "."),
        layers=None if layout.layers is None else tuple(n.replace("/", ".") for n in layout.layers),
    )


def _key_clash(layout: Layout, names: Iterable[str]) -> str | None:
    """Why ``layout``'s file keys for ``names`` would not read back as those names
    (two paths joined into one key), or None when every one does.

    >>> clash = _key_clash(Layout("x", "a.{i}", "a/{i}", False), ["fc1.weight", "fc1.bias"])
    >>> "fc1.bias is stored as 'a.1', which reads back as fc1.weight" in clash
    True
    >>> _key_clash(Layout("y", "a.{i}", "a{i}/b", False), ["fc1.weight", "fc1.bias"]) is None
    True
    """
    names = list(names)
    try:
        read_back = _keyed(layout).torch_name
    except ValueError:
        # Joined, two paths are one (Layout refuses that): the first name holding a
        # key is what reading it gives.
        joined = {name: ".".join(layout.path(name)) for name in names}

        def read_back(path: tuple[str, ...]) -> str | None:
            return next((n for n in names if joined[n] == path[0]), None)

    clashes = [
        f"{name} is stored as {key!r}, which reads back as {read_back((key,)) or 'nothing'}"
        for name in names
        for key in [".".join(layout.path(name))]
        if read_back((key,)) != name
    ]
    if not clashes:
        return None
    return (
        f"the {layout.name!r} layout's paths do not read back from a file, which joins a "
        f"path's keys with '.': {'; '.join(clashes)}; choose paths that stay apart when joined"
    )


def layout_of_keys(keys: Iterable[str]) -> str | None:
    """The name of the built-in layout whose file keys all of ``keys`` are, or None.

    >>> layout_of_keys(["Dense_0.kernel", "Dense_0.bias"]), layout_of_keys(["0.weight"])
    ('flax', None)
    >>> layout_of_keys(["Dense_0/kernel", "Dense_0/bias"])  # flatten_dict(sep="/")'s
    'flax'
    """
    keys = list(keys)

    def holds(layout: Layout) -> bool:
        keyed = _keyed(layout)
        read = _layout_names(keys, keyed, numbered=False)
        return isinstance(read, list) or all(keyed.torch_name((k,)) for k in keys)

    return next((n for n, other in LAYOUTS.items() if holds(other)), None)


def _refuse_disagreeing_names(
    keys: list[str], recorded: Layout, given: Layout | None, shown: str
) -> None:
    """A ``ValueError`` if none of a file's keys is a name of the layout it records:
    its metadata and its names disagree, and no argument can settle which is right."""
    keyed = _keyed(recorded)
    if not keys or any(keyed.torch_name((key,)) for key in keys):
        return  # some or all match: check_entries names any others
    theirs = layout_of_keys(keys)
    found = ", ".join(map(repr, keys[:3])) + (", ..." if len(keys) > 3 else "")
    names = f"the names of the {theirs!r} layout" if theirs else "names of another layout"
    read_as = f"file_layout={theirs!r}" if theirs else "file_layout=Layout(...) naming its paths"
    override = " (file_layout does not override what a file records)" if given else ""
    raise value_error(
        f"{shown} records layout {recorded.name!r}, but its entries ({found}) have {names}: "
        f"its metadata and its names disagree, as in a damaged or hand-edited file{override}. "
        "Repair it: rewrite its tensors without metadata, safetensors.torch.save_file("
        f"safetensors.torch.load_file(path), path), read that with {read_as}, and save "
        "it again with equiv.save_torch or equiv.save_jax"
    )


def load_jax(
    path: PathLike,
    layout: str | Layout = "flax",
    *,
    spec: MLPSpec | None = None,
    file_layout: str | Layout | None = None,
    entry: str | None = None,
    device: jax.Device | str | None = None,
    copy: bool = True,
) -> dict[str, Any]:
    """Read a checkpoint (any layout, or a torch ``.pt``) as a JAX tree in ``layout``.

    One copy of the parameters is made: a plain one when the file is in ``layout``,
    a transposing one otherwise (never two). safetensors reads a file as a private
    memory map; with ``copy=False`` the arrays adopt it where the layouts allow
    (no copy, pages read lazily): they then change, or fault, if the file is
    rewritten in place. equiv's own writers replace files atomically, which is safe.

    float64 files need JAX's x64 mode, as for :func:`equiv.convert.torch_to_jax`.
    ``spec``, ``file_layout`` and ``entry`` are :func:`load_torch`'s.

    Raises:
      ValueError: as :func:`load_torch`, or float64 data while x64 is off.
    """
    # Transposed weights are read as views: converting them back to the file's own
    # layout is then a plain copy (or none), not two transposes.
    state, spec = _load_state(path, spec, file_layout, entry, contiguous=False)
    return torch_to_jax(state, layout=layout, spec=spec, copy=copy, device=device)


# ---------------------------------------------------------------------------
# Reading


class _File(NamedTuple):
    """What :func:`_read_file` reads."""

    #: The tensors keyed by ``(file key,)``.
    flat: dict
    #: The layout they are in, as the file holds it (:func:`_keyed`).
    layout: Layout
    #: Each key :func:`_foreign_keys` read under another name: ``{name read: file key}``.
    renamed: dict[str, str]
    #: Whether each layer has a bias, where the file records it (equiv's files do).
    biases: tuple[bool, ...] | None


def _read(
    path: PathLike, file_layout: str | Layout | None, entry: str | None = None
) -> tuple[dict, Layout]:
    """The file's tensors keyed by ``(file key,)``, and the layout they are in, as
    the file holds it (:func:`_keyed`)."""
    read = _read_file(path, file_layout, entry)
    return read.flat, read.layout


def _read_file(
    path: PathLike,
    file_layout: str | Layout | None,
    entry: str | None = None,
    numbered: bool = True,
) -> _File:
    """:func:`_read`, with what else the file says; ``numbered`` is
    :func:`_foreign_keys`'s."""
    renamed: dict[str, str] = {}
    kind = _kind(path, _SAFETENSORS + _PICKLES)
    shown = os.fspath(path)
    if os.path.isdir(shown):
        raise IsADirectoryError(
            message(f"{shown} is a folder, not a checkpoint file: give the path of a file")
        )
    given = None if file_layout is None else get_layout(file_layout)
    if kind in _PICKLES:
        # A pickle records no layout: its names are read in the one the caller names.
        layout = _keyed(given or LAYOUTS["torch"])
        tensors = _foreign_keys(_read_pickle(shown, entry), layout, numbered, renamed, shown)
        return _File({(n,): t for n, t in tensors.items()}, layout, renamed, None)
    if entry is not None:
        raise value_error(
            f"entry={entry!r} was given, but {shown} is a safetensors file, which holds one "
            "flat mapping of tensors and no entries: drop entry"
        )
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(shown, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        misnamed = _misnamed(shown, kind)
        if misnamed:
            raise value_error(misnamed) from exc
        raise value_error(f"{shown} is not a readable safetensors file: {exc}") from exc
    recorded = _recorded_layout(metadata, given, shown)
    if recorded is not None:
        _refuse_disagreeing_names(list(tensors), recorded, given, shown)
    if recorded is not None and given is not None and given != recorded:
        # Names tell built-in layouts apart; two definitions under one name need more.
        show = repr if given.name == recorded.name else (lambda layout: repr(layout.name))
        raise value_error(
            f"{shown} records layout {show(recorded)}, but file_layout={show(given)} was "
            "given; drop file_layout to use the recorded one"
        )
    layout = _keyed(recorded or given or LAYOUTS["torch"])
    if recorded is None:
        tensors = _foreign_keys(tensors, layout, numbered, renamed, shown)
    biases = _recorded_biases(metadata, shown)
    return _File({(key,): t for key, t in tensors.items()}, layout, renamed, biases)


def _format(path: str) -> str | None:
    """What a file's first bytes say it is: ``"safetensors"`` (an 8-byte header length,
    then ``{``), ``"zip"`` (torch.save's format), or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return None
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
        return "safetensors"
    return None


def _misnamed(path: str, kind: str) -> str | None:
    """Why a file that is not what its suffix says cannot be read, or None (found in a
    user trial: a safetensors file named .pt was said to hold more than tensors)."""
    found = _format(path)
    if kind in _PICKLES and found == "safetensors":
        return f"{path} is a safetensors file under a {kind} name: rename it to .safetensors"
    if kind in _SAFETENSORS and found == "zip":
        return f"{path} is a torch.save file under a {kind} name: rename it to .pt"
    return None


#: torch.load's warning for a sparse COO tensor (torch 2.11), which equiv refuses anyway.
_SPARSE_INVARIANTS = "Sparse invariant checks are implicitly disabled"
#: torch.load's warning for a pickle of another protocol than torch.save's legacy 2.
_PICKLE_PROTOCOL = "Detected pickle protocol"


def _read_pickle(path: str, entry: str | None = None) -> dict[str, torch.Tensor]:
    try:
        with warnings.catch_warnings():
            # torch 2.11 warns that it does not check a loaded sparse COO tensor's
            # invariants. equiv refuses sparse tensors by name just below and never uses
            # one; under -W error the warning made such a file "not a readable torch file"
            # (seen on the GPU machine's torch 2.11).
            warnings.filterwarnings("ignore", _SPARSE_INVARIANTS, UserWarning)
            # And that a pickle's protocol is not 2: such a file is refused just below,
            # with the reason (_unreadable), which -W error would hide.
            warnings.filterwarnings("ignore", _PICKLE_PROTOCOL, UserWarning)
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise  # missing or not ours to read: the OS's message says which
    except Exception as exc:  # noqa: BLE001 - every failure is told in one message
        # torch 2.13 raises OSError(EINVAL) for most truncations of a zip (found in a
        # user trial: 121 of 164 cut points of a 16 KB file, a bare "Invalid argument").
        # Looked at only when torch.load fails: a file under the wrong suffix first.
        raise value_error(
            _misnamed(path, os.path.splitext(path)[1].lower()) or _unreadable(path, exc)
        ) from exc
    top = loaded
    if entry is not None:
        loaded = _entry(loaded, entry, path)
    if not isinstance(loaded, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in loaded.values()
    ):
        where = f"{path}'s entry {entry!r}" if entry is not None else path
        # The largest first; of equal ones, the shallowest ("model" before "ema/model":
        # found in a user trial, the moving average was offered as "the largest").
        sized = sorted(_state_dicts_in(top), key=lambda f: (-f[0], f[1].count("/")))
        found = [name for _, name in sized]
        advice = "save model.state_dict() (for a training checkpoint, the entry holding it)"
        if len(found) == 1:
            advice = f"pass entry={found[0]!r}, which holds one"
        elif found:
            others = ", ".join(map(repr, found[1:]))
            which = "the largest" if sized[0][0] > sized[1][0] else "of the largest, the shallowest"
            advice = f"pass entry={found[0]!r}, {which} that holds one (others: {others})"
        raise value_error(
            f"{where} holds {_described(loaded)}, not a state_dict of tensors; {advice}"
        )
    keys = [k for k in loaded if not isinstance(k, str)]
    if keys:
        raise value_error(
            f"{path} holds a state_dict whose keys are not all names: "
            f"{', '.join(f'{k!r} ({type(k).__name__})' for k in keys[:6])}; equiv reads "
            "parameters by name ('fc1.weight', ...)"
        )
    problems = _without_dense_values(loaded)
    if problems:
        raise value_error(
            f"{path} holds {problems}; equiv reads dense tensors with values: save them so "
            f"({_DENSE_ADVICE})"
        )
    # torch.save keeps ties: tensors that shared memory when saved share it when
    # loaded, so an in-place update of one would change the others. Untie them.
    storages = collections.Counter(t.untyped_storage().data_ptr() for t in loaded.values())
    return {
        name: t.clone() if storages[t.untyped_storage().data_ptr()] > 1 else _owning(t)
        for name, t in loaded.items()
    }


#: Classes that training checkpoints hold beside the state_dict (hyper-parameters) and
#: that only record attributes: the classes refusal advice may offer to allow.
_PLAIN_RECORDS = (
    "argparse.Namespace",
    "lightning.fabric.utilities.data.AttributeDict",
    "pytorch_lightning.utilities.parsing.AttributeDict",
)


def _unreadable(path: str, exc: Exception) -> str:
    """What ``torch.load``'s failure ``exc`` on ``path`` means to the caller."""
    if isinstance(exc, pickle.UnpicklingError):
        reason = _weights_only_reason(exc)
        head = _head(path)
        if _format(path) != "zip":
            # Found in a user trial: a file of bytes and a state_dict written by
            # pickle.dump were both said to "hold more than tensors", quoting torch's
            # request to file an issue. torch.save writes a zip, or (legacy) a pickle
            # of protocol 2 whose tensors are torch's persistent ids.
            protocol = head[1] if head[:1] == b"\x80" and len(head) > 1 else None
            if protocol is None or not 2 <= protocol <= pickle.HIGHEST_PROTOCOL:
                return (
                    f"{path} is not a file torch.save writes (a zip archive, or in its legacy "
                    f"format a pickle of protocol 2): it starts with {head!r}"
                )
            if protocol > 2 or "torch.storage._load_from_bytes" in reason:
                return (
                    f"{path} is a pickle (protocol {protocol}) as pickle.dump writes it, not "
                    "a torch.save file, and was not unpickled (a pickle can run code; "
                    "torch.load(weights_only=True) reads torch.save's files only). If you "
                    "trust it, save it again with torch: with open(path, 'rb') as f: "
                    "torch.save(pickle.load(f), 'model.pt')"
                )
        named = re.search(r"GLOBAL ([\w.]+) was not an allowed global", reason)
        trust = ""
        if named and named[1] in _PLAIN_RECORDS:
            # Found in a user trial: a Lightning checkpoint's hyper_parameters held an
            # argparse.Namespace, and nothing said how to read its state_dict. Only
            # classes known to hold plain attributes are offered: a global such as
            # io.open or os.system is what a malicious pickle calls.
            trust = (
                f". If you trust the file, allow that class, which holds plain attributes: "
                f"with torch.serialization.safe_globals([{named[1]}]): "
                "equiv.load_torch(path, ...)"
            )
        return (
            f"{path} holds more than tensors and was not unpickled (a pickle can run code; "
            f"torch.load(weights_only=True) refused it: {reason}){trust}"
        )
    # A damaged zip or pickle stream fails in torch.load wherever the damage is met:
    # RuntimeError and EOFError for truncation, and UnicodeDecodeError, KeyError,
    # IndexError or ValueError for a changed byte (found by fuzzing:
    # tests/test_checkpoint.py). All of them mean one thing to the caller.
    reason = str(exc) or "empty or truncated"
    if isinstance(exc, OSError):
        reason = f"damaged or truncated: torch.load failed with {exc.strerror or exc}"
    elif not isinstance(exc, RuntimeError):
        reason = f"{type(exc).__name__}: {reason}"
    return f"{path} is not a readable torch file: {reason}"


def _weights_only_reason(exc: Exception) -> str:
    """The sentence of ``torch.load(weights_only=True)``'s refusal that names what it
    refused: its message is a page of advice, and in torch 2.13 the reason sits on a
    line of its own after ``WeightsUnpickler error:``, or says a GLOBAL is blocked.

    >>> _weights_only_reason(pickle.UnpicklingError(
    ...     "Weights only load failed. Please file an issue: WeightsUnpickler error: "
    ...     "\\n\\nUnsupported operand 149\\n\\nCheck the documentation"))
    'WeightsUnpickler error: Unsupported operand 149'
    """
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        sentence = text.split(marker, 1)[1].strip().split("\n\n")[0].split(". ")[0].strip()
        if sentence:
            return f"{marker} {sentence}"
    blocked = re.search(r"Trying to load unsupported GLOBAL [^\n]*", text)
    return blocked[0].rstrip(".") if blocked else type(exc).__name__


def _head(path: str, size: int = 12) -> bytes:
    """A file's first bytes (empty if it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError:
        return b""


def _entry(loaded: Any, entry: str, path: str) -> Any:
    """``loaded[a][b]`` for ``entry="a/b"``, or a ``ValueError`` naming the keys there.

    In a state_dict, whose keys a module's own prefixes (``model.0.weight``), a step is
    such a prefix too: ``entry="state_dict/model"`` holds ``0.weight``, ... (found in a
    user trial: a Lightning state_dict holding ``model.*`` and ``ema_model.*`` could not
    be read).

    >>> import torch
    >>> state = {"model.0.weight": torch.ones(1), "ema.0.weight": torch.zeros(1)}
    >>> list(_entry({"state_dict": state}, "state_dict/model", "f.ckpt"))
    ['0.weight']
    """
    value = loaded
    for depth, key in enumerate(entry.split("/")):
        if isinstance(value, Mapping) and key not in value and _tensors_only(value):
            inner = {k[len(key) + 1 :]: v for k, v in value.items() if k.startswith(key + ".")}
            if inner:
                value = inner
                continue
        if not isinstance(value, Mapping) or key not in value:
            at = "/".join(entry.split("/")[:depth]) or "the top"
            keys = list(value) if isinstance(value, Mapping) else []
            holds = (
                f"its keys are {', '.join(map(repr, keys[:8]))}" + (", ..." if keys[8:] else "")
                if keys
                else f"it holds {_described(value)}"
            )
            raise value_error(f"{path} has no entry {entry!r}: at {at}, {holds}")
        value = value[key]
    return value


def _tensors_only(value: Mapping) -> bool:
    """Whether ``value`` is a state_dict: string keys, tensor values."""
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _state_dicts_in(loaded: Any, prefix: str = "", depth: int = 2) -> list[tuple[int, str]]:
    """The entries (``/``-joined keys, at most ``depth`` deep) of a loaded pickle that
    are state_dicts (non-empty mappings of names to tensors), with their sizes."""
    if not isinstance(loaded, Mapping) or depth == 0:
        return []
    found: list[tuple[int, str]] = []
    for key, value in loaded.items():
        if not isinstance(key, str):
            continue
        name = f"{prefix}{key}"
        if (
            isinstance(value, Mapping)
            and value
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
        ):
            found.append((len(value), name))
        else:
            found += _state_dicts_in(value, f"{name}/", depth - 1)
    return found


def _described(value: Any) -> str:
    """What a loaded pickle's value is, in a few words: ``a dict of 'model' (dict),
    'epoch' (int)``."""
    if isinstance(value, Mapping):
        entries = [f"{k!r} ({type(v).__name__})" for k, v in list(value.items())[:6]]
        more = ", ..." if len(value) > 6 else ""
        return (
            f"a {type(value).__name__} of {', '.join(entries)}{more}"
            if entries
            else "an empty dict"
        )
    return f"a {type(value).__name__}"


def _without_dense_values(tensors: Mapping[str, torch.Tensor]) -> str:
    """The tensors that hold no dense values to read (sparse of any layout, nested,
    on the meta device), named with what they are; empty when there are none.

    >>> _without_dense_values({"a": torch.zeros(2).to_sparse(), "b": torch.zeros(2)})
    "tensors without dense values: 'a' (sparse_coo)"
    """
    problems = [f"{name!r} ({what})" for name, t in tensors.items() if (what := missing_values(t))]
    return f"tensors without dense values: {', '.join(problems)}" if problems else ""


def _owning(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, copied when it is a view of a larger storage: ``torch.save``
    writes a tensor's whole storage (a slice of a flat buffer would write all of
    it), and a loaded view would keep all of it alive.

    >>> flat = torch.zeros(1000)
    >>> _owning(flat[:12]).untyped_storage().nbytes(), _owning(flat) is flat
    (48, True)
    """
    if tensor.storage_offset() or tensor.untyped_storage().nbytes() > tensor.nbytes:
        return tensor.clone()
    return tensor


def _kind(path: PathLike, allowed: tuple[str, ...]) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise type_error(f"path must be a str or os.PathLike, got {type(path).__name__}")
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in allowed:
        raise value_error(
            f"{os.fspath(path)!r}: unsupported suffix {suffix!r}; expected {', '.join(allowed)}"
        )
    return suffix


# ---------------------------------------------------------------------------
# Writing
