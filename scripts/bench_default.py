#!/usr/bin/env python
"""Time the default comparison as a user experiences it, imports included.

Each run is a fresh ``python scripts/compare_frameworks.py`` process (interpreter
start, ``import equiv`` with torch and JAX, drawing the problem, the JIT compile,
every backend, the report), timed end to end; ``import equiv`` alone is timed
the same way. Prints the median and the minimum of each; the issue's target is
a median under 10 s on a 2-core machine.

    python scripts/bench_default.py            # 5 runs each
    python scripts/bench_default.py --runs 9 -- --steps 3   # options after -- go to the script
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "compare_frameworks.py"
TARGET_S = 10.0


def time_command(command: list[str], runs: int) -> tuple[list[float], list[float]]:
    """Wall and CPU (user + system) seconds of ``runs`` fresh processes of ``command``.

    CPU time is shown beside wall time because other work on a shared 2-core machine
    stretches wall time; fails if a run fails.
    """
    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        if done.returncode != 0:
            shown = " ".join(command)
            raise SystemExit(f"[equiv] {shown} exited {done.returncode}:\n{done.stderr}")
    return walls, cpus


def summary(label: str, walls: list[float], cpus: list[float]) -> str:
    return (
        f"{label:<20} wall median {statistics.median(walls):5.2f} s, min {min(walls):5.2f} s, "
        f"max {max(walls):5.2f} s; CPU median {statistics.median(cpus):5.2f} s ({len(walls)} runs)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="processes per measurement (default 5)")
    parser.add_argument("script_args", nargs="*", help="options for compare_frameworks.py")
    args = parser.parse_args(argv)
    python = sys.executable
    print(
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.machine()}, "
        f"{platform.system()}"
    )
    print(f"load average before: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    imports = time_command([python, "-c", "import equiv"], args.runs)
    print(summary("import equiv", *imports))
    compare = time_command([python, str(SCRIPT), *args.script_args], args.runs)
    print(summary("default comparison" if not args.script_args else "comparison", *compare))
    print(f"load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    median = statistics.median(compare[0])
    verdict = "within" if median < TARGET_S else "OVER"
    print(f"[equiv] {verdict} the {TARGET_S:g} s target: median {median:.2f} s wall, end to end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
