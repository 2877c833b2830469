"""equiv: prove that two deep-learning implementations compute the same thing.

The same MLP three ways (a torch module trained with ``torch.optim``, a
hand-derived forward and backward pass, a pure JAX function under ``jax.grad``
with optax), converters between torch and JAX parameter trees, and a harness that
runs training steps in all of them and compares loss, gradients, optimizer state
and parameters leaf by leaf against derived tolerances and a float64 reference.

Importing equiv changes no global setting of torch, JAX or NumPy, nor Python's
``random`` stream.

>>> import equiv
>>> equiv.compare_backends(equiv.MLPSpec((4, 3, 2))).agree
True
"""

from equiv import _quiet_imports  # noqa: F401, I001 - first: rich would draw from random
from equiv.activations import ACTIVATIONS, Activation
from equiv.checkpoint import load_jax, load_torch, save_jax, save_torch
from equiv.compare import LeafDiff, Report, compare_leaf, compare_trees
from equiv.convert import (
    LAYOUTS,
    Layout,
    equinox_to_torch,
    jax_to_torch,
    torch_to_equinox,
    torch_to_jax,
)
from equiv.diagnose import diagnose_leaf
from equiv.from_module import mlp_from_module
from equiv.gradcheck import GradCheck, check_gradients
from equiv.harness import (
    BACKENDS,
    REFERENCE,
    Comparison,
    Trajectory,
    assert_backends_agree,
    compare_backends,
    compare_trajectories,
)
from equiv.linen_layout import linen_layout
from equiv.losses import LOSSES, Loss
from equiv.nnx_layout import nnx_layout, torch_to_nnx
from equiv.optimizers import OPTIMIZERS, OptimizerSpec
from equiv.plot import plot_divergence
from equiv.port import check_jax_port, check_manual_backward
from equiv.precision import comparison_scope, current_settings
from equiv.problem import Problem, make_problem
from equiv.render import print_comparison, render_comparison
from equiv.spec import MLPSpec
from equiv.tolerance import Tolerance, derived_tolerance
from equiv.torch_mlp import TorchMLP

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "LAYOUTS",
    "LOSSES",
    "OPTIMIZERS",
    "REFERENCE",
    "Activation",
    "Comparison",
    "GradCheck",
    "LeafDiff",
    "Layout",
    "Loss",
    "MLPSpec",
    "OptimizerSpec",
    "Problem",
    "Report",
    "Tolerance",
    "TorchMLP",
    "Trajectory",
    "assert_backends_agree",
    "check_gradients",
    "check_jax_port",
    "check_manual_backward",
    "compare_backends",
    "compare_leaf",
    "compare_trajectories",
    "compare_trees",
    "comparison_scope",
    "current_settings",
    "derived_tolerance",
    "diagnose_leaf",
    "equinox_to_torch",
    "jax_to_torch",
    "linen_layout",
    "load_jax",
    "load_torch",
    "make_problem",
    "mlp_from_module",
    "nnx_layout",
    "plot_divergence",
    "print_comparison",
    "render_comparison",
    "save_jax",
    "save_torch",
    "torch_to_equinox",
    "torch_to_jax",
    "torch_to_nnx",
]
