#!/usr/bin/env python
"""Compare the torch, hand-derived and JAX implementations of one MLP step by step.

The same command as ``equiv-compare`` (see ``--help``); with no options it replays
the notebook: a 4-3-2 ReLU MLP after ``torch.manual_seed(0)``, MSE, SGD at lr 0.1.

    python scripts/compare_frameworks.py
    python scripts/compare_frameworks.py --sizes 784,512,512,10 --batch 64 --steps 3 --json out.json
"""

import sys

try:
    from equiv.cli import main
except ImportError:  # run from a clone without installing: use the package beside scripts/
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from equiv.cli import main

if __name__ == "__main__":
    sys.exit(main())
