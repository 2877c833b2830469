"""Each layout against the real library: load converted parameters into a flax.linen,
flax.nnx or Equinox model (and back into torch), and show that its forward pass and its
gradients equal torch's within the derived bound.

The bound is :func:`equiv.tolerance.derived_tolerance` for one step of the spec in
its dtype: ``|a - b| ≤ 8·√k·(u + u)·max(|a|, |b|)`` per tensor, with ``k`` the
longest reduction (see equiv/tolerance.py). Two computations of the same function
in different frameworks round differently, so equality is not bitwise; a forgotten
transpose on a square layer misses the bound by orders of magnitude (tested below).
The torch reference runs on the CPU; the libraries run on JAX's default device (the GPU
on a GPU machine), and their results come to the CPU (``device="cpu"``) to be compared.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from equiv.convert import jax_to_torch, torch_to_jax
from equiv.precision import comparison_scope
from equiv.spec import MLPSpec
from equiv.tolerance import derived_tolerance
from equiv.torch_mlp import TORCH_DTYPES, TorchMLP, load_params

SPEC = MLPSpec((5, 8, 8, 3))  # equal hidden widths, as eqx.nn.MLP requires
BATCH = 6
DTYPES = ("float32", "float64")
HALF = ("bfloat16", "float16")
LIBRARIES = ("linen", "nnx", "equinox")


# ---------------------------------------------------------------------------
# The reference: torch's forward, loss and gradients


def torch_reference(model: TorchMLP, x: np.ndarray, y: np.ndarray):
    model.zero_grad(set_to_none=True)
    out = model(torch.from_numpy(x))
    torch.nn.functional.mse_loss(out, torch.from_numpy(y)).backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return out.detach(), grads


def assert_exact(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for name, value in expected.items():
        assert torch.equal(actual[name], value.detach()), name


def assert_within_derived_bound(actual, expected, spec: MLPSpec, what: str) -> None:
    tol = derived_tolerance(spec, BATCH, "grads", 1, (spec.dtype, spec.dtype))
    a, e = np.asarray(actual), np.asarray(expected)
    assert a.shape == e.shape and a.dtype == e.dtype, what
    scale = max(np.abs(a).max(), np.abs(e).max())
    worst = np.abs(a - e).max()
    assert worst <= tol.scaled * scale, f"{what}: |diff| {worst:.3g} > {tol.scaled * scale:.3g}"


def assert_matches_torch(library_out, library_grads: dict, model: TorchMLP, x, y) -> None:
    out, grads = torch_reference(model, x, y)
    assert_within_derived_bound(library_out, out.numpy(), model.spec, "forward")
    assert list(library_grads) == list(grads)
    for name in grads:
        assert_within_derived_bound(
            library_grads[name].numpy(), grads[name].numpy(), model.spec, name
        )


def batch(spec: MLPSpec, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH, spec.sizes[0])).astype(spec.dtype)
    return x, rng.standard_normal((BATCH, spec.sizes[-1])).astype(spec.dtype)


def mse(out, y):
    return jnp.mean((out - y) ** 2)


# ---------------------------------------------------------------------------
# The libraries: build a model, run forward and gradients, read and write parameters


def linen_model(spec: MLPSpec):
    nn = pytest.importorskip("flax.linen")

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i, width in enumerate(spec.sizes[1:]):
                x = nn.Dense(width, use_bias=spec.bias, dtype=spec.dtype, param_dtype=spec.dtype)(x)
                if i < spec.num_layers - 1:
                    x = nn.relu(x)
            return x

    return Stack()


@functools.partial(jax.jit, static_argnums=0)  # jitted: eager op-by-op dispatch is slower
def _linen_step(model, params, x, y):
    out = model.apply({"params": params}, x)
    return out, jax.grad(lambda p: mse(model.apply({"params": p}, x), y))(params)


class Linen:
    layout = "flax"

    def native(spec, seed):
        model = linen_model(spec)
        x = jnp.zeros((1, spec.sizes[0]), spec.dtype)
        return model, model.init(jax.random.key(seed), x)["params"]

    def load(spec, native, torch_model):
        model, _ = native
        return model, torch_to_jax(torch_model, layout="flax")

    def params_as_torch(native):
        return jax_to_torch(native[1], layout="flax", device="cpu")

    def forward_and_grads(native, x, y):
        model, params = native
        out, grads = _linen_step(model, params, x, y)
        return out, jax_to_torch(grads, layout="flax", device="cpu")

    def upcast(native, spec):
        return linen_model(spec), jax.tree.map(lambda a: a.astype(spec.dtype), native[1])


def nnx_model(spec: MLPSpec, seed: int):
    nnx = pytest.importorskip("flax.nnx")

    class Stack(nnx.Module):
        def __init__(self, rngs):
            for i in range(1, spec.num_layers + 1):
                layer = nnx.Linear(
                    spec.sizes[i - 1],
                    spec.sizes[i],
                    use_bias=spec.bias,
                    dtype=spec.dtype,
                    param_dtype=spec.dtype,
                    rngs=rngs,
                )
                setattr(self, f"fc{i}", layer)

        def __call__(self, x):
            for i in range(1, spec.num_layers + 1):
                x = getattr(self, f"fc{i}")(x)
                if i < spec.num_layers:
                    x = nnx.relu(x)
            return x

    return Stack(nnx.Rngs(seed))


class Nnx:
    layout = "nnx"

    def native(spec, seed):
        return nnx_model(spec, seed)

    def load(spec, model, torch_model):
        from flax import nnx

        nnx.update(model, torch_to_jax(torch_model, layout="nnx"))
        return model

    def params_as_torch(model):
        from flax import nnx

        return jax_to_torch(nnx.state(model, nnx.Param), layout="nnx", device="cpu")

    def forward_and_grads(model, x, y):
        from flax import nnx

        grads = nnx.grad(lambda m: mse(m(x), y))(model)
        return model(x), jax_to_torch(grads, layout="nnx", device="cpu")

    def upcast(model, spec):
        from flax import nnx

        wide = nnx_model(spec, 0)
        state = nnx.state(model, nnx.Param)
        nnx.update(wide, jax.tree.map(lambda a: a.astype(spec.dtype), state))
        return wide


class Equinox:
    layout = "equinox"

    def native(spec, seed):
        eqx = pytest.importorskip("equinox")
        return eqx.nn.MLP(
            spec.sizes[0],
            spec.sizes[-1],
            width_size=spec.sizes[1],
            depth=spec.num_layers - 1,
            use_bias=spec.bias,
            dtype=jnp.dtype(spec.dtype),
            key=jax.random.key(seed),
        )

    def load(spec, model, torch_model):
        from equiv.convert import torch_to_equinox

        return torch_to_equinox(torch_model, model)

    def params_as_torch(model):
        from equiv.convert import equinox_to_torch

        return equinox_to_torch(model, device="cpu")

    def forward_and_grads(model, x, y):
        import equinox as eqx

        from equiv.convert import equinox_to_torch

        out, grads = eqx.filter_jit(_equinox_step)(model, x, y)
        return out, equinox_to_torch(grads, device="cpu")

    def upcast(model, spec):
        import equinox as eqx

        wide = lambda a: a.astype(spec.dtype) if eqx.is_inexact_array(a) else a  # noqa: E731
        return jax.tree.map(wide, model)


def _equinox_step(model, x, y):
    import equinox as eqx

    return jax.vmap(model)(x), eqx.filter_grad(lambda m: mse(jax.vmap(m)(x), y))(model)


ADAPTERS = {"linen": Linen, "nnx": Nnx, "equinox": Equinox}


# ---------------------------------------------------------------------------
# Both directions, both dtypes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("library", LIBRARIES)
def test_torch_parameters_drive_the_library_model(library, dtype, equiv_seed):
    lib, spec = ADAPTERS[library], SPEC.replace(dtype=dtype)
    with comparison_scope(dtype):
        torch.manual_seed(equiv_seed)
        torch_model = TorchMLP(spec)
        loaded = lib.load(spec, lib.native(spec, equiv_seed + 1), torch_model)
        x, y = batch(spec, equiv_seed)
        out, grads = lib.forward_and_grads(loaded, x, y)
        assert_matches_torch(out, grads, torch_model, x, y)
        # The load itself is exact: reading the parameters back gives torch's bits.
        for name, tensor in lib.params_as_torch(loaded).items():
            assert torch.equal(tensor, torch_model.state_dict()[name]), name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("library", LIBRARIES)
def test_library_parameters_drive_the_torch_model(library, dtype, equiv_seed):
    lib, spec = ADAPTERS[library], SPEC.replace(dtype=dtype)
    with comparison_scope(dtype):
        native = lib.native(spec, equiv_seed)  # the library's own initialisation
        torch_model = load_params(TorchMLP(spec), lib.params_as_torch(native))
        x, y = batch(spec, equiv_seed)
        out, grads = lib.forward_and_grads(native, x, y)
        assert_matches_torch(out, grads, torch_model, x, y)
        assert next(torch_model.parameters()).dtype == TORCH_DTYPES[dtype]


# ---------------------------------------------------------------------------
# Half precision: stored, converted and read back bit for bit; computed in float32


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("library", LIBRARIES)
def test_half_precision_parameters_arrive_exactly_in_the_library_model(library, dtype, equiv_seed):
    # A bfloat16 (float16) model's parameters, converted, are the library model's bit for
    # bit; that model, upcast to float32 as it stands (every half value is a float32 one
    # exactly), computes torch's float32 forward and gradients of the same values within
    # the float32 bound: a value put in the wrong place would miss it (as above).
    lib, spec = ADAPTERS[library], SPEC.replace(dtype=dtype)
    torch.manual_seed(equiv_seed)
    half_model = TorchMLP(spec)
    loaded = lib.load(spec, lib.native(spec, equiv_seed + 1), half_model)
    for name, tensor in lib.params_as_torch(loaded).items():
        assert tensor.dtype == TORCH_DTYPES[dtype], name
        assert torch.equal(tensor, half_model.state_dict()[name]), name
    _assert_float32_copies_agree(lib, loaded, half_model, equiv_seed)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("library", LIBRARIES)
def test_half_precision_library_parameters_drive_the_torch_model(library, dtype, equiv_seed):
    lib, spec = ADAPTERS[library], SPEC.replace(dtype=dtype)
    native = lib.native(spec, equiv_seed)  # the library's own initialisation, in half
    half = lib.params_as_torch(native)
    assert {t.dtype for t in half.values()} == {TORCH_DTYPES[dtype]}
    _assert_float32_copies_agree(lib, native, load_params(TorchMLP(spec), half), equiv_seed)


def _assert_float32_copies_agree(lib, native, half_model: TorchMLP, seed: int) -> None:
    """The library model upcast to float32 as it stands against torch's float32 copy of
    ``half_model``: every half value is a float32 one exactly, so both hold the same."""
    wide = half_model.spec.replace(dtype="float32")
    with comparison_scope("float32"):
        exact = {name: t.float() for name, t in half_model.state_dict().items()}
        x, y = batch(wide, seed)
        out, grads = lib.forward_and_grads(lib.upcast(native, wide), x, y)
        assert_matches_torch(out, grads, load_params(TorchMLP(wide), exact), x, y)


def test_forgotten_transpose_breaks_the_bound(equiv_seed):
    # The failing counterpart: a square model given untransposed weights as kernels.
    spec = MLPSpec((6, 6, 6))
    with comparison_scope("float32"):
        torch.manual_seed(equiv_seed)
        torch_model = TorchMLP(spec)
        wrong = {
            f"Dense_{i}": {"kernel": layer["weight"], "bias": layer["bias"]}
            for i, layer in enumerate(
                torch_to_jax(torch_model, layout="equinox")["layers"].values()
            )
        }
        out, grads = Linen.forward_and_grads((linen_model(spec), wrong), *batch(spec, equiv_seed))
        with pytest.raises(AssertionError, match=r"^forward: \|diff\|"):
            assert_matches_torch(out, grads, torch_model, *batch(spec, equiv_seed))


# ---------------------------------------------------------------------------
# Equinox's explicit pair: what it accepts and refuses


def test_equinox_model_of_another_shape_is_refused(equiv_seed):
    eqx = pytest.importorskip("equinox")
    from equiv.convert import torch_to_equinox

    # Only shapes matter for the refusal: skip the (slow) random initialisation.
    model = eqx.filter_eval_shape(eqx.nn.MLP, 5, 3, width_size=4, depth=2, key=jax.random.key(0))
    with pytest.raises(ValueError) as info:
        torch_to_equinox(TorchMLP(SPEC), model)
    assert str(info.value).splitlines()[:4] == [
        "[equiv] equinox model does not match the MLP (5, 8, 8, 3) (bias=True, float32):",
        "  wrong shape: 'layers.0.weight' expected (8, 5), got (4, 5)",
        "  wrong shape: 'layers.0.bias' expected (8,), got (4,)",
        "  wrong shape: 'layers.1.weight' expected (8, 8), got (4, 4)",
    ]


def test_equinox_model_without_final_bias_is_refused():
    eqx = pytest.importorskip("equinox")
    from equiv.convert import torch_to_equinox

    model = eqx.filter_eval_shape(
        eqx.nn.MLP, 5, 3, 8, 2, use_final_bias=False, key=jax.random.key(0)
    )
    with pytest.raises(ValueError) as info:
        torch_to_equinox(TorchMLP(SPEC), model)
    assert str(info.value).splitlines()[1] == "  missing: 'layers.2.bias' (expected shape (3,))"


def test_equinox_accepts_a_list_of_linear_layers(equiv_seed):
    eqx = pytest.importorskip("equinox")
    from equiv.convert import equinox_to_torch, torch_to_equinox

    spec = MLPSpec((4, 3, 2))
    keys = jax.random.split(jax.random.key(equiv_seed))
    layers = [eqx.nn.Linear(4, 3, key=keys[0]), eqx.nn.Linear(3, 2, key=keys[1])]
    torch_model = TorchMLP(spec)
    filled = torch_to_equinox(torch_model, layers)
    assert isinstance(filled, list) and len(filled) == 2
    for name, tensor in equinox_to_torch(filled).items():
        assert torch.equal(tensor, torch_model.state_dict()[name])


def test_equinox_refuses_other_modules():
    eqx = pytest.importorskip("equinox")
    from equiv.convert import equinox_to_torch

    # An eqx.nn.Sequential is read off its calls, as any eqx.Module (see below).
    model = eqx.nn.Sequential([eqx.nn.Linear(2, 2, key=jax.random.key(0))])
    assert list(equinox_to_torch(model)) == ["fc1.weight", "fc1.bias"]
    with pytest.raises(TypeError) as info:
        equinox_to_torch(eqx.nn.Sequential([eqx.nn.Lambda(jnp.tanh)]))
    assert str(info.value) == (
        "[equiv] Sequential holds no eqx.nn.Linear: pass its Linear layers in call order as "
        "a list instead, e.g. torch_to_equinox(state, [model.enc, model.head])"
    )


def test_an_nnx_list_of_linear_layers_takes_a_layout_with_index_keys():
    # Found in a user trial: a layout "layers/{j}/kernel" builds the keys "0", "1",
    # which nnx.update refuses for an nnx.List's 0, 1 (KeyError 'Invalid key: 0').
    # index_keys=True builds ints; the twin: without it nnx.update still refuses.
    nnx = pytest.importorskip("flax.nnx")
    from equiv import mlp_from_module
    from equiv.convert import Layout

    class Listed(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 2, rngs=rngs)])

        def __call__(self, x):
            return self.layers[1](nnx.relu(self.layers[0](x)))

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    _, params = mlp_from_module(net)
    listed = Layout("nnx_list", "layers/{j}/kernel", "layers/{j}/bias", True, index_keys=True)
    model = Listed(nnx.Rngs(0))
    nnx.update(model, torch_to_jax(params, layout=listed))
    for j in (0, 1):  # each layer's kernel is torch's weight transposed, bit for bit
        kernel = np.asarray(model.layers[j].kernel[...])
        assert np.array_equal(kernel, params[f"fc{j + 1}.weight"].numpy().T)
    back = jax_to_torch(nnx.state(model, nnx.Param), layout=listed)
    assert all(torch.equal(back[name], value) for name, value in params.items())
    plain = Layout("nnx_list", "layers/{j}/kernel", "layers/{j}/bias", True)
    with pytest.raises(KeyError):
        nnx.update(Listed(nnx.Rngs(1)), torch_to_jax(params, layout=plain))


def test_torch_to_equinox_takes_a_sequential():
    # Found in a user trial: refused ("none of its 6 entries is a parameter of the
    # torch layout") though jax_to_torch(out=) took the same model back.
    eqx = pytest.importorskip("equinox")
    from equiv import mlp_from_module
    from equiv.convert import equinox_to_torch, torch_to_equinox

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 8),
        torch.nn.GELU(),
        torch.nn.Linear(8, 8),
        torch.nn.GELU(),
        torch.nn.Linear(8, 3),
    )
    gelu = functools.partial(jax.nn.gelu, approximate=False)  # torch's nn.GELU()
    model = eqx.nn.MLP(4, 3, 8, depth=2, activation=gelu, key=jax.random.key(0))
    _, params = mlp_from_module(net)
    back = equinox_to_torch(torch_to_equinox(net, model))
    assert all(torch.equal(back[k], params[k]) for k in params)
    with pytest.raises(ValueError, match="equinox model"):  # the twin: another shape
        torch_to_equinox(net, eqx.nn.MLP(4, 3, 9, depth=2, key=jax.random.key(0)))


def test_torch_to_equinox_refuses_an_mlp_that_would_compute_another_function():
    # Found in a user trial: a ReLU model's parameters went into an eqx.nn.MLP with
    # another activation, silently. Its forward then differs from torch's.
    eqx = pytest.importorskip("equinox")
    from equiv.convert import torch_to_equinox

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.LeakyReLU(0.2), torch.nn.Linear(8, 3)
    ).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    key = jax.random.key(0)
    slope = functools.partial(jax.nn.leaky_relu, negative_slope=0.2)
    with jax.enable_x64(True):
        filled = torch_to_equinox(net, eqx.nn.MLP(4, 3, 8, 1, activation=slope, key=key))
        np.testing.assert_allclose(
            jax.vmap(filled)(jnp.asarray(x.numpy())), net(x).detach().numpy(), rtol=1e-12
        )
        with pytest.raises(ValueError) as info:
            torch_to_equinox(net, eqx.nn.MLP(4, 3, 8, 1, key=key))  # relu, eqx's default
        assert str(info.value) == (
            "[equiv] the equinox model would compute another function than the torch module "
            "with the same parameters: its activation is relu, but the torch module's is "
            "leaky_relu with negative_slope 0.2: build it with activation=functools.partial("
            "jax.nn.leaky_relu, negative_slope=0.2)"
        )
        # Found in a user trial: jax.nn.leaky_relu's own slope was shown as
        # "<PjitFunction of <function leaky_relu ...>>"; its slope is read now.
        with pytest.raises(
            ValueError, match="its activation is leaky_relu with negative_slope 0.01, "
        ):
            torch_to_equinox(net, eqx.nn.MLP(4, 3, 8, 1, activation=jax.nn.leaky_relu, key=key))
        with pytest.raises(ValueError, match="its final_activation is not the identity"):
            torch_to_equinox(
                net, eqx.nn.MLP(4, 3, 8, 1, activation=slope, final_activation=jnp.tanh, key=key)
            )
        # Parameters alone (a state_dict) carry no activation: nothing to check.
        torch_to_equinox(net.state_dict(), eqx.nn.MLP(4, 3, 8, 1, key=key))


def test_an_equinox_model_is_copied_into_an_existing_torch_module():
    # Found in a user trial: jax_to_torch(model, layout="equinox", out=seq) was refused
    # with a flax message, and equinox_to_torch had no out=.
    eqx = pytest.importorskip("equinox")
    from equiv.convert import equinox_to_torch

    torch.manual_seed(0)
    model = eqx.nn.MLP(4, 3, 8, depth=1, activation=jax.nn.tanh, key=jax.random.key(1))
    expected = equinox_to_torch(model, device="cpu")  # as seq
    for convert in (
        lambda seq: equinox_to_torch(model, out=seq),
        lambda seq: jax_to_torch(model, layout="equinox", out=seq),
    ):
        seq = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        weight = seq[2].weight
        convert(seq)
        assert seq[2].weight is weight  # copied in place, not replaced
        assert torch.equal(seq[0].weight, expected["fc1.weight"])
        assert torch.equal(seq[2].bias, expected["fc2.bias"])
    with pytest.raises(TypeError, match="holds its weights \\(out, in\\), but layout='flax'"):
        jax_to_torch(model, layout="flax")  # the twin: the layout must say equinox
    wider = torch.nn.Sequential(torch.nn.Linear(4, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))
    with pytest.raises(ValueError, match="out"):
        equinox_to_torch(model, out=wider)


def test_an_equinox_model_is_saved_as_it_is_converted(tmp_path):
    # Found in a user trial: save_jax and save_torch refused the model that
    # jax_to_torch(model, layout="equinox") takes.
    eqx = pytest.importorskip("equinox")
    from equiv import load_jax, load_torch, save_jax, save_torch
    from equiv.convert import equinox_to_torch

    model = eqx.nn.MLP(4, 2, 3, depth=1, key=jax.random.key(2))
    expected = equinox_to_torch(model, device="cpu")  # as loaded
    save_torch(model, tmp_path / "m.pt")
    save_jax(model, tmp_path / "m.safetensors", layout="equinox")
    for path in ("m.pt", "m.safetensors"):
        assert all(torch.equal(v, expected[k]) for k, v in load_torch(tmp_path / path).items())
    tree = load_jax(tmp_path / "m.safetensors", layout="equinox")
    assert np.array_equal(tree["layers"]["1"]["weight"], model.layers[1].weight)
    with pytest.raises(TypeError, match="pass layout='equinox'"):  # the twin
        save_jax(model, tmp_path / "x.safetensors")


def test_an_nnx_module_is_read_through_its_parameters(tmp_path, equiv_seed):
    # Found in a user trial: jax_to_torch and save_jax refused an nnx module with advice
    # for linen's variables dict; an Equinox model was taken. Its Params are read: a
    # Dropout's RNG state is not a parameter.
    nnx = pytest.importorskip("flax.nnx")
    from equiv.checkpoint import load_torch, save_jax

    model = nnx_model(SPEC, equiv_seed)
    model.drop = nnx.Dropout(0.5, rngs=nnx.Rngs(0))
    expected = jax_to_torch(nnx.state(model, nnx.Param), layout="nnx")
    assert_exact(jax_to_torch(model, layout="nnx"), expected)
    save_jax(model, tmp_path / "m.safetensors", layout="nnx")
    assert_exact(load_torch(tmp_path / "m.safetensors"), expected)
    # The twin: a module with a parameter outside the layout is refused by name.
    model.scale = nnx.Param(jnp.ones(3))
    with pytest.raises(ValueError, match="unexpected: 'scale'"):
        jax_to_torch(model, layout="nnx")
    del model.scale
    # Its whole state holds the Dropout's RNG state too: found in a user trial, that
    # was reported as unexpected parameters with spec= advice.
    with pytest.raises(ValueError) as info:
        jax_to_torch(nnx.state(model), layout="nnx")
    assert str(info.value) == (
        "[equiv] params is a flax.nnx state holding more than parameters: "
        "'drop.rngs.count' (RngCount), 'drop.rngs.key' (RngKey). Pass "
        "nnx.state(model, nnx.Param), or the model itself"
    )


def test_torch_to_equinox_takes_a_tree_in_the_equinox_layout(tmp_path, equiv_seed):
    # Found in a user trial: load_jax(path, layout="equinox") had no way into a model but
    # through torch. The model's layers say which have a bias (none on the last here).
    eqx = pytest.importorskip("equinox")
    from equiv.checkpoint import load_jax, save_torch
    from equiv.convert import equinox_to_torch, torch_to_equinox

    spec = SPEC.replace(bias=(True, True, False))
    torch.manual_seed(equiv_seed)
    source = TorchMLP(spec)
    save_torch(source, tmp_path / "m.safetensors")
    model = eqx.nn.MLP(5, 3, 8, 2, use_final_bias=False, key=jax.random.key(0))
    filled = torch_to_equinox(load_jax(tmp_path / "m.safetensors", layout="equinox"), model)
    assert_exact(equinox_to_torch(filled), source.state_dict())
    # The twin: a tree in another layout is told to say so, and then read.
    flax = load_jax(tmp_path / "m.safetensors", layout="flax")
    with pytest.raises(
        ValueError, match="These are the names of the 'flax' layout: say so, layout='flax'$"
    ):
        torch_to_equinox(flax, model)
    assert_exact(
        equinox_to_torch(torch_to_equinox(flax, model, layout="flax")), source.state_dict()
    )


def test_an_equinox_module_of_your_own_is_read_in_the_order_it_calls_its_layers(tmp_path):
    # Found in a user trial: an eqx.Module with Linear fields (the usual way to write
    # Equinox) was refused; its fields here are declared out of call order, so only the
    # calls tell fc1 from fc3. The twins: a layer called twice, and a model that cannot
    # be called on a probe, are refused with the list to pass instead.
    eqx = pytest.importorskip("equinox")
    from equiv import check_jax_port, save_jax
    from equiv.convert import equinox_to_torch, torch_to_equinox

    class Port(eqx.Module):
        head: eqx.nn.Linear
        enc: eqx.nn.Linear
        mid: eqx.nn.Linear

        def __init__(self, key):
            a, b, c = jax.random.split(key, 3)
            self.head = eqx.nn.Linear(8, 2, key=a)
            self.enc = eqx.nn.Linear(4, 8, key=b)
            self.mid = eqx.nn.Linear(8, 8, key=c)

        def __call__(self, x):
            return self.head(jnp.tanh(self.mid(jnp.tanh(self.enc(x)))))

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 8),
        torch.nn.Tanh(),
        torch.nn.Linear(8, 8),
        torch.nn.Tanh(),
        torch.nn.Linear(8, 2),
    )
    port = torch_to_equinox(net, Port(jax.random.key(0)))
    np.testing.assert_array_equal(port.enc.weight, net[0].weight.detach().numpy())
    np.testing.assert_array_equal(port.head.bias, net[4].bias.detach().numpy())
    x = torch.randn(5, 4)
    np.testing.assert_allclose(
        jax.vmap(port)(jnp.asarray(x.numpy())), net(x).detach().numpy(), rtol=1e-5, atol=1e-6
    )
    assert_exact(equinox_to_torch(port), mlp_state(net))
    save_jax(port, tmp_path / "port.safetensors", layout="equinox")

    def loss_fn(model, x, y):
        return jnp.mean((jax.vmap(model)(x) - y) ** 2)

    assert check_jax_port(net, loss_fn, x, torch.randn(5, 2), params=port, layout="equinox").agree

    class Twice(Port):
        def __call__(self, x):
            return self.head(jnp.tanh(self.mid(jnp.tanh(self.mid(jnp.tanh(self.enc(x)))))))

    with pytest.raises(ValueError, match="calls its eqx.nn.Linear layers 4 times for 3"):
        torch_to_equinox(net, Twice(jax.random.key(0)))

    class Uncallable(Port):
        def __call__(self, x, mask):
            return self.head(self.mid(self.enc(x))) * mask

    with pytest.raises(TypeError, match=r"pass its Linear layers in call order"):
        torch_to_equinox(net, Uncallable(jax.random.key(0)))


def mlp_state(net: torch.nn.Module) -> dict:
    from equiv import mlp_from_module

    return mlp_from_module(net)[1]


def test_an_equinox_module_with_functions_and_jit_is_read_once_and_its_gradients_with_like():
    # Found in review: a module holding functions (an eqx.nn.Sequential with a Lambda)
    # was read again from each partition or gradient, whose functions are None, and
    # refused at every step of check_jax_port; a jitted __call__ recorded tracers. The
    # twin: a gradient alone cannot say its order, and is told to pass like=model.
    eqx = pytest.importorskip("equinox")
    from equiv import check_jax_port
    from equiv.convert import equinox_to_torch, torch_to_equinox

    keys = jax.random.split(jax.random.key(0), 2)
    seq = eqx.nn.Sequential(
        [
            eqx.nn.Linear(4, 8, key=keys[0]),
            eqx.nn.Lambda(jnp.tanh),
            eqx.nn.Linear(8, 2, key=keys[1]),
        ]
    )
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    port = torch_to_equinox(net, seq)
    x, y = torch.randn(5, 4), torch.randn(5, 2)

    def loss_fn(model, x, y):
        return jnp.mean((jax.vmap(model)(x) - y) ** 2)

    report = check_jax_port(net, loss_fn, x, y, params=port, layout="equinox", steps=2)
    assert report.agree, report.hints()
    grads = eqx.filter_grad(lambda m: loss_fn(m, jnp.asarray(x.numpy()), jnp.asarray(y.numpy())))(
        port
    )
    assert list(equinox_to_torch(grads, like=port)) == list(mlp_state(net))
    with pytest.raises(TypeError, match="cannot be called: pass like=model"):
        equinox_to_torch(grads)

    class Jitted(eqx.Module):
        head: eqx.nn.Linear
        enc: eqx.nn.Linear

        @eqx.filter_jit
        def __call__(self, x):
            return self.head(jnp.tanh(self.enc(x)))

    jitted = Jitted(eqx.nn.Linear(8, 2, key=keys[0]), eqx.nn.Linear(4, 8, key=keys[1]))
    jitted(jnp.ones(4))  # compiled before: a cached call would record nothing
    filled = torch_to_equinox(net, jitted)
    np.testing.assert_array_equal(filled.enc.weight, net[0].weight.detach().numpy())


def test_hints_name_an_equinox_module_of_your_owns_fields():
    # Found in review: a port with fields enc, head was told of 'layers/1/bias', the
    # eqx.nn.MLP's path, in the own-names line. The twin: an eqx.nn.MLP keeps that path.
    eqx = pytest.importorskip("equinox")
    from equiv import check_jax_port
    from equiv.convert import torch_to_equinox

    class Port(eqx.Module):
        enc: eqx.nn.Linear
        head: eqx.nn.Linear

        def __call__(self, x):
            return self.head(jnp.tanh(self.enc(x)))

    keys = jax.random.split(jax.random.key(0), 2)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    x, y = torch.randn(5, 4), torch.randn(5, 2)

    def no_head_bias(model, x, y):
        out = jax.vmap(lambda v: model.head.weight @ jnp.tanh(model.enc(v)))(x)
        return jnp.mean((out - y) ** 2)

    port = torch_to_equinox(
        net, Port(eqx.nn.Linear(4, 8, key=keys[0]), eqx.nn.Linear(8, 2, key=keys[1]))
    )
    hints = check_jax_port(net, no_head_bias, x, y, params=port, layout="equinox").hints()
    assert any(
        h.endswith("In the port's equinox layout, fc2.bias is 'head/bias'.") for h in hints
    ), hints

    mlp = torch_to_equinox(net, eqx.nn.MLP(4, 2, 8, 1, activation=jnp.tanh, key=keys[0]))

    def mlp_no_bias(model, x, y):
        last = model.layers[1]
        out = jax.vmap(lambda v: last.weight @ jnp.tanh(model.layers[0](v)))(x)
        return jnp.mean((out - y) ** 2)

    hints = check_jax_port(net, mlp_no_bias, x, y, params=mlp, layout="equinox").hints()
    assert any(h.endswith("fc2.bias is 'layers/1/bias'.") for h in hints), hints
