"""Unit tests of the evidence ledger: records, files, modes, masking, checkpoints, signers, retention."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest

from crashcart.errors import EvidenceError
from crashcart.evidence import (
    EXIT_CODES,
    GENESIS,
    Ledger,
    LocalEd25519Signer,
    Status,
    TrustedKeys,
    iter_records,
    pin_key,
    prune,
    verify,
)
from crashcart.evidence.ledger import canonical_json
from crashcart.evidence.merkle import Frontier, leaf_hash, tree_root
from crashcart.secrets import MASK, Secret
from ledger_support import StepClock, UnreachableVault, local_signer, read_files, utc


@pytest.fixture
def signer_and_keys(tmp_path):
    return local_signer(tmp_path / "keys")


def new_ledger(tmp_path, signer, **kw) -> Ledger:
    return Ledger(tmp_path / "evidence", signer=signer, **kw)


def test_append_then_read_back_gives_the_same_records(tmp_path, signer_and_keys):
    signer, keys = signer_and_keys
    ledger = new_ledger(tmp_path, signer, clock=StepClock(utc(2026, 3, 4, 5, 6, 7)))
    bodies = [
        {"host": "web-1", "action": "isolate_host", "zones": ["drop"], "ok": True},
        {"note": "ünïcödé ✓ 日本", "n": 3.5, "nested": {"b": [1, {"a": None}]}},
        {},
    ]
    written = [ledger.append("step", b, run="run-42") for b in bodies]

    read = list(iter_records(tmp_path / "evidence"))
    assert [r.body for r in read] == bodies
    assert [r.seq for r in read] == [0, 1, 2]
    assert read[0].prev == GENESIS
    assert [r.prev for r in read[1:]] == [r.hash for r in read[:-1]]
    assert read == written
    assert read[0].ts == "2026-03-04T05:06:07.000000Z"
    for r in read:
        assert r.hash == hashlib.sha256(r.raw).hexdigest()
        assert r.raw == canonical_json(json.loads(r.raw)).encode()
        assert r.run == "run-42"
    head = json.loads((tmp_path / "evidence" / "HEAD").read_text())
    assert head == {"seq": 2, "hash": read[-1].hash}
    assert verify(tmp_path / "evidence", keys).status is Status.INTACT


def test_iter_records_filters_by_time_kind_and_run(tmp_path, signer_and_keys):
    signer, _ = signer_and_keys
    ledger = new_ledger(tmp_path, signer, clock=StepClock(utc(2026, 1, 31, 23, 0), timedelta(minutes=30)))
    for i in range(6):
        ledger.append("intent" if i % 2 else "result", {"i": i}, run=f"run-{i % 3}")
    d = tmp_path / "evidence"
    assert [r.body["i"] for r in iter_records(d, kind="intent")] == [1, 3, 5]
    assert [r.body["i"] for r in iter_records(d, run="run-1")] == [1, 4]
    assert [r.body["i"] for r in iter_records(d, since=utc(2026, 2, 1, 0, 30))] == [3, 4, 5]


def test_one_file_per_utc_month_and_seq_runs_across_files(tmp_path, signer_and_keys):
    signer, keys = signer_and_keys
    times = iter([
        utc(2026, 1, 31, 23, 59, 59),
        # 19:30 on 31 January in New York is already February in UTC.
        datetime(2026, 1, 31, 19, 30, tzinfo=timezone(timedelta(hours=-5))),
        utc(2026, 2, 28, 12),
        utc(2026, 4, 1, 0, 0, 0),
    ])
    ledger = new_ledger(tmp_path, signer, clock=lambda: next(times))
    for i in range(4):
        ledger.append("step", {"i": i})

    files = read_files(tmp_path / "evidence")
    assert [(name, len(lines)) for name, lines in files] == [
        ("evidence-2026-01.jsonl", 1),
        ("evidence-2026-02.jsonl", 2),
        ("evidence-2026-04.jsonl", 1),
    ]
    assert [json.loads(line)["seq"] for _, lines in files for line in lines] == [0, 1, 2, 3]
    assert json.loads(files[1][1][0])["ts"] == "2026-02-01T00:30:00.000000Z"
    assert verify(tmp_path / "evidence", keys).status is Status.INTACT


def test_a_clock_stepping_back_does_not_move_records_into_an_older_month(tmp_path, signer_and_keys):
    signer, keys = signer_and_keys
    times = iter([utc(2026, 5, 1, 0, 0, 1), utc(2026, 4, 30, 23, 59, 59)])
    ledger = new_ledger(tmp_path, signer, clock=lambda: next(times))
    a = ledger.append("step", {})
    b = ledger.append("step", {})
    assert b.ts == a.ts
    assert verify(tmp_path / "evidence", keys).status is Status.INTACT


def test_directory_is_0700_and_files_0600_whatever_the_umask(tmp_path, signer_and_keys):
    signer, _ = signer_and_keys
    old = os.umask(0)
    try:
        ledger = new_ledger(tmp_path, signer, checkpoint_every=2)
        for i in range(3):
            ledger.append("step", {"i": i})
        (tmp_path / "evidence" / "evidence-2099-01.jsonl").write_bytes(b'{"partial')  # a torn tail
        os.chmod(tmp_path / "evidence" / "evidence-2099-01.jsonl", 0o600)
        ledger.append("step", {"after": "tear"})
    finally:
        os.umask(old)
    d = tmp_path / "evidence"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE((d / "torn").stat().st_mode) == 0o700
    files = [p for p in d.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"HEAD", ".lock", "evidence-2099-01.jsonl.0.torn"}
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


def test_secrets_never_reach_any_file_of_the_ledger(tmp_path, signer_and_keys):
    signer, keys = signer_and_keys
    canary = "canary-XYZ-123-" + os.urandom(8).hex()
    secret = Secret(canary)
    ledger = new_ledger(tmp_path, signer, checkpoint_every=2)
    ledger.append(
        "step",
        {
            "password": secret,
            "stderr": f"sshpass -p {canary} ssh root@web-1: permission denied",
            "argv": ["chpasswd", f"root:{canary}"],
            "nested": {"deep": [{"value": secret}, (canary,)]},
            canary: "a secret used as a key",
            "path": Path(f"/tmp/{canary}"),
        },
        run=f"run-{canary}",
    )
    ledger.append("step", {"quoted": f'he said "{canary}"\n'})
    ledger.checkpoint()

    for path in (tmp_path / "evidence").rglob("*"):
        if path.is_file():
            assert canary.encode() not in path.read_bytes(), path
    records = list(iter_records(tmp_path / "evidence"))
    assert records[0].body["password"] == MASK
    assert records[0].body["stderr"] == f"sshpass -p {MASK} ssh root@web-1: permission denied"
    assert records[0].run == f"run-{MASK}"
    assert verify(tmp_path / "evidence", keys).status is Status.INTACT


def test_a_checkpoint_follows_every_n_records_and_chains_to_the_last(tmp_path, signer_and_keys):
    signer, keys = signer_and_keys
    ledger = new_ledger(tmp_path, signer, checkpoint_every=5)
    for i in range(12):
        ledger.append("step", {"i": i})
    records = list(iter_records(tmp_path / "evidence"))
    cps = [r for r in records if r.kind == "checkpoint"]
    assert [r.seq for r in cps] == [5, 11]
    assert [r.body["count"] for r in cps] == [5, 11]
    assert cps[0].body["prev_checkpoint_seq"] is None and cps[0].body["prev_checkpoint_hash"] is None
    assert cps[1].body["prev_checkpoint_seq"] == 5 and cps[1].body["prev_checkpoint_hash"] == cps[0].hash
    assert cps[1].body["head"] == records[10].hash
    leaves = [leaf_hash(r.raw) for r in records[:11]]
    assert cps[1].body["root"] == tree_root(leaves).hex()
    assert cps[1].body["signer"] == "local-ed25519" and cps[1].body["key_id"] == signer.key_id

    final = ledger.checkpoint()
    assert final.seq == 14 and final.body["count"] == 14
    assert ledger.checkpoint() == final  # nothing new since: no checkpoint of a checkpoint
    report = verify(tmp_path / "evidence", keys)
    assert (report.status, report.records, report.checkpoints) == (Status.INTACT, 15, 3)


def test_a_new_ledger_object_continues_the_chain_and_the_merkle_frontier(tmp_path, signer_and_keys):
    signer, keys = signer_and_keys
    for round_ in range(3):  # each round is a new process's view: cold caches, rebuilt by a scan
        ledger = new_ledger(tmp_path, signer, checkpoint_every=4)
        for i in range(3):
            ledger.append("step", {"round": round_, "i": i})
        ledger.checkpoint()
    report = verify(tmp_path / "evidence", keys)
    assert report.status is Status.INTACT and report.checkpoints >= 3


def test_fallback_signer_signs_when_vault_is_unreachable_and_the_checkpoint_says_so(tmp_path, signer_and_keys):
    local, keys = signer_and_keys
    vault = UnreachableVault()
    ledger = new_ledger(tmp_path, vault, fallback_signer=local, checkpoint_every=3)
    for i in range(3):
        ledger.append("step", {"i": i})
    cp = ledger.checkpoint()
    assert vault.calls == 1
    assert cp.body["signer"] == "local-ed25519"
    assert cp.body["key_id"] == local.key_id
    auto = [r for r in iter_records(tmp_path / "evidence", kind="checkpoint")]
    assert auto == [cp]
    assert verify(tmp_path / "evidence", keys).status is Status.INTACT


def test_without_a_fallback_an_unsigned_checkpoint_is_refused_but_appends_still_land(tmp_path):
    ledger = new_ledger(tmp_path, UnreachableVault(), checkpoint_every=2)
    records = [ledger.append("step", {"i": i}) for i in range(3)]  # auto checkpoints fail quietly-but-logged
    assert [r.seq for r in records] == [0, 1, 2]
    with pytest.raises(EvidenceError, match="cannot sign the evidence checkpoint"):
        ledger.checkpoint()
    assert [r.kind for r in iter_records(tmp_path / "evidence")] == ["step"] * 3


def test_a_checkpoint_signed_with_an_unpinned_key_is_reported(tmp_path, signer_and_keys):
    signer, _ = signer_and_keys
    other, other_keys = local_signer(tmp_path / "other")
    ledger = new_ledger(tmp_path, signer)
    ledger.append("step", {})
    cp = ledger.checkpoint()
    report = verify(tmp_path / "evidence", other_keys)
    assert report.status is Status.UNKNOWN_KEY and report.seq == cp.seq
    assert signer.key_id in report.message


def test_an_append_that_cannot_be_written_raises_evidence_error(tmp_path, signer_and_keys):
    signer, _ = signer_and_keys
    clock = StepClock(utc(2026, 7, 1))
    ledger = new_ledger(tmp_path, signer, clock=clock)
    ledger.append("step", {})
    (tmp_path / "evidence" / "evidence-2026-08.jsonl").mkdir()  # next month's file cannot be opened
    clock.now = utc(2026, 8, 2)
    with pytest.raises(EvidenceError, match="evidence-2026-08.jsonl"):
        ledger.append("step", {"would": "run"})


@pytest.mark.parametrize(
    "kind, body",
    [("checkpoint", {}), ("torn_tail_recovered", {}), ("Bad Kind", {}), ("step", ["not", "a", "dict"]),
     ("step", {"raw": b"bytes"}), ("step", {"x": float("nan")}), ("step", {"x": object()})],
)
def test_bad_kinds_and_bodies_are_refused_before_anything_is_written(tmp_path, signer_and_keys, kind, body):
    signer, _ = signer_and_keys
    ledger = new_ledger(tmp_path, signer)
    with pytest.raises(EvidenceError):
        ledger.append(kind, body)
    assert list(iter_records(tmp_path / "evidence")) == []


def test_prune_refuses_anything_younger_than_six_years(tmp_path, signer_and_keys):
    signer, _ = signer_and_keys
    ledger = new_ledger(tmp_path, signer, clock=StepClock(utc(2021, 1, 5)))
    ledger.append("step", {})
    now = utc(2026, 11, 23)
    with pytest.raises(EvidenceError, match=r"164\.316\(b\)\(2\)\(i\)"):
        prune(tmp_path / "evidence", date(2021, 2, 1), now, signer=signer)
    with pytest.raises(EvidenceError, match="six years"):
        ledger.prune(date(2020, 11, 24), now)  # one day too young
    assert [p.name for p in (tmp_path / "evidence").glob("*.jsonl")] == ["evidence-2021-01.jsonl"]
    assert not (tmp_path / "evidence" / "archive").exists()


def test_prune_archives_old_months_and_the_chain_still_verifies_with_or_without_the_archive(tmp_path, signer_and_keys):
    signer, keys = signer_and_keys
    d = tmp_path / "evidence"
    clock = StepClock(utc(2018, 1, 10), timedelta(days=9))
    ledger = Ledger(d, signer=signer, checkpoint_every=4, clock=clock)
    for i in range(20):  # January to June 2018
        ledger.append("step", {"i": i})
    clock.now, clock.step = utc(2026, 11, 1), timedelta(hours=1)
    ledger.append("step", {"i": "now"})

    pruned = ledger.prune(date(2018, 4, 1), now=utc(2026, 11, 23))
    assert pruned.kind == "pruned"
    assert pruned.body["files"] == ["evidence-2018-01.jsonl", "evidence-2018-02.jsonl", "evidence-2018-03.jsonl"]
    archived = sorted(p.name for p in (d / "archive").iterdir())
    assert archived == pruned.body["files"]
    assert stat.S_IMODE((d / "archive").stat().st_mode) == 0o700
    last_archived = list(iter_records(d / "archive"))[-1]
    assert (pruned.body["last_seq_pruned"], pruned.body["last_hash_pruned"]) == (last_archived.seq, last_archived.hash)
    assert verify(d, keys).status is Status.INTACT

    # The archive goes to cold storage: the chain is verified from the prune anchor.
    shutil.move(d / "archive", tmp_path / "cold")
    fresh = Ledger(d, signer=signer, checkpoint_every=4, clock=clock)  # cold cache: rebuilt from the anchor
    for i in range(5):
        fresh.append("step", {"after": i})
    fresh.checkpoint()
    report = verify(d, keys)
    assert report.status is Status.INTACT, report.message
    assert report.first_seq == last_archived.seq + 1
    assert any("pruned" in w for w in report.warnings)

    # Without the anchor the missing months are reported.
    shutil.move(d / "evidence-2018-04.jsonl", tmp_path / "gone.jsonl")
    assert verify(d, keys).status is Status.MISSING_FILE


def test_verify_statuses_have_distinct_exit_codes():
    assert set(EXIT_CODES) == set(Status)
    assert len(set(EXIT_CODES.values())) == len(Status)
    assert EXIT_CODES[Status.INTACT] == 0


def test_verify_of_a_missing_or_empty_ledger(tmp_path, signer_and_keys):
    _, keys = signer_and_keys
    assert verify(tmp_path / "nowhere", keys).status is Status.MISSING_FILE
    (tmp_path / "empty").mkdir()
    assert verify(tmp_path / "empty", keys).status is Status.INTACT


def test_since_narrows_the_counts_but_the_whole_chain_is_still_verified(tmp_path, signer_and_keys):
    signer, keys = signer_and_keys
    d = tmp_path / "evidence"
    ledger = Ledger(d, signer=signer, clock=StepClock(utc(2026, 1, 1), timedelta(days=10)))
    for i in range(9):
        ledger.append("step", {"i": i})
    report = verify(d, keys, since=utc(2026, 3, 1))
    assert report.status is Status.INTACT and report.records == 9 and report.since_records == 3
    lines = (d / "evidence-2026-01.jsonl").read_bytes().replace(b'"i":1}', b'"i":7}')
    (d / "evidence-2026-01.jsonl").write_bytes(lines)  # a January edit, before `since`
    report = verify(d, keys, since=utc(2026, 3, 1))
    assert report.status is Status.TAMPERED and report.seq == 1


def test_frontier_root_matches_the_rfc6962_definition():
    leaves = [leaf_hash(str(i).encode()) for i in range(130)]
    f = Frontier()
    assert f.root() == tree_root([])
    for n, leaf in enumerate(leaves, 1):
        f.append(leaf)
        assert f.root() == tree_root(leaves[:n]), n
    assert Frontier.from_hex(f.count, f.to_hex()).root() == f.root()
    # RFC 6962 2.1: the split is at the largest power of two below n, not in the middle.
    assert tree_root(leaves[:3]) != tree_root([tree_root(leaves[:1]), tree_root(leaves[1:3])])


def test_trusted_keys_round_trip_and_pinning(tmp_path):
    signer, public = LocalEd25519Signer.generate(tmp_path / "k.pem")
    again, public_again = LocalEd25519Signer.generate(tmp_path / "k.pem")  # exists: loaded, not replaced
    assert public_again == public and again.key_id == signer.key_id
    assert stat.S_IMODE((tmp_path / "k.pem").stat().st_mode) == 0o600
    path = tmp_path / "trusted-keys.json"
    pin_key(path, signer.key_id, signer.kind, public)
    pin_key(path, "vault-transit:crashcart-evidence:v1", "vault-transit", public)
    loaded = TrustedKeys.load(path)
    assert set(json.loads(path.read_text())) == {signer.key_id, "vault-transit:crashcart-evidence:v1"}
    assert loaded.get(signer.key_id).public_key == signer.public_key_raw
    other, other_public = LocalEd25519Signer.generate(tmp_path / "other.pem")
    with pytest.raises(EvidenceError, match="already pinned"):
        pin_key(path, signer.key_id, "local-ed25519", other_public)
    with pytest.raises(EvidenceError, match="kind"):
        TrustedKeys().add("x", "hsm", public)
    path.write_text('{"k": {"kind": "local-ed25519", "public_key": "c2hvcnQ="}}')
    with pytest.raises(EvidenceError, match="32 raw bytes"):
        TrustedKeys.load(path)


def test_a_signing_key_readable_by_others_is_refused(tmp_path):
    LocalEd25519Signer.generate(tmp_path / "k.pem")
    os.chmod(tmp_path / "k.pem", 0o644)
    with pytest.raises(EvidenceError, match="0600"):
        LocalEd25519Signer(tmp_path / "k.pem")


def test_an_append_gives_up_when_another_process_holds_the_lock_too_long(tmp_path, signer_and_keys):
    import fcntl

    signer, keys = signer_and_keys
    ledger = new_ledger(tmp_path, signer, lock_timeout=0.3)
    ledger.append("step", {"i": 0})
    holder = os.open(tmp_path / "evidence" / ".lock", os.O_RDWR)  # a separate open file: a separate lock
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        with pytest.raises(EvidenceError, match="held the evidence ledger lock"):
            ledger.append("step", {"i": 1})
    finally:
        os.close(holder)
    # The abandoned wait got the lock when it was freed and let it go again.
    assert ledger.append("step", {"i": 2}).seq == 1
    assert verify(tmp_path / "evidence", keys).status is Status.INTACT
