"""How far beyond its bound each optimizer trap of ``tests/test_traps.py`` lands.

For each trap (a naive optax port of a torch optimizer) and each seed, the largest
ratio of a failing leaf's difference to its bound; the table shows the smallest of
those over the seeds: the trap's margin. Run from the repository root:

    python scripts/trap_margins.py --seeds 5
"""

from __future__ import annotations

import argparse
import pathlib
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
    from test_traps import OPTIMIZER_TRAPS, SPEC, _mse  # noqa: PLC0415

    from equiv.harness import REFERENCE, compare_trajectories, run_reference, run_torch
    from equiv.port import run_jax_port
    from equiv.problem import make_problem

    for name, spec_opt, naive_tx, _ in OPTIMIZER_TRAPS:
        lr, worst = spec_opt.learning_rate, []
        for seed in range(args.seeds):
            problem = make_problem(SPEC, batch_size=3, seed=seed, steps=3)
            runs = {
                "torch": run_torch(problem, lr, optimizer=spec_opt),
                REFERENCE: run_reference(problem, lr, optimizer=spec_opt),
                "port": run_jax_port(problem, _mse, "flax", lr, optimizer=naive_tx),
            }
            report = compare_trajectories(problem, runs, learning_rate=lr, optimizer=spec_opt)
            worst.append(max((d.ratio for d in report.failures), default=0.0))
        print(f"{name:32} margin {min(worst):9.3g}x the bound (min over {args.seeds} seeds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
