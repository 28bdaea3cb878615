"""Restore tests: the pure judgements and content proof, then real restores from the lab's restic repositories."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from conftest import LAB_DIR
from crashcart.errors import (
    InvalidInput,
    ResticDataError,
    ResticLocked,
    ResticNotFound,
    ResticRepoMissing,
    ResticWrongPassword,
    StateFileError,
    VaultUnavailable,
)
from crashcart.evidence.ledger import iter_records
from crashcart.evidence.verify import verify
from crashcart.inventory import AppCheck
from crashcart.runtime import Runtime
from crashcart.secrets import Secret
from integrations.restic import Restic, Snapshot

ROOT = Path(__file__).resolve().parents[1]
CRASHCART = str(ROOT / ".venv" / "bin" / "crashcart")
RESTIC_ROOT = LAB_DIR / "hosts" / "backup-1" / "srv" / "restic"
WEB1_SOURCE = LAB_DIR / "hosts" / "web-1" / "srv" / "ephi"
T0 = datetime(2026, 1, 1, 3, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def restore():
    """flows.restore, imported once the session points Prefect at the lab's server (never a temporary one)."""
    import flows.restore as module

    return module


# -- the content proof: pure comparison -----------------------------------------------------------------

def _tree(root: Path) -> None:
    (root / "srv" / "ephi" / "records").mkdir(parents=True)
    (root / "srv" / "ephi" / "patients.csv").write_text("patient_id,name\nP00001,Test Patient\n")
    (root / "srv" / "ephi" / "records" / "0001.json").write_text('{"patient_id": "P00001"}')
    (root / "srv" / "ephi" / "scan.bin").write_bytes(bytes(range(256)) * 64)


def _references(restore, source_root: Path, mtime: float) -> tuple[dict, dict, dict]:
    """The listing, dump digests and source files a restore is compared with, taken from the original tree."""
    original = restore.digest_tree(source_root)
    listing = {p: d.size for p, d in original.items()}
    source = {p: restore.SourceFile(d.sha256, mtime) for p, d in original.items()}
    return listing, dict(original), source


def test_restored_bytes_that_match_pass(restore, tmp_path):
    _tree(tmp_path / "source")
    shutil.copytree(tmp_path / "source", tmp_path / "restored")
    listing, dumped, source = _references(restore, tmp_path / "source", T0.timestamp() - 60)

    proof = restore.compare_content(restore.digest_tree(tmp_path / "restored"), listing, dumped=dumped, source=source,
                            source_root="/srv/ephi", snapshot_time=T0)

    assert proof.ok and proof.mismatches == []
    assert (proof.files_verified, proof.files_expected, proof.source_compared) == (3, 3, 3)
    assert proof.bytes_verified == sum(listing.values()) == 16384 + 36 + 24


def test_one_altered_restored_file_is_a_mismatch_naming_it(restore, tmp_path):
    _tree(tmp_path / "source")
    shutil.copytree(tmp_path / "source", tmp_path / "restored")
    listing, dumped, source = _references(restore, tmp_path / "source", T0.timestamp() - 60)
    scan = tmp_path / "restored" / "srv" / "ephi" / "scan.bin"
    data = bytearray(scan.read_bytes())
    data[5000] ^= 0xFF  # same size: only the digests can tell
    scan.write_bytes(bytes(data))

    proof = restore.compare_content(restore.digest_tree(tmp_path / "restored"), listing, dumped=dumped, source=source,
                            source_root="/srv/ephi", snapshot_time=T0)

    assert not proof.ok
    assert {(m.path, m.problem) for m in proof.mismatches} == {("/srv/ephi/scan.bin", "dump"),
                                                               ("/srv/ephi/scan.bin", "source")}
    assert proof.files_verified == 2 and "content mismatch" in proof.summary() and "/srv/ephi/scan.bin" in proof.summary()
    # Without the dump and the source, the listing's sizes alone cannot see it: the digests are the proof.
    assert restore.compare_content(restore.digest_tree(tmp_path / "restored"), listing).ok


def test_missing_extra_and_resized_files_are_mismatches(restore):
    listing = {"/a": 3, "/b": 4}
    restored = {"/b": restore.FileDigest(5, "x" * 64), "/c": restore.FileDigest(1, "y" * 64)}
    proof = restore.compare_content(restored, listing)
    assert [(m.path, m.problem) for m in proof.mismatches] == [("/a", "missing"), ("/b", "size"), ("/c", "extra")]
    assert proof.files_verified == 0 and not proof.ok


def test_source_changes_after_the_snapshot_are_reported_not_failed(restore):
    digest = restore.FileDigest(3, "a" * 64)
    restored = {"/srv/ephi/old.csv": digest, "/srv/ephi/edited.csv": digest, "/srv/ephi/gone.csv": digest,
                "/srv/ephi/silently.csv": digest}
    listing = {p: 3 for p in restored}
    before, after = T0.timestamp() - 3600, T0.timestamp() + 3600
    source = {"/srv/ephi/old.csv": restore.SourceFile("a" * 64, before), "/srv/ephi/edited.csv": restore.SourceFile("b" * 64, after),
              "/srv/ephi/silently.csv": restore.SourceFile("c" * 64, before), "/srv/ephi/new.csv": restore.SourceFile("d" * 64, after),
              "/srv/ephi/skipped.csv": restore.SourceFile("e" * 64, before)}

    proof = restore.compare_content(restored, listing, source=source, source_root="/srv/ephi", snapshot_time=T0)

    assert proof.changed_since_backup == ["/srv/ephi/edited.csv"]
    assert proof.deleted_since_backup == ["/srv/ephi/gone.csv"]
    assert proof.new_since_backup == ["/srv/ephi/new.csv"]
    assert proof.not_in_snapshot == ["/srv/ephi/skipped.csv"]
    # Different bytes with an mtime older than the snapshot: the backup does not hold what the disk did.
    assert [(m.path, m.problem) for m in proof.mismatches] == [("/srv/ephi/silently.csv", "source")]


def test_source_listing_parsers(restore):
    hashes = ("a" * 64 + "  /srv/ephi/patients.csv\n" + "\\" + "b" * 64 + "  /srv/ephi/odd\\nname\\\\x\n"
              + "c" * 64 + " */srv/ephi/with space.bin\n")
    assert restore.parse_sha256sum(hashes) == {"/srv/ephi/patients.csv": "a" * 64, "/srv/ephi/odd\nname\\x": "b" * 64,
                                       "/srv/ephi/with space.bin": "c" * 64}
    with pytest.raises(ValueError, match="line 1"):
        restore.parse_sha256sum("sha256sum: /srv/ephi/x: Permission denied\n")
    assert restore.parse_find_mtimes("1700000000.5 /srv/ephi/a b\0" "1700000001.0000000000 /srv/ephi/c\0") == {
        "/srv/ephi/a b": 1700000000.5, "/srv/ephi/c": 1700000001.0}


# -- RPO, RTO, snapshots, rotation: pure judgements ----------------------------------------------------------

def test_rpo_breach_reason(restore):
    assert restore.judge_rpo(T0, T0 + timedelta(hours=40.2), 26).reason == "RPO breach: snapshot is 40.2 h old, target 26 h"
    ok = restore.judge_rpo(T0, T0 + timedelta(hours=25), 26)
    assert ok.ok and ok.reason is None and ok.as_dict()["age_hours"] == 25.0
    assert restore.judge_rpo(T0, T0 + timedelta(minutes=3), 0.0001).reason == "RPO breach: snapshot is 0.05 h old, target 0.0001 h"
    with pytest.raises(ValueError):
        restore.judge_rpo(T0.replace(tzinfo=None), T0, 26)


def test_rto_is_restore_plus_verification_with_throughput(restore):
    fast = restore.judge_rto(20.0, 5.0, 200_000_000, 30)
    assert fast.ok and fast.seconds == 25.0 and fast.throughput_mb_s == 10.0
    assert fast.summary() == "RTO 25.0 s (target 30 min) at 10.00 MB/s"
    slow = restore.judge_rto(1700.0, 160.0, 10, 30)
    assert not slow.ok and slow.reason == "RTO breach: restore and verification took 31.0 min, target 30 min"


def _snap(sid: str, hours: float, host: str = "web-1", paths=("/srv/ephi",)) -> Snapshot:
    return Snapshot(id=sid * 8, short_id=sid, time=T0 + timedelta(hours=hours), hostname=host, paths=tuple(paths))


def test_choose_snapshot(restore):
    snaps = [_snap("aaaaaaaa", 0), _snap("bbbbbbbb", 5), _snap("cccccccc", 9, host="db-1"), _snap("dddddddd", 7, paths=("/etc",))]
    assert restore.choose_snapshot(snaps, "latest", host="web-1", path="/srv/ephi").short_id == "bbbbbbbb"
    assert restore.choose_snapshot(snaps, "latest").short_id == "cccccccc"
    assert restore.choose_snapshot(snaps, "latest", host="web-1", path="/srv/ephi/records").short_id == "bbbbbbbb"
    assert {restore.choose_snapshot(snaps, "random", host="web-1", path="/srv/ephi").short_id for _ in range(50)} == {
        "aaaaaaaa", "bbbbbbbb"}
    assert restore.choose_snapshot(snaps, "dddddddd").short_id == "dddddddd"  # an id is taken as named
    with pytest.raises(ResticNotFound, match="snapshot 0123abcd is not in the repository"):
        restore.choose_snapshot(snaps, "0123abcd")
    with pytest.raises(ResticNotFound, match="no snapshot of backup-1:/srv/ephi"):
        restore.choose_snapshot(snaps, "latest", host="backup-1", path="/srv/ephi")
    twins = [Snapshot(id="abcdef01" + c * 56, short_id="abcdef01", time=T0, hostname="web-1", paths=("/srv/ephi",))
             for c in "01"]
    with pytest.raises(InvalidInput, match="ambiguous"):
        restore.choose_snapshot(twins, "abcdef01")


def test_snapshot_selector_refuses_anything_but_latest_random_or_hex(restore):
    assert restore.snapshot_selector("latest") == "latest" and restore.snapshot_selector("random") == "random"
    assert restore.snapshot_selector("256cbec5") == "256cbec5"
    for bad in ("../x", "LATEST", "256cbec", "256cbec5;rm", "-r", "", None):
        with pytest.raises(InvalidInput, match="snapshot .* is not allowed"):
            restore.snapshot_selector(bad)


def test_check_subsets_rotate_so_t_runs_read_every_pack(restore, tmp_path):
    assert [restore.subset_for_run(k, 5) for k in range(6)] == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5), (1, 5)]
    rotation = restore.CheckRotation(tmp_path / "state" / "restore-check-rotation.json")
    assert rotation.peek("web-1-data", 5) == (1, 5)
    with rotation.claim("web-1-data", 5) as claim:
        assert claim.subset == "1/5"
        claim.commit(ok=True, run_id="r1")
    with rotation.claim("web-1-data", 5) as claim:
        assert claim.subset == "2/5"  # not committed: the check did not read its subset (e.g. locked)
    assert rotation.peek("web-1-data", 5) == (2, 5) and rotation.peek("db-1-data", 5) == (1, 5)
    saved = json.loads(rotation.path.read_text())
    assert saved["web-1-data"]["runs"] == 1 and saved["web-1-data"]["last"]["subset"] == "1/5"
    rotation.path.write_text("{not json")
    with pytest.raises(StateFileError, match="restore-check rotation"):
        rotation.peek("web-1-data", 5)


def test_application_checks(restore, tmp_path):
    assert restore.judge_csv(io.StringIO("id,name\n1,a\n2,b\n")) == (True, "2 columns, 2 rows")
    assert restore.judge_csv(io.StringIO("id,name\n"))[0] is False
    assert restore.judge_csv(io.StringIO(""))[0] is False
    assert restore.judge_csv(io.StringIO('id,name\n1,"unterminated\n'))[0] is False
    assert restore.judge_csv(io.StringIO("id,name\n1,a,extra\n")) == (False, "row 1 has 3 fields, the header 2")
    assert restore.judge_json(io.StringIO('{"a": 1}'))[0] and not restore.judge_json(io.StringIO('{"a": '))[0]
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "p.csv").write_text("a,b\n1,2\n")
    assert not restore.app_check(tmp_path, AppCheck(path="empty", kind="nonempty")).ok
    assert restore.app_check(tmp_path, AppCheck(path="p.csv", kind="csv")).ok
    assert restore.app_check(tmp_path, AppCheck(path="nope.json", kind="json")).detail.startswith("not restored")


def test_capabilities_and_failure_reasons_are_distinct(restore):
    caps = restore.restic_capabilities((0, 14, 0))
    assert caps["restore_verify"] and caps["read_data_subset_n_of_t"] and not caps["structured_exit_codes"]
    assert restore.restic_capabilities((0, 17, 1))["structured_exit_codes"]
    codes = {restore.failure_reason(cls("x"))[0] for cls in (ResticWrongPassword, ResticRepoMissing, ResticLocked,
                                                      ResticDataError, ResticNotFound, VaultUnavailable)}
    assert len(codes) == 6
    assert restore.failure_reason(ResticWrongPassword("x")) == ("wrong_password", "wrong repository password: x")


@pytest.mark.lab
def test_what_to_test_is_chosen_from_the_inventory(restore, runtime):
    inventory = runtime.inventory
    assert [r.name for r in restore.restore_targets(inventory)[0]] == ["web-1-data", "db-1-data"]
    assert [r.name for r in restore.restore_targets(inventory, host="db-1")[0]] == ["db-1-data"]
    assert restore.restore_targets(inventory, ["web-1-data"], "web-1", "random") == (
        [inventory.repo("web-1-data")], "random")
    with pytest.raises(InvalidInput, match="choose exactly one repository"):
        restore.restore_targets(inventory, snapshot="256cbec5")
    with pytest.raises(InvalidInput, match="no restic repository .* backs up host 'peer-1'"):
        restore.restore_targets(inventory, host="peer-1")
    with pytest.raises(InvalidInput, match="unknown host 'web-9'"):
        restore.restore_targets(inventory, host="web-9")
    with pytest.raises(InvalidInput, match="host name 'web-1;id' is not allowed"):
        restore.restore_targets(inventory, host="web-1;id")


def test_the_runbook_validates_and_maps_to_the_contingency_specifications():
    from flows.common import runbook

    book = runbook("restore-test")
    assert book.hipaa == ("164.308(a)(7)(ii)(A)", "164.308(a)(7)(ii)(B)", "164.308(a)(7)(ii)(D)")
    assert [s.id for s in book.steps] == ["tooling", "snapshot", "rpo", "restore", "content", "application", "rto",
                                          "check", "wipe"]
    assert book.final_states == ("passed", "failed", "planned")


# -- real restores from the lab ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def web1_password(vault_admin) -> Secret:
    data = vault_admin.secrets.kv.v2.read_secret_version(path="restic/web-1", mount_point="secret",
                                                          raise_on_deleted_version=True)
    return Secret(data["data"]["data"]["password"])


@pytest.fixture
def repo_copies():
    """Copies of web-1's repository on backup-1 (reached as /srv/restic/test-...), removed afterwards."""
    made: list[Path] = []

    def make() -> str:
        name = f"test-{uuid.uuid4().hex[:12]}"
        shutil.copytree(RESTIC_ROOT / "web-1", RESTIC_ROOT / name, symlinks=True)
        made.append(RESTIC_ROOT / name)
        return name

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


def with_repos(**extra: dict):
    """An inventory edit: add repositories made from web-1-data's entry with the given fields changed."""
    def edit(text: str) -> str:
        data = yaml.safe_load(text)
        repos = data["restic_repositories"]
        for name, fields in extra.items():
            repos[name] = {**repos["web-1-data"], **fields}
        return yaml.safe_dump(data, sort_keys=False)

    return edit


def records(config: Path, run_id: str) -> list:
    return list(iter_records(Runtime.load(config).settings.evidence.dir, run=run_id))


def result_of(config: Path, run_id: str, repo: str) -> dict:
    [body] = [r.body for r in records(config, run_id) if r.kind == "restore_test" and r.body["repository"] == repo]
    return body


def _source_files() -> dict[str, int]:
    return {"/" + str(p.relative_to(LAB_DIR / "hosts" / "web-1")): p.stat().st_size
            for p in WEB1_SOURCE.rglob("*") if p.is_file()}


@pytest.mark.lab
def test_web1_latest_snapshot_restores_matches_and_is_recorded(restore, lab_copy, web1_password):
    config = lab_copy()
    result = restore.restore_test(repos=["web-1-data"], triggered_by="cli:tester@mgmt", config=str(config))

    assert result["status"] == "passed", result["summary"]
    rt = Runtime.load(config)
    body = result_of(config, result["run_id"], "web-1-data")
    source = _source_files()
    # Every file of the source, byte for byte (the test's own view of web-1's disk, not crashcart's).
    assert body["files_verified"] == body["files_expected"] == len(source) and body["mismatches"] == []
    assert body["bytes_verified"] == sum(source.values())
    assert body["content"]["source_compared"] == len(source) and len(body["content"]["dump_compared"]) == 5
    assert body["rpo"]["ok"] and 0 < body["rpo"]["age_hours"] < 26 and body["rpo"]["target_hours"] == 26
    assert body["rto"]["ok"] and body["rto"]["seconds"] > 0 and body["rto"]["throughput_mb_s"] > 0
    assert body["rto"]["seconds"] == pytest.approx(body["rto"]["restore_seconds"] + body["rto"]["verify_seconds"], abs=0.002)
    assert body["check"]["subset"] == "1/5" and body["check"]["ok"] and body["hipaa"] == "164.308(a)(7)(ii)(D)"
    assert len(body["repository_id"]) == 64 and body["snapshot"]["hostname"] == "web-1"
    assert body["tool_versions"]["restic"] == "0.14.0" and body["application"] and all(a["ok"] for a in body["application"])
    # The scratch was wiped and the wipe recorded; the rotation moved on.
    assert body["wipe"]["files_removed"] == len(source) and body["wipe"]["bytes_removed"] == sum(source.values())
    assert not Path(body["wipe"]["path"]).exists()
    assert list((rt.settings.state_dir / "restore-scratch").iterdir()) == []
    assert restore.CheckRotation(rt.settings.state_dir / "restore-check-rotation.json").peek("web-1-data", 5) == (2, 5)
    # Intent before result for every step, run started and finished, checkpointed, and it verifies.
    recs = records(config, result["run_id"])
    kinds = [r.kind for r in recs]
    # Only the hooks' own records (notifications) may follow the run's end.
    assert kinds[0] == "run_started" and kinds.index("run_finished") > kinds.index("restore_test") > max(
        i for i, k in enumerate(kinds) if k == "step_result")
    assert set(kinds[kinds.index("run_finished") + 1:]) <= {"notification", "hook_failed"}
    assert recs[0].body["hipaa"] == ["164.308(a)(7)(ii)(A)", "164.308(a)(7)(ii)(B)", "164.308(a)(7)(ii)(D)"]
    intents = {r.seq: r.body["step"]["id"] for r in recs if r.kind == "step_intent"}
    results = [(r.body["step"], r.body["intent_seq"]) for r in recs if r.kind == "step_result"]
    assert [step for step, _ in results] == list(intents.values()) and all(intents[seq] == step for step, seq in results)
    report = verify(rt.settings.evidence.dir, rt.settings.evidence.trusted_keys)
    assert report.ok, report.message
    for path in rt.settings.evidence.dir.rglob("*"):
        if path.is_file():
            assert web1_password.reveal().encode() not in path.read_bytes(), path


@pytest.mark.lab
def test_corrupted_pack_fails_the_test_where_a_plain_check_passes(restore, lab_copy, repo_copies, web1_password):
    name = repo_copies()
    pack = max((p for p in (RESTIC_ROOT / name / "data").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(pack, "r+b") as f:  # root writes through the pack's 0400 mode
        f.seek(pack.stat().st_size // 2)
        f.write(b"\0CORRUPTED-BY-TEST\0" * 4)
    config = lab_copy(inventory=with_repos(**{name: {"url": f"sftp:root@10.77.0.13:/srv/restic/{name}"}}))
    rt = Runtime.load(config)
    plain = Restic(rt.inventory.repo(name), web1_password, known_hosts=rt.settings.ssh.known_hosts, timeout=60,
                   cache_dir=rt.settings.state_dir / "plain-check-cache")
    assert plain.check().ok, "restic 0.14's plain check reads no pack contents: it misses this damage"
    # This run's subset is the damaged pack's: restic puts a pack in subset n when its id's first byte % t == n - 1.
    bucket = int(pack.name[:2], 16) % 5 + 1
    restore.CheckRotation(rt.settings.state_dir / "restore-check-rotation.json").path.write_text(
        json.dumps({name: {"runs": bucket - 1, "t": 5}}))

    result = restore.restore_test(repos=[name], config=str(config))

    assert result["status"] == "failed"
    body = result_of(config, result["run_id"], name)
    codes = {r["step"]: r["code"] for r in body["reasons"]}
    assert codes == {"restore": "data_damaged", "check": "data_damaged"}, body["reasons"]
    assert result["hosts"][name]["summary"].startswith("repository data damaged: restic restore")
    assert body["check"]["subset"] == f"{bucket}/5" and not body["check"]["ok"]
    assert any("Pack ID does not match" in e for e in body["check"]["errors"]), body["check"]
    assert body["steps"]["content"] == "skipped" and body["steps"]["wipe"] in ("succeeded", "unchanged")
    assert list((rt.settings.state_dir / "restore-scratch").iterdir()) == []


@pytest.mark.lab
def test_wrong_password_missing_and_locked_repositories_each_fail_with_their_own_reason(
        restore, lab_copy, repo_copies, web1_password):
    locked = repo_copies()
    config = lab_copy(inventory=with_repos(**{
        "wrong-password": {"password": "vault:secret/restic/db-1#password"},
        "missing": {"url": f"sftp:root@10.77.0.13:/srv/restic/missing-{uuid.uuid4().hex[:8]}"},
        "locked": {"url": f"sftp:root@10.77.0.13:/srv/restic/{locked}"},
    }))
    rt = Runtime.load(config)
    # A live restic holding an exclusive lock: `key passwd` locks, then waits for the new password on stdin.
    holder = subprocess.Popen(Restic(rt.inventory.repo("locked"), web1_password, known_hosts=rt.settings.ssh.known_hosts,
                                     cache_dir=rt.settings.state_dir / "holder-cache").argv("key", "passwd"),
                              env={"PATH": os.environ["PATH"], "HOME": "/root", "RESTIC_PASSWORD": web1_password.reveal()},
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not [p for p in (RESTIC_ROOT / locked / "locks").iterdir() if re.fullmatch(r"[0-9a-f]{64}", p.name)]:
            assert time.monotonic() < deadline and holder.poll() is None, "restic key passwd took no lock"
            time.sleep(0.01)
        result = restore.restore_test(repos=["wrong-password", "missing", "locked", "web-1-data"], config=str(config))
    finally:
        holder.kill()
        holder.wait()

    assert result["status"] == "failed"  # one failed repository fails the run
    statuses = {name: r["status"] for name, r in result["hosts"].items()}
    assert statuses == {"wrong-password": "failed", "missing": "failed", "locked": "failed", "web-1-data": "passed"}
    summaries = {name: r["summary"] for name, r in result["hosts"].items()}
    assert summaries["wrong-password"].startswith("wrong repository password: ") and "wrong password" in summaries["wrong-password"]
    assert summaries["missing"].startswith("repository missing: ")
    assert summaries["locked"].startswith("repository locked: ")
    assert f"PID {holder.pid}" in summaries["locked"] and "live process" in summaries["locked"]
    for name, code in (("wrong-password", "wrong_password"), ("missing", "repository_missing"), ("locked", "repository_locked")):
        body = result_of(config, result["run_id"], name)
        assert body["status"] == "failed" and body["reasons"] == [
            {"step": "snapshot", "code": code, "text": summaries[name]}]
        assert body["steps"]["restore"] == "skipped"
    finished = [r.body for r in records(config, result["run_id"]) if r.kind == "run_finished"]
    assert finished[0]["status"] == "failed" and finished[0]["detail"]["repositories"]["web-1-data"] == "passed"


@pytest.mark.lab
def test_snapshot_older_than_the_rpo_target_is_an_rpo_breach(restore, lab_copy, monkeypatch):
    config = lab_copy(inventory=lambda text: text.replace("rpo_hours: 26", "rpo_hours: 0.0001", 1))
    events = []
    make_hooks = restore.common.make_hooks

    def hooks_that_also_record(runtime, recorder):
        hooks = make_hooks(runtime, recorder)
        hooks.register("test", events.append)
        return hooks

    monkeypatch.setattr(restore.common, "make_hooks", hooks_that_also_record)
    # Scratch left by a restore test whose process died (its pid is gone): this run sweeps it.
    dead = subprocess.Popen(["true"])
    dead.wait()
    abandoned = Runtime.load(config).settings.state_dir / "restore-scratch" / str(uuid.uuid4())
    (abandoned / "web-1-data" / "srv" / "ephi").mkdir(parents=True)
    (abandoned / "web-1-data" / "srv" / "ephi" / "patients.csv").write_text("patient_id\nP00001\n")
    (abandoned / "owner.json").write_text(json.dumps({"pid": dead.pid, "boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip()}))

    result = restore.restore_test(host="web-1", config=str(config))

    assert not abandoned.exists()
    [swept] = [r.body for r in records(config, result["run_id"]) if r.kind == "scratch_swept"]
    assert swept["path"] == str(abandoned) and swept["files_removed"] == 2

    assert result["status"] == "failed"
    summary = result["hosts"]["web-1-data"]["summary"]
    assert re.match(r"RPO breach: snapshot is [\d.]+ h old, target 0\.0001 h", summary), summary
    body = result_of(config, result["run_id"], "web-1-data")
    assert [r["code"] for r in body["reasons"]] == ["rpo_breach"] and not body["rpo"]["ok"]
    # Everything else was still tested, and held.
    assert body["mismatches"] == [] and body["rto"]["ok"] and body["check"]["ok"] and body["wipe"]["files_removed"] > 0
    # A failed test is a result to announce: the notification hook gets it with its reason and measures.
    [event] = [e for e in events if e.kind == "restore_test"]
    assert (event.status, event.hosts, event.data["reasons"]) == ("failed", ("web-1-data",), [summary.split(" [")[0]])
    assert event.data["measures"]["rpo_target_hours"] == 0.0001 and event.data["measures"]["mismatches"] == 0


# -- the command line ------------------------------------------------------------------------------------------

def cli(*args: str, config: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CRASHCART_CONFIG": str(config), "COLUMNS": "200"}
    return subprocess.run([CRASHCART, *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.lab
def test_bad_input_is_one_line_and_exit_2_before_anything_runs(lab_copy):
    config = lab_copy()
    rt = Runtime.load(config)
    for args, message in ((("--repo", "x;rm"), "identifier 'x;rm' is not allowed"),
                          (("--repo", "nope"), "unknown restic repository 'nope'"),
                          (("--snapshot", "../x"), "snapshot '../x' is not allowed")):
        result = cli("restore-test", *args, config=config)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not rt.settings.evidence.dir.exists() and not rt.settings.state_dir.exists()


@pytest.mark.lab
def test_dry_run_chooses_the_snapshot_and_shows_the_plan_without_restoring(lab_copy):
    config = lab_copy()
    result = cli("restore-test", "--host", "web-1", "--dry-run", config=config)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "web-1-data: planned" in result.stdout and "RPO" in result.stdout
    flat = re.sub(r"\s+", " ", result.stdout)  # the console wraps long command lines
    assert re.search(r"restore [0-9a-f]{64} --target \S+/restore-scratch/\S+/web-1-data --verify", flat), flat
    assert "--read-data-subset=1/5" in flat
    rt = Runtime.load(config)
    assert list((rt.settings.state_dir / "restore-scratch").glob("*")) == []  # restic's planning cache is gone too
    assert not (rt.settings.state_dir / "restore-check-rotation.json").exists()
    started = next(iter_records(rt.settings.evidence.dir, kind="run_started"))
    assert started.body["mode"] == "dry_run"
