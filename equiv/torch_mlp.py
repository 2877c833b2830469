"""The MLP as a ``torch.nn.Module``, trained with ``torch.optim``: the torch backend."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from equiv.activations import ACTIVATIONS
from equiv.losses import LOSSES
from equiv.spec import MLPSpec, check_spec

TORCH_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class TorchMLP(nn.Module):
    """``fc1, act1, fc2, ..., fcN``: Linear layers created in order, so that after
    ``torch.manual_seed(0)`` the 4-3-2 model holds the notebook's initial parameters.

    Example:
      >>> import torch
      >>> _ = torch.manual_seed(0)
      >>> model = TorchMLP(MLPSpec((4, 3, 2)))
      >>> [name for name, _ in model.named_parameters()]
      ['fc1.weight', 'fc1.bias', 'fc2.weight', 'fc2.bias']
      >>> round(model.fc1.weight[0, 1].item(), 4)
      0.2682
    """

    def __init__(self, spec: MLPSpec, device: torch.device | str | None = None):
        super().__init__()
        check_spec(spec)
        self.spec = spec
        dtype = TORCH_DTYPES[spec.dtype]
        for i in range(1, spec.num_layers + 1):
            layer = nn.Linear(
                spec.sizes[i - 1],
                spec.sizes[i],
                bias=spec.biases[i - 1],
                dtype=dtype,
                device=device,
            )
            setattr(self, f"fc{i}", layer)
            if i < spec.num_layers:
                activation = ACTIVATIONS[spec.activations[i - 1]]
                setattr(self, f"act{i}", activation.torch_module(activation.param(spec)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, self.spec.num_layers + 1):
            x = getattr(self, f"fc{i}")(x)
            if i < self.spec.num_layers:
                x = getattr(self, f"act{i}")(x)
        return x


def torch_loss_fn(spec: MLPSpec) -> nn.Module:
    """The ``torch.nn`` loss module the spec names (``nn.MSELoss()`` for ``"mse"``)."""
    return LOSSES[spec.loss].torch_module(spec)


def torch_sgd_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_module: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training step: forward, ``loss.backward()``, ``optimizer.step()``.

    Returns the loss and a copy of every gradient under its state_dict name, taken
    before the step changes anything.
    """
    optimizer.zero_grad(set_to_none=True)
    loss = loss_module(model(x), y)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    optimizer.step()
    return loss.detach().clone(), grads


def torch_mlp_with_params(
    spec: MLPSpec, params: Mapping[str, torch.Tensor], device: torch.device | str = "cpu"
) -> TorchMLP:
    """A :class:`TorchMLP` holding copies of ``params``, built without drawing from
    torch's global RNG (the layers are made on the meta device, then filled).

    >>> import torch
    >>> state = torch.random.get_rng_state()
    >>> params = {"fc1.weight": torch.ones(1, 2), "fc1.bias": torch.zeros(1)}
    >>> model = torch_mlp_with_params(MLPSpec((2, 1)), params)
    >>> torch.equal(state, torch.random.get_rng_state()), model.fc1.weight.sum().item()
    (True, 2.0)
    """
    model = TorchMLP(spec, device="meta").to_empty(device=device)
    return load_params(model, params)


def load_params(model: nn.Module, params: Mapping[str, torch.Tensor]) -> nn.Module:
    """Copy ``params`` into ``model`` in place (strict: every name must match)."""
    with torch.no_grad():
        model.load_state_dict(dict(params), strict=True)
    return model
