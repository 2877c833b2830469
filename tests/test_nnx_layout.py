"""nnx_layout: a flax.nnx port under its own attribute names, read off its calls."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import equiv
from equiv.convert import Layout

nnx = pytest.importorskip("flax.nnx")


class Port(nnx.Module):
    """Defined out of call order, with dropout: what nnx_layout must read right."""

    def __init__(self, sizes, rngs, dtype=jnp.float32):
        self.out = nnx.Linear(sizes[1], sizes[2], dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.hidden = nnx.Linear(sizes[0], sizes[1], dtype=dtype, param_dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.out(self.drop(jnp.tanh(self.hidden(x))))


def _torch_net(sizes, seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(sizes[0], sizes[1]), torch.nn.Tanh(), torch.nn.Linear(sizes[1], sizes[2])
    )


def test_a_port_under_its_own_names_takes_torchs_weights_and_gives_torchs_output(equiv_seed):
    # The square widths make a layout read in definition order (out, hidden) fit every
    # shape: only the order of the calls tells the layers apart.
    sizes = (5, 5, 5)
    with jax.enable_x64(True):
        net = _torch_net(sizes, equiv_seed).double()
        port = Port(sizes, nnx.Rngs(equiv_seed), dtype=jnp.float64)
        counts = [int(c[...]) for c in jax.tree.leaves(nnx.state(port, nnx.RngCount))]
        assert counts  # the Dropout's
        layout = equiv.nnx_layout(port)
        assert layout.layers == ("hidden", "out")
        # The model is left as it was: no RNG drawn, no mode changed.
        assert [int(c[...]) for c in jax.tree.leaves(nnx.state(port, nnx.RngCount))] == counts
        assert port.drop.deterministic is False
        nnx.update(port, equiv.torch_to_jax(net, layout=layout))
        port.eval()
        x = torch.randn(7, 5, dtype=torch.float64)
        np.testing.assert_allclose(
            np.asarray(port(jnp.asarray(x.numpy()))), net(x).detach().numpy(), rtol=1e-13
        )
        # The twin: the same names in definition order put fc1's weights in `out`.
        wrong = Layout("defined", "{name}/kernel", "{name}/bias", True, layers=("out", "hidden"))
        nnx.update(port, equiv.torch_to_jax(net, layout=wrong))
        assert not np.allclose(np.asarray(port(jnp.asarray(x.numpy()))), net(x).detach().numpy())


def test_the_way_back_files_and_a_port_check_take_the_layout(tmp_path, equiv_seed):
    sizes = (4, 8, 3)
    net = _torch_net(sizes, equiv_seed)
    port = Port(sizes, nnx.Rngs(equiv_seed))
    layout = equiv.nnx_layout(port)
    state = equiv.jax_to_torch(port, layout=layout)
    assert np.array_equal(state["fc1.weight"].numpy(), np.asarray(port.hidden.kernel[...]).T)
    equiv.save_jax(port, tmp_path / "port.safetensors", layout=layout)
    for name, value in equiv.load_torch(tmp_path / "port.safetensors").items():
        assert torch.equal(value, state[name]), name
    back = equiv.load_jax(tmp_path / "port.safetensors", layout=layout)
    assert set(back) == {"hidden", "out"}

    graphdef, _, rest = nnx.split(port, nnx.Param, ...)

    def loss_fn(params, x, y):
        model = nnx.merge(graphdef, params, rest)
        model.eval()
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    def forgot_tanh(params, x, y):
        h = x @ params["hidden"]["kernel"] + params["hidden"]["bias"]
        logits = h @ params["out"]["kernel"] + params["out"]["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    gen = torch.Generator().manual_seed(equiv_seed)
    x, y = torch.randn(16, 4, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    spec = equiv.MLPSpec(sizes, activation="tanh", loss="cross_entropy")
    equiv.check_jax_port(net, loss_fn, x, y, layout=layout, spec=spec, steps=2).assert_agree()
    assert not equiv.check_jax_port(net, forgot_tanh, x, y, layout=layout, spec=spec).agree
    # Without the layout, the "nnx" layout's names are not the port's: told what to pass.
    with pytest.raises(ValueError, match=r"pass layout=equiv.nnx_layout\(model\)"):
        equiv.jax_to_torch(port, layout="nnx")


def test_layers_in_an_nnx_list_are_read_with_int_keys(equiv_seed):
    class Listed(nnx.Module):
        def __init__(self, rngs):
            self.blocks = nnx.List([nnx.Linear(4, 6, rngs=rngs), nnx.Linear(6, 2, rngs=rngs)])

        def __call__(self, x):
            return self.blocks[1](jax.nn.relu(self.blocks[0](x)))

    port = Listed(nnx.Rngs(equiv_seed))
    layout = equiv.nnx_layout(port)
    assert layout.layers == ("blocks/0", "blocks/1")
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    nnx.update(port, equiv.torch_to_jax(net, layout=layout))  # int keys, as nnx.List holds them
    assert np.array_equal(np.asarray(port.blocks[1].bias[...]), net[2].bias.detach().numpy())


def test_what_nnx_layout_cannot_read_is_refused_by_name():
    class Scaled(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(3, 2, rngs=rngs)
            self.scale = nnx.Param(jnp.ones(2))

        def __call__(self, x):
            return self.fc(x) * self.scale

    with pytest.raises(ValueError, match="parameters outside its nnx.Linear layers: 'scale'"):
        equiv.nnx_layout(Scaled(nnx.Rngs(0)))

    class Twice(nnx.Module):
        def __init__(self, rngs):
            self.a, self.b = nnx.Linear(3, 3, rngs=rngs), nnx.Linear(3, 2, rngs=rngs)

        def __call__(self, x):
            return self.b(self.a(self.a(x)))

    with pytest.raises(ValueError) as info:
        equiv.nnx_layout(Twice(nnx.Rngs(0)))
    assert str(info.value) == (
        "[equiv] Twice's __call__ calls its Linear layers as a, a, b, not each of a, b once: "
        "equiv's MLP calls each layer once, in order"
    )

    class Needs(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(3, 2, rngs=rngs)

        def __call__(self, x, mask):
            return self.a(x) * mask

    with pytest.raises(ValueError, match="cannot be run on one batch x"):
        equiv.nnx_layout(Needs(nnx.Rngs(0)))
    with pytest.raises(TypeError, match="reads a flax.nnx.Module, got Sequential"):
        equiv.nnx_layout(torch.nn.Sequential())
    # Found in review: a bare nnx.Linear gave "layer name '' is empty".
    with pytest.raises(ValueError, match="this is a bare Linear, which has none: hold it in a"):
        equiv.nnx_layout(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))


def test_a_layout_of_named_layers_is_checked_as_templates_are():
    named = Layout("port", "{name}/kernel", "{name}/bias", True, layers=("a/b", "c"))
    assert named.path("fc1.weight") == ("a", "b", "kernel")
    assert named.torch_name(("c", "bias")) == "fc2.bias" and named.torch_name(("d",)) is None
    with pytest.raises(ValueError, match="names 2 layers .a/b, c., so fc3.weight has no path"):
        named.path("fc3.weight")
    with pytest.raises(ValueError, match="uses '.name.' without layers="):
        Layout("p", "{name}/kernel", "{name}/bias", True)
    with pytest.raises(ValueError, match="does not use '.name.', so layers= names nothing"):
        Layout("p", "Dense_{j}/kernel", "Dense_{j}/bias", True, layers=("a",))
    with pytest.raises(ValueError, match="names a layer twice"):
        Layout("p", "{name}/kernel", "{name}/bias", True, layers=("a", "a"))
    with pytest.raises(ValueError, match="holds a brace or a comma"):
        Layout("p", "{name}/kernel", "{name}/bias", True, layers=("a,b",))
    with pytest.raises(TypeError, match="layers must be a tuple of str"):
        Layout("p", "{name}/kernel", "{name}/bias", True, layers=["a"])


def test_an_nnx_sequential_interleaving_functions_is_read(equiv_seed):
    # Found in review: its Linear layers are numbered 0, 2, ..., which no template
    # expresses; the layout read off its calls holds those keys.
    seq = nnx.Sequential(
        nnx.Linear(4, 8, rngs=nnx.Rngs(equiv_seed)), jax.nn.relu, nnx.Linear(8, 2, rngs=nnx.Rngs(1))
    )
    layout = equiv.nnx_layout(seq)
    assert layout.layers == ("layers/0", "layers/2")
    torch.manual_seed(equiv_seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    nnx.update(seq, equiv.torch_to_jax(net, layout=layout))
    x = torch.randn(3, 4)
    np.testing.assert_allclose(
        np.asarray(seq(jnp.asarray(x.numpy()))), net(x).detach().numpy(), rtol=1e-5, atol=1e-6
    )


def test_the_probe_leaves_every_variable_of_the_model_as_it_was():
    # Found in review: the probe ran on nnx.merge(*nnx.split(model)), which shares the
    # model's variables: a call that passes deterministic=not train, draws from its
    # Rngs or updates a variable (batch statistics) changed the model.
    class Counter(nnx.Variable):
        pass

    class Stateful(nnx.Module):
        def __init__(self, rngs):
            self.a, self.c = nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 2, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)
            self.bn = nnx.BatchNorm(8, use_scale=False, use_bias=False, rngs=rngs)
            self.rngs, self.calls = rngs, Counter(jnp.array(0))

        def __call__(self, x, train: bool = True):
            self.calls[...] += 1
            self.rngs.params()
            self.bn(x @ jnp.ones((4, 8)), use_running_average=not train)  # its stats only
            return self.c(self.drop(jax.nn.relu(self.a(x)), deterministic=not train))

    def values(model):
        def value(v):
            if jnp.issubdtype(v.dtype, jax.dtypes.prng_key):
                v = jax.random.key_data(v)
            return np.array(v)

        return jax.tree.leaves(jax.tree.map(value, nnx.state(model, ...)))

    model = Stateful(nnx.Rngs(0))
    before = values(model)
    assert equiv.nnx_layout(model).layers == ("a", "c")  # dropout on in the call: rate 0
    assert all(np.array_equal(a, b) for a, b in zip(before, values(model), strict=True))
    assert model.drop.deterministic is False


def _stack_of(call):
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.a, self.b = nnx.Linear(4, 4, rngs=rngs), nnx.Linear(4, 4, rngs=rngs)

        def __call__(self, x):
            return call(self, x)

    return Model(nnx.Rngs(0))


@pytest.mark.parametrize(
    "call,phrase",
    [
        (
            lambda m, x: m.b(jax.nn.relu(m.a(x)) + x),
            "Linear b is not called on one of equiv.s activations of a",
        ),
        (lambda m, x: m.b(m.a(x) * 2), "Linear b is not called on one of equiv.s activations of a"),
        (lambda m, x: m.b(jax.nn.relu(m.a(x - 1))), "first Linear a is not called on the input"),
        (lambda m, x: jax.nn.softmax(m.b(jax.nn.relu(m.a(x)))), "output is not its last Linear b"),
        (
            lambda m, x: nnx.remat(lambda layer, h: layer(h))(m.b, m.a(x)),
            "through an nnx transform",
        ),
        (lambda m, x: (m.b(jax.nn.relu(m.a(x))), x), "returns a tuple, not an array"),
    ],
    ids=["residual", "scale", "shifted-input", "final-softmax", "transform", "tuple"],
)
def test_a_call_that_is_not_a_linear_stack_is_refused_with_the_gap_named(call, phrase):
    # Found in review: a residual connection or parallel branches with square widths
    # were read as a stack, and a transform's copy of a layer raised a bare KeyError.
    with pytest.raises(ValueError, match=phrase):
        equiv.nnx_layout(_stack_of(call))
    # The twin: the same layers as a stack, any of equiv's activations between them.
    for act in (jax.nn.relu, jnp.tanh, jax.nn.silu, lambda h: h):
        stack = _stack_of(lambda m, x, act=act: m.b(act(m.a(x))))
        assert equiv.nnx_layout(stack).layers == ("a", "b")


def test_layers_in_a_dict_attribute_are_read_by_their_keys():
    class Keyed(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.data(
                {"first": nnx.Linear(4, 8, rngs=rngs), "second": nnx.Linear(8, 2, rngs=rngs)}
            )

        def __call__(self, x):
            return self.layers["second"](jax.nn.relu(self.layers["first"](x)))

    assert equiv.nnx_layout(Keyed(nnx.Rngs(0))).layers == ("layers/first", "layers/second")


def test_a_layer_without_a_bias_is_read_off_the_model(tmp_path):
    # Found in review: an nnx port with use_bias=False on one layer needed spec=.
    class Port(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(4, 8, use_bias=False, rngs=rngs)
            self.b = nnx.Linear(8, 2, rngs=rngs)

        def __call__(self, x):
            return self.b(jax.nn.relu(self.a(x)))

    port = Port(nnx.Rngs(0))
    layout = equiv.nnx_layout(port)
    assert list(equiv.jax_to_torch(port, layout=layout)) == ["fc1.weight", "fc2.weight", "fc2.bias"]
    equiv.save_jax(port, tmp_path / "p.safetensors", layout=layout)
    assert list(equiv.load_torch(tmp_path / "p.safetensors")) == [
        "fc1.weight",
        "fc2.weight",
        "fc2.bias",
    ]
    # The twin: its state alone cannot tell a layer without a bias from a lost entry,
    # and its own names point to nnx_layout.
    with pytest.raises(ValueError, match="missing: 'a.bias'"):
        equiv.jax_to_torch(nnx.state(port, nnx.Param), layout=layout)
    with pytest.raises(ValueError, match=r"layout=equiv.nnx_layout\(model\) for a flax.nnx model"):
        equiv.jax_to_torch(nnx.state(port, nnx.Param), layout="nnx")


class Body(nnx.Module):
    def __init__(self, rngs, act=jnp.tanh, sizes=(4, 8, 2), bias=True):
        self.body = nnx.Linear(sizes[0], sizes[1], rngs=rngs)
        self.head = nnx.Linear(sizes[1], sizes[2], use_bias=bias, rngs=rngs)
        self.act = act

    def __call__(self, x):
        return self.head(self.act(self.body(x)))


def _seq(*layers):
    torch.manual_seed(0)
    return torch.nn.Sequential(*layers)


def test_torch_to_nnx_fills_a_port_that_fits_and_refuses_one_that_does_not():
    # Found in a user trial: nnx.update(port, torch_to_jax(net, layout=nnx_layout(port)))
    # installed a 4-16-2 model's arrays in a 4-8-2 port, and kept the port's bias where
    # the torch layer had none, silently; the port failed later, or computed otherwise.
    net = _seq(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    port = equiv.torch_to_nnx(net, Body(nnx.Rngs(0)))
    x = torch.randn(5, 4)
    np.testing.assert_allclose(
        np.asarray(port(jnp.asarray(x.numpy()))), net(x).detach().numpy(), rtol=1e-5, atol=1e-6
    )
    equiv.torch_to_nnx(net.state_dict(), Body(nnx.Rngs(0)))  # a state_dict too

    def refusal(source, target):
        with pytest.raises(ValueError) as info:
            equiv.torch_to_nnx(source, target)
        return str(info.value).splitlines()

    wider = _seq(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    assert refusal(wider, Body(nnx.Rngs(0)))[1:] == [
        "  body (torch's fc1): kernel (4, 8) in the port, (4, 16) from torch",
        "  head (torch's fc2): kernel (8, 2) in the port, (16, 2) from torch",
    ]
    no_bias = _seq(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2, bias=False))
    assert refusal(no_bias, Body(nnx.Rngs(0)))[1:] == [
        "  head (torch's fc2): the port has a bias and torch's fc2 none (build it with "
        "use_bias=False)"
    ]
    equiv.torch_to_nnx(no_bias, Body(nnx.Rngs(0), bias=False))  # the twin, as advised
    deeper = _seq(
        torch.nn.Linear(4, 8),
        torch.nn.Tanh(),
        torch.nn.Linear(8, 8),
        torch.nn.Tanh(),
        torch.nn.Linear(8, 2),
    )
    assert refusal(deeper, Body(nnx.Rngs(0))) == [
        "[equiv] the torch MLP (4, 8, 8, 2) has 3 Linear layers and Body 2 (body, head, in "
        "the order it calls them): they are different models"
    ]


@pytest.mark.parametrize(
    "torch_act,port_act,row",
    [
        (torch.nn.Tanh(), jax.nn.relu, "the port applies relu, torch's module tanh"),
        (torch.nn.GELU(), jax.nn.gelu, "the port applies gelu_tanh, torch's module gelu"),
        (
            torch.nn.LeakyReLU(0.2),
            jax.nn.leaky_relu,
            "leaky_relu with negative_slope 0.01 in the port, 0.2 in torch",
        ),
    ],
    ids=["tanh-relu", "gelu-tanh", "slope"],
)
def test_torch_to_nnx_refuses_a_port_applying_another_activation(torch_act, port_act, row):
    net = _seq(torch.nn.Linear(4, 8), torch_act, torch.nn.Linear(8, 2))
    with pytest.raises(ValueError) as info:
        equiv.torch_to_nnx(net, Body(nnx.Rngs(0), act=port_act))
    assert str(info.value).splitlines()[1] == f"  between body and head: {row}"
    # The twin: the port applying torch's activation, its parameter read off the probe.
    same = {
        "Tanh": jnp.tanh,
        "GELU": functools.partial(jax.nn.gelu, approximate=False),
        "LeakyReLU": functools.partial(jax.nn.leaky_relu, negative_slope=0.2),
    }[type(torch_act).__name__]
    equiv.torch_to_nnx(net, Body(nnx.Rngs(0), act=same))


def test_check_jax_port_takes_an_nnx_port_itself_as_params(equiv_seed):
    # Found in a user trial: params=<an nnx port with a Dropout> failed inside jax.grad
    # on its RNG state, reported as the loss_fn's failure. Its Params are
    # differentiated, in the layout nnx_layout reads, and loss_fn receives the model.
    class Port(nnx.Module):
        def __init__(self, rngs, act):
            self.l2 = nnx.Linear(8, 2, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)
            self.l1 = nnx.Linear(4, 8, rngs=rngs)
            self.act = act

        def __call__(self, x):
            return self.l2(self.drop(self.act(self.l1(x)), deterministic=True))

    net = _seq(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    gen = torch.Generator().manual_seed(equiv_seed)
    x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 2, generator=gen)

    def loss_fn(model, x, y):
        return jnp.mean((model(x) - y) ** 2)

    port = equiv.torch_to_nnx(net, Port(nnx.Rngs(0), jax.nn.relu))
    report = equiv.check_jax_port(net, loss_fn, x, y, params=port, steps=2)
    report.assert_agree()
    assert report.trajectories["port"].layout == "Port"
    # The twin: a port applying another activation disagrees.
    wrong = Port(nnx.Rngs(0), jax.nn.silu)
    nnx.update(wrong, nnx.state(port, nnx.Param))
    assert not equiv.check_jax_port(net, loss_fn, x, y, params=wrong).agree


def test_a_swap_in_the_nnx_layout_is_told_why_and_the_fix(equiv_seed):
    # Found in a user trial: "port uses fc1 and fc2 in each other's place" said neither
    # that nnx.merge pairs arrays in sorted key order nor what to pass instead.
    class Port(nnx.Module):
        def __init__(self, rngs):
            self.proj, self.mix = nnx.Linear(5, 5, rngs=rngs), nnx.Linear(5, 5, rngs=rngs)

        def __call__(self, x):
            return self.mix(jnp.tanh(self.proj(x)))

    net = _seq(torch.nn.Linear(5, 5), torch.nn.Tanh(), torch.nn.Linear(5, 5))
    gen = torch.Generator().manual_seed(equiv_seed)
    x, y = torch.randn(16, 5, generator=gen), torch.randn(16, 5, generator=gen)
    port = Port(nnx.Rngs(0))
    graphdef, _ = nnx.split(port)

    def loss_fn(params, x, y):
        return jnp.mean((nnx.merge(graphdef, params)(x) - y) ** 2)

    report = equiv.check_jax_port(net, loss_fn, x, y, layout="nnx")
    hints = " ".join(report.hints())
    assert "uses fc1 and fc2 in each other's place" in hints, hints
    assert "pass layout=equiv.nnx_layout(port)" in hints, hints
    layout = equiv.nnx_layout(port)  # the twin, as advised
    equiv.check_jax_port(net, loss_fn, x, y, layout=layout).assert_agree()


def test_torch_to_nnx_compares_outputs_after_the_fill_not_only_registered_activations():
    # Found in review: a Sequential with no activation module between its layers went
    # into a tanh port (nothing to compare), and a port of zeros matched any activation
    # on its own weights; the filled copy's output against the module's tells both.
    plain = _seq(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    with pytest.raises(ValueError) as info:
        equiv.torch_to_nnx(plain, Body(nnx.Rngs(0)))  # tanh between
    assert str(info.value).splitlines()[1] == (
        "  between body and head: the port applies tanh, torch's module none there (or a "
        "function it calls, which equiv cannot read)"
    )
    equiv.torch_to_nnx(plain, Body(nnx.Rngs(0), act=lambda h: h))  # the twin
    tanh = _seq(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    zeros = nnx.initializers.zeros

    class Shell(Body):
        def __init__(self, rngs):
            super().__init__(rngs, act=jax.nn.relu)
            self.body = nnx.Linear(4, 8, kernel_init=zeros, rngs=rngs)

    with pytest.raises(ValueError, match="the port applies relu, torch's module tanh"):
        equiv.torch_to_nnx(tanh, Shell(nnx.Rngs(0)))


def test_a_port_in_training_mode_is_told_to_call_eval(equiv_seed):
    # Found in review: params=<a port whose Dropout is active> failed inside jax.grad
    # with flax's TraceContextError, and was told about the tree's keys.
    class Port(nnx.Module):
        def __init__(self, rngs):
            self.a, self.b = nnx.Linear(4, 6, rngs=rngs), nnx.Linear(6, 2, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)

        def __call__(self, x):
            return self.b(self.drop(jax.nn.relu(self.a(x))))

    net = _seq(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    port = equiv.torch_to_nnx(net, Port(nnx.Rngs(0)))
    x, y = torch.randn(8, 4), torch.randn(8, 2)

    def loss_fn(model, x, y):
        return jnp.mean((model(x) - y) ** 2)

    with pytest.raises(ValueError, match=r"call port.eval\(\) first"):
        equiv.check_jax_port(net, loss_fn, x, y, params=port)
    port.eval()  # the twin, as told
    report = equiv.check_jax_port(net, loss_fn, x, y, params=port)
    report.assert_agree()
    assert report.report.settings["port"] == "jax loss_fn, Port layout"


def test_a_torch_module_ending_in_softmax_is_told_the_nnx_port_lacks_it():
    # Found in review: the refusal said only that the outputs differed after the last
    # layer. The twin: its state_dict, parameters alone, fills the port.
    class Head(nnx.Module):
        def __init__(self, rngs):
            self.a, self.head = nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            return self.head(jnp.tanh(self.a(x)))

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3), torch.nn.Softmax(-1)
    )
    with pytest.raises(ValueError, match="applies its final Softmax, which the port does not"):
        equiv.torch_to_nnx(net, Head(nnx.Rngs(0)))
    port = equiv.torch_to_nnx(net.state_dict(), Head(nnx.Rngs(0)))
    np.testing.assert_array_equal(np.asarray(port.head.bias[...]), net[2].bias.detach().numpy())
