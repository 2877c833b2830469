"""The ``equiv-compare`` command (also ``python scripts/compare_frameworks.py``).

Argument parsing and printing only: the work is :func:`equiv.harness.compare_backends`,
the report is :mod:`equiv.render`, the JSON is :meth:`equiv.harness.Comparison.to_dict`.

Exit status:

* 0: every backend agrees with every other (and with the float64 reference);
* 1: some leaf disagrees (the report lists every failing leaf);
* 2: bad input (a width below 1, an unknown dtype, device, precision or backend, a
  malformed number, ``--rtol`` without ``--atol``, an unwritable ``--json`` path, a
  comparison that cannot fit in this machine's memory, :mod:`equiv.memory`):
  one ``[equiv] ...`` line on stderr, no traceback, nothing computed.

Example:
  >>> main(["--sizes", "4,0,2"])  # prints "[equiv] every width must be at least 1, ..."
  2
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import re
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from equiv._messages import PREFIX, message
from equiv.activations import ACTIVATIONS
from equiv.checkpoint import _load_state
from equiv.compare import json_safe
from equiv.convert import LAYOUTS
from equiv.files import atomic_path, create_beside, read_only
from equiv.harness import BACKENDS, compare_backends
from equiv.losses import LOSSES
from equiv.optimizers import OPTIMIZERS, OptimizerSpec
from equiv.plot import plot_divergence, plot_format
from equiv.problem import make_problem
from equiv.render import make_console, print_comparison
from equiv.spec import DTYPES, HALF_DTYPES, MLPSpec
from equiv.torch_mlp import TORCH_DTYPES

_OPTIMIZER_FIELDS = ("momentum", "dampening", "nesterov", "weight_decay", "betas", "eps", "amsgrad")

_SEED_LIMIT = 2**64  # torch.manual_seed takes seeds below 2**64


class UsageError(Exception):
    """Bad command-line input; the message is one line without the prefix."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the usage block and exits on a bad argument; we want one
    # prefixed line and an exit status from main() instead.
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message}; see --help")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``equiv-compare`` (syntax only; the library checks values)."""
    parser = _Parser(
        prog="equiv-compare",
        description=(
            "Run training steps of one MLP in PyTorch, by hand (no autodiff) and in JAX, from the "
            "same parameters and batches, and compare loss, gradients and updated parameters "
            "leaf by leaf against derived bounds and a float64 hand-derived reference. The "
            "defaults replay the notebook: a 4-3-2 ReLU MLP after torch.manual_seed(0), MSE, "
            "SGD at lr 0.1."
        ),
        epilog="Exit status: 0 all agree, 1 some leaf disagrees, 2 bad input.",
    )
    add = parser.add_argument
    add(
        "--sizes",
        type=_sizes,
        default=None,
        metavar="W,W,...",
        help="layer widths, input first (default: 4,3,2, or the --params file's)",
    )
    add(
        "--params",
        default=None,
        metavar="PATH",
        help="start from the parameters in this checkpoint instead of drawing them "
        "(.safetensors in any layout, .pt/.pth/.bin/.ckpt state_dict); its sizes, bias and "
        "dtype are the model's, and --seed still draws the batches",
    )
    add(
        "--entry",
        default=None,
        metavar="KEY",
        help="the key of a .pt training checkpoint that holds the state_dict "
        "(e.g. model; / for nested keys)",
    )
    add(
        "--file-layout",
        default=None,
        metavar="NAME",
        help=f"the layout of the names in a --params file that records none (a safetensors "
        f"file without equiv's metadata, or a .pt): one of {', '.join(LAYOUTS)} "
        "(default: torch)",
    )
    add("--batch", type=int, default=2, metavar="N", help="batch size (default: 2)")
    add(
        "--seed",
        type=_seed,
        default=0,
        metavar="N",
        help="torch seed for the initial parameters (unless --params) and the batches (default: 0)",
    )
    add(
        "--lr",
        type=_finite_float,
        default=0.1,
        metavar="X",
        help="the optimizer's learning rate (default: 0.1)",
    )
    add(
        "--steps",
        type=int,
        default=1,
        metavar="N",
        help="training steps, a fresh batch each (default: 1)",
    )
    add(
        "--dtype",
        default=None,
        metavar="DTYPE",
        help=f"one of {', '.join(DTYPES)} (default: float32, or the --params file's; a "
        "bfloat16 or float16 file needs it, and its values are compared as this dtype holds "
        "them, exactly)",
    )
    add(
        "--device",
        default="cpu",
        metavar="DEVICE",
        help="cpu, cuda or cuda:N, for torch and JAX alike (default: cpu)",
    )
    bias = parser.add_mutually_exclusive_group()
    bias.add_argument("--no-bias", action="store_true", help="layers without bias")
    bias.add_argument(
        "--bias",
        type=_bias_pattern,
        default=None,
        metavar="1|0[,1|0...]",
        help="which Linear layers have a bias, one 1 or 0 per layer, fc1 first, or one "
        "for all (default: every layer; --bias 1,0,1 leaves fc2 without one)",
    )
    add(
        "--activation",
        type=_names,
        default=("relu",),
        metavar="NAME[,NAME...]",
        help=f"between layers, one name or one per hidden layer: {', '.join(ACTIVATIONS)} "
        "(default: relu)",
    )
    add(
        "--negative-slope",
        type=_finite_float,
        default=None,
        metavar="X",
        help="leaky_relu's slope (default: 0.01)",
    )
    add(
        "--elu-alpha",
        type=_finite_float,
        default=None,
        metavar="X",
        help="elu's alpha (default: 1.0)",
    )
    add(
        "--loss",
        default="mse",
        metavar="NAME",
        help=f"one of {', '.join(LOSSES)} (default: mse, torch's MSELoss)",
    )
    add(
        "--label-smoothing",
        type=_finite_float,
        default=None,
        metavar="X",
        help="cross-entropy label smoothing (default: 0)",
    )
    add(
        "--huber-delta",
        type=_finite_float,
        default=None,
        metavar="X",
        help="huber's delta (default: 1.0)",
    )
    add(
        "--smooth-l1-beta",
        type=_finite_float,
        default=None,
        metavar="X",
        help="smooth_l1's beta (default: 1.0)",
    )
    add(
        "--optimizer",
        default="sgd",
        metavar="NAME",
        help=f"one of {', '.join(OPTIMIZERS)}, with torch.optim's semantics (default: sgd); "
        "its learning rate is --lr",
    )
    add("--momentum", type=_finite_float, default=None, metavar="X", help="SGD momentum")
    add("--dampening", type=_finite_float, default=None, metavar="X", help="SGD dampening")
    add("--nesterov", action="store_true", default=None, help="SGD Nesterov momentum")
    add(
        "--weight-decay",
        type=_finite_float,
        default=None,
        metavar="X",
        help="weight decay (default: torch's, 0 for SGD and Adam, 1e-2 for AdamW)",
    )
    add("--betas", type=_betas, default=None, metavar="B1,B2", help="Adam/AdamW betas")
    add("--eps", type=_finite_float, default=None, metavar="X", help="Adam/AdamW eps")
    add("--amsgrad", action="store_true", default=None, help="Adam/AdamW AMSGrad (torch's)")
    add(
        "--plot",
        default=None,
        metavar="PATH",
        help="also plot how the differences grow over the steps (PNG, or the format the "
        "suffix names: .svg, .pdf; needs matplotlib)",
    )
    add(
        "--precision",
        default="exact",
        metavar="MODE",
        help="exact: IEEE float32 matmuls, no TF32, in a scope (default); "
        "native: keep the current torch and JAX settings",
    )
    add(
        "--rtol",
        type=_finite_float,
        default=None,
        metavar="X",
        help="a fixed relative tolerance instead of derived bounds (needs --atol)",
    )
    add(
        "--atol",
        type=_finite_float,
        default=None,
        metavar="X",
        help="a fixed absolute tolerance instead of derived bounds (needs --rtol)",
    )
    add(
        "--backends",
        type=_names,
        default=BACKENDS,
        metavar="NAME,...",
        help=f"backends to compare, from {','.join(BACKENDS)} (default: all)",
    )
    add(
        "--json",
        default=None,
        metavar="PATH",
        help="also write the report as JSON (agree, loss, params, diffs, config, settings); "
        "- writes it to standard output and the report to standard error",
    )
    add("--version", action="version", version=f"%(prog)s {_version()}")
    return parser


#: Model options and what they apply to: (MLPSpec field, "activation" or "loss", names).
_MODEL_OPTIONS = {
    "--negative-slope": ("negative_slope", "activation", ("leaky_relu",)),
    "--elu-alpha": ("elu_alpha", "activation", ("elu",)),
    "--label-smoothing": ("label_smoothing", "loss", ("cross_entropy", "cross_entropy_probs")),
    "--huber-delta": ("huber_delta", "loss", ("huber",)),
    "--smooth-l1-beta": ("smooth_l1_beta", "loss", ("smooth_l1",)),
}


def _model_options(args: argparse.Namespace) -> dict[str, float]:
    """The MLPSpec fields the model options give; an option that the chosen activations
    or loss do not use is refused, as an optimizer's are (``--label-smoothing`` with
    MSE printed PASS with the smoothing ignored: found in a user trial)."""
    out = {}
    for option, (field, kind, names) in _MODEL_OPTIONS.items():
        value = getattr(args, field)
        if value is None:
            continue
        chosen = args.activation if kind == "activation" else (args.loss,)
        if not set(chosen) & set(names):
            raise UsageError(
                f"{option} applies to the {' or '.join(names)} {kind} only, and "
                f"--{kind} is {','.join(chosen)}: leave it out, or choose that {kind}"
            )
        out[field] = value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison the arguments describe, print the report, return the exit status.

    Args:
      argv: the arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
      0 when all agree, 1 when some leaf disagrees, 2 for bad input.
    """
    try:
        args = build_parser().parse_args(argv)
        if (args.rtol is None) != (args.atol is None):
            # The library says the same; saying it here names the options.
            raise UsageError(
                "give --rtol and --atol both, or neither to use derived bounds; "
                f"got --rtol {args.rtol}, --atol {args.atol}"
            )
        params, shape = _initial_params(args)
        spec = MLPSpec(
            **shape,
            activation=args.activation[0] if len(args.activation) == 1 else args.activation,
            loss=args.loss,
            **_model_options(args),
        )
        optimizer = OptimizerSpec(
            args.optimizer,
            learning_rate=args.lr,
            **{
                field: getattr(args, field)
                for field in _OPTIMIZER_FIELDS
                if getattr(args, field) is not None
            },
        )
        for option, path in (("--json", args.json), ("--plot", args.plot)):
            if path is not None and not (option == "--json" and path == "-"):
                check_writable(path, option)
        if args.plot is not None:
            with contextlib.suppress(ImportError):  # said after the comparison
                plot_format(args.plot)  # a suffix matplotlib cannot write, before any work
        phases = list(args.backends) + ["reference", "compare"]
        problem = None
        if params is not None:
            problem = make_problem(
                spec, batch_size=args.batch, seed=args.seed, steps=args.steps, params=params
            )
        with _progress_bar(len(phases)) as advance:
            comparison = compare_backends(
                None if problem else spec,
                problem=problem,
                progress=advance,
                batch_size=args.batch,
                seed=args.seed,
                learning_rate=args.lr,
                optimizer=optimizer,
                steps=args.steps,
                device=args.device,
                backends=args.backends,
                precision=args.precision,
                rtol=args.rtol,
                atol=args.atol,
            )
    except SystemExit as exit_:  # --help and --version
        return int(exit_.code or 0)
    except UsageError as error:
        return _bad_input(str(error))
    except (ValueError, TypeError) as error:
        if not str(error).startswith(PREFIX):
            raise  # not a message about the input: a bug, keep its traceback
        # The library names its arguments; here they are options (found in review).
        return _bad_input(re.sub(r"loss='(\w+)'", r"--loss \1", str(error)))
    # --json - writes the JSON to standard output, the report to standard error.
    console = make_console(sys.stderr) if args.json == "-" else None
    try:
        print_comparison(comparison, console, seed=args.seed, params=args.params)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader stopped reading (`equiv-compare | head`): the verdict still
        # decides the exit status, and --json/--plot are still written. Python's own
        # flush at exit would fail again, so stdout goes to devnull (Python's docs).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if args.plot is not None:
        try:
            plot_divergence(comparison, args.plot)
        except ImportError as error:
            return _bad_input(f"--plot needs matplotlib: pip install matplotlib ({error})")
    if args.json is not None:
        try:
            data = comparison.to_dict()
            data["config"].setdefault("seed", args.seed)  # the problem does not record it
            if args.params is not None:
                data["config"]["params"] = args.params
            if args.json == "-":
                sys.stdout.write(json_text(data))
            else:
                write_json(args.json, data)
        except OSError as error:
            return _bad_input(f"cannot write --json {args.json!r}: {error.strerror or error}")
    return 0 if comparison.agree else 1


def _foreign_names_advice(args: argparse.Namespace) -> str | None:
    """What to do, from the command line, about a ``--params`` file none of whose names
    is one of the layout read (the library's advice is Python's), or None."""
    from equiv.checkpoint import _read, layout_of_keys  # noqa: PLC0415 - the reader's view

    try:
        flat, layout = _read(args.params, args.file_layout, args.entry)
    except (ValueError, OSError):
        return None  # the load's own error says what is wrong
    if not flat or any(layout.torch_name(key) for key in flat):
        return None
    if args.file_layout not in (None, "torch"):
        # Found in a user trial: an nn.Sequential's file read with --file-layout flax
        # was told to convert it in Python; it reads as it is without the option.
        try:
            _load_state(args.params, None, None, args.entry, contiguous=True, biases=args.bias)
        except (ValueError, OSError):
            pass
        else:
            return (
                f"its names are not the {args.file_layout} layout's, and it reads without "
                f"--file-layout {args.file_layout}: leave that out"
            )
    theirs = layout_of_keys(key for (key,) in flat)
    if theirs is not None:
        return f"its names are the {theirs} layout's: add --file-layout {theirs}"
    found = ", ".join(repr(key[0]) for key in list(flat)[:4]) + (", ..." if len(flat) > 4 else "")
    entry = f", entry={args.entry!r}" if args.entry is not None else ""
    return (
        f"its names ({found}) are a module's own, not a layout's, and only the module "
        "tells which Linear layer each is. Convert it in Python with the module: "
        f"equiv.load_torch(path{entry}, out=module), then equiv.save_torch(module, "
        "'model.safetensors'), and pass --params model.safetensors"
    )


def _read_params(args: argparse.Namespace) -> tuple[dict, MLPSpec]:
    """The ``--params`` file's state_dict and spec. A file's entries cannot tell a layer without
    a bias from a lost entry (:func:`equiv.convert.check_entries`): ``--bias`` says
    which layers have one, and a file that holds other biases is read as it is, for
    the comparison with ``--bias`` to say so."""
    read = functools.partial(
        _load_state, args.params, None, args.file_layout, args.entry, contiguous=True
    )
    if args.bias is None:
        return read()
    try:
        return read(biases=args.bias)
    except ValueError:
        pass
    # Read as the file is: where that fails too, its error carries the pattern the
    # file holds (found in review: --bias 1,1,0 for a file of 1,0,1 got the error of
    # the read with --bias's pattern, which names none).
    return read()


def _initial_params(args: argparse.Namespace) -> tuple[dict | None, dict[str, Any]]:
    """The ``--params`` file's state_dict (None without one) and the MLPSpec fields
    for the model's shape (sizes, bias, dtype): the file's, which ``--sizes``,
    ``--no-bias`` and ``--dtype`` may repeat but not contradict."""
    given = {
        "sizes": args.sizes,
        "bias": False if args.no_bias else args.bias,
        "dtype": args.dtype,
    }
    if args.dtype is not None and args.dtype not in DTYPES:
        half = (
            f" (a comparison runs in one of them; a {args.dtype} --params file is compared "
            "as --dtype float32, exactly)"
            if args.dtype in HALF_DTYPES
            else ""
        )
        raise UsageError(f"unknown dtype {args.dtype!r}; expected one of {', '.join(DTYPES)}{half}")
    if args.params is None:
        for option in ("--entry", "--file-layout"):
            if getattr(args, option[2:].replace("-", "_")) is not None:
                raise UsageError(f"{option} describes a --params file; give --params too")
        defaults = {"sizes": (4, 3, 2), "bias": True, "dtype": "float32"}
        shape = {k: defaults[k] if v is None else v for k, v in given.items()}
        layers = _layer_biases(args.bias, shape["sizes"])
        return None, {**shape, "bias": shape["bias"] if layers is None else layers}
    try:
        state, found = _read_params(args)
    except OSError as error:
        raise UsageError(
            f"cannot read --params {args.params!r}: {error.strerror or error}"
        ) from None
    except ValueError as error:
        advice = _foreign_names_advice(args)
        if advice is not None:
            raise UsageError(f"--params {args.params!r}: {advice}") from None
        text = str(error).removeprefix(PREFIX)
        # The library's advice for a bias on some layers only names spec=; here it is
        # --bias.
        text, told = re.subn(
            r"say so: spec=MLPSpec\(\([^)]*\), bias=\(([^)]*)\)\)",
            lambda m: (
                "say so: "
                + ("add " if args.bias is None else "")
                + "--bias "
                + ",".join("1" if word.strip() == "True" else "0" for word in m[1].split(","))
                + ("" if args.bias is None else f" (not {_shown_bias(args.bias)[5:]})")
            ),
            text,
        )
        if told:
            text = text.replace("Pass spec=MLPSpec(...) to state the architecture; the", "The")
            raise UsageError(f"--params {args.params!r}: {text}") from None
        if "file_layout" in text:
            # Found in a user trial: "drop file_layout" where the option is --file-layout.
            text = re.sub(r"\bfile_layout='(\w+)'", r"--file-layout \1", text)
            text = text.replace("drop file_layout", "leave out --file-layout")
            raise UsageError(f"--params {args.params!r}: {text}") from None
        if "entry=" not in text:
            raise
        # The library's advice names its argument; on the command line it is an option.
        # A key is quoted for the shell where it needs it ('my model'); Python's repr
        # may have used either quote ("it's").
        pattern = r"""(pass )?entry=(['"])(.*?)\2"""
        raise UsageError(
            re.sub(
                pattern,
                lambda m: ("add " if m[1] else "") + f"--entry {shlex.quote(m[3])}",
                text,
            )
        ) from None
    if found.dtype in HALF_DTYPES:
        # A comparison runs in float32 or float64; every half-precision value is one of
        # theirs exactly, so the file's model is compared as it is, once asked to.
        if args.dtype is None:
            raise UsageError(
                f"--params {args.params!r} holds {found.dtype} parameters, and a comparison "
                f"runs in {' or '.join(DTYPES)}: add --dtype float32 to compare them as "
                f"float32 (each {found.dtype} value is a float32 one, exactly)"
            )
        state = {name: tensor.to(TORCH_DTYPES[args.dtype]) for name, tensor in state.items()}
        found = found.replace(dtype=args.dtype)
    if args.bias is not None:
        given["bias"] = _layer_biases(args.bias, found.sizes)
    options = {
        "sizes": "--sizes",
        "bias": "--no-bias" if args.no_bias else "--bias",
        "dtype": "--dtype",
    }
    shown = {
        "sizes": lambda v: f"sizes {','.join(map(str, v))}",
        "bias": _shown_bias,
        "dtype": str,
    }
    for field, value in given.items():
        if value is not None and value != getattr(found, field):
            said = args.bias if field == "bias" and args.bias is not None else value
            raise UsageError(
                f"{options[field]} says {shown[field](said)}, but --params {args.params!r} "
                f"holds {shown[field](getattr(found, field))}: leave {options[field]} out "
                "(the file's is used)"
            )
    return state, {"sizes": found.sizes, "bias": found.bias, "dtype": found.dtype}


@contextlib.contextmanager
def _progress_bar(total: int):
    """A transient rich progress bar on stderr, shown only on a terminal; yields the
    ``progress`` callback for :func:`equiv.harness.compare_backends`."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description:<10}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    ) as bar:
        task = bar.add_task("starting", total=total)
        started = []

        def advance(phase: str) -> None:
            if started:
                bar.advance(task)
            started.append(phase)
            bar.update(task, description=phase)

        yield advance


def check_writable(path: str, option: str = "--json") -> None:
    """Raise :class:`UsageError` unless a file can be created beside ``path``.

    Done before the comparison runs, so a typo in the path costs nothing.
    """
    example = "report.json" if option == "--json" else "divergence.png"
    if os.path.isdir(path):
        raise UsageError(f"{option} {path!r} is a folder; give a file path such as {example}")
    target = os.path.realpath(path)  # where atomic_path will write: through a link
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise UsageError(f"{option} {path!r}: the folder {folder!r} does not exist")
    try:
        probe = create_beside(target)
    except OSError as error:
        raise UsageError(
            f"{option} {path!r}: cannot write in {folder!r}: {error.strerror}"
        ) from None
    os.close(probe[0])
    os.unlink(probe[1])
    if os.path.exists(target) and read_only(target):
        raise UsageError(f"{option} {path!r} is read-only")


def write_json(path: str, data: dict[str, Any]) -> None:
    """Write ``data`` as strict JSON, atomically: a temporary file in the same
    folder, then ``os.replace``, so a reader never sees half a report.

    Non-finite numbers become the strings ``"nan"``, ``"inf"``, ``"-inf"`` (as in
    :meth:`equiv.compare.Report.to_dict`), since JSON has no spelling for them.
    """
    with atomic_path(path) as temp, open(temp, "w", encoding="utf-8") as file:
        file.write(json_text(data))


def json_text(data: dict[str, Any]) -> str:
    """``data`` as strict JSON text (:func:`write_json`'s), ending in a newline."""
    return json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n"


def _bad_input(text: str) -> int:
    # One line: a message's lines joined, without their indentation (found in a user
    # trial: "float32):   missing: ..." read as runs of spaces).
    line = re.sub(r"\s*\n\s*", " ", text)
    sys.stderr.write((line if line.startswith(PREFIX) else message(line)) + "\n")
    return 2


def _sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integer widths such as 4,3,2, got {text!r}"
        ) from None


def _seed(text: str) -> int:
    try:
        seed = int(text)
    except ValueError:
        seed = -1
    if not 0 <= seed < _SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2**64-1, got {text!r}")
    return seed


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number such as 0.1, got {text!r}")
    return value


def _betas(text: str) -> tuple[float, float]:
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(
            f"--betas takes two numbers such as 0.9,0.999, got {text!r}"
        )
    return (_finite_float(parts[0]), _finite_float(parts[1]))


_BIAS_WORDS = {"1": True, "0": False, "yes": True, "no": False, "true": True, "false": False}


def _bias_pattern(text: str) -> tuple[bool, ...]:
    """``--bias 1,0,1`` as one bool per Linear layer, fc1 first."""
    parts = [part.strip().lower() for part in text.split(",")]
    wrong = [part for part in parts if part not in _BIAS_WORDS]
    if wrong:
        raise argparse.ArgumentTypeError(
            f"{wrong[0]!r} is not 1 or 0: give one 1 (a bias) or 0 (none) per Linear "
            "layer, fc1 first, for example --bias 1,0,1"
        )
    return tuple(_BIAS_WORDS[part] for part in parts)


def _layer_biases(pattern: tuple[bool, ...] | None, sizes: tuple[int, ...]) -> Any:
    """``--bias``'s pattern for a model of ``sizes``: one bool where every layer is
    alike (the report reads as the default's), else the tuple; None without one."""
    if pattern is None:
        return None
    if len(pattern) == 1:
        return pattern[0]  # one value for every layer: --bias 0 is --no-bias
    layers = len(sizes) - 1
    if len(pattern) != layers:
        raise UsageError(
            f"--bias gives {len(pattern)} entr{'ies' if len(pattern) != 1 else 'y'} for "
            f"{layers} Linear layer{'s' if layers != 1 else ''} (sizes "
            f"{','.join(map(str, sizes))}): give one 1 or 0 per layer, fc1 first, for "
            f"example --bias {','.join(['1'] * (layers - 1) + ['0'])}"
        )
    return pattern[0] if len(set(pattern)) == 1 else pattern


def _shown_bias(value: Any) -> str:
    if isinstance(value, bool):
        return "bias" if value else "no bias"
    return f"bias {','.join('1' if has else '0' for has in value)}"


def _names(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(","))
    if "" in names and len(names) > 1:  # one empty name: the option's own check says
        # Found in a user trial: "tanh," read as two names, one of them empty.
        raise argparse.ArgumentTypeError(
            f"{text!r} has an empty name: give names separated by commas, with none empty"
        )
    return names


def _version() -> str:
    from equiv import __version__

    return __version__


if __name__ == "__main__":
    sys.exit(main())
