"""The ledger survives SIGKILL at any point and many processes appending at once."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from crashcart.evidence import Ledger, Status, iter_records, verify
from crashcart.evidence.ledger import ledger_files
from ledger_support import local_signer

# Appends in a loop and prints each seq append() returned. Every eighth record carries a large body so
# that a SIGKILL can land inside its write(2) and leave a real torn line. That is rare (the write is a
# small part of each append), so the tests below also make torn lines by hand.
APPENDER = r"""
import sys
from crashcart.evidence import Ledger, LocalEd25519Signer
directory, key, tag, pad = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ledger = Ledger(directory, signer=LocalEd25519Signer(key), checkpoint_every=7)
big = "x" * pad
i = 0
while True:
    record = ledger.append("step", {"i": i, "pad": big if i % 8 == 0 else ""}, run=tag)
    sys.stdout.write(f"{record.seq} {i}\n")
    sys.stdout.flush()
    i += 1
"""

# Waits for the start signal on stdin, appends `count` records, checkpoints, prints the seqs.
RACER = r"""
import sys
from crashcart.evidence import Ledger, LocalEd25519Signer
directory, key, tag, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ledger = Ledger(directory, signer=LocalEd25519Signer(key), checkpoint_every=50)
sys.stdin.readline()
seqs = [ledger.append("step", {"writer": tag, "i": i}, run=tag).seq for i in range(count)]
ledger.checkpoint()
print(" ".join(map(str, seqs)))
"""


def child_env() -> dict:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def torn_fragment(d: Path) -> bytes:
    """The partial last line of the newest non-empty file."""
    for name in reversed(ledger_files(d)):
        data = (d / name).read_bytes()
        if data:
            return data[data.rfind(b"\n") + 1:]
    return b""


def test_sigkill_at_random_points_loses_no_returned_record(tmp_path):
    signer, keys = local_signer(tmp_path / "keys")
    d = tmp_path / "evidence"
    rng = random.Random(20261123)
    returned: dict[int, tuple[str, int]] = {}  # seq -> (round tag, i) as printed by the child
    tears = 0
    for round_ in range(30):
        tag = f"round-{round_}"
        child = subprocess.Popen(
            [sys.executable, "-c", APPENDER, str(d), str(signer.path), tag, str(rng.choice([128, 256, 512]) << 10)],
            stdout=subprocess.PIPE, env=child_env(),
        )
        first = child.stdout.readline()  # it is appending now
        time.sleep(rng.uniform(0, 0.12))
        child.send_signal(signal.SIGKILL)
        out = first + child.stdout.read()
        child.wait()
        assert child.returncode == -signal.SIGKILL
        for line in out.decode().splitlines():
            seq, i = line.split()
            returned[int(seq)] = (tag, int(i))

        report = verify(d, keys)
        assert report.status in (Status.INTACT, Status.TORN_TAIL), report.message
        present = {r.seq: (r.run, r.body["i"]) for r in iter_records(d) if r.kind == "step"}
        missing = {seq: who for seq, who in returned.items() if present.get(seq) != who}
        assert not missing, f"round {round_}: records append() returned are gone: {missing}"

        if report.status is Status.TORN_TAIL:
            # A real tear: the next append must move it aside and record that, then be INTACT.
            tears += 1
            fragment = torn_fragment(d)
            assert fragment and report.seq == max(present.keys() | {r.seq for r in iter_records(d)})
            Ledger(d, signer=signer, checkpoint_every=7).append("step", {"i": -1}, run="parent")
            after = verify(d, keys)
            assert after.status is Status.INTACT, after.message
            recovered = list(iter_records(d, kind="torn_tail_recovered"))[-1]
            assert recovered.body["sha256"] == hashlib.sha256(fragment).hexdigest()
            assert (d / recovered.body["saved_as"]).read_bytes() == fragment

    Ledger(d, signer=signer, checkpoint_every=7).checkpoint()
    final = verify(d, keys)
    assert final.status is Status.INTACT, final.message
    assert len(list(iter_records(d, kind="torn_tail_recovered"))) >= tears
    assert len(returned) > 30


def test_a_torn_tail_is_reported_then_moved_aside_and_recorded(tmp_path):
    signer, keys = local_signer(tmp_path / "keys")
    d = tmp_path / "evidence"
    ledger = Ledger(d, signer=signer)
    for i in range(5):
        ledger.append("step", {"i": i})
    name = ledger_files(d)[-1]
    good_size = (d / name).stat().st_size
    fragment = b'{"body":{"i":5},"kind":"step","prev":"9f8e'
    with open(d / name, "ab") as f:
        f.write(fragment)  # what a crash in the middle of write(2) leaves

    report = verify(d, keys)
    assert report.status is Status.TORN_TAIL and report.seq == 4
    assert "after seq 4" in report.message and not report.ok
    assert [r.seq for r in iter_records(d)] == [0, 1, 2, 3, 4]

    record = ledger.append("step", {"i": 5})
    records = list(iter_records(d))
    torn = records[5]
    assert torn.kind == "torn_tail_recovered"
    assert torn.body["file"] == name and torn.body["offset"] == good_size
    assert torn.body["length"] == len(fragment)
    assert torn.body["sha256"] == hashlib.sha256(fragment).hexdigest()
    assert (d / "torn" / f"{name}.{good_size}.torn").read_bytes() == fragment
    assert record.seq == 6 and record.prev == torn.hash
    assert fragment not in (d / name).read_bytes()
    after = verify(d, keys)
    assert after.status is Status.INTACT, after.message
    assert any("torn tail recovered at seq 5" in w for w in after.warnings)


def test_a_torn_first_line_of_a_new_month_leaves_the_head_in_the_month_before(tmp_path):
    signer, keys = local_signer(tmp_path / "keys")
    d = tmp_path / "evidence"
    ledger = Ledger(d, signer=signer)
    first = ledger.append("step", {})
    later = d / "evidence-2999-12.jsonl"  # a month after every other: the newest file
    later.write_bytes(b'{"body":{"cut')
    os.chmod(later, 0o600)
    assert verify(d, keys).status is Status.TORN_TAIL
    ledger.append("step", {"after": True})
    records = list(iter_records(d))
    assert [r.kind for r in records] == ["step", "torn_tail_recovered", "step"]
    assert records[1].prev == first.hash and records[1].body["offset"] == 0
    assert later.read_bytes() == b""
    assert verify(d, keys).status is Status.INTACT


def test_four_processes_appending_at_once_make_one_chain(tmp_path):
    signer, keys = local_signer(tmp_path / "keys")
    d = tmp_path / "evidence"
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(d), str(signer.path), f"w{n}", "200"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=child_env(),
        )
        for n in range(4)
    ]
    time.sleep(1.0)  # let every interpreter start, so the appends overlap
    for w in writers:
        w.stdin.write(b"go\n")
        w.stdin.flush()
    outputs = [w.communicate(timeout=120)[0] for w in writers]
    assert [w.returncode for w in writers] == [0, 0, 0, 0]

    report = verify(d, keys)
    assert report.status is Status.INTACT, report.message
    records = list(iter_records(d))
    assert [r.seq for r in records] == list(range(len(records)))
    steps = [r for r in records if r.kind == "step"]
    assert len(steps) == 800
    assert len(records) == 800 + report.checkpoints and report.checkpoints >= 16
    for n, out in enumerate(outputs):
        seqs = [int(s) for s in out.split()]
        mine = [r for r in steps if r.run == f"w{n}"]
        assert [r.seq for r in mine] == seqs  # what each writer was told is what is there
        assert [r.body["i"] for r in mine] == list(range(200))
    interleaved = sum(1 for a, b in zip(steps, steps[1:]) if a.run != b.run)
    assert interleaved > 4, "the writers ran one after another; the test did not exercise contention"
