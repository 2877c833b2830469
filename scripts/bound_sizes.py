"""How wide the derived bounds are, and whether correct backends stay inside them.

Three measurements behind the README's figures on error sizes (``equiv.manual.magnitudes``):

``grid --json FILE``
    Every leaf's allowed difference (and ratio to it) over 168 float32 configurations
    where nothing is wrong: 7 activations × 4 losses × 3 architectures × 2 seeds, 2 SGD
    steps, batch 8.
``compare OLD NEW``
    How much the bounds of one ``grid`` file grew over another's, per stage, activation
    and loss (median and greatest factor), and each file's worst ratio.
``optimizers``
    224 float32 configurations (8 optimizers × 7 losses × learning rates 0.5 and 0.05 ×
    batch 1 and 8, activations in turn, 3 steps): how many are flagged, and the worst ratio.

To measure a change against a release, run ``grid`` on both, the release's through
``PYTHONPATH`` (from outside the checkout, so that it wins over an editable install)::

    git worktree add /tmp/release 800fff4
    (cd /tmp && PYTHONPATH=/tmp/release python /path/to/scripts/bound_sizes.py grid --json old.json)
    python scripts/bound_sizes.py grid --json new.json
    python scripts/bound_sizes.py compare /tmp/old.json new.json
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import pathlib
import statistics
import sys

ACTIVATIONS = ["relu", "elu", "tanh", "sigmoid", "gelu", "gelu_tanh", "silu"]
LOSSES = ["mse", "cross_entropy", "bce_with_logits", "huber"]
SIZES = [(4, 3, 2), (8, 16, 16, 4), (32, 64, 3)]


def grid(path: str) -> None:
    from equiv import MLPSpec, compare_backends

    bounds = {}
    for act, loss, sizes, seed in itertools.product(ACTIVATIONS, LOSSES, SIZES, (0, 1)):
        spec = MLPSpec(sizes, activation=act, loss=loss)
        comparison = compare_backends(spec, seed=seed, steps=2, batch_size=8)
        for leaf in comparison.report.leaves:
            where = (leaf.stage, leaf.step, leaf.name, leaf.actual, leaf.expected)
            key = "|".join(map(str, (act, loss, sizes, seed) + where))
            bounds[key] = (leaf.allowed, leaf.ratio)
    with open(path, "w") as f:
        json.dump(bounds, f)
    print(f"{len(bounds)} leaves written to {path}")


def compare(old_path: str, new_path: str) -> None:
    with open(old_path) as f:
        old = json.load(f)
    with open(new_path) as f:
        new = json.load(f)
    factors, worst = collections.defaultdict(list), collections.defaultdict(lambda: [0.0, 0.0])
    for key, (allowed, ratio) in old.items():
        act, loss, _, _, stage, *_ = key.split("|")
        worst[stage] = [max(worst[stage][0], ratio), max(worst[stage][1], new[key][1])]
        if allowed > 0:
            for group in ("all", act, loss):
                factors[(stage, group)].append(new[key][0] / allowed)
    print(f"{'stage':7} {'group':16} {'median':>7} {'max':>7}  (new bound / old bound)")
    for (stage, group), values in sorted(factors.items()):
        print(f"{stage:7} {group:16} {statistics.median(values):7.3f} {max(values):7.3f}")
    for stage, (old_worst, new_worst) in sorted(worst.items()):
        print(f"worst ratio, {stage}: {old_worst:.3g} before, {new_worst:.3g} after")


def optimizers() -> None:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
    from test_false_alarms import OPTIMIZERS  # noqa: PLC0415  (the breadth sweep's)

    from equiv import ACTIVATIONS as ALL_ACTIVATIONS
    from equiv import LOSSES as ALL_LOSSES
    from equiv import MLPSpec, OptimizerSpec, compare_backends

    activations, flagged, worst, n = list(ALL_ACTIVATIONS), [], 0.0, 0
    for opt, loss, lr, batch in itertools.product(OPTIMIZERS, ALL_LOSSES, (0.5, 0.05), (1, 8)):
        act = activations[n % len(activations)]
        spec = MLPSpec(
            (4, 8, 3), activation=act, loss=loss, label_smoothing=0.1 if "cross" in loss else 0.0
        )
        comparison = compare_backends(
            spec,
            batch_size=batch,
            seed=n,
            steps=3,
            optimizer=OptimizerSpec(learning_rate=lr, **opt),
        )
        ratio = comparison.report.worst_ratio
        worst = max(worst, ratio)
        if not comparison.agree:
            flagged.append(f"seed {n}: {opt} {loss} lr {lr} batch {batch} {act}: ratio {ratio:.3g}")
        n += 1
    print(f"{n} configurations, {len(flagged)} flagged, worst ratio {worst:.3g}")
    for line in flagged:
        print("  " + line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("grid").add_argument("--json", required=True)
    both = commands.add_parser("compare")
    both.add_argument("old")
    both.add_argument("new")
    commands.add_parser("optimizers")
    args = parser.parse_args(argv)
    if args.command == "grid":
        grid(args.json)
    elif args.command == "compare":
        compare(args.old, args.new)
    else:
        optimizers()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
