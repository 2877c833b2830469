"""The problem every backend solves: initial parameters and the batches, drawn once.

Everything is drawn from torch's generator in the notebook's order: after
``torch.manual_seed(seed)`` the model's layers are initialised, then for each step
``x = torch.randn(batch, in)`` and then the targets ``y`` (``torch.randn(batch, out)``
for regression losses; labels, probabilities or values in [0, 1] for the others,
see :func:`equiv.losses.draw_targets`). The global
torch RNG state is restored afterwards (``torch.random.fork_rng``).
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from equiv._messages import value_error
from equiv.losses import LOSSES, draw_targets
from equiv.memory import check_fits
from equiv.spec import MLPSpec, check_computable, check_spec
from equiv.tolerance import repeated_examples
from equiv.torch_mlp import TORCH_DTYPES, TorchMLP


@dataclasses.dataclass(frozen=True)
class Problem:
    """Initial parameters (torch layout, on the CPU) and one ``(x, y)`` batch per step.

    Tensors given on another device are kept as CPU copies (found in review: a
    Problem built with CUDA batches failed in ``.numpy()``); each backend moves them
    to its device.
    """

    spec: MLPSpec
    params: dict[str, torch.Tensor]
    batches: tuple[tuple[torch.Tensor, torch.Tensor], ...]

    def __post_init__(self) -> None:
        def on_cpu(t: torch.Tensor) -> torch.Tensor:
            return t.cpu() if isinstance(t, torch.Tensor) else t

        object.__setattr__(self, "params", {k: on_cpu(v) for k, v in self.params.items()})
        batches = tuple((on_cpu(x), on_cpu(y)) for x, y in self.batches)
        object.__setattr__(self, "batches", batches)

    @property
    def steps(self) -> int:
        return len(self.batches)

    @property
    def batch_size(self) -> int:
        return self.batches[0][0].shape[0]

    @functools.cached_property
    def repeats(self) -> int:
        """The most times one example occurs in a batch: identical examples round alike
        in every sum over the batch (:func:`equiv.tolerance.repeated_examples`)."""
        return max(repeated_examples(x.cpu(), y.cpu()) for x, y in self.batches)


def check_counts(*, batch_size: int, steps: int, seed: int) -> None:
    """Raise ``ValueError`` unless ``batch_size`` and ``steps`` are ints of at least 1
    and ``seed`` an int that ``torch.manual_seed`` takes.

    Example:
      >>> check_counts(batch_size=0, steps=1, seed=0)
      Traceback (most recent call last):
      ...
      ValueError: [equiv] batch_size must be an int of at least 1, got 0
    """
    for name, value, lowest in [("batch_size", batch_size, 1), ("steps", steps, 1)]:
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            raise value_error(f"{name} must be an int of at least {lowest}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise value_error(
            f"seed must be an int in [0, 2**64) as torch.manual_seed takes, got {seed!r}"
        )


def make_problem(
    spec: MLPSpec,
    *,
    batch_size: int = 2,
    seed: int = 0,
    steps: int = 1,
    params: dict[str, torch.Tensor] | None = None,
) -> Problem:
    """Draw the initial parameters and ``steps`` batches as the notebook does.

    ``params`` (torch names, e.g. from :func:`equiv.from_module.mlp_from_module`)
    replaces the drawn initial parameters; the batches are drawn as without it.

    Example:
      >>> problem = make_problem(MLPSpec((4, 3, 2)), batch_size=2, seed=0)
      >>> problem.batches[0][0].shape, problem.params["fc2.bias"].shape
      (torch.Size([2, 4]), torch.Size([2]))
    """
    check_spec(spec)
    check_computable(spec, "make_problem")
    check_counts(batch_size=batch_size, steps=steps, seed=seed)
    # Before drawing: a batch beyond memory (or beyond torch's int64 sizes) is refused
    # with what it needs instead of failing in the allocator.
    check_fits(spec, batch_size=batch_size, steps=steps, backends=(), reference=False)
    dtype = TORCH_DTYPES[spec.dtype]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TorchMLP(spec)
        batches = tuple(
            (
                torch.randn(batch_size, spec.sizes[0], dtype=dtype),
                draw_targets(LOSSES[spec.loss], batch_size, spec.sizes[-1], dtype),
            )
            for _ in range(steps)
        )
    drawn = {name: p.detach().clone() for name, p in model.state_dict().items()}
    if params is not None:
        problems = []
        for name, p in drawn.items():
            given = params.get(name)
            expected = f"{tuple(p.shape)} {str(p.dtype).removeprefix('torch.')}"
            if given is None:
                problems.append(f"{name}: missing (expected {expected})")
            elif not isinstance(given, torch.Tensor):
                problems.append(
                    f"{name}: a {type(given).__name__}, expected a torch tensor "
                    f"{expected} (torch.as_tensor(...))"
                )
            elif given.shape != p.shape or given.dtype != p.dtype:
                problems.append(
                    f"{name}: {tuple(given.shape)} "
                    f"{str(given.dtype).removeprefix('torch.')}, expected {expected}"
                )
        problems += [f"{name}: unexpected" for name in sorted(set(params) - set(drawn))]
        if problems:
            raise value_error(
                f"params do not fit {spec.sizes} ({spec.dtype}, {spec.describe_bias()}): "
                + "; ".join(problems)
            )
        drawn = {name: params[name].detach().cpu().clone() for name in drawn}
    return Problem(spec=spec, params=drawn, batches=batches)
