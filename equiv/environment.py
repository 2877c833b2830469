"""What a JSON report records about where it ran: library versions and the device.

A CI log that says "port vs torch: 3.1e-07 within 4.2e-07" is only evidence of
something if it also says which torch, which jaxlib and which chip gave it: a new
jaxlib that changes a reduction order, or a GPU with TF32 matmuls, moves those
figures (found in a user trial: two CI runs' reports differed and nothing in them
said why).

>>> from equiv.environment import environment
>>> env = environment("cpu")
>>> [name in env["versions"] for name in ("python", "torch", "jax", "jaxlib", "numpy")]
[True, True, True, True, True]
>>> env["device"]["name"]
'cpu'
"""

from __future__ import annotations

import importlib.metadata
import platform

import torch

from equiv.devices import _jax_gpus

#: The distributions whose version can change a comparison's figures; optional
#: ones (optax, flax, equinox) are recorded when installed.
DISTRIBUTIONS = ("equiv", "numpy", "torch", "jax", "jaxlib", "optax", "flax", "equinox")


def library_versions() -> dict[str, str]:
    """Python's version and each installed distribution's among :data:`DISTRIBUTIONS`
    (read from the installed metadata: nothing is imported)."""
    versions = {"python": platform.python_version()}
    for name in DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def device_description(device: str) -> dict[str, str]:
    """The device a comparison ran on, as a report records it: its name
    (``"cpu"``, ``"cuda:0"``), the machine, and for a GPU the chip torch and JAX
    report (``"NVIDIA H100 80GB HBM3"``)."""
    description = {"name": device, "machine": f"{platform.system()} {platform.machine()}"}
    if device.startswith(("cuda", "gpu")):
        index = int(device.partition(":")[2] or 0)
        if torch.cuda.is_available():
            description["torch"] = torch.cuda.get_device_name(index)
        gpus = _jax_gpus()
        if index < len(gpus):
            description["jax"] = gpus[index].device_kind
    return description


def environment(device: str = "cpu") -> dict[str, object]:
    """:func:`library_versions` and :func:`device_description` together, as the
    ``"environment"`` entry of a report's ``to_dict()``."""
    return {
        "versions": library_versions(),
        "device": device_description(device),
    }
