"""The hand-derived backward against float64 central differences, over random models.

For each case a random MLP (depth 1 to 4, widths 1 to 64, with or without bias, any
activation and loss) and batch (1 to 16 examples): :func:`equiv.check_gradients`
projects the hand-derived gradient of every leaf on random directions and holds it
against central differences of the float64 loss. Prints the worst ratio to the bound
over the sweep and fails (exit status 1) if any case disagrees. Run from the
repository root:

    python scripts/gradcheck_sweep.py --cases 60
"""

from __future__ import annotations

import argparse

import numpy as np

from equiv import ACTIVATIONS, LOSSES, MLPSpec, check_gradients, make_problem


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    worst, worst_case, failed = 0.0, "", 0
    for case in range(args.cases):
        depth = int(rng.integers(1, 5))
        sizes = tuple(int(w) for w in rng.integers(1, 65, depth + 1))
        loss = str(rng.choice(list(LOSSES)))
        if loss.startswith(("cross_entropy", "nll")) and sizes[-1] < 2:
            sizes = (*sizes[:-1], 2)  # a classifier needs two classes at least
        spec = MLPSpec(
            sizes,
            activation=str(rng.choice(list(ACTIVATIONS))),
            loss=loss,
            bias=bool(rng.integers(2)),
            dtype="float64",
        )
        problem = make_problem(spec, batch_size=int(rng.integers(1, 17)), seed=case)
        ((x, y),) = problem.batches
        check = check_gradients(problem.params, x, y, spec, seed=case)
        failed += not check.agree
        if check.worst_ratio > worst:
            worst, worst_case = check.worst_ratio, f"{spec.sizes} {spec.activation} {spec.loss}"
    print(
        f"{args.cases} cases, {failed} disagree; worst ratio to the bound {worst:.3g} "
        f"({worst_case})"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
