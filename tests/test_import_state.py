"""Importing equiv, and running comparisons, changes no global state of torch, JAX, NumPy
or Python's ``random``.

Measured in a fresh interpreter (``sys.executable``): numpy, torch and jax are imported
first (and one ``torch.optim.SGD`` created, as a torch user has), the state is read,
then equiv is imported and read again, then a float32 and a float64 comparison run and
it is read again. Last, the script changes every setting on
purpose and reads once more: the failing counterpart, showing that each key it reads
would reveal a leak.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import hashlib, json, os, random, warnings
import numpy as np
import torch
import jax

FLAGS = ["fp32_precision", "cuda.matmul.fp32_precision", "cudnn.fp32_precision",
         "cudnn.conv.fp32_precision", "cudnn.rnn.fp32_precision", "mkldnn.fp32_precision",
         "mkldnn.matmul.fp32_precision", "mkldnn.conv.fp32_precision",
         "mkldnn.rnn.fp32_precision", "cudnn.deterministic", "cudnn.benchmark"]
JAX = ["jax_enable_x64", "jax_default_matmul_precision", "jax_numpy_rank_promotion",
       "jax_numpy_dtype_promotion", "jax_default_prng_impl", "jax_compilation_cache_dir",
       "jax_persistent_cache_min_compile_time_secs", "jax_debug_nans"]

def flag(path):
    owner = torch.backends
    for part in path.split("."):
        owner = getattr(owner, part)
    return owner

def digest(*arrays):
    return hashlib.sha256(b"".join(np.asarray(a).tobytes() for a in arrays)).hexdigest()[:16]

def snapshot():
    state = {name: getattr(jax.config, name) for name in JAX}
    state.update({"torch." + path: flag(path) for path in FLAGS})
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state.update({
        "torch_default_dtype": str(torch.get_default_dtype()),
        "torch_rng_state": digest(torch.get_rng_state().numpy()),
        "numpy_rng_state": digest(keys, pos, has_gauss, gauss),
        # Found in a user trial: rich's import drew from Python's generator.
        "python_random_state": digest(np.asarray(random.getstate()[1], np.uint64)),
        "torch_num_threads": torch.get_num_threads(),
        "torch_float32_matmul_precision": torch.get_float32_matmul_precision(),
        "torch_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "torch_grad_enabled": torch.is_grad_enabled(),
        "numpy_errstate": np.geterr(),
        "environ": digest(np.frombuffer(repr(sorted(os.environ.items())).encode(), np.uint8)),
        "warnings_filters": repr(warnings.filters),
    })
    return state

# A torch user has created an optimizer before: the first one imports torch._dynamo,
# which sets TORCHINDUCTOR_CACHE_DIR and a sympy warnings filter (torch's doing, not equiv's).
torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
states = {"before": snapshot()}
import equiv
states["import"] = snapshot()
agree = [equiv.compare_backends().agree,
         equiv.compare_backends(equiv.MLPSpec(dtype="float64"), steps=2).agree]
states["compare"] = snapshot()

# The failing counterpart: leak every setting on purpose.
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_default_matmul_precision", "bfloat16")
jax.config.update("jax_numpy_rank_promotion", "raise")
torch.set_default_dtype(torch.float64)
torch.manual_seed(1)
np.random.seed(1)
random.seed(1)
torch.set_num_threads(2 if torch.get_num_threads() == 1 else 1)
torch.set_float32_matmul_precision("medium")
torch.backends.cudnn.deterministic = True
torch.use_deterministic_algorithms(True)
states["leaked"] = snapshot()
print(json.dumps({"agree": agree, "states": states}))
"""
# What the leaks at the end of SCRIPT change (matmul precision "medium" moves the legacy
# value and the CUDA and oneDNN matmul flags).
LEAKED = {
    "jax_enable_x64",
    "jax_default_matmul_precision",
    "jax_numpy_rank_promotion",
    "torch_default_dtype",
    "torch_rng_state",
    "numpy_rng_state",
    "python_random_state",
    "torch_num_threads",
    "torch_float32_matmul_precision",
    "torch.cuda.matmul.fp32_precision",
    "torch.mkldnn.matmul.fp32_precision",
    "torch.cudnn.deterministic",
    "torch_deterministic_algorithms",
}
ONEDNN = "torch.mkldnn.matmul.fp32_precision"
TORCH_RNG = "torch_rng_state"


@pytest.fixture(scope="module")
def run() -> dict:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def changed(a: dict, b: dict) -> set[str]:
    assert set(a) == set(b)
    return {key for key in a if a[key] != b[key]}


def test_import_changes_nothing(run):
    states = run["states"]
    assert changed(states["before"], states["import"]) == set()


def test_comparisons_change_nothing(run):
    states = run["states"]
    assert run["agree"] == [True, True]
    assert changed(states["before"], states["compare"]) == set()


def test_every_key_would_reveal_a_leak(run):
    states = run["states"]
    assert changed(states["compare"], states["leaked"]) == LEAKED
    assert len(states["before"]) >= 25  # every key is read, none silently missing


def test_comparison_leaves_onednn_matmul_flag(run):
    states = run["states"]
    assert states["compare"][ONEDNN] == states["before"][ONEDNN]


def test_comparison_leaves_torch_rng(run):
    states = run["states"]
    assert states["compare"][TORCH_RNG] == states["before"][TORCH_RNG]
