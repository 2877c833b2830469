"""mlp_from_module: any torch Linear stack as equiv's MLP, checked, or a clear refusal."""

import functools

import numpy as np
import pytest
import torch
from torch import nn

import equiv
from equiv.from_module import mlp_from_module


class Named(nn.Module):
    """Layers as named attributes, registered in call order."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 7)
        self.act = nn.LeakyReLU(0.2)
        self.out = nn.Linear(7, 3)

    def forward(self, x):
        return self.out(self.act(self.inp(x)))


class Reordered(Named):
    """Registered in one order, called in another: the check must notice."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, x):
        return self.out(torch.relu(self.inp(x)) * 2)


MODELS = [
    (
        "sequential",
        lambda: nn.Sequential(
            nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 2)
        ),
        (4, 8, 8, 2),
        ("gelu", "silu"),
    ),
    ("named", Named, (5, 7, 3), ("leaky_relu",)),
    (
        "float64-no-bias",
        lambda: nn.Sequential(
            nn.Linear(3, 4, bias=False, dtype=torch.float64),
            nn.Tanh(),
            nn.Linear(4, 1, bias=False, dtype=torch.float64),
        ),
        (3, 4, 1),
        ("tanh",),
    ),
    (
        "mixed-bias",
        lambda: nn.Sequential(
            nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8, bias=False), nn.ReLU(), nn.Linear(8, 2)
        ),
        (4, 8, 8, 2),
        ("relu", "relu"),
    ),
]


@pytest.mark.parametrize("make,sizes,acts", [m[1:] for m in MODELS], ids=[m[0] for m in MODELS])
def test_reads_the_stack_and_the_harness_agrees(make, sizes, acts, equiv_seed):
    torch.manual_seed(equiv_seed)
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec, params = mlp_from_module(model)
    assert spec.sizes == sizes and spec.activations == acts
    # The user's module is untouched (dtype and values).
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    problem = equiv.make_problem(spec, params=params, batch_size=5, steps=2, seed=equiv_seed)
    assert all(torch.equal(problem.params[k], params[k]) for k in params)
    equiv.compare_backends(problem=problem).assert_agree()


@pytest.mark.parametrize(
    ("biases", "bias"),
    [
        ((True, False), (True, False)),
        ((False, True, True), (False, True, True)),
        ((True, True), True),  # one bool for every layer, as before
        ((False, False), False),
    ],
)
def test_each_linears_own_bias_is_read(biases, bias):
    widths = (3, 5, 4, 2)[: len(biases) + 1]
    layers = []
    for i, has in enumerate(biases):
        layers += [nn.Linear(widths[i], widths[i + 1], bias=has), nn.Tanh()]
    spec, params = mlp_from_module(nn.Sequential(*layers[:-1]))
    assert spec.bias == bias and spec.biases == biases
    assert list(params) == spec.param_names()
    assert {f"fc{i}.bias" for i, has in enumerate(biases, start=1) if has} == {
        name for name in params if name.endswith(".bias")
    }


def test_a_module_with_a_bias_on_some_layers_converts_both_ways():
    from equiv.convert import jax_to_torch, torch_to_jax

    class Net(nn.Module):  # equiv's names, fc1 without a bias
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    torch.manual_seed(0)
    source, target = Net(), Net()
    tree = torch_to_jax(source, layout="flax")  # no spec: the module says which have one
    assert sorted(tree["Dense_0"]) == ["kernel"] and sorted(tree["Dense_1"]) == ["bias", "kernel"]
    jax_to_torch(tree, layout="flax", out=target, spec=mlp_from_module(source)[0])
    assert all(
        torch.equal(a, b) for a, b in zip(source.parameters(), target.parameters(), strict=True)
    )
    # out= says which layers have a bias; the twin: the tree alone cannot tell fc1's
    # absent bias from a lost one.
    jax_to_torch(tree, layout="flax", out=Net())
    with pytest.raises(ValueError, match="missing: 'Dense_0.bias'"):
        jax_to_torch(tree, layout="flax")


def test_leaky_relu_slope_is_carried():
    spec, _ = mlp_from_module(Named())
    assert spec.negative_slope == 0.2


def _reused() -> nn.Module:
    layer = nn.Linear(3, 3)
    return nn.Sequential(layer, nn.ReLU(), layer)


def _tied() -> nn.Module:
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    second.weight = first.weight
    return nn.Sequential(first, nn.ReLU(), second)


class SharedActivation(nn.Module):  # layers in a ModuleList, one activation module reused
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 1)])
        self.act = nn.ReLU()

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = self.act(layer(x))
        return self.layers[-1](x)


def _tied_transposed() -> nn.Module:
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    second.weight = nn.Parameter(first.weight.T)  # the same memory, transposed
    return nn.Sequential(first, nn.ReLU(), second)


class Scaled(nn.Module):  # a learnable scale outside the Linear layers (1 at first)
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 3), nn.Linear(3, 1)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))) * self.scale


def _frozen() -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
    model[0].requires_grad_(False)
    return model


class WithBuffer(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
        self.register_buffer("step", torch.zeros(()))


class Detached(nn.Module):  # the same output, but no gradient reaches fc1
    def __init__(self):
        super().__init__()
        # Tanh, not ReLU: with ReLU, weights drawn from the global generator at collection
        # time (which depends on what was collected before) could leave every fc1 unit
        # dead on the probe batch, where no gradient reaches fc1 either way (seen once in
        # a full run: "DID NOT RAISE").
        self.fc1, self.act, self.fc2 = nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)).detach())


def test_a_bare_linear_is_a_one_layer_mlp():
    layer = nn.Linear(3, 2, dtype=torch.float64)
    spec, params = mlp_from_module(layer)
    assert spec.sizes == (3, 2) and spec.dtype == "float64"
    assert torch.equal(params["fc1.weight"], layer.weight)


def test_parameters_packed_in_one_buffer_are_not_called_tied():
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
    flat = torch.randn(6)
    with torch.no_grad():  # both weights as views of one flat buffer, side by side
        model[0].weight = nn.Parameter(flat[:4].view(2, 2))
        model[2].weight = nn.Parameter(flat[4:].view(1, 2))
    spec, _ = mlp_from_module(model)
    assert spec.sizes == (2, 2, 1)


def _weight_norm() -> nn.Module:
    """torch's old weight_norm: the Linear's weight is recomputed from weight_g and
    weight_v before each call, so a copy of the weight would train as something else."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated, still in use
        first = nn.utils.weight_norm(nn.Linear(3, 3))
    return nn.Sequential(first, nn.ReLU(), nn.Linear(3, 1))


@pytest.mark.parametrize(
    "model,phrase",
    [
        (
            nn.Sequential(nn.Linear(3, 3), nn.Softmax(dim=-1), nn.Linear(3, 1)),
            "submodule '1' is Softmax, which equiv cannot express",
        ),
        (
            nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1), nn.Linear(3, 1)),
            "submodule '1' is Dropout(p=0.1) in training mode: it zeroes random units",
        ),
        (
            nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Tanh(), nn.Linear(3, 1)),
            "activation '2' (tanh) comes right after another activation",
        ),
        (
            nn.Sequential(nn.Linear(3, 3), nn.ReLU()),
            "an activation comes after the last Linear layer in the order its forward calls them",
        ),
        (
            nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(3, 1)),
            # The forward cannot run, so registration order stands in.
            "Linear '2' takes 3 inputs but '0', before it in registration order, gives 4",
        ),
        (
            nn.Sequential(
                nn.Linear(3, 3),
                nn.LeakyReLU(0.1),
                nn.Linear(3, 3),
                nn.LeakyReLU(0.2),
                nn.Linear(3, 1),
            ),
            "negative_slope differs between layers",
        ),
        (Reordered(), "forward pass is not its Linear layers and activations applied in"),
        (_reused(), "Linear '2' is the same module as '0'"),
        (_tied(), "parameters '0.weight' and '2.weight' share memory (tied weights)"),
        (_tied_transposed(), "parameters '0.weight' and '2.weight' share memory"),
        (Scaled(), "parameter 'scale' belongs to Scaled 'the module itself', not an nn.Linear"),
        (  # found in a user trial: the module holding it was not named
            nn.Sequential(nn.Linear(3, 3), nn.PReLU(), nn.Linear(3, 1)),
            "parameter '1.weight' belongs to PReLU '1', not an nn.Linear",
        ),
        (_frozen(), "parameter '0.weight' is frozen (requires_grad=False)"),
        (WithBuffer(), "buffer 'step' is state equiv's MLP does not have"),
        (Detached(), "float64 probe batch, its gradients differ for fc1.weight"),
        (_weight_norm(), "Linear '0' holds parameters weight_g, weight_v besides its weight"),
        (
            nn.Sequential(nn.LazyLinear(3), nn.ReLU(), nn.Linear(3, 1)),
            "'0.weight' is an uninitialised lazy parameter",
        ),
        (
            nn.Sequential(nn.Linear(3, 3, device="meta"), nn.ReLU(), nn.Linear(3, 1)),
            "'0.weight' is on the meta device and holds no values",
        ),
        (
            nn.ModuleList([nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1)]),
            "ModuleList has no forward pass to check",
        ),
        (
            nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1, dtype=torch.float64)),
            "all Linear layers' weights and biases must share one dtype; got dtypes "
            "['torch.float32', 'torch.float64']: convert the model first (model.float(), "
            "model.double() or model.bfloat16())",
        ),
    ],
    ids=[
        "softmax",
        "training-dropout",
        "two-activations",
        "trailing-activation",
        "widths",
        "slopes",
        "reordered",
        "reused-layer",
        "tied-weights",
        "tied-transposed",
        "extra-parameter",
        "prelu",
        "frozen",
        "buffer",
        "detached",
        "weight-norm",
        "lazy",
        "meta",
        "module-list",
        "mixed-dtypes",
    ],
)
def test_refusals_name_the_problem(model, phrase):
    with pytest.raises(ValueError, match="^\\[equiv\\] ") as error:
        mlp_from_module(model)
    assert phrase in str(error.value)


def test_materialised_lazy_layers_and_an_unchecked_module_list_are_read():
    lazy = nn.Sequential(nn.LazyLinear(3), nn.ReLU(), nn.Linear(3, 1))
    lazy(torch.randn(2, 5))  # the first call materialises the weights
    assert mlp_from_module(lazy)[0].sizes == (5, 3, 1)
    layers = nn.ModuleList([nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1)])
    spec, params = mlp_from_module(layers, check=False)  # registration order, as asked
    assert spec.sizes == (4, 3, 1) and spec.activations == ("tanh",)
    assert torch.equal(params["fc2.weight"], layers[2].weight)


def test_activations_called_as_functions_are_named_as_the_likely_reason():
    class Functional(nn.Module):  # F.relu in forward: no activation submodule to read
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    with pytest.raises(ValueError) as error:
        mlp_from_module(Functional())
    assert "No activation module was found: activations called as functions" in str(error.value)
    # Under any names: found in a user trial, this said they had to be fc1, fc2, ...
    assert "or, pass spec=equiv.MLPSpec(...) saying its activations to check_jax_port" in str(
        error.value
    )
    with pytest.raises(ValueError) as error:  # the twin: a module, left unused
        mlp_from_module(Reordered())
    assert "No activation module was found" not in str(error.value)
    assert "with Linear layers named fc1, fc2, ..., pass spec=" in str(error.value)
    assert "calls no activation module (one it registers goes unused" in str(error.value)


def test_not_a_module_is_a_type_error():
    with pytest.raises(TypeError, match="expected a torch.nn.Module, got dict"):
        mlp_from_module({"fc1.weight": torch.ones(1, 1)})


def test_params_that_do_not_fit_the_spec_are_refused():
    spec = equiv.MLPSpec((4, 3, 2))
    with pytest.raises(ValueError, match="params do not fit"):
        equiv.make_problem(spec, params={"fc1.weight": torch.ones(3, 4)})


class _Swapped(nn.Module):
    """Square layers registered a, b but called b, a."""

    def __init__(self):
        super().__init__()
        self.a, self.act, self.b = nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)

    def forward(self, x):
        return self.a(self.act(self.b(x)))


def test_copying_into_a_frozen_stack_needs_no_float64_copy(monkeypatch):
    # Found in review: jax_to_torch(out=) refused a frozen inference model ("equiv's
    # MLP trains every parameter") and deep-copied it to float64 to check it (11 times
    # a 64 MiB model's memory). Copying into one needs neither.
    from equiv.convert import jax_to_torch, torch_to_jax

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).requires_grad_(False)
    source = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    monkeypatch.setattr("equiv.from_module.copy.deepcopy", _no_copy)
    jax_to_torch(torch_to_jax(source), out=net)
    assert torch.equal(net[2].weight, source[2].weight) and not net[2].weight.requires_grad
    # The twin: a training check still refuses the frozen model.
    monkeypatch.undo()
    with pytest.raises(ValueError, match="is frozen"):
        mlp_from_module(net)


def test_square_layers_called_out_of_registration_order_are_copied_in_call_order():
    # Registered a, b, called b, a: fc1 is b. Before, the stack was read in registration
    # order and such a module refused; its calls are read now (activation modules too).
    # The twin: the copy computes what the source computes, which fc1 into a would not.
    from equiv.convert import jax_to_torch, torch_to_jax

    torch.manual_seed(0)
    swapped = _Swapped()
    square = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    jax_to_torch(torch_to_jax(square), out=swapped)
    assert torch.equal(swapped.b.weight, square[0].weight)
    assert torch.equal(swapped.a.weight, square[2].weight)
    x = torch.randn(3, 4)
    assert torch.equal(swapped(x), square(x))


class _SharedNamed(nn.Module):
    """One activation module for every layer, under names of its own (a user trial)."""

    def __init__(self):
        super().__init__()
        self.encoder, self.hidden, self.head = nn.Linear(4, 16), nn.Linear(16, 16), nn.Linear(16, 2)
        self.act = nn.GELU()

    def forward(self, x):
        return self.head(self.act(self.hidden(self.act(self.encoder(x)))))


class _HeadFirst(nn.Module):
    """The head registered before the body, an activation module between them."""

    def __init__(self):
        super().__init__()
        self.head, self.body, self.act = nn.Linear(8, 2), nn.Linear(4, 8), nn.Tanh()

    def forward(self, x):
        return self.head(self.act(self.body(x)))


@pytest.mark.parametrize(
    "make, sizes, acts",
    [
        (SharedActivation, (3, 3, 3, 1), ("relu", "relu")),
        (_SharedNamed, (4, 16, 16, 2), ("gelu", "gelu")),
        (_HeadFirst, (4, 8, 2), ("tanh",)),
    ],
)
def test_activation_modules_are_read_in_call_order(make, sizes, acts, equiv_seed):
    # Found in a user trial: one activation module shared by every layer, or layers
    # registered in another order than called, were refused, where the same model
    # calling F.gelu converted. The twin: a forward that cannot be run on one batch
    # leaves registration order, which cannot read a shared module.
    torch.manual_seed(equiv_seed)
    model = make()
    spec, params = mlp_from_module(model)
    assert spec.sizes == sizes and spec.activations == acts
    x, y = torch.randn(6, sizes[0]), torch.randn(6, sizes[-1])
    grad_fn = functools.partial(_manual_grads, spec=spec)
    equiv.check_manual_backward(model, grad_fn, x, y).assert_agree()


def _manual_grads(params, x, y, spec):
    return equiv.manual.loss_and_grads(params, x, y, spec)


class _SharedTwoInputs(SharedActivation):
    def forward(self, x, mask):
        return super().forward(x) * mask


def test_a_shared_activation_in_a_forward_that_cannot_run_is_refused():
    with pytest.raises(ValueError, match="registers one activation module \\('act'\\)"):
        mlp_from_module(_SharedTwoInputs())


def _no_copy(*args, **kwargs):
    raise AssertionError("the module was copied")


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x, mask):
        return self.fc(x) * mask


class _ReturnsDict(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return {"logits": self.fc(x)}


@pytest.mark.parametrize(
    ("model", "phrase"),
    [
        (_TwoInputs(), "forward cannot be called on one input batch"),
        (_ReturnsDict(), "forward returns a dict, not a tensor"),
    ],
)
def test_a_forward_equiv_cannot_call_is_named(model, phrase):
    # Found in review: a raw TypeError from the call or from arithmetic on a dict.
    with pytest.raises(ValueError, match=phrase):
        mlp_from_module(model)
    spec, params = mlp_from_module(model, check=False)  # the twin: read unchecked
    assert spec.sizes == (4, 2) and sorted(params) == ["fc1.bias", "fc1.weight"]


class _Functional(nn.Module):
    """Linear layers under names of its own, registered out of call order, with the
    activation called as a function."""

    def __init__(self, first="encoder", second="head"):
        super().__init__()
        torch.manual_seed(0)
        setattr(self, second, nn.Linear(7, 3))
        setattr(self, first, nn.Linear(5, 7))
        self.names = first, second

    def forward(self, x):
        first, second = (getattr(self, n) for n in self.names)
        return second(torch.relu(first(x)))


def test_names_in_another_order_than_the_calls_are_refused_not_swapped():
    # Found in a user trial: an nn.Sequential registering fc2 first converted with its
    # layers swapped, silently (the JAX forward off by 1.2); so did a forward calling
    # fc2 first. The twin: the same layers registered in call order convert.
    import collections

    def seq(order):
        torch.manual_seed(0)
        layers = {name: nn.Linear(4, 4) for name in order}
        return nn.Sequential(
            collections.OrderedDict(
                [(order[0], layers[order[0]]), ("act", nn.Tanh()), (order[1], layers[order[1]])]
            )
        )

    swapped = seq(("fc2", "fc1"))
    for convert in (
        lambda m: equiv.torch_to_jax(m),
        lambda m: equiv.jax_to_torch(equiv.torch_to_jax(seq(("fc1", "fc2"))), out=m),
    ):
        with pytest.raises(ValueError, match="calls them in the order fc2, fc1: equiv's fc1"):
            convert(swapped)
    right = seq(("fc1", "fc2"))
    params = equiv.torch_to_jax(right)
    assert np.array_equal(np.asarray(params["Dense_0"]["kernel"]).T, right.fc1.weight.detach())


def test_activations_called_as_functions_take_the_call_order_and_the_specs_activations():
    # Found in a user trial: layers named encoder/head (or fc1, fc2, out) with F.relu in
    # forward could not be converted or checked at all. The call order is read off the
    # forward's calls; a check_jax_port spec says the activations and is checked.
    import jax
    import jax.numpy as jnp

    model = _Functional()
    params = equiv.torch_to_jax(model, layout="torch")
    assert np.array_equal(np.asarray(params["fc1.weight"]), model.encoder.weight.detach())

    def loss_fn(p, x, y):
        h = jax.nn.relu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
        return jnp.mean((h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"] - y) ** 2)

    x, y = torch.randn(4, 5), torch.randn(4, 3)
    equiv.check_jax_port(model, loss_fn, x, y, spec=equiv.MLPSpec((5, 7, 3))).assert_agree()
    with pytest.raises(ValueError, match="calls its activations as functions, so the spec"):
        equiv.check_jax_port(model, loss_fn, x, y, spec=equiv.MLPSpec((5, 7, 3), activation="tanh"))
    out = equiv.jax_to_torch(equiv.torch_to_jax(_Functional("a", "b")), out=_Functional("a", "b"))
    assert sorted(out) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]


class _Odd(nn.Module):
    """Same-shape layers a, b with a functional activation, and a forward equiv cannot
    read an order from: it takes more than x, calls a layer twice, or leaves one unused."""

    def __init__(self, kind):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.kind = nn.Linear(4, 4), nn.Linear(4, 4), kind
        if kind == "unused":
            self.c = nn.Linear(4, 4)

    def forward(self, x, *extra):
        if self.kind == "extra" and not extra:
            raise TypeError("forward() missing 1 required positional argument: 'scale'")
        h = torch.relu(self.b(x))
        if self.kind == "twice":
            h = torch.relu(self.b(h))
        return self.a(h)


@pytest.mark.parametrize(
    ("kind", "phrase"),
    [
        ("extra", "cannot be run on one batch x"),
        ("twice", "calls its Linear layers as b, b, a, not each of a, b once"),
        ("unused", "calls its Linear layers as b, a, not each of a, b, c once"),
    ],
)
def test_a_functional_stack_whose_call_order_cannot_be_read_is_refused(kind, phrase):
    # Found in review: these fell back to registration order silently (a, b), though b
    # is called first. The twin: the readable forward converts in call order.
    with pytest.raises(ValueError, match=phrase):
        equiv.torch_to_jax(_Odd(kind))
    readable = _Odd("plain")
    params = equiv.torch_to_jax(readable, layout="torch")
    assert np.array_equal(np.asarray(params["fc1.weight"]), readable.b.weight.detach())


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_the_call_order_reading_leaves_the_random_stream_and_compiled_modules_alone():
    # Found in review: a forward that draws (F.dropout) moved the caller's torch RNG,
    # and a torch.compile'd module's calls were not seen (converted in registration order).
    class Drawing(_Functional):
        def forward(self, x):
            return super().forward(x + 0 * torch.rand_like(x))

    model = Drawing()  # (its __init__ seeds torch)
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    equiv.torch_to_jax(model)
    assert torch.equal(torch.rand(3), expected)
    compiled = torch.compile(_Functional())
    params = equiv.torch_to_jax(compiled, layout="torch")
    assert np.array_equal(np.asarray(params["fc1.weight"]), compiled.encoder.weight.detach())


def test_a_frozen_parameter_is_refused_by_name_with_a_spec():
    # Found in review: with spec= and functional activations (or fc1/fc2 names), a
    # frozen weight reached torch's autograd as a raw RuntimeError.
    import jax
    import jax.numpy as jnp

    def loss_fn(p, x, y):
        h = jax.nn.relu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
        return jnp.mean((h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"] - y) ** 2)

    x, y = torch.randn(4, 5), torch.randn(4, 3)
    for names in (("encoder", "head"), ("fc1", "fc2")):
        model = _Functional(*names)
        getattr(model, names[0]).weight.requires_grad_(False)
        with pytest.raises(ValueError, match=f"parameter '{names[0]}.weight' is frozen"):
            equiv.check_jax_port(model, loss_fn, x, y, spec=equiv.MLPSpec((5, 7, 3)))
        getattr(model, names[0]).weight.requires_grad_(True)  # the twin
        equiv.check_jax_port(model, loss_fn, x, y, spec=equiv.MLPSpec((5, 7, 3))).assert_agree()


def test_an_identity_placeholder_keeps_registration_order_where_the_forward_cannot_run():
    # Found in review: once nn.Identity was read as absent, a module with it as the only
    # thing between two Linear layers, and a forward taking more than x, was refused as
    # one that "registers no activation module"; it was read in registration order.
    from equiv.from_module import read_spec

    class TwoArg(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.none, self.b = nn.Linear(4, 8), nn.Identity(), nn.Linear(8, 2)

        def forward(self, x, mask):
            return self.b(self.none(self.a(x))) * mask

    assert read_spec(TwoArg()).activations == ("identity",)

    class Bare(TwoArg):  # the twin: nothing registered between them says the order
        def __init__(self):
            super().__init__()
            del self.none

        def forward(self, x, mask):
            return self.b(self.a(x)) * mask

    with pytest.raises(ValueError, match="registers no activation module"):
        read_spec(Bare())
