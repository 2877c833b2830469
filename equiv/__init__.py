"""equiv: prove that two deep-learning implementations compute the same thing.

The same MLP three ways (a torch module trained with ``torch.optim``, a
hand-derived forward and backward pass, a pure JAX function under ``jax.grad``),
converters between torch and JAX parameter trees, and a harness that runs SGD
steps in all of them and compares loss, gradients and parameters leaf by leaf
against derived tolerances and a float64 reference.

Importing equiv changes no global setting of torch, JAX or NumPy.

>>> import equiv
>>> equiv.compare_backends(equiv.MLPSpec((4, 3, 2))).agree
True
"""

from equiv.compare import LeafDiff, Report, compare_leaf, compare_trees
from equiv.convert import LAYOUTS, Layout, jax_to_torch, torch_to_jax
from equiv.harness import (
    BACKENDS,
    REFERENCE,
    Comparison,
    Trajectory,
    assert_backends_agree,
    compare_backends,
    compare_trajectories,
)
from equiv.precision import comparison_scope, current_settings
from equiv.problem import Problem, make_problem
from equiv.spec import MLPSpec
from equiv.tolerance import Tolerance, derived_tolerance
from equiv.torch_mlp import TorchMLP

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "LAYOUTS",
    "REFERENCE",
    "Comparison",
    "LeafDiff",
    "Layout",
    "MLPSpec",
    "Problem",
    "Report",
    "Tolerance",
    "TorchMLP",
    "Trajectory",
    "assert_backends_agree",
    "compare_backends",
    "compare_leaf",
    "compare_trajectories",
    "compare_trees",
    "comparison_scope",
    "current_settings",
    "derived_tolerance",
    "jax_to_torch",
    "make_problem",
    "torch_to_jax",
]
