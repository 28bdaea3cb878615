"""Pure tests of the restic parsers and failure classification, from recorded restic 0.14 and documented newer outputs."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from crashcart.errors import (
    InvalidInput,
    ResticDataError,
    ResticError,
    ResticLocked,
    ResticNotFound,
    ResticRepoMissing,
    ResticUnexpectedOutput,
    ResticWrongPassword,
)
from crashcart.inventory import ResticRepo
from crashcart.secrets import MASK, Secret
from integrations.restic import (
    Restic,
    classify_failure,
    failure_reason,
    lock_holder,
    meaningful_lines,
    parse_backup_summary,
    parse_ls,
    parse_repository_id,
    parse_restore_verified,
    parse_sftp_url,
    parse_snapshots,
    parse_time,
    parse_version,
)

FIXTURES = Path(__file__).parent / "fixtures" / "restic"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


# -- version ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("version-0.14.txt", (0, 14, 0)),
    ("version-0.17.txt", (0, 17, 3)),
    ("version-0.17.json", (0, 17, 3)),
    ("version-dev.txt", (0, 18, 0)),
])
def test_parse_version(name, expected):
    version = parse_version(fixture(name))
    assert version.version == expected
    assert version.text == fixture(name).strip()


def test_parse_version_rejects_other_text():
    with pytest.raises(ResticUnexpectedOutput):
        parse_version("bash: restic: command not found")


# -- snapshots -------------------------------------------------------------------------------------

def test_snapshots_014():
    [snap] = parse_snapshots(fixture("snapshots-0.14.json"))
    assert snap.id == "fb5a0cd9ad055f91e5d4601ce4b32b3c4465feab10794494cedfa771ac541746"
    assert snap.short_id == "fb5a0cd9"
    assert snap.time == datetime(2026, 11, 23, 9, 35, 23, 322291, tzinfo=timezone.utc)
    assert snap.hostname == "src-host"
    assert snap.paths == ("/tmp/WORK/src",)
    assert snap.tags == ("t1",)
    assert snap.program_version is None


def test_snapshots_017_offsets_summary_and_omitted_fields():
    older, newer = parse_snapshots(fixture("snapshots-0.17.json"))  # oldest first, whatever the input order
    # 01:02:03+02:00 is 23:02:03 UTC, after db-1's 23:00:00Z.
    assert newer.time == datetime(2025, 3, 3, 23, 2, 3, 123456, tzinfo=timezone.utc)
    assert newer.time.utcoffset().total_seconds() == 0
    assert newer.tags == ()  # restic omits empty fields
    assert newer.program_version == "restic 0.17.3"
    assert older.short_id == older.id[:8]  # short_id is deprecated and may be absent
    assert older.paths == ("/srv/ephi", "/etc") and older.tags == ("nightly", "ephi")


@pytest.mark.parametrize("text", ["[]", "null"])
def test_snapshots_empty(text):
    assert parse_snapshots(text) == []


@pytest.mark.parametrize("text", ["", "no snapshots", '{"id": 1}', '[{"time": "yesterday", "id": "ab"}]'])
def test_snapshots_garbage_is_a_typed_error(text):
    with pytest.raises(ResticUnexpectedOutput):
        parse_snapshots(text)


@pytest.mark.parametrize("text, expected", [
    ("2026-11-23T09:28:02.139922126Z", datetime(2026, 11, 23, 9, 28, 2, 139922, tzinfo=timezone.utc)),
    ("2025-03-04T01:02:03-05:30", datetime(2025, 3, 4, 6, 32, 3, tzinfo=timezone.utc)),
    ("2025-03-04T01:02:04.5+02:00", datetime(2025, 3, 3, 23, 2, 4, 500000, tzinfo=timezone.utc)),
])
def test_parse_time(text, expected):
    assert parse_time(text) == expected


# -- ls --------------------------------------------------------------------------------------------

def test_ls_014_first_line_is_the_snapshot_with_struct_type():
    snapshot, nodes = parse_ls(fixture("ls-0.14.jsonl"))
    assert snapshot is not None and snapshot.short_id == "fb5a0cd9"
    assert [(n.path, n.type) for n in nodes] == [
        ("/src", "dir"), ("/src/a.bin", "file"), ("/src/link", "symlink"), ("/src/sub", "dir"), ("/src/sub/b.txt", "file"),
    ]
    by_path = {n.path: n for n in nodes}
    assert by_path["/src/a.bin"].size == 300000 and by_path["/src/a.bin"].permissions == 0o644
    assert by_path["/src"].size == 0 and by_path["/src"].permissions == 0o755


def test_ls_017_message_type_and_omitted_size():
    snapshot, nodes = parse_ls(fixture("ls-0.17.jsonl"))
    assert snapshot.id.startswith("9c3f6e1a")
    by_path = {n.path: n for n in nodes}
    assert by_path["/srv/ephi/patients.csv"].size == 90920
    assert by_path["/srv/ephi/patients.csv"].permissions == 0o640
    assert by_path["/srv/ephi/empty.txt"].size == 0
    assert by_path["/srv/ephi/empty.txt"].mtime == datetime(2025, 3, 3, 23, 1, tzinfo=timezone.utc)


def test_ls_of_unknown_snapshot_prints_nothing_in_014():
    # restic 0.14 exits 0 with only "Ignoring ..." on stderr; the runner turns this into ResticNotFound.
    assert parse_ls("") == (None, [])
    assert classify_failure(fixture("ls-unknown-id-0.14.stderr"), 1) is ResticNotFound


def test_ls_garbage():
    with pytest.raises(ResticUnexpectedOutput):
        parse_ls("not json\n")


# -- backup ----------------------------------------------------------------------------------------

def test_backup_summary_014_has_short_snapshot_id():
    summary = parse_backup_summary(fixture("backup-0.14.jsonl"))
    assert summary.snapshot_id == "fb5a0cd9"
    assert (summary.files_new, summary.dirs_new, summary.total_bytes_processed) == (2, 2, 300006)
    assert summary.data_added_packed is None and summary.dry_run is False


def test_backup_summary_017():
    summary = parse_backup_summary(fixture("backup-0.17.jsonl"))
    assert summary.snapshot_id == "9c3f6e1a2b4d5c6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6"
    assert (summary.files_new, summary.files_changed, summary.files_unmodified) == (1, 2, 43)
    assert summary.data_added_packed == 2048
    assert summary.total_duration == pytest.approx(1.376543)


def test_backup_summary_without_snapshot():
    summary = parse_backup_summary(fixture("backup-0.17-skipped.jsonl"))
    assert summary.snapshot_id is None and summary.files_new == 0 and summary.files_unmodified == 46


def test_backup_without_summary_is_an_error():
    with pytest.raises(ResticUnexpectedOutput):
        parse_backup_summary('{"message_type":"status","percent_done":0}\n')


# -- cat config, restore ---------------------------------------------------------------------------

def test_repository_id():
    assert parse_repository_id(fixture("cat-config-0.14.json")) == (
        "6e4db55d8e687080de16441e2aedb39e20740acc33489b25d56d1d1e2e03149a")
    with pytest.raises(ResticUnexpectedOutput):
        parse_repository_id('{"version": 2}')


def test_restore_verified_count():
    assert parse_restore_verified(fixture("restore-verify-0.14.txt")) == 2
    assert parse_restore_verified(fixture("restore-verify-0.17.txt")) == 46
    # restic 0.14 ignores --json for restore: the same text, no JSON lines.
    assert parse_restore_verified(fixture("restore-json-0.14.txt")) is None
    assert not fixture("restore-json-0.14.txt").lstrip().startswith("{")


# -- failure classification ------------------------------------------------------------------------

@pytest.mark.parametrize("name, code, expected", [
    ("wrong-password-0.14.stderr", 1, ResticWrongPassword),
    ("wrong-password-0.17.stderr", 12, ResticWrongPassword),
    ("exit-error-wrong-password-0.18.stderr", 1, ResticWrongPassword),
    ("repo-missing-local-0.14.stderr", 1, ResticRepoMissing),
    ("repo-missing-sftp-0.14.stderr", 1, ResticRepoMissing),
    ("repo-missing-0.17.stderr", 10, ResticRepoMissing),
    ("exit-error-repo-missing-0.18.stderr", 1, ResticRepoMissing),
    ("locked-0.14.stderr", 1, ResticLocked),
    ("locked-exclusive-0.14.stderr", 1, ResticLocked),
    ("locked-0.17.stderr", 11, ResticLocked),
    ("corrupt-check-read-0.14.stderr", 1, ResticDataError),
    ("corrupt-restore-0.14.stderr", 1, ResticDataError),
    ("check-errors-0.17.stderr", 1, ResticDataError),
    ("restore-unknown-id-0.14.stderr", 1, ResticNotFound),
    ("restore-no-snapshot-0.14.stderr", 1, ResticNotFound),
    ("dump-no-path-0.14.stderr", 2, ResticNotFound),
    ("sftp-hostkey-0.14.stderr", 1, ResticError),
])
def test_classify_recorded_failures(name, code, expected):
    assert classify_failure(fixture(name), code) is expected


@pytest.mark.parametrize("code, expected", [(10, ResticRepoMissing), (11, ResticLocked), (12, ResticWrongPassword)])
def test_exit_codes_of_017_decide_even_without_text(code, expected):
    assert classify_failure("", code) is expected


def test_unknown_failure_is_plain_restic_error():
    assert classify_failure("Fatal: something new went wrong", 1) is ResticError
    assert classify_failure("", 130) is ResticError


def test_check_plain_misses_corrupt_pack_in_014():
    # Recorded: plain `check` on a repository with overwritten bytes in a pack says all is well.
    assert "no errors were found" in fixture("corrupt-check-plain-0.14.txt")


@pytest.mark.parametrize("name, reason", [
    ("wrong-password-0.14.stderr", "wrong password or no key found"),
    ("repo-missing-sftp-0.14.stderr", "unable to open config file: Lstat: file does not exist"),
    ("locked-0.14.stderr", "unable to create lock in backend: repository is already locked by PID"),
    ("corrupt-check-read-0.14.stderr", "repository contains errors"),
    ("corrupt-restore-0.14.stderr", "There were 2 errors"),
    ("sftp-hostkey-0.14.stderr", "unable to start the sftp session, error: EOF (ssh: Host key verification failed.)"),
    ("exit-error-wrong-password-0.18.stderr", "wrong password or no key found"),
])
def test_failure_reason_is_one_meaningful_line(name, reason):
    text = failure_reason(fixture(name))
    assert reason in text
    assert "\n" not in text


def test_failure_reason_masks_secrets():
    secret = Secret("planted-canary-9f8e7d")
    assert failure_reason(f"Fatal: cannot open {secret.reveal()}") == f"cannot open {MASK}"


def test_meaningful_lines_drop_progress_and_advice():
    stderr = "\x1b[2K[0:01] 50.00%  1 / 2 packs\rPack ID does not match\nthe `unlock` command can be used to remove stale locks\n"
    assert meaningful_lines(stderr) == ["Pack ID does not match"]


@pytest.mark.parametrize("name, holder", [
    ("locked-0.14.stderr", "PID 12656 on vm by root"),
    ("locked-exclusive-0.14.stderr", "PID 12702 on vm by root (exclusive)"),
    ("locked-0.17.stderr", "PID 4242 on backup-1 by root (exclusive)"),
])
def test_lock_holder(name, holder):
    assert lock_holder(fixture(name)) == holder


# -- arguments (no process is started) --------------------------------------------------------------

def _repo(url: str, **extra) -> ResticRepo:
    return ResticRepo(name="web-1-data", url=url, password="vault:secret/restic/web-1#password", **extra)


def test_sftp_command_is_built_from_validated_parts():
    restic = Restic(_repo("sftp://backup@10.77.0.13:2222//srv/restic/web-1", sftp_identity_file="/keys/id"),
                    Secret("pw-not-on-argv-1234"), known_hosts=Path("/lab/known_hosts"), cache_dir=Path("/c"))
    argv = restic.argv("snapshots", "--json")
    assert argv[:3] == ["restic", "-r", "sftp://backup@10.77.0.13:2222//srv/restic/web-1"]
    assert argv[3:5] == ["-o", "sftp.command=ssh -i /keys/id -o UserKnownHostsFile=/lab/known_hosts "
                         "-o StrictHostKeyChecking=yes -o BatchMode=yes -o ConnectTimeout=5 -p 2222 "
                         "backup@10.77.0.13 -s sftp"]
    assert argv[5:] == ["--cache-dir", "/c", "snapshots", "--json"]
    assert not any("pw-not-on-argv" in a for a in argv)
    assert "pw-not-on-argv" not in repr(restic)


def test_password_only_in_child_environment():
    restic = Restic(_repo("/srv/restic/local"), Secret("env-only-secret-5678"), known_hosts=Path("/kh"))
    env = restic._env()
    assert env["RESTIC_PASSWORD"] == "env-only-secret-5678"
    assert "RESTIC_REPOSITORY" not in env and "RESTIC_PASSWORD_FILE" not in env


@pytest.mark.parametrize("url", [
    "sftp:root@10.77.0.13:/srv/restic/web-1",
    "sftp:backup-1.lab.crashcart.test:/srv/restic/web-1",
    "sftp://root@[fd00::13]:22//srv/restic/web-1",
])
def test_parse_sftp_url_accepts(url):
    target = parse_sftp_url(url)
    assert target.path == "/srv/restic/web-1"


@pytest.mark.parametrize("url", [
    "sftp:-oProxyCommand=x@10.77.0.13:/srv/r",
    "sftp:root@10.77.0.13:/srv/../etc",
    "sftp:root@host;reboot:/srv/r",
    "sftp://root@10.77.0.13:99999//srv/r",
    "sftp:ROOT@10.77.0.13:/srv/r",
])
def test_parse_sftp_url_rejects(url):
    with pytest.raises(InvalidInput):
        parse_sftp_url(url)


def test_paths_with_spaces_cannot_split_the_ssh_command():
    with pytest.raises(InvalidInput):
        Restic(_repo("sftp:root@10.77.0.13:/srv/r", sftp_identity_file="/keys/my key"), Secret("x" * 8),
               known_hosts=Path("/kh"))


@pytest.mark.parametrize("call", [
    lambda r: r.ls("--help"),
    lambda r: r.ls("xyz"),
    lambda r: r.dump_sha256("latest", "relative/path"),
    lambda r: r.dump_sha256("latest", "/srv/../etc/shadow"),
    lambda r: r.check(read_data_subset="all; rm -rf /"),
    lambda r: r.snapshots(host="-h"),
    lambda r: r.backup(["relative"], host="web-1"),
])
def test_hostile_arguments_are_refused_before_restic_runs(call):
    # binary points nowhere: reaching the process start would raise ResticError instead.
    restic = Restic(_repo("/srv/restic/local"), Secret("x" * 8), known_hosts=Path("/kh"), binary="/nonexistent/restic")
    with pytest.raises(InvalidInput):
        call(restic)


def test_restore_target_must_be_empty(tmp_path):
    (tmp_path / "already-here").write_text("x")
    restic = Restic(_repo("/srv/restic/local"), Secret("x" * 8), known_hosts=Path("/kh"), binary="/nonexistent/restic")
    with pytest.raises(InvalidInput, match="empty directory"):
        restic.restore("latest", tmp_path)


def test_missing_binary_is_a_restic_error():
    restic = Restic(_repo("/srv/restic/local"), Secret("x" * 8), known_hosts=Path("/kh"), binary="/nonexistent/restic")
    with pytest.raises(ResticError, match="not found"):
        restic.snapshots()
