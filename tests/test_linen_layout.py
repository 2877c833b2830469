"""linen_layout: a flax.linen port under its own layer names, read off its calls."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import equiv

nn = pytest.importorskip("flax.linen")


class Inverted(nn.Module):
    """Dense(3)(f(Dense(8)(x))): linen constructs, and numbers, the outer one first."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(jnp.tanh(nn.Dense(5)(x)))


class Named(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="out")(jnp.tanh(nn.Dense(5, name="hidden")(x)))


def _net(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


@pytest.mark.parametrize(
    "module,layers",
    [
        (Inverted(), ("Dense_1", "Dense_0")),
        (Named(), ("hidden", "out")),
        (nn.Sequential([nn.Dense(5), jnp.tanh, nn.Dense(3)]), ("layers_0", "layers_2")),
    ],
    ids=["construction-order", "named", "sequential"],
)
def test_a_linen_port_takes_torchs_weights_under_its_own_names(module, layers, equiv_seed):
    # Found in a user trial: nn.Dense(name=...) had no layout but one written by hand,
    # and the "flax" layout's Dense_0 is the first constructed, not the first called.
    net = _net(equiv_seed)
    params = module.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    layout = equiv.linen_layout(module, params)
    assert layout.layers == layers
    filled = equiv.torch_to_jax(net, layout=layout)
    x = torch.randn(6, 4)
    np.testing.assert_allclose(
        np.asarray(module.apply({"params": filled}, jnp.asarray(x.numpy()))),
        net(x).detach().numpy(),
        rtol=1e-5,
        atol=1e-6,
    )
    equiv.check_jax_port(
        net,
        lambda p, x, y: jnp.mean((module.apply({"params": p}, x) - y) ** 2),
        torch.randn(8, 4),
        torch.randn(8, 3),
        layout=layout,
        steps=2,
    ).assert_agree()
    # The twin: the "flax" layout's numbering puts the torch layers elsewhere.
    if layers[0] != "layers_0":
        from flax.errors import FlaxError

        with pytest.raises(FlaxError):
            module.apply({"params": equiv.torch_to_jax(net, layout="flax")}, jnp.ones((1, 4)))


def test_what_linen_layout_cannot_read_is_refused_by_name():
    class Residual(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(4, name="a")(x)
            return nn.Dense(2, name="b")(jax.nn.relu(h) + x)

    params = Residual().init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    with pytest.raises(ValueError, match="Linear b is not called on one of equiv.s activations"):
        equiv.linen_layout(Residual(), params)

    class Normed(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(nn.LayerNorm()(nn.Dense(4)(x)))

    params = Normed().init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    with pytest.raises(ValueError, match="parameters outside its Dense layers: 'LayerNorm_0/"):
        equiv.linen_layout(Normed(), {"params": params})  # a variables dict is read too
    with pytest.raises(TypeError, match="reads a flax.linen.Module, got Sequential"):
        equiv.linen_layout(torch.nn.Sequential(), params)


def test_three_nested_dense_layers_are_named_as_reversed_and_linen_layout_reads_them():
    # Found in a user trial: Dense(8)(f(Dense(8)(f(Dense(8)(x))))) numbers its layers
    # outermost first; with three of one shape the only hint was about the loss. The
    # twin: read with linen_layout, the port agrees.
    class Nested(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(8)(jnp.tanh(nn.Dense(8)(jnp.tanh(nn.Dense(8)(x)))))

    port = Nested()
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(8, 8),
        torch.nn.Tanh(),
        torch.nn.Linear(8, 8),
        torch.nn.Tanh(),
        torch.nn.Linear(8, 8),
    )

    def loss_fn(p, x, y):
        return jnp.mean((port.apply({"params": p}, x) - y) ** 2)

    x, y = torch.randn(16, 8), torch.randn(16, 8)
    report = equiv.check_jax_port(net, loss_fn, x, y, layout="flax")
    assert not report.agree
    assert any("uses fc1 to fc3 in reverse order" in hint for hint in report.hints())
    params = port.init(jax.random.key(0), jnp.zeros((1, 8)))["params"]
    layout = equiv.linen_layout(port, params)
    assert layout.layers == ("Dense_2", "Dense_1", "Dense_0")
    assert equiv.check_jax_port(net, loss_fn, x, y, layout=layout).agree


def test_hints_name_the_ports_own_parameters_beside_equivs():
    # Found in a user trial: a flax port was told "port uses fc2.weight transposed" and
    # left to work out Dense_1/kernel; under linen_layout, the names it gave its layers.
    class Named(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = jnp.tanh(nn.Dense(8, name="proj_in")(x))
            return nn.Dense(8, name="proj_out")(h)

    port = Named()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))

    def transposed(p, x, y):  # proj_out's kernel used transposed
        wrong = {**p, "proj_out": {**p["proj_out"], "kernel": p["proj_out"]["kernel"].T}}
        return jnp.mean((port.apply({"params": wrong}, x) - y) ** 2)

    x, y = torch.randn(16, 8), torch.randn(16, 8)
    layout = equiv.linen_layout(port, port.init(jax.random.key(0), jnp.zeros((1, 8)))["params"])
    report = equiv.check_jax_port(net, transposed, x, y, layout=layout)
    assert any(
        "port uses fc2.weight transposed" in h
        and h.endswith("In the port's Named layout, fc2.weight is 'proj_out/kernel'.")
        for h in report.hints()
    ), report.hints()

    # The twin: a torch-layout port's names are equiv's, and said once (no such line).
    def torch_names(p, x, y):
        h = jnp.tanh(x @ p["fc1.weight"].T + p["fc1.bias"])
        return jnp.mean((h @ p["fc2.weight"] + p["fc2.bias"] - y) ** 2)

    hints = equiv.check_jax_port(net, torch_names, x, y, layout="torch").hints()
    assert any("port uses fc2.weight transposed" in h for h in hints), hints
    assert not any("In the port's" in h for h in hints), hints
