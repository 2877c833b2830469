"""Scoped numerical settings for a comparison: x64, matmul precision, TF32.

Importing equiv changes nothing global. A comparison enters :func:`comparison_scope`,
which sets what it needs and restores every setting on exit, even on error.

Why each setting (see the README's "Numerical traps"):

* ``jax.enable_x64``: without it ``jnp.asarray`` of float64 data silently gives
  float32, and a float64 comparison would quietly run in float32.
* ``jax.default_matmul_precision("highest")``: JAX's default float32 matmul uses
  TF32 on A100/H100 GPUs (bf16 on TPU), about 2000 times float32 rounding noise.
* torch's fp32 precision ``"ieee"`` for CUDA matmuls and cuDNN: the same for torch.
* ``torch.backends.cudnn.deterministic``: repeatable GPU runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import torch

from equiv._messages import value_error

PRECISIONS = ("exact", "native")


def _torch_flag_paths() -> list[tuple[str, object, str, object]]:
    """(label, owner, attribute, exact value) for each torch setting exact mode pins."""
    backends = torch.backends
    paths: list[tuple[str, object, str, object]] = [
        ("torch.backends.cudnn.deterministic", backends.cudnn, "deterministic", True)
    ]
    if hasattr(backends.cuda.matmul, "fp32_precision"):
        for label, owner in [
            ("torch.backends.cuda.matmul", backends.cuda.matmul),
            ("torch.backends.cudnn.conv", backends.cudnn.conv),
            ("torch.backends.cudnn.rnn", backends.cudnn.rnn),
        ]:
            paths.append((f"{label}.fp32_precision", owner, "fp32_precision", "ieee"))
    else:  # torch releases before the fp32_precision API
        paths += [
            ("torch.backends.cuda.matmul.allow_tf32", backends.cuda.matmul, "allow_tf32", False),
            ("torch.backends.cudnn.allow_tf32", backends.cudnn, "allow_tf32", False),
        ]
    return paths


def current_settings() -> dict[str, object]:
    """The settings a report records: what torch and JAX use right now.

    >>> sorted(current_settings())[:2]
    ['jax_default_matmul_precision', 'jax_enable_x64']
    """
    settings: dict[str, object] = {
        "jax_enable_x64": bool(jax.config.jax_enable_x64),
        "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
        "torch_float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
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
    if precision not in PRECISIONS:
        raise value_error(
            f"unknown precision {precision!r}; expected 'exact' (IEEE float32 matmuls, "
            "the default) or 'native' (keep the current torch and JAX settings)"
        )
    with contextlib.ExitStack() as stack:
        stack.enter_context(jax.enable_x64(dtype == "float64" or jax.config.jax_enable_x64))
        if precision == "exact":
            stack.enter_context(jax.default_matmul_precision("highest"))
            stack.enter_context(_torch_exact())
        settings = current_settings()
        settings["precision"] = precision
        yield settings


@contextlib.contextmanager
def _torch_exact() -> Iterator[None]:
    paths = _torch_flag_paths()
    saved = [getattr(owner, name) for _, owner, name, _ in paths]
    saved_matmul = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        for _, owner, name, exact in paths:
            setattr(owner, name, exact)
        yield
    finally:
        # The global matmul precision also writes the per-backend flags: restore it
        # first, then the flags exactly as they were.
        torch.set_float32_matmul_precision(saved_matmul)
        for (_, owner, name, _), value in zip(paths, saved, strict=True):
            setattr(owner, name, value)
