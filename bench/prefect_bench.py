"""Prefect's fixed cost: a no-op flow through the CLI against the running lab server, against bare starts.

    .venv/bin/python bench/prefect_bench.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"
IMPORT = "python -c 'import prefect'"
ENV = {**os.environ, "CRASHCART_CONFIG": "/var/lib/crashcart-lab/crashcart.toml",
       "PREFECT_API_URL": "http://127.0.0.1:4200/api"}


def timed(argv: list[str]) -> float:
    t0 = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=300)
    if proc.returncode != 0:
        sys.exit(f"bench: {' '.join(argv)} failed: {proc.stdout}{proc.stderr}")
    return time.monotonic() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    cases = {
        "python -c pass": [str(BIN / "python"), "-c", "pass"],
        "crashcart --help": [str(BIN / "crashcart"), "--help"],
        IMPORT: [str(BIN / "python"), "-c", "import prefect"],
        "crashcart noop (a no-op flow run)": [str(BIN / "crashcart"), "noop"],
    }
    figures = {name: statistics.median([timed(argv) for _ in range(args.rounds)]) for name, argv in cases.items()}
    base = figures["python -c pass"]
    print(f"Prefect overhead, median of {args.rounds} runs (baseline: python -c pass = {base:.3f} s)")
    for name, seconds in figures.items():
        print(f"  {name:<36} {seconds:6.3f} s   {seconds / base:6.1f}x")
    flow_cost = figures["crashcart noop (a no-op flow run)"] - figures["crashcart --help"]
    print(f"  fixed cost of a flow run through the CLI (noop - help): {flow_cost:.3f} s, of which importing prefect "
          f"{figures[IMPORT] - base:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
