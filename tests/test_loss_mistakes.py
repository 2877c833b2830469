"""Mistakes in a port's loss and in an activation's parameter: caught, and named.

Each row of :data:`PORTS` is a mistake a user made in a trial, written as a user writes
it (a JAX loss function for :func:`equiv.check_jax_port`), beside the right port of the
same torch model, which agrees with no hint. The rows of :data:`COMPUTED` are their
siblings, computed by JAX in float64 from torch-layout parameters and matched with
:func:`equiv.variants.matching_variant` directly (cheaper than a whole comparison).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from torch import nn

from equiv import MLPSpec, manual, mlp_from_module
from equiv.port import check_jax_port
from equiv.variants import matching_variant


def _mse(out, y):
    return jnp.mean((out - y) ** 2)


def _ce(out, y):
    return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()


def _sliced(loss_fn, taken=slice(None, -1)):
    """``loss_fn`` on ``x[taken]`` and ``y[taken]``: an off-by-one slice."""
    return lambda params, x, y: loss_fn(params, x[taken], y[taken])


@dataclasses.dataclass(frozen=True)
class Port:
    name: str
    layers: Callable[[], list[nn.Module]]  # the torch model, an nn.Sequential of these
    activation: Callable  # the right port's JAX activation
    loss: Callable  # the right port's loss(out, y)
    wrong: Callable  # (flax_port) -> the mistaken port's loss_fn(params, x, y)
    cause: str  # what the first hint begins with after "loss: "
    spec_loss: str = "mse"
    batch: int = 8
    labels: bool = False


def _relu_net(outputs):
    return lambda: [nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, outputs)]


PORTS = [
    Port(
        "mse-broadcast-(N,1)-against-(N,)",
        lambda: [nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1)],
        jnp.tanh,
        _mse,
        lambda port: port(jnp.tanh, lambda out, y: jnp.mean((out - y[:, 0]) ** 2)),
        "port broadcasts (8,1) against (8,) in its loss (or the reverse), so that out - y is (8,8)",
    ),
    Port(
        "mse-broadcast-(N,)-against-(N,1)",
        lambda: [nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1)],
        jnp.tanh,
        _mse,
        lambda port: port(jnp.tanh, lambda out, y: jnp.mean((out[:, 0] - y) ** 2)),
        "port broadcasts (8,1) against (8,) in its loss (or the reverse), so that out - y is (8,8)",
    ),
    Port(
        "softmax-before-cross-entropy",
        _relu_net(4),
        jax.nn.relu,
        _ce,
        lambda port: port(jax.nn.relu, lambda out, y: _ce(jax.nn.softmax(out), y)),
        "port applies softmax to the outputs before a cross-entropy that applies log_softmax "
        "itself (probabilities for logits)",
        spec_loss="cross_entropy",
        labels=True,
    ),
    Port(
        "loss-on-x[:-1]",
        _relu_net(3),
        jax.nn.relu,
        _mse,
        lambda port: _sliced(port(jax.nn.relu, _mse)),
        "port computes its loss on x[:-1] and y[:-1], 15 of the 16 rows",
        batch=16,
    ),
    Port(
        "mean-divided-by-batch-less-one",
        _relu_net(4),
        jax.nn.relu,
        _ce,
        lambda port: port(
            jax.nn.relu,
            lambda out, y: (
                optax.softmax_cross_entropy_with_integer_labels(out, y).sum() / (y.shape[0] - 1)
            ),
        ),
        "port's loss is 1.067 times reference's. A factor 16/15: port divides by 15, the batch "
        "size less one, where reference divides by the batch size, 16",
        spec_loss="cross_entropy",
        batch=16,
        labels=True,
    ),
    Port(
        "leaky-relu-slope-left-at-jax-default",
        lambda: (
            [nn.Linear(5, 16), nn.LeakyReLU(0.2), nn.Linear(16, 16), nn.LeakyReLU(0.2)]
            + [nn.Linear(16, 3)]
        ),
        functools.partial(jax.nn.leaky_relu, negative_slope=0.2),
        _mse,
        lambda port: port(jax.nn.leaky_relu, _mse),
        "port uses leaky_relu's negative_slope 0.01 (jax.nn.leaky_relu's default), not 0.2 as the "
        "spec has",
    ),
    Port(
        "elu-alpha-left-at-jax-default",
        lambda: [nn.Linear(5, 16), nn.ELU(0.5), nn.Linear(16, 3)],
        functools.partial(jax.nn.elu, alpha=0.5),
        _mse,
        lambda port: port(jax.nn.elu, _mse),
        "port uses elu's alpha 1 (jax.nn.elu's default), not 0.5 as the spec has",
    ),
    Port(
        "mse-sum-averaged-over-the-batch",
        lambda: [nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1)],
        jnp.tanh,
        lambda out, y: jnp.sum((out - y) ** 2),
        lambda port: port(jnp.tanh, lambda out, y: jnp.mean(jnp.sum((out - y) ** 2, axis=-1))),
        "port's loss is 0.125 times reference's. A factor of the batch size: port takes the mean "
        "over the batch where reference's loss (mse_sum) sums.",
        spec_loss="mse_sum",
    ),
]


def _check(row: Port, seed: int, wrong: bool, flax_port):
    torch.manual_seed(seed)
    model = nn.Sequential(*row.layers())
    spec = mlp_from_module(model)[0].replace(loss=row.spec_loss)  # a module has no loss
    layers, outputs = spec.num_layers, spec.sizes[-1]
    x = torch.randn(row.batch, 5)
    y = torch.randint(0, outputs, (row.batch,)) if row.labels else torch.randn(row.batch, outputs)
    port = (
        row.wrong(lambda act, loss: flax_port(act, loss, layers))
        if wrong
        else flax_port(row.activation, row.loss, layers)
    )
    return check_jax_port(model, port, x, y, spec=spec)


@pytest.mark.parametrize("row", PORTS, ids=[row.name for row in PORTS])
def test_a_mistaken_port_is_named_and_the_right_one_agrees(row, equiv_seed, flax_port):
    # Found in a user trial: each was caught (the comparison failed) with no cause
    # named, or the wrong one. The twin: the right port of the same model agrees.
    right = _check(row, equiv_seed, False, flax_port)
    right.assert_agree()
    assert right.hints() == []
    wrong = _check(row, equiv_seed, True, flax_port)
    assert not wrong.agree
    hints = wrong.hints()
    assert hints and hints[0].startswith(f"loss: {row.cause}"), hints


def test_the_broadcast_hint_says_how_to_fix_it(equiv_seed, flax_port):
    (row,) = [r for r in PORTS if r.name == "mse-broadcast-(N,1)-against-(N,)"]
    hint = _check(row, equiv_seed, True, flax_port).hints()[0]
    assert hint.endswith(
        "Reshape y to out's shape (y.reshape(out.shape)): torch's loss warns of the "
        "broadcast, jax.numpy broadcasts silently."
    ), hint


# ---------------------------------------------------------------------------
# Siblings, computed by JAX from torch-layout parameters


def _params(spec: MLPSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    params = {}
    for i in range(1, spec.num_layers + 1):
        fan_in, fan_out = spec.sizes[i - 1], spec.sizes[i]
        params[f"fc{i}.weight"] = rng.uniform(-1, 1, (fan_out, fan_in)) / np.sqrt(fan_in)
        params[f"fc{i}.bias"] = rng.uniform(-1, 1, fan_out) / np.sqrt(fan_in)
    return params


def _targets(spec: MLPSpec, rng: np.random.Generator, batch: int) -> np.ndarray:
    outputs = spec.sizes[-1]
    if spec.loss == "cross_entropy":
        return rng.integers(0, outputs, batch)
    if spec.loss == "cross_entropy_probs":
        return rng.dirichlet(np.ones(outputs), size=batch)
    if spec.loss == "bce_with_logits":
        return rng.uniform(0, 1, (batch, outputs))
    return rng.standard_normal((batch, outputs))


def _jax_step(spec: MLPSpec, params, x, y, act, loss) -> dict[str, np.ndarray]:
    """The float64 step-1 loss and gradients of a user's JAX port: ``act`` after every
    hidden layer, ``loss(out, x, y)``."""

    def loss_fn(p):
        h = jnp.asarray(x)
        for i in range(1, spec.num_layers + 1):
            h = h @ p[f"fc{i}.weight"].T + p[f"fc{i}.bias"]
            h = act(h) if i < spec.num_layers else h
        return loss(h, jnp.asarray(x), jnp.asarray(y))

    with jax.enable_x64(True):
        value, grads = jax.value_and_grad(loss_fn)({k: jnp.asarray(v) for k, v in params.items()})
        return {"loss": np.asarray(value), **{k: np.asarray(v) for k, v in grads.items()}}


def _bce(out, y):
    return jnp.mean(optax.sigmoid_binary_cross_entropy(out, y))


def _rows_of(loss, taken, targets):
    """``loss`` of the outputs' rows ``taken`` against the targets' rows ``targets`` (the
    port's forward pass of ``x[taken]``, row by row the same)."""
    return lambda out, x, y: loss(out[taken], y[targets])


def _plain(loss):
    return lambda out, x, y: loss(out, y)


_HEAD, _TAIL = slice(None, -1), slice(1, None)
SMOOTHED = MLPSpec((4, 8, 5), activation="tanh", loss="cross_entropy", label_smoothing=0.1)


def _smoothed_ce(out, y):
    return optax.softmax_cross_entropy(out, optax.smooth_labels(jax.nn.one_hot(y, 5), 0.1)).mean()


def _sum_of_squares(out, y):
    return jnp.sum((out - y) ** 2)


@dataclasses.dataclass(frozen=True)
class Computed:
    name: str
    spec: MLPSpec
    wrong: Callable  # the mistaken port's loss(out, x, y)
    cause: str  # what its hint begins with
    right: Callable | None = None  # the right port's loss(out, x, y): the spec's own by default
    act: Callable = jnp.tanh  # the right port's activation
    wrong_act: Callable | None = None  # the mistaken port's, where it differs


_RIGHT = {
    "mse": _plain(_mse),
    "mse_sum": _plain(_sum_of_squares),
    "huber": _plain(lambda out, y: jnp.mean(optax.huber_loss(out, y, delta=0.5))),
    "bce_with_logits": _plain(_bce),
    "cross_entropy": _plain(_smoothed_ce),
    "cross_entropy_probs": _plain(lambda out, y: optax.softmax_cross_entropy(out, y).mean()),
}
_WIDTH_1 = "broadcasts (6,1) against (6,) in its loss (or the reverse)"
_SQUASHED = "applies softmax to the outputs before a cross-entropy that applies log_softmax"
LEAKY = MLPSpec((4, 8, 8, 2), activation="leaky_relu", negative_slope=0.2)

COMPUTED = [
    Computed(
        "mse-sum-broadcast",
        MLPSpec((4, 8, 1), activation="tanh", loss="mse_sum"),
        _plain(lambda out, y: _sum_of_squares(out, y[:, 0])),
        _WIDTH_1,
    ),
    Computed(
        "huber-broadcast",
        MLPSpec((4, 8, 1), activation="tanh", loss="huber", huber_delta=0.5),
        _plain(lambda out, y: jnp.mean(optax.huber_loss(out[:, 0], y, delta=0.5))),
        _WIDTH_1,
    ),
    Computed(
        "bce-broadcast",
        MLPSpec((4, 8, 1), activation="tanh", loss="bce_with_logits"),
        _plain(lambda out, y: _bce(out, y[:, 0])),
        _WIDTH_1,
    ),
    Computed(
        "sigmoid-before-bce",
        MLPSpec((4, 8, 3), activation="tanh", loss="bce_with_logits"),
        _plain(lambda out, y: _bce(jax.nn.sigmoid(out), y)),
        "applies sigmoid to the outputs before a binary cross-entropy that applies it itself",
    ),
    Computed(
        "softmax-before-smoothed-cross-entropy",
        SMOOTHED,
        _plain(lambda out, y: _smoothed_ce(jax.nn.softmax(out), y)),
        _SQUASHED,
    ),
    Computed(
        "softmax-before-probability-targets",
        MLPSpec((4, 8, 5), activation="tanh", loss="cross_entropy_probs"),
        _plain(lambda out, y: optax.softmax_cross_entropy(jax.nn.softmax(out), y).mean()),
        _SQUASHED,
    ),
    Computed(
        "loss-on-x[1:]",
        SMOOTHED,
        _rows_of(_smoothed_ce, _TAIL, _TAIL),
        "computes its loss on x[1:] and y[1:], 5 of the 6 rows",
    ),
    Computed(
        "x[:-1]-paired-with-y[1:]",
        MLPSpec((4, 8, 2), activation="tanh"),
        _rows_of(_mse, _HEAD, _TAIL),
        "pairs x[:-1] with y[1:] in its loss, each row with the next one's target",
    ),
    Computed(
        "leaky-relu-slope-fitted",
        LEAKY,
        _plain(_mse),
        "uses leaky_relu's negative_slope 0.1, not 0.2 as the spec has",
        act=functools.partial(jax.nn.leaky_relu, negative_slope=0.2),
        wrong_act=functools.partial(jax.nn.leaky_relu, negative_slope=0.1),
    ),
    Computed(
        "leaky-relu-slope-the-spec-lacks",  # torch's default in the spec, 0.2 in the port
        LEAKY.replace(negative_slope=0.01),
        _plain(_mse),
        "uses leaky_relu's negative_slope 0.2, not 0.01 as the spec has",
        act=jax.nn.leaky_relu,
        wrong_act=functools.partial(jax.nn.leaky_relu, negative_slope=0.2),
    ),
    Computed(
        "elu-alpha-fitted",
        LEAKY.replace(activation="elu"),
        _plain(_mse),
        "uses elu's alpha 0.3, not 1 as the spec has",
        act=jax.nn.elu,
        wrong_act=functools.partial(jax.nn.elu, alpha=0.3),
    ),
]


@pytest.mark.parametrize("row", COMPUTED, ids=[row.name for row in COMPUTED])
def test_a_computed_mistake_is_named_and_the_right_port_is_none(row, rng):
    spec = row.spec.replace(dtype="float64")
    params = _params(spec, rng)
    x, y = rng.standard_normal((6, spec.sizes[0])), _targets(spec, rng, 6)
    right = _jax_step(spec, params, x, y, row.act, row.right or _RIGHT[spec.loss])
    assert matching_variant(spec, params, x, y, right) is None
    wrong = _jax_step(spec, params, x, y, row.wrong_act or row.act, row.wrong)
    named = matching_variant(spec, params, x, y, wrong)
    assert named is not None and named.startswith(row.cause), named


def _numpy_step(spec, params, x, y, **miswritten):
    with np.errstate(all="ignore"):
        loss, grads = manual.miswritten_loss_and_grads(params, x, y, spec, **miswritten)
    return {"loss": np.asarray(loss), **grads}


_NEW_NAMES = ("broadcasts", "softmax to the outputs", "sigmoid to the outputs", "x[:-1]", "x[1:]")
_NEW_NAMES += ("negative_slope", "alpha")


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize(
    "spec",
    [
        MLPSpec((5, 7, 7, 1), activation="leaky_relu", negative_slope=0.2),
        MLPSpec((5, 7, 7, 3), activation="elu", elu_alpha=0.5, loss="cross_entropy"),
        MLPSpec((5, 7, 1), activation="tanh", loss="bce_with_logits"),
    ],
    ids=["leaky-mse-width-1", "elu-cross-entropy", "tanh-bce-width-1"],
)
def test_the_new_names_go_to_their_mistakes_only(spec, seed):
    # False names are worse than none: a weight scaled by 1.05, one gradient 5% off and
    # a loss scaled with its gradients are no known mistake; a bias left out and a ReLU
    # mask in a leaky ReLU's or ELU's backward keep their own names. The twin: the loss
    # of x[:-1] is named, in every one of these models.
    spec = spec.replace(dtype="float64")
    rng = np.random.default_rng(seed)
    params = _params(spec, rng)
    x, y = rng.standard_normal((8, 5)), _targets(spec, rng, 8)
    short = _numpy_step(spec, params, x[:-1], y[:-1])
    named = matching_variant(spec, params, x, y, short)
    assert named.startswith("computes its loss on x[:-1] and y[:-1], 7 of the 8 rows:"), named
    right = _numpy_step(spec, params, x, y)
    scaled = _numpy_step(spec, {**params, "fc1.weight": params["fc1.weight"] * 1.05}, x, y)
    off = {**right, "fc1.weight": right["fc1.weight"] * 1.05}
    louder = {k: v * 1.05 for k, v in right.items()}
    for theirs in (scaled, off, louder):
        assert matching_variant(spec, params, x, y, theirs) is None
    last = spec.num_layers
    unbiased = _numpy_step(spec, {**params, f"fc{last}.bias": 0 * params[f"fc{last}.bias"]}, x, y)
    unbiased[f"fc{last}.bias"] = 0 * unbiased[f"fc{last}.bias"]
    named = matching_variant(spec, params, x, y, unbiased)
    assert named.startswith(f"leaves out fc{last}.bias"), named
    assert not any(n in named for n in _NEW_NAMES), named
    if spec.activation != "tanh":
        masked = _numpy_step(
            spec, params, x, y, slope_of=lambda k, dh, zs, acts: (zs[k - 1] > 0) * 1.0
        )
        named = matching_variant(spec, params, x, y, masked)
        assert named.startswith(f"takes a ReLU mask for {spec.activation}'s slope"), named
        assert not any(n in named for n in _NEW_NAMES), named


def test_a_port_computing_the_mean_absolute_error_is_told_the_l1_loss():
    # Found in a user trial: a port taking jnp.mean(jnp.abs(out - y)) against an MSE
    # model was told to pass a loss= equiv did not have. The twin: with loss="l1" the
    # same port agrees.
    import jax.numpy as jnp
    import torch

    import equiv

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(8, 4), torch.randn(8, 3)

    def mae(p, x, y):
        h = jnp.tanh(x @ p["fc1.weight"].T + p["fc1.bias"])
        return jnp.mean(jnp.abs(h @ p["fc2.weight"].T + p["fc2.bias"] - y))

    report = equiv.check_jax_port(net, mae, x, y, layout="torch")
    assert any("loss='l1'" in hint for hint in report.hints()), report.hints()
    spec = equiv.MLPSpec((4, 8, 3), activation="tanh", loss="l1")
    assert equiv.check_jax_port(net, mae, x, y, layout="torch", spec=spec, steps=2).agree
