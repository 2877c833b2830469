"""Scoped numerical settings for a comparison: x64, matmul precision, TF32.

Importing equiv changes nothing global. A comparison enters :func:`comparison_scope`,
which sets what it needs and restores every setting on exit, even on error.

Why each setting (see the README's "Numerical traps"):

* ``jax.enable_x64``: without it ``jnp.asarray`` of float64 data silently gives
  float32, and a float64 comparison would quietly run in float32.
* ``jax.default_matmul_precision("highest")``: JAX's default float32 matmul uses
  TF32 on A100/H100 GPUs (bf16 on TPU), about 2000 times float32 rounding noise.
* torch's fp32 precision ``"ieee"`` for CUDA matmuls and cuDNN: the same for torch.
* ``torch.backends.cudnn.deterministic``: repeatable cuDNN kernels. An MLP's matmuls
  are cuBLAS's and XLA's, which this does not pin: XLA's autotuning may pick another
  algorithm in another run, so GPU runs can differ in the last bits between runs.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping

import jax
import torch

from equiv._messages import value_error

PRECISIONS = ("exact", "native")


# (path under torch.backends, value in exact mode or None to record only). Globals
# come first: restoring them can rewrite the per-backend flags, restored after.
_FP32_PRECISION_FLAGS = [
    ("fp32_precision", None),
    ("mkldnn.fp32_precision", None),
    ("cudnn.fp32_precision", None),
    ("cuda.matmul.fp32_precision", "ieee"),
    ("cudnn.conv.fp32_precision", "ieee"),
    ("cudnn.rnn.fp32_precision", "ieee"),
    ("mkldnn.matmul.fp32_precision", "ieee"),  # oneDNN on CPU: its TF32/bf16 counterpart
    ("mkldnn.conv.fp32_precision", "ieee"),
    ("mkldnn.rnn.fp32_precision", "ieee"),
]
_LEGACY_FLAGS = [
    ("cuda.matmul.allow_tf32", False),
    ("cudnn.allow_tf32", False),
]


def _torch_flag_paths() -> list[tuple[str, object, str, object]]:
    """(label, owner, attribute, exact value or None) for each torch setting recorded.

    Torch releases with the ``fp32_precision`` API (2.9 and later) refuse to mix it
    with the legacy ``allow_tf32`` / ``set_float32_matmul_precision`` calls, so only
    one of the two families is touched.
    """
    flags = _FP32_PRECISION_FLAGS if _has_fp32_precision_api() else _LEGACY_FLAGS
    paths = [("torch.backends.cudnn.deterministic", torch.backends.cudnn, "deterministic", True)]
    for path, exact in flags:
        *owners, name = path.split(".")
        owner = torch.backends
        for part in owners:
            owner = getattr(owner, part)
        paths.append((f"torch.backends.{path}", owner, name, exact))
    return paths


def _has_fp32_precision_api() -> bool:
    return hasattr(torch.backends.cuda.matmul, "fp32_precision")


#: The recorded torch settings that decide how float32 matmuls round on each kind of
#: device: the global flags and the backend's matmul flag (conv and rnn flags do not
#: touch an MLP).
_MATMUL_FLAGS = {
    "cpu": ("fp32_precision", "mkldnn.fp32_precision", "mkldnn.matmul.fp32_precision"),
    "cuda": ("fp32_precision", "cuda.matmul.fp32_precision"),
}


def lowered_matmuls(settings: Mapping[str, object]) -> list[str]:
    """The settings among ``settings`` (:func:`current_settings`, as a report records
    them) under which float32 matmuls on its device are bf16 or TF32, not IEEE, as
    ``"name = value"``; empty when there are none.

    >>> lowered_matmuls({"device": "cpu", "torch.backends.mkldnn.matmul.fp32_precision": "bf16"})
    ["torch.backends.mkldnn.matmul.fp32_precision = 'bf16'"]
    >>> lowered_matmuls(current_settings() | {"precision": "exact"})  # the defaults here
    []
    """
    # "gpu:N" names the same device as "cuda:N" (found in review: it was taken for a CPU).
    kind = str(settings.get("device", "cpu")).split(":")[0]
    device = "cuda" if kind in ("cuda", "gpu") else "cpu"
    lowered = []
    for path in _MATMUL_FLAGS[device]:
        label = f"torch.backends.{path}"
        value = settings.get(label)
        if value in ("bf16", "tf32"):
            lowered.append(f"{label} = {value!r}")
    if device == "cuda":  # torch before 2.9 records its legacy settings instead
        if settings.get("torch.backends.cuda.matmul.allow_tf32") is True:
            lowered.append("torch.backends.cuda.matmul.allow_tf32 = True")
        legacy = settings.get("torch_float32_matmul_precision")
        if legacy in ("high", "medium"):
            lowered.append(f"torch_float32_matmul_precision = {legacy!r}")
    jax_precision = settings.get("jax_default_matmul_precision")
    if device == "cuda" and jax_precision not in (None, "highest", "float32"):
        lowered.append(f"jax_default_matmul_precision = {jax_precision!r}")  # XLA:CPU: exact
    return lowered


def current_settings() -> dict[str, object]:
    """The settings a report records: what torch and JAX use right now.

    >>> sorted(current_settings())[:2]
    ['jax_default_matmul_precision', 'jax_enable_x64']
    """
    settings: dict[str, object] = {
        "jax_enable_x64": bool(jax.config.jax_enable_x64),
        "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
    }
    if not _has_fp32_precision_api():
        settings["torch_float32_matmul_precision"] = torch.get_float32_matmul_precision()
    for label, owner, name, _ in _torch_flag_paths():
        settings[label] = getattr(owner, name)
    return settings


@contextlib.contextmanager
def comparison_scope(dtype: str = "float32", precision: str = "exact") -> Iterator[dict]:
    """Set x64 (for float64) and, with ``precision="exact"``, IEEE float32 matmuls.

    ``precision="native"`` keeps the user's own matmul settings, so a comparison
    shows what their configuration computes; x64 is still enabled for float64.

    Yields the settings in force inside the scope, for the report.

    Example:
      >>> import jax
      >>> before = jax.config.jax_enable_x64
      >>> with comparison_scope("float64") as settings:
      ...     settings["jax_enable_x64"]
      True
      >>> jax.config.jax_enable_x64 == before
      True
    """
    if dtype not in ("float32", "float64"):
        raise value_error(f"unknown dtype {dtype!r}; expected 'float32' or 'float64'")
    if precision not in PRECISIONS:
        raise value_error(
            f"unknown precision {precision!r}; expected 'exact' (IEEE float32 matmuls, "
            "the default) or 'native' (keep the current torch and JAX settings)"
        )
    outside = bool(jax.config.jax_enable_x64)
    with contextlib.ExitStack() as stack:
        stack.enter_context(jax.enable_x64(dtype == "float64" or outside))
        if precision == "exact":
            stack.enter_context(jax.default_matmul_precision("highest"))
            stack.enter_context(_torch_exact())
        settings = current_settings()
        settings["precision"] = precision
        if dtype == "float64" and not outside:
            # A float64 port passes here, x64 on, and may still run in float32 in the
            # caller's own script (found in a user trial): the report says so.
            settings["jax_enable_x64_outside"] = (
                "off: equiv enabled x64 for this comparison only; your own JAX code "
                "computes float32 unless it enables it (jax.config.update('jax_enable_x64', "
                "True))"
            )
        yield settings


#: torch's flags are the process's, JAX's settings each thread's. Overlapping exact
#: scopes in several threads share one save: the first to enter saves the flags, the
#: last to leave restores them (found in review: the first to leave restored the
#: user's bf16 while another thread's "exact" comparison was still running).
_exact_lock = threading.Lock()
_exact_depth = 0
_exact_saved: tuple[list[object], str | None] | None = None


@contextlib.contextmanager
def _torch_exact() -> Iterator[None]:
    global _exact_depth, _exact_saved
    paths = _torch_flag_paths()
    legacy = not _has_fp32_precision_api()
    with _exact_lock:
        if _exact_depth == 0:
            saved = [getattr(owner, name) for _, owner, name, _ in paths]
            _exact_saved = (saved, torch.get_float32_matmul_precision() if legacy else None)
        _exact_depth += 1
        # Set on every entry: a nested scope pins IEEE again whatever ran in between.
        if legacy:
            torch.set_float32_matmul_precision("highest")
        for _, owner, name, exact in paths:
            if exact is not None:
                setattr(owner, name, exact)
    try:
        yield
    finally:
        with _exact_lock:
            _exact_depth -= 1
            if _exact_depth == 0:
                saved, saved_matmul = _exact_saved
                # The global matmul precision also writes the per-backend flags:
                # restore it first, then every flag exactly as it was.
                if legacy:
                    torch.set_float32_matmul_precision(saved_matmul)
                for (_, owner, name, _), value in zip(paths, saved, strict=True):
                    setattr(owner, name, value)
                _exact_saved = None


#: The canary's matrices are these widths. A library may compute a float32 matmul in
#: another way above a size of its own: oneDNN's bf16 path starts at width 17 on one
#: CPU with torch 2.13, and above 64 (64 exact, 256 not) on the H200 machine's CPU with
#: torch 2.11. Each width is checked; 1024 costs about 10 ms on a CPU.
_CANARY_SIZES = (64, 256, 1024)


def precision_canary(device: str | None = None) -> dict[str, bool]:
    """Whether float32 matmuls are exact IEEE right now, in torch and in JAX.

    ``x @ I == x`` for ``x = 1 + 2**-20`` holds in IEEE float32 and fails under TF32
    (10 mantissa bits) or bf16: a one-line check of the settings in force, at widths
    64, 256 and 1024 (a library may lower only its larger matmuls). Call it inside
    :func:`comparison_scope` to see what a comparison gets, or outside to see your own
    settings. ``device`` is where: by default the GPU where torch and JAX both see one
    (XLA computes float32 matmuls exactly on the CPU, TF32 on recent GPUs by default),
    else the CPU.

    It sees how the inputs of a product are rounded, in square ``@`` products at
    those widths; not the accumulation's precision, nor a ``precision=`` that your
    own code passes to a matmul.

    >>> with comparison_scope("float32"):
    ...     precision_canary()
    {'torch': True, 'jax': True}
    """
    from equiv.devices import resolve_device  # no import cycle at module level

    if device is None:  # found in review: the default was the CPU, on a GPU machine too
        try:
            torch_device, jax_device = resolve_device("cuda")
        except ValueError:
            torch_device, jax_device = resolve_device("cpu")
    else:
        torch_device, jax_device = resolve_device(device)
    value = 1.0 + 2.0**-20
    torch_exact = jax_exact = True
    for size in _CANARY_SIZES:
        # Found in user trials: at width 16 the canary said exact under mkldnn's
        # fp32_precision = "bf16" while a 784-wide matmul was off by 0.3 (torch 2.13);
        # at width 64 likewise on another CPU with torch 2.11 (the GPU machine's run).
        x = torch.full((size, size), value, dtype=torch.float32, device=torch_device)
        eye = torch.eye(size, dtype=torch.float32, device=torch_device)
        torch_exact &= bool(torch.equal(x @ eye, x))
        xj = jax.device_put(x.cpu().numpy(), jax_device)
        ij = jax.device_put(eye.cpu().numpy(), jax_device)
        jax_exact &= bool((xj @ ij == xj).all())
    return {"torch": torch_exact, "jax": jax_exact}
