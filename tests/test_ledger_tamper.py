"""Tampering with a ledger is always detected, pinned at or before the altered record; clean ledgers pass."""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crashcart.evidence import GENESIS, Ledger, Status, TrustedKeys, iter_records, verify
from crashcart.evidence.ledger import canonical_json, ledger_files
from ledger_support import StepClock, line_hash, local_signer, read_files, rechain, utc, write_files

Draw = Callable[[int, int], int]  # an integer in [lo, hi], from hypothesis or a seeded Random


@dataclass
class Base:
    """A clean ledger built through the real append path, with copies of it taken on the way."""

    name: str
    dir: Path
    keys: TrustedKeys
    snapshots: list[tuple[int, Path]]  # (records in the copy, folder holding its files and HEAD)


def body_for(i: int, pad: int) -> dict:
    return {
        "i": i,
        "host": f"web-{i % 5}",
        "note": ["ünïcödé ✓", "日本語", "plain", 'quote " and \\ backslash'][i % 4],
        "nested": {"ok": i % 2 == 0, "ratio": i / 7, "none": None, "list": list(range(i % 4))},
        "pad": "p" * pad,
    }


def build(root: Path, name: str, *, n: int, every: int, step: timedelta, end_checkpoint: bool,
          pad: int = 0, tear_at: int | None = None, snap_at: tuple[int, ...] = ()) -> Base:
    signer, keys = local_signer(root / "keys")
    d = root / name
    ledger = Ledger(d, signer=signer, checkpoint_every=every, clock=StepClock(utc(2026, 1, 3), step))
    snapshots = []
    for i in range(n):
        if i == tear_at:
            newest = ledger_files(d)[-1]
            with open(d / newest, "ab") as f:
                f.write(b'{"body":{"i":' + str(i).encode() + b',"half wr')  # a crash mid-append
        ledger.append("step" if i % 3 else "intent", body_for(i, pad), run=f"run-{i // 10}")
        if i in snap_at:
            copy = root / f"{name}-snap{i}"
            shutil.copytree(d, copy)
            snapshots.append((sum(len(lines) for _, lines in read_files(copy)), copy))
    if end_checkpoint:
        ledger.checkpoint()
    return Base(name, d, keys, snapshots)


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> list[Base]:
    root = tmp_path_factory.mktemp("bases")
    return [
        # Ends on a checkpoint: every record is under a signature.
        build(root, "small", n=40, every=6, step=timedelta(days=1), end_checkpoint=True, snap_at=(9, 25)),
        # Records after the last checkpoint: only HEAD guards those.
        build(root, "months", n=90, every=10, step=timedelta(days=3), end_checkpoint=False, snap_at=(30, 70)),
        # A recovered torn tail in its history, and lines long enough to split files into several chunks.
        build(root, "torn", n=60, every=7, step=timedelta(hours=20), end_checkpoint=True, pad=300, tear_at=17,
              snap_at=(20,)),
    ]


# -- mutations: each edits the copy in `d` and returns the seq of the first record it altered --------


def _flat(d: Path) -> tuple[list[tuple[str, list[bytes]]], list[bytes]]:
    files = read_files(d)
    return files, [line for _, lines in files for line in lines]


def _unflat(files, flat: list[bytes], counts: list[int] | None = None) -> list[tuple[str, list[bytes]]]:
    counts = counts or [len(lines) for _, lines in files]
    out, at = [], 0
    for (name, _), c in zip(files, counts):
        out.append((name, flat[at: at + c]))
        at += c
    return out


def _file_of(files, index: int) -> int:
    at = 0
    for fi, (_, lines) in enumerate(files):
        if index < at + len(lines):
            return fi
        at += len(lines)
    return len(files) - 1


def flip_a_byte(d: Path, base: Base, draw: Draw) -> int:
    files, flat = _flat(d)
    k = draw(0, len(flat) - 1)
    pos = draw(0, len(flat[k]))  # len(line) is its newline
    fi = _file_of(files, k)
    name, lines = files[fi]
    first = sum(len(files[j][1]) for j in range(fi))
    data = bytearray(b"".join(line + b"\n" for line in lines))
    data[sum(len(line) + 1 for line in lines[: k - first]) + pos] ^= draw(1, 255)
    (d / name).write_bytes(bytes(data))
    return k


def edit_and_rehash(d: Path, base: Base, draw: Draw) -> int:
    files, flat = _flat(d)
    k = draw(0, len(flat) - 1)
    obj = json.loads(flat[k])
    obj["body"]["approved_by"] = "mallory"
    flat[k] = canonical_json(obj).encode()
    write_files(d, _unflat(files, rechain(flat, k + 1)))
    return k


def delete_a_record(d: Path, base: Base, draw: Draw) -> int:
    files, flat = _flat(d)
    k = draw(0, len(flat) - 1)
    counts = [len(lines) for _, lines in files]
    counts[_file_of(files, k)] -= 1
    del flat[k]
    write_files(d, _unflat(files, flat, counts))
    return k


def _insert(d: Path, draw: Draw, renumber: bool) -> int:
    # Insert before an existing record: one forged record after the last is indistinguishable from a
    # crash between an append and its HEAD update (documented), so the end is not a position here.
    files, flat = _flat(d)
    k = draw(0, len(flat) - 1)
    ts = json.loads(flat[k])["ts"]
    forged = {"seq": k, "prev": line_hash(flat[k - 1]) if k else GENESIS, "ts": ts, "kind": "step",
              "run": None, "body": {"forged": True}}
    counts = [len(lines) for _, lines in files]
    counts[_file_of(files, k)] += 1
    flat.insert(k, canonical_json(forged).encode())
    if renumber:
        flat = rechain(flat, k + 1, renumber=True)
    write_files(d, _unflat(files, flat, counts))
    return k


def insert_a_record(d: Path, base: Base, draw: Draw) -> int:
    return _insert(d, draw, renumber=False)


def insert_and_renumber(d: Path, base: Base, draw: Draw) -> int:
    return _insert(d, draw, renumber=True)


def reorder_two(d: Path, base: Base, draw: Draw) -> int:
    files, flat = _flat(d)
    i = draw(0, len(flat) - 2)
    j = draw(i + 1, len(flat) - 1)
    flat[i], flat[j] = flat[j], flat[i]
    write_files(d, _unflat(files, flat))
    return i


def duplicate_a_record(d: Path, base: Base, draw: Draw) -> int:
    files, flat = _flat(d)
    k = draw(0, len(flat) - 1)
    counts = [len(lines) for _, lines in files]
    counts[_file_of(files, k)] += 1
    flat.insert(k + 1, flat[k])
    write_files(d, _unflat(files, flat, counts))
    return k


def truncate_the_end(d: Path, base: Base, draw: Draw) -> int:
    files, flat = _flat(d)
    keep = draw(1, len(flat) - 1)
    out, left = [], keep
    for name, lines in files:
        if left > 0:
            out.append((name, lines[:left]))
        left -= len(lines)
    write_files(d, out)
    return keep


def swap_checkpoint_signatures(d: Path, base: Base, draw: Draw) -> int:
    files, flat = _flat(d)
    cps = [i for i, line in enumerate(flat) if json.loads(line)["kind"] == "checkpoint"]
    a = cps[draw(0, len(cps) - 2)]
    b = cps[draw(cps.index(a) + 1, len(cps) - 1)]
    oa, ob = json.loads(flat[a]), json.loads(flat[b])
    oa["body"]["signature"], ob["body"]["signature"] = ob["body"]["signature"], oa["body"]["signature"]
    flat[a], flat[b] = canonical_json(oa).encode(), canonical_json(ob).encode()
    write_files(d, _unflat(files, flat))
    return a


def replay_an_older_prefix(d: Path, base: Base, draw: Draw) -> int:
    count, snap = base.snapshots[draw(0, len(base.snapshots) - 1)]
    for name in ledger_files(d):
        (d / name).unlink()
    for name in ledger_files(snap):
        shutil.copy2(snap / name, d / name)  # HEAD stays as it was
    return count


MUTATIONS = [
    flip_a_byte, edit_and_rehash, delete_a_record, insert_a_record, insert_and_renumber, reorder_two,
    duplicate_a_record, truncate_the_end, swap_checkpoint_signatures, replay_an_older_prefix,
]


def check_detected(report, mutated: int) -> None:
    assert report.status is not Status.INTACT, f"undetected; verify said {report.message}"
    assert not report.ok
    assert report.seq is not None and report.seq <= mutated, (
        f"altered record {mutated}, but the report points later: {report.message}"
    )
    if report.range is not None:
        assert report.range[0] <= mutated
    assert "\n" not in report.message


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.__name__)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_mutation_is_detected_at_or_before_the_altered_record(bases, mutation, data):
    base = data.draw(st.sampled_from(bases), label="base")
    draw = lambda lo, hi: data.draw(st.integers(lo, hi))  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "evidence"
        shutil.copytree(base.dir, d)
        mutated = mutation(d, base, draw)
        check_detected(verify(d, base.keys), mutated)


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.__name__)
def test_parallel_verify_reports_exactly_what_the_single_process_one_does(bases, mutation, tmp_path):
    for seed, base in enumerate(bases):
        d = tmp_path / f"{base.name}-{seed}"
        shutil.copytree(base.dir, d)
        mutated = mutation(d, base, random.Random(seed).randint)
        one, two = verify(d, base.keys, workers=1), verify(d, base.keys, workers=2)
        check_detected(two, mutated)
        assert (two.status, two.seq, two.range, two.message) == (one.status, one.seq, one.range, one.message)


def test_clean_ledgers_and_their_earlier_copies_verify_intact(bases):
    for base in bases:
        for workers in (1, 2):
            report = verify(base.dir, base.keys, workers=workers)
            assert report.status is Status.INTACT, report.message
            assert report.ok and report.seq == report.last_seq and report.checkpoints >= 3
        for _, snap in base.snapshots:
            assert verify(snap, base.keys).status is Status.INTACT
    torn = verify(bases[2].dir, bases[2].keys)
    recovered = list(iter_records(bases[2].dir, kind="torn_tail_recovered"))
    assert len(recovered) == 1 and recovered[0].body["length"] == len(b'{"body":{"i":17,"half wr')
    assert [w for w in torn.warnings if w.startswith(f"torn tail recovered at seq {recovered[0].seq}:")]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=25, deadline=None)
@given(bodies=st.lists(st.dictionaries(st.text(max_size=8), json_values, max_size=5), min_size=1, max_size=8),
       every=st.integers(1, 4))
def test_any_clean_ledger_verifies_intact_and_reads_back(bodies, every):
    with tempfile.TemporaryDirectory() as tmp:
        signer, keys = local_signer(Path(tmp))
        d = Path(tmp) / "evidence"
        ledger = Ledger(d, signer=signer, checkpoint_every=every,
                        clock=StepClock(utc(2026, 1, 30), timedelta(hours=13)))
        for body in bodies:
            ledger.append("step", body)
        ledger.checkpoint()
        report = verify(d, keys)
        assert report.status is Status.INTACT, report.message
        assert [r.body for r in iter_records(d, kind="step")] == bodies
