"""Benchmark the evidence ledger: fsync'd appends per second and verify throughput, against baselines."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from hashlib import sha256
from pathlib import Path

from crashcart.evidence.ledger import (
    GENESIS,
    KIND_CHECKPOINT,
    Ledger,
    canonical_json,
    checkpoint_payload,
    file_name,
)
from crashcart.evidence.merkle import Frontier
from crashcart.evidence.signing import LocalEd25519Signer, TrustedKeys
from crashcart.evidence.verify import verify


def filesystem_of(path: Path) -> str:
    """The mount point and type /proc/mounts gives for `path` (so fsync figures can be judged)."""
    best = ("?", "?")
    target = str(path.resolve())
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mnt, fstype = parts[1], parts[2]
                if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                    best = (mnt, fstype)
    except OSError:
        pass
    return f"{best[1]} at {best[0]}"


def sample_body(i: int) -> dict:
    """A body shaped like a step record: host, action, status, a command digest."""
    return {
        "host": f"web-{i % 17}",
        "step": "isolate_host",
        "status": "succeeded",
        "command": "firewall-cmd --zone=drop --add-source=10.0.0.0/8",
        "stdout_sha256": sha256(str(i).encode()).hexdigest(),
        "exit_code": 0,
    }


def bench_appends(work: Path, signer: LocalEd25519Signer, n: int) -> None:
    ledger_dir = work / "appends"
    ledger = Ledger(ledger_dir, signer=signer, checkpoint_every=1000)
    start = time.perf_counter()
    for i in range(n):
        ledger.append("step", sample_body(i), run="bench-run")
    ledger_seconds = time.perf_counter() - start
    records = sum(1 for name in os.listdir(ledger_dir) if name.endswith(".jsonl") for _ in open(ledger_dir / name, "rb"))

    # Baseline: the same line bytes, each written with one os.write and fsync'd, nothing else.
    lines = [line for name in sorted(os.listdir(ledger_dir)) if name.endswith(".jsonl")
             for line in open(ledger_dir / name, "rb")][:n]
    fd = os.open(work / "baseline.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    start = time.perf_counter()
    for line in lines:
        os.write(fd, line)
        os.fsync(fd)
    base_seconds = time.perf_counter() - start
    os.close(fd)

    rate, base_rate = n / ledger_seconds, len(lines) / base_seconds
    print(f"append: {n} appends (+{records - n} automatic checkpoints) in {ledger_seconds:.2f} s")
    print(f"append: {rate:,.0f} appends/s with fsync (lock, one write, fsync file, HEAD rename + fsyncs)")
    print(f"append baseline: {base_rate:,.0f} writes/s (raw os.write + fsync of the same bytes)")
    print(f"append ratio: ledger runs at {rate / base_rate:.2f}x the raw write+fsync rate")


def generate(ledger_dir: Path, signer: LocalEd25519Signer, n: int, every: int = 1000) -> int:
    """Write `n` records with a valid chain and a signed checkpoint after every `every`, straight to files.

    No fsync and no lock: this is a fixture, not the ledger's write path. Returns the records written.
    """
    ledger_dir.mkdir(mode=0o700, parents=True)
    frontier = Frontier()
    prev, seq = GENESIS, 0
    last_cp_seq, last_cp_hash, since_cp = None, None, 0
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    handles: dict[str, object] = {}
    encode = canonical_json
    while seq < n:
        ts = (t0 + timedelta(seconds=8 * seq)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        if since_cp == every:
            root = frontier.root().hex()
            signature = signer.sign(checkpoint_payload(frontier.count, root, prev, last_cp_hash))
            kind, body = KIND_CHECKPOINT, {
                "count": frontier.count, "root": root, "head": prev, "prev_checkpoint_seq": last_cp_seq,
                "prev_checkpoint_hash": last_cp_hash, "signer": signer.kind, "key_id": signer.key_id,
                "signature": signature,
            }
        else:
            kind, body = "step", sample_body(seq)
        raw = encode({"seq": seq, "prev": prev, "ts": ts, "kind": kind, "run": "bench-run", "body": body}).encode()
        name = file_name(ts[:7])
        if name not in handles:
            handles[name] = open(ledger_dir / name, "ab", buffering=1 << 20)
        handles[name].write(raw + b"\n")
        digest = sha256(raw).hexdigest()
        frontier.append_raw(raw)
        if kind == KIND_CHECKPOINT:
            last_cp_seq, last_cp_hash, since_cp = seq, digest, 0
        else:
            since_cp += 1
        prev = digest
        seq += 1
    for h in handles.values():
        h.close()
    (ledger_dir / "HEAD").write_text(json.dumps({"hash": prev, "seq": seq - 1}) + "\n")
    return seq


def bench_verify(work: Path, signer: LocalEd25519Signer, n: int) -> None:
    ledger_dir = work / "verify"
    start = time.perf_counter()
    generate(ledger_dir, signer, n)
    gen_seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in ledger_dir.glob("*.jsonl"))
    keys = TrustedKeys()
    keys.add(signer.key_id, signer.kind, signer.public_key)

    verify(ledger_dir, keys)  # warm the page cache, so every timing reads from memory
    start = time.perf_counter()
    report = verify(ledger_dir, keys)  # the default: one worker process per CPU for a ledger this size
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    single = verify(ledger_dir, keys, workers=1)
    single_seconds = time.perf_counter() - start
    if not (report.ok and single.ok):
        sys.exit(f"bench ledger did not verify: {report.message} / {single.message}")

    # Baseline: sha256 + json.loads of the same lines, read the same way.
    start = time.perf_counter()
    for path in sorted(ledger_dir.glob("*.jsonl")):
        with open(path, "rb", buffering=1 << 20) as f:
            for line in f:
                raw = line[:-1]
                sha256(raw).hexdigest()
                json.loads(raw)
    base_seconds = time.perf_counter() - start

    rate, base_rate = report.records / seconds, report.records / base_seconds
    single_rate = single.records / single_seconds
    workers = len(os.sched_getaffinity(0))
    print(f"verify: generated {report.records:,} records ({report.checkpoints:,} signed checkpoints, "
          f"{size / 1e6:,.0f} MB in {len(list(ledger_dir.glob('*.jsonl')))} monthly files) in {gen_seconds:.1f} s, "
          f"measured directly (not extrapolated)")
    print(f"verify ({workers} worker processes, the default): {rate:,.0f} records/s, "
          f"{1e6 / rate:.2f} s per million records ({seconds:.2f} s, {report.status.value})")
    print(f"verify (1 process): {single_rate:,.0f} records/s, {1e6 / single_rate:.2f} s per million records")
    print(f"verify baseline (1 process): {base_rate:,.0f} records/s (sha256 + json.loads of the same lines)")
    print(f"verify ratio: {rate / base_rate:.2f}x the baseline with {workers} workers, "
          f"{single_rate / base_rate:.2f}x in one process")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--appends", type=int, default=2000)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a new temporary one)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ledger-bench-", dir=args.dir))
    try:
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, work dir on {filesystem_of(work)}")
        signer, _ = LocalEd25519Signer.generate(work / "key.pem")
        bench_appends(work, signer, args.appends)
        bench_verify(work, signer, args.records)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
