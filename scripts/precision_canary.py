"""What the precision canary says under each setting, on one device.

``x @ I == x`` for ``x = 1 + 2**-20`` (:func:`equiv.precision.precision_canary`) at
the defaults, in ``comparison_scope`` with ``precision="native"`` and ``"exact"``,
with torch's TF32 turned on and with oneDNN's float32 matmuls in bf16 (each alone,
inside and after the exact scope), and with JAX's matmul precision set by hand. Every
setting is restored before the script ends. Run from the repository root:

    python scripts/precision_canary.py                # cuda when torch sees one, else cpu
    python scripts/precision_canary.py --device cpu

On the H200 (torch 2.11, jax 0.11.2) the defaults gave torch exact, JAX not (TF32):
see the README's "On a GPU".
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import jax
import torch

from equiv.precision import comparison_scope, precision_canary


@contextlib.contextmanager
def lowered(owner: object, name: str, value: object) -> Iterator[None]:
    """``owner.name = value`` for the block, restored after."""
    before = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, before)


def rows(device: str) -> list[tuple[str, dict[str, bool]]]:
    """(setting, canary) for each setting, in order."""
    out = [("the defaults (nothing set)", precision_canary(device))]
    for precision in ("native", "exact"):
        with comparison_scope("float32", precision):
            out.append((f"comparison_scope(precision={precision!r})", precision_canary(device)))
    settings = [("torch allow_tf32 = True", torch.backends.cuda.matmul, "allow_tf32", True)]
    if hasattr(torch.backends.mkldnn.matmul, "fp32_precision"):  # oneDNN on the CPU
        mkldnn = ("torch mkldnn bf16", torch.backends.mkldnn.matmul, "fp32_precision", "bf16")
        settings.append(mkldnn)
    for label, owner, name, value in settings:
        with lowered(owner, name, value):
            out.append((label, precision_canary(device)))
            with comparison_scope("float32", "exact"):
                out.append((f"{label}, in the exact scope", precision_canary(device)))
            out.append((f"{label}, after the exact scope", precision_canary(device)))
    for precision in ("highest", "tensorfloat32"):
        with jax.default_matmul_precision(precision):
            out.append((f"jax.default_matmul_precision({precision!r})", precision_canary(device)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default, help=f"default: {default}")
    args = parser.parse_args(argv)
    print(f"device {args.device}; torch {torch.__version__}, jax {jax.__version__}")
    print(f"{'setting':48} {'torch':>9} {'jax':>9}")
    for setting, canary in rows(args.device):
        torch_says, jax_says = (("exact" if canary[k] else "NOT exact") for k in ("torch", "jax"))
        print(f"{setting:48} {torch_says:>9} {jax_says:>9}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
