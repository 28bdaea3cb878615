"""Time to contain: `crashcart isolate-host` against the same firewall-cmd commands and probes in a plain ssh script.

Run as root with the lab up (for --fleet: `crashcart lab up --extra-hosts 8`):
    .venv/bin/python bench/contain_bench.py [--rounds 3] [--fleet]
Prints each figure and its ratio against the baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAB = Path("/var/lib/crashcart-lab")
CRASHCART = str(ROOT / ".venv" / "bin" / "crashcart")
ENV = {**os.environ, "CRASHCART_CONFIG": str(LAB / "crashcart.toml"), "COLUMNS": "200"}

SSH = ["ssh", "-i", str(LAB / "keys" / "id_ed25519"), "-o", f"UserKnownHostsFile={LAB}/known_hosts",
       "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"]
RULE = 'rule family="ipv4" source address="10.77.0.1/32" port port="22" protocol="tcp" accept'
PROBE = ('for p in "$@"; do ( if timeout 1.5 bash -c "exec 3<>/dev/tcp/$0/$p" 2>/dev/null; '
         'then echo "$p open"; else echo "$p closed"; fi ) & done; wait')

# What a careful responder's hand-written script does: the same commands crashcart sends.
BASELINE_APPLY = " && ".join([
    "firewall-cmd --zone=ccquarantine --add-rich-rule='%s'" % RULE,
    "firewall-cmd --policy=ccquarantine-out --add-ingress-zone=HOST",
    "firewall-cmd --policy=ccquarantine-out --add-egress-zone=ANY",
    "firewall-cmd --zone=ccquarantine --change-interface=eth0",
])
BASELINE_PERSIST = BASELINE_APPLY.replace("firewall-cmd ", "firewall-cmd --permanent ")
BASELINE_REVERT = "; ".join([
    "firewall-cmd --zone=ccquarantine --remove-interface=eth0",
    "firewall-cmd --policy=ccquarantine-out --remove-ingress-zone=HOST",
    "firewall-cmd --policy=ccquarantine-out --remove-egress-zone=ANY",
    "firewall-cmd --zone=ccquarantine --remove-rich-rule='%s'" % RULE,
])
BASELINE_REVERT_PERMANENT = BASELINE_REVERT.replace("firewall-cmd ", "firewall-cmd --permanent ")


def ssh(address: str, command: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SSH, f"root@{address}", command], capture_output=True, text=True, timeout=120)


def baseline(address: str, peer: str = "10.77.0.14") -> dict[str, float]:
    """The plain script: apply, probe from the peer, new management SSH, outbound probe, persist."""
    t0 = time.monotonic()
    assert ssh(address, BASELINE_APPLY).returncode == 0
    applied = time.monotonic() - t0
    out = ssh(peer, f"sh -c '{PROBE}' {address} 22 443").stdout
    assert "open" not in out, out
    assert ssh(address, "true").returncode == 0
    assert "open" not in ssh(address, f"sh -c '{PROBE}' {peer} 22").stdout
    verified = time.monotonic() - t0
    assert ssh(address, BASELINE_PERSIST).returncode == 0
    full = time.monotonic() - t0
    ssh(address, BASELINE_REVERT + "; " + BASELINE_REVERT_PERMANENT)
    return {"applied": applied, "verified": verified, "full": full}


def crashcart(*args: str, responder: bool = True) -> tuple[float, str]:
    env = {**ENV, "CRASHCART_USE_RESPONDER": "true" if responder else "false"}
    t0 = time.time()
    proc = subprocess.run([CRASHCART, *args], capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        sys.exit(f"bench: crashcart {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return t0, proc.stdout


def run_timeline(t0: float) -> dict:
    """Per-step durations and the moment isolation was applied, from the evidence of the newest run."""
    sys.path.insert(0, str(ROOT))
    from crashcart.evidence.ledger import iter_records

    records = list(iter_records(LAB / "evidence", since=datetime.fromtimestamp(t0).astimezone()))
    run = [r for r in records if r.kind == "run_started"][-1].run
    steps: dict[str, float] = {}
    applied: list[float] = []
    verified: list[float] = []
    for r in records:
        if r.run != run or r.kind != "step_result":
            continue
        steps[r.body["step"]] = max(steps.get(r.body["step"], 0.0), r.body["duration"])
        if r.body["step"] == "quarantine" and "applied_at" in r.body.get("detail", {}):
            applied.append(r.body["detail"]["applied_at"] - t0)
            verified.append(r.body["ended"] - t0)
    started = next(r for r in records if r.run == run and r.kind == "run_started")
    return {"steps": steps, "applied": max(applied), "verified": max(verified),
            "startup": datetime.fromisoformat(started.ts.replace("Z", "+00:00")).timestamp() - t0}


def isolate(hosts: list[str], responder: bool = True) -> dict:
    t0, _ = crashcart("isolate-host", *hosts, "--reason", "benchmark", responder=responder)
    full = time.time() - t0
    timeline = run_timeline(t0)
    crashcart("release-host", *hosts, "--reason", "benchmark over")
    return {**timeline, "full": full}


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fleet", action="store_true", help="also isolate 1, 4 and 8 fleet hosts at once")
    args = parser.parse_args()
    crashcart("isolate-host", "web-1", "--reason", "warm-up (creates the quarantine zone and policy)")
    crashcart("release-host", "web-1", "--reason", "warm-up over")

    if not (LAB / "state" / "responder.sock").exists():
        sys.exit("bench: no responder: the lab starts one (`crashcart lab up`), or run `crashcart responder`")
    base = [baseline("10.77.0.11") for _ in range(args.rounds)]
    modes = {"through the responder": [isolate(["web-1"]) for _ in range(args.rounds)],
             "CLI alone (Prefect imported per command)": [isolate(["web-1"], responder=False) for _ in range(args.rounds)]}
    b_applied, b_verified, b_full = (median([b[k] for b in base]) for k in ("applied", "verified", "full"))
    print(f"time to contain web-1, median of {args.rounds} (baseline: the same firewall-cmd commands and probes by ssh:"
          f" applied {b_applied:.2f} s, verified {b_verified:.2f} s, full {b_full:.2f} s)")
    for mode, runs in modes.items():
        c_applied, c_verified, c_full = (median([r[k] for r in runs]) for k in ("applied", "verified", "full"))
        print(f"  {mode}:")
        print(f"    isolation applied: {c_applied:6.2f} s   ratio {c_applied / b_applied:5.2f}x   goal <= 1.5 s from the "
              f"command: {'met' if c_applied <= 1.5 else 'NOT met'}")
        print(f"    verified:          {c_verified:6.2f} s   ratio {c_verified / b_verified:5.2f}x")
        print(f"    full run:          {c_full:6.2f} s   ratio {c_full / b_full:5.2f}x   (also captures, archives, rotates)")
        print(f"    command to run_started record: {median([r['startup'] for r in runs]):.2f} s")
        print("    full run by step (median s): " + ", ".join(
            f"{step} {median([r['steps'][step] for r in runs]):.2f}" for step in runs[0]["steps"]))

    if args.fleet:
        fleet = [f"node-{i}" for i in range(1, 9)]
        print("fleet: isolate N hosts at once (one command), median of "
              f"{args.rounds}; ratio against one host in the same run")
        results = {}
        for n in (1, 4, 8):
            results[n] = [isolate(fleet[:n]) for _ in range(args.rounds)]
        one = median([r["full"] for r in results[1]])
        one_applied = median([r["applied"] for r in results[1]])
        for n in (1, 4, 8):
            full = median([r["full"] for r in results[n]])
            applied = median([r["applied"] for r in results[n]])
            print(f"  {n} host(s): full {full:6.2f} s ({full / one:4.2f}x of one)   last applied {applied:5.2f} s "
                  f"({applied / one_applied:4.2f}x)" + (f"   goal 8 < 2x one: {'met' if full < 2 * one else 'NOT met'}" if n == 8 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
