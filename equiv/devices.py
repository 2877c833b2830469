"""Device names: ``"cpu"``, ``"cuda"``/``"cuda:N"`` (torch) = ``"gpu"``/``"gpu:N"`` (JAX).

:func:`resolve_device` needs both frameworks to see the device (a comparison runs
in both); :func:`jax_device` and :func:`torch_device` need only their own (a
conversion puts its result on one side). Both names work on either side.
"""

from __future__ import annotations

import re

import jax
import torch

from equiv._messages import value_error

_DEVICE = re.compile(r"(cpu|cuda|gpu)(?::(\d+))?")


def device_name(device: str | torch.device | jax.Device) -> str:
    """The name a report records for ``device``: a name as given, or a torch or JAX
    device object as a name (found in review: the object itself went into the report,
    which ``json.dumps`` then refused).

    >>> device_name("cuda:1"), device_name(torch.device("cpu")), device_name(jax.devices("cpu")[0])
    ('cuda:1', 'cpu', 'cpu')
    """
    if isinstance(device, torch.device):
        name = device.type if device.index is None else f"{device.type}:{device.index}"
    elif isinstance(device, jax.Device):
        if device.platform == "cpu":
            index = jax.local_devices(backend="cpu").index(device)
            name = "cpu" if index == 0 else f"cpu:{index}"
        else:
            name = f"gpu:{_jax_gpus().index(device)}"
    else:
        name = str(device)
    _parse(name)  # an unknown name fails here
    return name


def _parse(device: str) -> tuple[str, int]:
    match = _DEVICE.fullmatch(str(device))
    if match is None:
        raise value_error(
            f"unknown device {device!r}; expected 'cpu', 'cuda', 'cuda:N', 'gpu' or 'gpu:N'"
        )
    return match.group(1), int(match.group(2) or 0)


def _jax_gpus() -> list[jax.Device]:
    """This process's GPUs (in a multi-process JAX run, ``jax.devices`` lists all)."""
    try:
        return jax.local_devices(backend="gpu")
    except RuntimeError:
        return []


def jax_device(device: str | jax.Device) -> jax.Device:
    """The JAX device a name (or a ``jax.Device``, returned as is) stands for.

    >>> jax_device("cpu").platform
    'cpu'
    """
    if isinstance(device, jax.Device):
        return device
    kind, index = _parse(device)
    if kind == "cpu":
        cpus = jax.devices("cpu")
        if index >= len(cpus):
            raise value_error(
                f"device {device!r} is not available to JAX, which sees {len(cpus)} CPU "
                "device(s); use 'cpu'"
            )
        return cpus[index]
    gpus = _jax_gpus()
    if index >= len(gpus):
        raise value_error(
            f"device {device!r} is not available to JAX, which sees {len(gpus)} GPU(s); use "
            "'cpu', or install a CUDA build of jax"
        )
    return gpus[index]


def torch_device(device: str | torch.device) -> torch.device:
    """The torch device a name (or a ``torch.device``, returned as is) stands for.

    >>> torch_device("cpu")
    device(type='cpu')
    """
    if isinstance(device, torch.device) and (device.type != "cuda" or device.index is not None):
        return device
    kind, index = _parse(device_name(device))  # torch.device("cuda") is cuda:0, as "cuda"
    if kind == "cpu":
        if index:
            raise value_error(f"device {device!r}: torch has one CPU device, 'cpu'")
        return torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= count:
        raise value_error(
            f"device {device!r} is not available to torch, which sees {count} CUDA device(s); "
            "use 'cpu', or install a CUDA build of torch"
        )
    return torch.device("cuda", index)


def resolve_device(device: str | torch.device | jax.Device) -> tuple[torch.device, jax.Device]:
    """The torch and JAX devices a name stands for; ValueError if one is missing.

    >>> torch_device, jax_device = resolve_device("cpu")
    >>> torch_device.type, jax_device.platform
    ('cpu', 'cpu')
    """
    device = device_name(device)
    kind, index = _parse(device)
    if kind == "cpu":  # JAX's host devices (cpu:N) share torch's one CPU
        return torch.device("cpu"), jax_device(device)
    torch_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    jax_gpus = _jax_gpus()
    if index >= torch_count or index >= len(jax_gpus):
        raise value_error(
            f"device {device!r} is not available: torch sees {torch_count} CUDA device(s) "
            f"and JAX sees {len(jax_gpus)} GPU(s); use the CPU (device 'cpu', "
            "--device cpu on the command line), or install CUDA builds of torch and jax"
        )
    return torch.device("cuda", index), jax_gpus[index]
