"""How far AdamW porting mistakes land beyond their bound at torch's defaults.

torch.optim.AdamW at its defaults (lr 1e-3, ε 1e-8, weight decay 1e-2) against an optax
port that makes one of the common mistakes: ε inside the square root (optax's
``eps_root``), another ε (1e-6), optax.adamw's default decay (1e-4), Nesterov momentum
(``nesterov=True``), or ε added before the bias correction (Adam as Keras writes it,
by hand in optax). The model is a
GELU MLP with a label-smoothed cross-entropy loss, ported with ``flax.linen.Dense``
layers; each row gives the verdict's ratio to the bound (its smallest over the seeds
for a mistake, its greatest for the right port) and whether the first hint names the
mistake. Run from the repository root (needs the ``flax`` extra):

    python scripts/adamw_default_margins.py --seeds 4
"""

from __future__ import annotations

import argparse
import sys

MISTAKES = {  # name: (optax.adamw keyword arguments, a phrase the first hint must hold)
    "right": (dict(eps=1e-8, weight_decay=1e-2), None),
    "eps inside the square root": (
        dict(eps=0.0, eps_root=1e-8, weight_decay=1e-2),
        "inside the square root",
    ),
    "eps 1e-6 for 1e-8": (dict(eps=1e-6, weight_decay=1e-2), "uses eps=1e-06"),
    "optax's default decay (1e-4)": (dict(eps=1e-8), "the weight decays differ by -0.0099"),
    "Nesterov momentum": (dict(eps=1e-8, weight_decay=1e-2, nesterov=True), "Nesterov momentum"),
    "eps before the bias correction": (dict(keras=True), "before the bias correction"),
}


def keras_adamw(learning_rate, weight_decay=1e-2, b1=0.9, b2=0.999, eps=1e-8):
    """AdamW with Adam written as Keras writes it: ``lr·√(1-β₂ᵗ)/(1-β₁ᵗ) · m/(√v + ε)``."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import optax  # noqa: PLC0415

    def init(params):
        zeros = optax.tree.zeros_like(params)
        return zeros, zeros, jnp.zeros([], jnp.int32)

    def update(grads, state, params):
        m, v, t = state
        t = t + 1
        m = optax.tree.update_moment(grads, m, b1, 1)
        v = optax.tree.update_moment_per_elem_norm(grads, v, b2, 2)
        alpha = learning_rate * jnp.sqrt(1 - b2**t) / (1 - b1**t)
        updates = jax.tree.map(
            lambda m, v, p: -alpha * m / (jnp.sqrt(v) + eps) - learning_rate * weight_decay * p,
            m,
            v,
            params,
        )
        return updates, (m, v, t)

    return optax.GradientTransformation(init, update)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--sizes", default="20,32,32,5", help="comma-separated widths (default 20,32,32,5)"
    )
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)

    import flax.linen as nn  # noqa: PLC0415
    import jax  # noqa: PLC0415
    import optax  # noqa: PLC0415
    import torch  # noqa: PLC0415

    import equiv  # noqa: PLC0415

    sizes = tuple(int(s) for s in args.sizes.split(","))

    class Port(nn.Module):
        @nn.compact
        def __call__(self, x):
            for width in sizes[1:-1]:
                x = jax.nn.gelu(nn.Dense(width)(x), approximate=False)
            return nn.Dense(sizes[-1])(x)

    def loss_fn(params, x, y):
        logits = Port().apply({"params": params}, x)
        targets = optax.smooth_labels(jax.nn.one_hot(y, sizes[-1], dtype=logits.dtype), 0.1)
        return optax.softmax_cross_entropy(logits, targets).mean()

    spec = equiv.MLPSpec(sizes, activation="gelu", loss="cross_entropy", label_smoothing=0.1)
    adamw = equiv.OptimizerSpec("adamw", learning_rate=1e-3)
    rows = {name: [] for name in MISTAKES}
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        layers = []
        for i in range(len(sizes) - 1):
            layers.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                layers.append(torch.nn.GELU())
        model = torch.nn.Sequential(*layers)
        x, y = torch.randn(args.batch, sizes[0]), torch.randint(0, sizes[-1], (args.batch,))
        for name, (kwargs, phrase) in MISTAKES.items():
            report = equiv.check_jax_port(
                model,
                loss_fn,
                x,
                y,
                spec=spec,
                steps=args.steps,
                optimizer=adamw,
                port_optimizer=keras_adamw(1e-3)
                if kwargs.get("keras")
                else optax.adamw(1e-3, **kwargs),
            )
            hints = report.hints()
            named = phrase is None or bool(hints and phrase in hints[0])
            rows[name].append((report.agree, report.report.worst_ratio, named))
    print(f"{args.sizes}, batch {args.batch}, {args.steps} steps, {args.seeds} seeds")
    for name, results in rows.items():
        ratios = [ratio for _, ratio, _ in results]
        if name == "right":
            agree = all(a for a, _, _ in results)
            print(f"  {name:30} agrees {agree}, worst ratio {max(ratios):.3g}")
        else:
            caught = sum(not a for a, _, _ in results)
            named = sum(n for _, _, n in results)
            print(
                f"  {name:30} caught {caught}/{len(results)}, ratio {min(ratios):.3g} to "
                f"{max(ratios):.3g}, named {named}/{len(results)}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
