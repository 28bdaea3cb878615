"""Restore-test overhead: `crashcart restore-test` against `restic restore --verify` + sha256sum of the same snapshot.

Run as root with the lab up:  .venv/bin/python bench/restore_bench.py [--mb 200] [--rounds 3]
The first run puts MB of incompressible data on web-1 (/srv/bench) and backs it up to backup-1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from crashcart.lab import load_lab  # noqa: E402

LAB = Path("/var/lib/crashcart-lab")
URL = "sftp:root@10.77.0.13:/srv/restic/bench"


def prepare(lab, megabytes: int) -> str:
    """Data on web-1 and one snapshot of it; returns the repository password (kept in Vault)."""
    source = LAB / "hosts" / "web-1" / "srv" / "bench"
    marker = source / f".bench-{megabytes}mb"
    password = lab.kv_get("restic/bench", "password")
    if marker.exists() and password:
        return password
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir(parents=True)
    per_file = 4 << 20
    for i in range(megabytes * (1 << 20) // per_file):
        (source / f"scan-{i:04d}.bin").write_bytes(os.urandom(per_file))
    shutil.rmtree(LAB / "hosts" / "backup-1" / "srv" / "restic" / "bench", ignore_errors=True)
    password = lab.secret_password()
    lab.kv_put("restic/bench", {"password": password})
    web = next(h for h in lab.lab_hosts() if h.name == "web-1")
    backup = next(h for h in lab.lab_hosts() if h.name == "backup-1")
    env = lab.restic_env(password)
    lab.in_host(web, "restic", "-r", URL, "-o", lab.restic_sftp_command(backup), "init", env=env)
    lab.in_host(web, "restic", "-r", URL, "-o", lab.restic_sftp_command(backup), "backup", "--host", "web-1",
                "/srv/bench", env=env, timeout=900)
    marker.write_text("bench data\n")
    return password


def settings_copy(workdir: Path) -> Path:
    import yaml

    inventory = yaml.safe_load((LAB / "inventory.yaml").read_text())
    inventory["restic_repositories"] = {"bench-data": {
        "url": URL, "password": "vault:secret/restic/bench#password", "source_host": "web-1",
        "source_path": "/srv/bench", "rpo_hours": 24 * 365, "rto_minutes": 30, "check_subsets": 10,
        "sftp_identity_file": str(LAB / "keys" / "id_ed25519")}}
    (workdir / "inventory.yaml").write_text(yaml.safe_dump(inventory))
    text = (LAB / "crashcart.toml").read_text()
    for key in ("state", "evidence"):
        text = text.replace(f'"{key}"', f'"{workdir / key}"')
    text = text.replace('inventory = "inventory.yaml"', f'inventory = "{workdir / "inventory.yaml"}"')
    for rel in ("known_hosts", "vault/crashcart-token", "keys/evidence-ed25519.pem", "trusted-keys.json"):
        text = text.replace(f'"{rel}"', f'"{LAB / rel}"')
    (workdir / "crashcart.toml").write_text(text)
    return workdir / "crashcart.toml"


def baseline(lab, password: str, workdir: Path) -> float:
    """What a careful admin would type: restore --verify into a fresh directory, then hash every file."""
    backup = next(h for h in lab.lab_hosts() if h.name == "backup-1")
    target, cache = workdir / "baseline", workdir / "baseline-cache"
    env = {**lab.restic_env(password), "RESTIC_CACHE_DIR": str(cache)}
    t0 = time.monotonic()
    subprocess.run(["restic", "-r", URL, "-o", lab.restic_sftp_command(backup), "restore", "latest",
                    "--target", str(target), "--verify"], env=env, check=True, capture_output=True)
    subprocess.run(["sh", "-c", 'find "$1" -type f -exec sha256sum {} + > /dev/null', "sh", str(target)], check=True)
    seconds = time.monotonic() - t0
    shutil.rmtree(target)
    shutil.rmtree(cache, ignore_errors=True)
    return seconds


def crashcart(config: Path) -> tuple[float, dict]:
    t0 = time.time()
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "crashcart"), "restore-test", "--repo", "bench-data"],
                          env={**os.environ, "CRASHCART_CONFIG": str(config)}, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        sys.exit(f"bench: restore-test failed:\n{proc.stdout}{proc.stderr}")
    from crashcart.evidence.ledger import iter_records
    from crashcart.runtime import Runtime

    rt = Runtime.load(config)
    steps = {}
    for r in iter_records(rt.settings.evidence.dir, since=datetime.fromtimestamp(t0).astimezone(), kind="step_result"):
        steps[r.body["step"]] = r.body
    rto = steps["rto"]["detail"]
    return wall, {"rto_seconds": rto.get("seconds"), "durations": {k: v["duration"] for k, v in steps.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    lab = load_lab()
    password = prepare(lab, args.mb)
    workdir = Path(tempfile.mkdtemp(prefix="crashcart-bench-"))
    try:
        config = settings_copy(workdir)
        base, runs = [], []
        for _ in range(args.rounds):  # interleaved, so both see the same machine load
            base.append(baseline(lab, password, workdir))
            runs.append(crashcart(config))
        b = statistics.median(base)
        rto = statistics.median([r[1]["rto_seconds"] for r in runs])
        wall = statistics.median([r[0] for r in runs])
        print(f"restore test of {args.mb} MB, median of {args.rounds} (baseline: restic restore --verify + sha256sum "
              f"of every file = {b:.2f} s)")
        print(f"  crashcart RTO (restore + verification):  {rto:7.2f} s   ratio {rto / b:5.2f}x   "
              f"goal <= 1.15x: {'met' if rto / b <= 1.15 else 'NOT met'}")
        print(f"  crashcart whole command:                 {wall:7.2f} s   ratio {wall / b:5.2f}x   "
              "(also: Prefect, listing, dump samples, source comparison over SSH, pack check, wipe)")
        print("  whole command by step (median s):")
        for step in runs[0][1]["durations"]:
            print(f"    {step:<12} {statistics.median([r[1]['durations'][step] for r in runs]):7.2f}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
