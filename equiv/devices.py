"""Device names: ``"cpu"``, ``"cuda"``/``"cuda:N"`` (torch) = ``"gpu"``/``"gpu:N"`` (JAX)."""

from __future__ import annotations

import re

import jax
import torch

from equiv._messages import value_error

_DEVICE = re.compile(r"(cpu|cuda|gpu)(?::(\d+))?")


def resolve_device(device: str) -> tuple[torch.device, jax.Device]:
    """The torch and JAX devices a name stands for; ValueError if one is missing.

    >>> torch_device, jax_device = resolve_device("cpu")
    >>> torch_device.type, jax_device.platform
    ('cpu', 'cpu')
    """
    match = _DEVICE.fullmatch(str(device))
    if match is None:
        raise value_error(
            f"unknown device {device!r}; expected 'cpu', 'cuda', 'cuda:N', 'gpu' or 'gpu:N'"
        )
    kind, index = match.group(1), int(match.group(2) or 0)
    if kind == "cpu":
        return torch.device("cpu"), jax.devices("cpu")[0]
    torch_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    try:
        jax_gpus = jax.devices("gpu")
    except RuntimeError:
        jax_gpus = []
    if index >= torch_count or index >= len(jax_gpus):
        raise value_error(
            f"device {device!r} is not available: torch sees {torch_count} CUDA device(s) "
            f"and JAX sees {len(jax_gpus)} GPU(s); use --device cpu, or install CUDA builds "
            "of torch and jax"
        )
    return torch.device("cuda", index), jax_gpus[index]
