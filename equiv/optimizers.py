r"""SGD, Adam and AdamW as ``torch.optim`` defines them, in all three implementations.

One :class:`OptimizerSpec` builds the ``torch.optim`` optimizer
(:func:`make_torch_optimizer`), the hand-written update (:func:`manual_init`,
:func:`manual_update`, no autodiff, array-API generic: NumPy and torch) and an
optax transformation composed to follow torch's semantics (:func:`make_optax`).
Optimizer state is read back from each under torch's state names
(``momentum_buffer``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) and torch's
parameter names, as ``{state_name: {param_name: array}}``, so it compares leaf by leaf.

The updates, per parameter ``p`` with gradient ``g`` at step ``t = 1, 2, ...``
(learning rate ``γ``, weight decay ``λ``), exactly as ``torch.optim`` computes them:

SGD (momentum ``μ``, dampening ``τ``)::

    g ← g + λ·p                                  weight decay: L2 in the gradient, first
    b_1 = g                                      first step: the buffer IS the gradient
    b_t = μ·b_{t-1} + (1 - τ)·g                  (only with μ ≠ 0)
    g ← g + μ·b_t   (nesterov)   or   g ← b_t
    p ← p - γ·g                                  torch: p.add_(g, alpha=-γ), one rounding

Adam and AdamW (``β₁, β₂, ε``)::

    g ← g + λ·p                                  Adam: L2 in the gradient
    p ← p·(1 - γ·λ)                              AdamW: decoupled, before the moments
    m_t = β₁·m_{t-1} + (1 - β₁)·g                torch: m.lerp_(g, 1 - β₁)
    v_t = β₂·v_{t-1} + (1 - β₂)·g²               torch: v.mul_(β₂).addcmul_(g, g, 1 - β₂)
    v'  = max(v'_{t-1}, v_t)  (amsgrad)  or  v' = v_t      max over the RAW v
    p ← p - γ/(1 - β₁ᵗ) · m_t / (√v' / √(1 - β₂ᵗ) + ε)    ε after the square root

Traps this module exists to avoid (sizes in the README's "Numerical traps"):

* ``Adam(weight_decay=λ)`` is L2 regularisation, not AdamW's decoupled decay
  (2.4e-3 relative after 5 steps).
* ``torch.optim.AdamW``'s default ``weight_decay`` is 1e-2; ``optax.adamw``'s is
  1e-4. :class:`OptimizerSpec` uses torch's defaults, and :func:`make_optax` always
  passes the decay explicitly.
* SGD weight decay goes into the gradient BEFORE momentum; ``optax.chain(sgd,
  add_decayed_weights)`` puts it after and drifts.
* ``optax`` has no SGD dampening; ``optax.amsgrad`` takes the max over the
  bias-corrected ``v̂`` where torch takes it over the raw ``v`` and bias-corrects
  after. Both get a small transformation of their own here
  (:func:`torch_sgd_momentum`, :func:`scale_by_torch_amsgrad`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from array_api_compat import array_namespace, is_torch_array

from equiv._messages import type_error, value_error

Array = Any
State = dict[str, dict[str, Array]]

#: Optimizer names, as ``torch.optim`` spells the classes in lower case.
OPTIMIZERS = ("sgd", "adam", "adamw")
#: torch's per-parameter state entries, in the order torch creates them.
STATE_NAMES = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
#: torch's default ``weight_decay`` per optimizer (optax.adamw's default is 1e-4).
TORCH_DEFAULT_WEIGHT_DECAY = {"sgd": 0.0, "adam": 0.0, "adamw": 1e-2}

_SGD_FIELDS = {"momentum": 0.0, "dampening": 0.0, "nesterov": False}
_ADAM_FIELDS = {"betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": False}
_NUMBER_FIELDS = ("learning_rate", "momentum", "dampening", "weight_decay", "eps")


def _plain(value: Any) -> Any:
    """A torch hyper-parameter as a Python value (a tensor learning rate as a float)."""
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, (tuple, list)):
        return tuple(_plain(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer and its hyper-parameters, with ``torch.optim``'s defaults.

    Args:
      name: ``"sgd"``, ``"adam"`` or ``"adamw"``.
      learning_rate: γ (torch's default 1e-3).
      momentum, dampening, nesterov: SGD only.
      weight_decay: λ; ``None`` takes torch's default for ``name``: 0 for SGD and
        Adam, 1e-2 for AdamW (NOT optax.adamw's 1e-4).
      betas, eps, amsgrad: Adam and AdamW only.

    Raises:
      ValueError: a value ``torch.optim`` rejects, or a field the optimizer lacks.
      TypeError: a name that is not a string or a hyper-parameter that is not a number.

    Example:
      >>> OptimizerSpec("adamw", learning_rate=1e-2).weight_decay
      0.01
      >>> OptimizerSpec("sgd", learning_rate=0.1, momentum=0.9).state_names
      ('momentum_buffer',)
    """

    name: str
    learning_rate: float = 1e-3
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    amsgrad: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise type_error(f"optimizer name must be a string, got {type(self.name).__name__}")
        if self.name not in OPTIMIZERS:
            raise value_error(
                f"unknown optimizer {self.name!r}; choose one of {', '.join(OPTIMIZERS)}"
            )
        if self.weight_decay is None:
            object.__setattr__(self, "weight_decay", TORCH_DEFAULT_WEIGHT_DECAY[self.name])
        betas = self.betas
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise value_error(f"betas must be a pair (beta1, beta2), got {betas!r}")
        numbers = {f: getattr(self, f) for f in _NUMBER_FIELDS}
        numbers.update({"betas[0]": betas[0], "betas[1]": betas[1]})
        for label, value in numbers.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise type_error(f"{label} must be a real number, got {value!r}")
        for field in ("nesterov", "amsgrad"):
            if not isinstance(getattr(self, field), bool):
                raise type_error(f"{field} must be True or False, got {getattr(self, field)!r}")
        for field in _NUMBER_FIELDS:
            object.__setattr__(self, field, float(getattr(self, field)))
        object.__setattr__(self, "betas", (float(betas[0]), float(betas[1])))
        self._check_applicable()
        self._check_ranges()

    def _check_applicable(self) -> None:
        foreign = _ADAM_FIELDS if self.name == "sgd" else _SGD_FIELDS
        for field, default in foreign.items():
            if getattr(self, field) != default:
                owner = "Adam and AdamW" if self.name == "sgd" else "SGD"
                raise value_error(
                    f"{field}={getattr(self, field)!r} applies to {owner} only, not to "
                    f"{self.name!r}; drop it, or choose an optimizer that has it"
                )

    def _check_ranges(self) -> None:
        # The same conditions, in the same form (NaN fails them), as torch.optim's.
        if not 0.0 <= self.learning_rate:
            raise value_error(f"learning_rate must be >= 0, got {self.learning_rate}")
        if not 0.0 <= self.weight_decay:
            raise value_error(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.momentum:
            raise value_error(f"momentum must be >= 0, got {self.momentum}")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise value_error(
                "nesterov=True needs momentum > 0 and dampening == 0 (torch.optim.SGD "
                f"requires both), got momentum={self.momentum}, dampening={self.dampening}; "
                'for example OptimizerSpec("sgd", learning_rate=0.1, momentum=0.9, nesterov=True)'
            )
        if not 0.0 <= self.eps:
            raise value_error(f"eps must be >= 0, got {self.eps}")
        for i, beta in enumerate(self.betas):
            if not 0.0 <= beta < 1.0:
                raise value_error(
                    f"betas[{i}] must lie in [0, 1), got {beta}; torch's default is "
                    f"betas=(0.9, 0.999)"
                )

    @classmethod
    def from_torch(cls, optimizer: torch.optim.Optimizer) -> OptimizerSpec:
        """The spec of a ``torch.optim`` SGD, Adam or AdamW with one set of
        hyper-parameters, fresh (no step taken: a comparison starts from no state).

        Found in a user trial: ``optimizer=torch.optim.AdamW(...)`` was refused, and its
        learning rate, betas and weight decay had to be written again.

        >>> p = [torch.zeros(2, requires_grad=True)]
        >>> OptimizerSpec.from_torch(torch.optim.AdamW(p, lr=3e-3, betas=(0.85, 0.98)))
        OptimizerSpec(name='adamw', learning_rate=0.003, momentum=0.0, dampening=0.0, \
nesterov=False, weight_decay=0.01, betas=(0.85, 0.98), eps=1e-08, amsgrad=False)
        """
        names = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adamw"}
        name = names.get(type(optimizer))
        if name is None:
            raise type_error(
                f"optimizer must be torch.optim.SGD, Adam or AdamW, or an equiv.OptimizerSpec, "
                f"got {type(optimizer).__name__}"
            )
        fields = (
            ("momentum", "dampening", "nesterov") if name == "sgd" else ("betas", "eps", "amsgrad")
        )
        keys = ("lr", "weight_decay", "maximize", "decoupled_weight_decay", *fields)
        groups = [{k: _plain(g[k]) for k in keys if k in g} for g in optimizer.param_groups]
        if any(group != groups[0] for group in groups):
            raise value_error(
                f"the {type(optimizer).__name__}'s {len(groups)} parameter groups have "
                "different hyper-parameters; equiv takes one set: compare with one group"
            )
        group = groups[0]
        if "initial_lr" in optimizer.param_groups[0]:
            # A scheduler attached sets initial_lr and moves lr (found in review: a
            # LinearLR's first rate was taken as the constant one).
            raise value_error(
                f"the {type(optimizer).__name__} has a learning-rate scheduler attached "
                "(its groups hold initial_lr); equiv compares constant rates: pass an "
                "optimizer without one"
            )
        if group.get("maximize"):
            raise value_error(f"{type(optimizer).__name__}(maximize=True) is not supported")
        if optimizer.state:
            raise value_error(
                f"the {type(optimizer).__name__} has taken steps (it holds state): a comparison "
                "starts from a fresh optimizer, so its momentum or moments would be lost; "
                "pass a fresh one, or write its hyper-parameters out as equiv.OptimizerSpec(...)"
            )
        if name == "adam" and group.get("decoupled_weight_decay"):
            name = "adamw"  # torch's Adam(decoupled_weight_decay=True) is AdamW
        extra = {f: group[f] for f in fields}
        return cls(name, learning_rate=group["lr"], weight_decay=group["weight_decay"], **extra)

    @property
    def state_names(self) -> tuple[str, ...]:
        """The per-parameter state torch keeps (and every implementation here compares)."""
        if self.name == "sgd":
            return ("momentum_buffer",) if self.momentum != 0 else ()
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if self.amsgrad else ())


def is_plain_sgd(optimizer: OptimizerSpec | None) -> bool:
    """SGD without momentum or weight decay: ``p - lr·g``, no state (None means that).

    >>> is_plain_sgd(None), is_plain_sgd(OptimizerSpec("sgd", momentum=0.9))
    (True, False)
    """
    return optimizer is None or (
        optimizer.name == "sgd" and optimizer.momentum == 0 and optimizer.weight_decay == 0
    )


# ---------------------------------------------------------------- torch.optim


def make_torch_optimizer(
    spec: OptimizerSpec, params: Iterable[torch.Tensor]
) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimizer ``spec`` describes, on torch's single-tensor path.

    ``foreach=False`` and ``fused=False`` pin the per-tensor loop
    (``_single_tensor_sgd`` / ``_single_tensor_adam``). Left to ``None``, torch
    picks the ``foreach`` (multi-tensor) path on CUDA and may pick ``fused``; those
    kernels order their roundings differently (bias corrections as tensors, fused
    multiply-adds), so the same spec would give bitwise different results by
    device. The single-tensor path is the one :func:`manual_update` mirrors.

    Example:
      >>> import torch
      >>> w = torch.ones(2)
      >>> opt = make_torch_optimizer(OptimizerSpec("sgd", learning_rate=0.5), [w])
      >>> w.grad = torch.full((2,), 2.0)
      >>> opt.step()
      >>> w.tolist()
      [0.0, 0.0]
    """
    common = dict(lr=spec.learning_rate, weight_decay=spec.weight_decay, foreach=False, fused=False)
    if spec.name == "sgd":
        return torch.optim.SGD(
            params,
            momentum=spec.momentum,
            dampening=spec.dampening,
            nesterov=spec.nesterov,
            **common,
        )
    cls = torch.optim.Adam if spec.name == "adam" else torch.optim.AdamW
    return cls(params, betas=spec.betas, eps=spec.eps, amsgrad=spec.amsgrad, **common)


def torch_optimizer_state(
    optimizer: torch.optim.Optimizer,
    named_params: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
) -> dict[str, dict[str, np.ndarray]]:
    """Copy a ``torch.optim`` optimizer's state as ``{state_name: {param_name: array}}``.

    ``named_params`` (a mapping or ``model.named_parameters()``) names the tensors
    the optimizer holds. The step counter is left out (every implementation here
    counts steps its own way). Before the first step torch holds no state: ``{}``.

    Raises:
      ValueError: the optimizer holds state for a tensor ``named_params`` lacks.

    Example:
      >>> import torch
      >>> w = torch.ones(2)
      >>> opt = make_torch_optimizer(OptimizerSpec("adam"), [w])
      >>> w.grad = torch.ones(2)
      >>> opt.step()
      >>> state = torch_optimizer_state(opt, {"w": w})
      >>> sorted(state), state["exp_avg"]["w"].astype(float).round(3).tolist()
      (['exp_avg', 'exp_avg_sq'], [0.1, 0.1])
    """
    pairs = named_params.items() if isinstance(named_params, Mapping) else named_params
    names = {id(tensor): name for name, tensor in pairs}
    out: dict[str, dict[str, np.ndarray]] = {}
    for tensor, entries in optimizer.state.items():
        if id(tensor) not in names:
            raise value_error(
                f"the optimizer holds state for a tensor of shape {tuple(tensor.shape)} that "
                f"named_params does not name; pass model.named_parameters() of the model the "
                f"optimizer was built on"
            )
        for key, value in entries.items():
            if key in STATE_NAMES and value is not None:
                array = value.detach().cpu().numpy().copy()
                out.setdefault(key, {})[names[id(tensor)]] = array
    return {key: out[key] for key in STATE_NAMES if key in out}


# ---------------------------------------------------------- hand-written update


def manual_init(spec: OptimizerSpec, params: Mapping[str, Array]) -> State:
    """Zero state for every entry torch keeps, under torch's names.

    torch creates the SGD momentum buffer at the first step (as a copy of the
    gradient); here it starts at zeros and :func:`manual_update` overwrites it at
    step 1, so the shapes are known from the start.

    Example:
      >>> import numpy as np
      >>> state = manual_init(OptimizerSpec("adam", amsgrad=True), {"w": np.ones(2)})
      >>> sorted(state)
      ['exp_avg', 'exp_avg_sq', 'max_exp_avg_sq']
    """
    return {key: {n: _zeros_like(p) for n, p in params.items()} for key in spec.state_names}


def manual_update(
    spec: OptimizerSpec,
    params: Mapping[str, Array],
    grads: Mapping[str, Array],
    state: Mapping[str, Mapping[str, Array]],
    step: int,
) -> tuple[dict[str, Array], State]:
    """One step of the optimizer by hand; inputs are never modified.

    ``step`` is torch's counter after the increment: 1 at the first step. On torch
    tensors the update calls the same torch operations in the same order as
    ``torch.optim``'s single-tensor path (``add`` with ``alpha``, ``lerp``,
    ``addcmul``, ``addcdiv``), so each rounding happens where torch's does; on other
    arrays it writes the same formulas with plain operators.

    Args:
      spec: the optimizer.
      params, grads: ``{torch name: array}``, same names.
      state: as :func:`manual_init` or a previous call returned it.
      step: 1-based step number.

    Returns:
      The new parameters and the new state (new arrays).

    Raises:
      ValueError: names or state entries that do not match, or ``step < 1``.

    Example:
      >>> import numpy as np
      >>> spec = OptimizerSpec("sgd", learning_rate=0.5, momentum=0.5)
      >>> params, grads = {"w": np.array([1.0])}, {"w": np.array([2.0])}
      >>> state = manual_init(spec, params)
      >>> params, state = manual_update(spec, params, grads, state, step=1)
      >>> params["w"].tolist(), state["momentum_buffer"]["w"].tolist()
      ([0.0], [2.0])
      >>> params, state = manual_update(spec, params, grads, state, step=2)
      >>> params["w"].tolist(), state["momentum_buffer"]["w"].tolist()
      ([-1.5], [3.0])
    """
    _check_manual_inputs(spec, params, grads, state, step)
    new_params: dict[str, Array] = {}
    new_state: State = {key: {} for key in spec.state_names}
    for name, p in params.items():
        old = {key: state[key][name] for key in spec.state_names}
        update = _sgd_one if spec.name == "sgd" else _adam_one
        new_params[name], new = update(spec, p, grads[name], old, step)
        for key, value in new.items():
            new_state[key][name] = value
    return new_params, new_state


def _sgd_one(spec: OptimizerSpec, p: Array, g: Array, state: dict, step: int):
    if spec.weight_decay != 0:
        g = _add(g, p, spec.weight_decay)
    new_state = {}
    if spec.momentum != 0:
        if step == 1:
            buf = _copy(g)  # torch: buf = grad.clone(); no (1 - τ) on the first step
        else:
            buf = _add(state["momentum_buffer"] * spec.momentum, g, 1 - spec.dampening)
        new_state["momentum_buffer"] = buf
        g = _add(g, buf, spec.momentum) if spec.nesterov else buf
    return _add(p, g, -spec.learning_rate), new_state


def _adam_one(spec: OptimizerSpec, p: Array, g: Array, state: dict, step: int):
    xp = array_namespace(p)
    lr, wd, (beta1, beta2) = spec.learning_rate, spec.weight_decay, spec.betas
    if wd != 0:
        if spec.name == "adamw":
            p = p * (1 - lr * wd)
        else:
            g = _add(g, p, wd)
    exp_avg = _lerp(state["exp_avg"], g, 1 - beta1)
    exp_avg_sq = _addcmul(state["exp_avg_sq"] * beta2, g, g, 1 - beta2)
    new_state = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    # Python floats, computed as torch computes them (float(step), ** 0.5).
    bias_correction1 = 1 - beta1 ** float(step)
    bias_correction2 = 1 - beta2 ** float(step)
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    second = exp_avg_sq
    if spec.amsgrad:
        second = xp.maximum(state["max_exp_avg_sq"], exp_avg_sq)  # max over the raw v
        new_state["max_exp_avg_sq"] = second
    denom = xp.sqrt(second) / bias_correction2_sqrt + spec.eps
    return _addcdiv(p, exp_avg, denom, -step_size), new_state


def _check_manual_inputs(spec, params, grads, state, step) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise value_error(f"step is torch's 1-based step counter, got {step!r}; the first is 1")
    if set(grads) != set(params):
        raise value_error(
            f"grads and params name different tensors: {sorted(set(grads) ^ set(params))}"
        )
    if set(state) != set(spec.state_names):
        raise value_error(
            f"state holds {sorted(state)} but {spec.name} keeps {list(spec.state_names)}; "
            "start from manual_init(spec, params)"
        )
    for key in spec.state_names:
        if set(state[key]) != set(params):
            raise value_error(f"state[{key!r}] and params name different tensors")


# torch's rounding, op for op, on torch tensors; the same formula elsewhere.


def _add(a: Array, b: Array, alpha: float) -> Array:
    """``a + alpha·b``: torch's ``add(alpha=)`` rounds it as one fused operation."""
    return a.add(b, alpha=alpha) if is_torch_array(a) else a + alpha * b


def _lerp(a: Array, b: Array, weight: float) -> Array:
    """``torch.lerp``: ``a + w·(b - a)`` for ``|w| < 0.5``, else ``b - (b - a)·(1 - w)``."""
    if is_torch_array(a):
        return a.lerp(b, weight)
    return a + weight * (b - a) if abs(weight) < 0.5 else b - (b - a) * (1 - weight)


def _addcmul(a: Array, b: Array, c: Array, value: float) -> Array:
    return a.addcmul(b, c, value=value) if is_torch_array(a) else a + value * b * c


def _addcdiv(a: Array, b: Array, c: Array, value: float) -> Array:
    return a.addcdiv(b, c, value=value) if is_torch_array(a) else a + value * b / c


def _copy(a: Array) -> Array:
    return a.clone() if is_torch_array(a) else array_namespace(a).asarray(a, copy=True)


def _zeros_like(a: Array) -> Array:
    return array_namespace(a).zeros_like(a)


# ------------------------------------------------------------------------ optax


class TorchSGDMomentumState(NamedTuple):
    """State of :func:`torch_sgd_momentum`: steps taken and torch's momentum buffer."""

    count: jax.Array
    momentum_buffer: Any


def torch_sgd_momentum(
    momentum: float, dampening: float = 0.0, nesterov: bool = False
) -> optax.GradientTransformation:
    """torch's SGD momentum with dampening, which optax does not offer.

    ``b_1 = g``, ``b_t = μ·b_{t-1} + (1 - τ)·g``; the output is ``b_t`` or, with
    nesterov, ``g + μ·b_t``. ``optax.trace`` is the case ``τ = 0`` (starting from
    zeros, its first step ``0·μ + g`` is ``g`` as in torch); no optax transformation
    skips the ``(1 - τ)`` at the first step as torch does. Follow it with
    ``optax.scale(-learning_rate)``.

    Example:
      >>> import jax.numpy as jnp
      >>> tx = torch_sgd_momentum(0.5, dampening=0.5)
      >>> g = {"w": jnp.array([2.0])}
      >>> state = tx.init(g)
      >>> u, state = tx.update(g, state)
      >>> u, state = tx.update(g, state)
      >>> u["w"].tolist()  # 0.5·2 + 0.5·2
      [2.0]
    """

    def init_fn(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return TorchSGDMomentumState(count=jnp.zeros([], jnp.int32), momentum_buffer=zeros)

    def update_fn(updates, state, params=None):
        del params
        first = state.count == 0

        def buffer(g, b):
            return jnp.where(first, g, momentum * b + (1 - dampening) * g)

        buf = jax.tree.map(buffer, updates, state.momentum_buffer)
        out = jax.tree.map(lambda g, b: g + momentum * b, updates, buf) if nesterov else buf
        return out, TorchSGDMomentumState(count=state.count + 1, momentum_buffer=buf)

    return optax.GradientTransformation(init_fn, update_fn)


class TorchAmsgradState(NamedTuple):
    """State of :func:`scale_by_torch_amsgrad`, fields under torch's names."""

    count: jax.Array
    exp_avg: Any
    exp_avg_sq: Any
    max_exp_avg_sq: Any


def scale_by_torch_amsgrad(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformation:
    """torch's AMSGrad: the max over the raw ``v``, bias-corrected afterwards.

    ``m̂ / (√max(v_max, v_t) / √(1 - β₂ᵗ) + ε)``. ``optax.scale_by_amsgrad`` takes
    the max over the bias-corrected ``v̂`` instead, and no choice of its arguments
    gives torch's rule (with ``bias_correction_nu=False`` the ``√(1 - β₂ᵗ)`` is lost
    and ``ε`` would have to change with ``t``). Follow it with
    ``optax.scale(-learning_rate)``.

    Example:
      >>> import jax.numpy as jnp
      >>> tx = scale_by_torch_amsgrad()
      >>> g = {"w": jnp.array([2.0])}
      >>> u, state = tx.update(g, tx.init(g))
      >>> round(float(u["w"][0]), 6)  # m̂/√v̂ = g/|g| at the first step
      1.0
    """

    def init_fn(params):
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
        return TorchAmsgradState(jnp.zeros([], jnp.int32), zeros(), zeros(), zeros())

    def update_fn(updates, state, params=None):
        del params
        count = state.count + 1
        m = jax.tree.map(lambda g, t: (1 - b1) * g + b1 * t, updates, state.exp_avg)
        v = jax.tree.map(lambda g, t: (1 - b2) * g * g + b2 * t, updates, state.exp_avg_sq)
        v_max = jax.tree.map(jnp.maximum, state.max_exp_avg_sq, v)

        def scale(m_, v_max_):
            # 1 - βᵗ as -expm1(t·ln β), ln β rounded once from float64: in float32,
            # 1 - 0.999ᵗ computed directly loses about 1e-5 relative (β itself is
            # rounded, then the subtraction cancels), where torch's, in Python
            # float64, is exact to float32 precision.
            t = count.astype(m_.dtype)
            correction1 = -jnp.expm1(t * _log(b1))
            correction2 = -jnp.expm1(t * _log(b2))
            return (m_ / correction1) / (jnp.sqrt(v_max_) / jnp.sqrt(correction2) + eps)

        out = jax.tree.map(scale, m, v_max)
        return out, TorchAmsgradState(count, m, v, v_max)

    return optax.GradientTransformation(init_fn, update_fn)


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0 else -math.inf


def make_optax(spec: OptimizerSpec) -> optax.GradientTransformation:
    """An optax transformation with torch's semantics for ``spec``.

    * SGD: ``chain(add_decayed_weights(λ), sgd(γ, μ, nesterov))`` (decay in the
      gradient, before momentum); with dampening, :func:`torch_sgd_momentum` and
      ``scale(-γ)`` replace ``sgd``.
    * Adam: ``chain(add_decayed_weights(λ), scale_by_adam(β₁, β₂, ε, eps_root=0),
      scale(-γ))``.
    * AdamW: ``chain(scale_by_adam(...), add_decayed_weights(λ), scale(-γ))``: the
      update is ``-γ·(adam + λ·p)``, torch's ``p·(1 - γλ) - γ·adam``, with λ passed
      explicitly (``optax.adamw``'s default is 1e-4, torch's 1e-2).
    * AMSGrad: :func:`scale_by_torch_amsgrad` replaces ``scale_by_adam``.

    ``update`` needs ``params`` when ``λ ≠ 0``: ``tx.update(grads, state, params)``.

    Example:
      >>> import jax.numpy as jnp
      >>> tx = make_optax(OptimizerSpec("sgd", learning_rate=0.5, weight_decay=1.0))
      >>> p = {"w": jnp.array([1.0])}
      >>> u, _ = tx.update({"w": jnp.array([1.0])}, tx.init(p), p)
      >>> u["w"].tolist()  # -0.5 · (1 + 1·1)
      [-1.0]
    """
    lr, wd = spec.learning_rate, spec.weight_decay
    decay = [optax.add_decayed_weights(wd)] if wd != 0 else []
    if spec.name == "sgd":
        if spec.dampening == 0:
            return optax.chain(*decay, optax.sgd(lr, spec.momentum or None, spec.nesterov))
        momentum = torch_sgd_momentum(spec.momentum, spec.dampening, spec.nesterov)
        return optax.chain(*decay, momentum, optax.scale(-lr))
    b1, b2 = spec.betas
    if spec.amsgrad:
        scale = scale_by_torch_amsgrad(b1, b2, spec.eps)
    else:
        scale = optax.scale_by_adam(b1, b2, spec.eps, eps_root=0.0)
    if spec.name == "adam":
        return optax.chain(*decay, scale, optax.scale(-lr))
    return optax.chain(scale, *decay, optax.scale(-lr))


def optax_state_to_torch_names(
    spec: OptimizerSpec,
    opt_state: Any,
    to_torch: Callable[[Any], Mapping[str, Array]] | None = None,
) -> State:
    """The moments an optax state holds, as ``{state_name: {torch param name: array}}``.

    Reads ``optax.TraceState`` (momentum_buffer), ``optax.ScaleByAdamState``
    (exp_avg, exp_avg_sq), ``optax.ScaleByAmsgradState`` (its ``nu_max`` as
    max_exp_avg_sq, although it holds the max of the bias-corrected ``v̂``) and this
    module's own states, anywhere in a chain. ``to_torch`` turns one params-shaped
    tree into ``{torch name: array}``, for example
    ``lambda t: equiv.convert.jax_to_torch(t, layout="flax", spec=mlp_spec)``; by
    default the trees must already be flat dicts under torch's names.

    Raises:
      ValueError: the state holds other moments than ``spec`` keeps.

    Example:
      >>> import jax.numpy as jnp
      >>> spec = OptimizerSpec("sgd", learning_rate=0.1, momentum=0.9)
      >>> tx = make_optax(spec)
      >>> p = {"fc1.bias": jnp.zeros(2)}
      >>> _, state = tx.update({"fc1.bias": jnp.ones(2)}, tx.init(p), p)
      >>> optax_state_to_torch_names(spec, state)["momentum_buffer"]["fc1.bias"].tolist()
      [1.0, 1.0]
    """
    convert = to_torch if to_torch is not None else dict
    found: dict[str, Any] = {}
    for sub in _moment_states(opt_state):
        for key, tree in _MOMENT_FIELDS[type(sub)](sub).items():
            if key in found:
                raise value_error(
                    f"the optax state holds two {key} trees; pass the state of one optimizer"
                )
            found[key] = tree
    if set(found) != set(spec.state_names):
        raise value_error(
            f"the optax state holds {sorted(found) or 'no moments'} but {spec.name} keeps "
            f"{list(spec.state_names) or 'none'}; build it with make_optax(spec)"
        )
    return {key: dict(convert(found[key])) for key in spec.state_names}


_MOMENT_FIELDS: dict[type, Callable[[Any], dict[str, Any]]] = {
    optax.TraceState: lambda s: {"momentum_buffer": s.trace},
    TorchSGDMomentumState: lambda s: {"momentum_buffer": s.momentum_buffer},
    optax.ScaleByAdamState: lambda s: {"exp_avg": s.mu, "exp_avg_sq": s.nu},
    optax.ScaleByAmsgradState: lambda s: {
        "exp_avg": s.mu,
        "exp_avg_sq": s.nu,
        "max_exp_avg_sq": s.nu_max,
    },
    TorchAmsgradState: lambda s: {
        "exp_avg": s.exp_avg,
        "exp_avg_sq": s.exp_avg_sq,
        "max_exp_avg_sq": s.max_exp_avg_sq,
    },
}


def _moment_states(state: Any) -> Iterable[Any]:
    """The states in ``_MOMENT_FIELDS`` inside nested chain tuples, in order."""
    if type(state) in _MOMENT_FIELDS:
        yield state
    elif isinstance(state, tuple):
        for sub in state:
            yield from _moment_states(sub)


__all__ = [
    "OPTIMIZERS",
    "STATE_NAMES",
    "TORCH_DEFAULT_WEIGHT_DECAY",
    "OptimizerSpec",
    "TorchAmsgradState",
    "TorchSGDMomentumState",
    "make_optax",
    "make_torch_optimizer",
    "manual_init",
    "manual_update",
    "optax_state_to_torch_names",
    "scale_by_torch_amsgrad",
    "torch_optimizer_state",
]
