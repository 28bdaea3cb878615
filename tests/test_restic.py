"""The restic adapter against the lab's real repositories on backup-1 over SFTP (damage only ever to copies)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from crashcart.errors import (
    ResticDataError,
    ResticLocked,
    ResticNotFound,
    ResticRepoMissing,
    ResticTimedOut,
    ResticWrongPassword,
)
from crashcart.secrets import Secret
from integrations.restic import INTERRUPT_GRACE, UNLOCK_AFTER_STOP_TIMEOUT, Restic


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def lab_dir(lab) -> Path:
    return Path(lab.LAB_DIR)


@pytest.fixture(scope="session")
def web1(runtime):
    return runtime.inventory.repo("web-1-data")


@pytest.fixture(scope="session")
def web1_password(vault_admin) -> Secret:
    data = vault_admin.secrets.kv.v2.read_secret_version(path="restic/web-1", mount_point="secret",
                                                          raise_on_deleted_version=True)
    return Secret(data["data"]["data"]["password"])


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("restic-cache")


@pytest.fixture(scope="session")
def restic(web1, web1_password, runtime, cache_dir) -> Restic:
    """The real web-1 repository: read-only operations only."""
    return Restic(web1, web1_password, known_hosts=runtime.settings.ssh.known_hosts, timeout=60, cache_dir=cache_dir)


@pytest.fixture(scope="session")
def latest(restic):
    snapshots = restic.snapshots(host="web-1")
    assert snapshots, "the lab's web-1 repository has no snapshot of web-1"
    return snapshots[-1]


class RepoCopy:
    """A copy of web-1's repository on backup-1, for tests that lock, damage or write."""

    def __init__(self, lab_dir: Path, web1, password: Secret, known_hosts: Path, tmp_path: Path) -> None:
        name = f"test-{uuid.uuid4().hex[:12]}"
        restic_root = lab_dir / "hosts" / "backup-1" / "srv" / "restic"
        self.dir = restic_root / name
        shutil.copytree(restic_root / "web-1", self.dir, symlinks=True)
        self.repo = web1.model_copy(update={"name": name, "url": f"sftp:root@10.77.0.13:/srv/restic/{name}"})
        self.password = password
        self.known_hosts = known_hosts
        # Its own cache: the copy has web-1's repository id, so it would share web-1's cache entries.
        self.cache = tmp_path / "cache"

    def restic(self, **kwargs) -> Restic:
        return Restic(self.repo, self.password, known_hosts=self.known_hosts, cache_dir=self.cache,
                      timeout=kwargs.pop("timeout", 60), **kwargs)

    def locks(self) -> list[str]:
        """The lock files. A restic killed while writing one over SFTP leaves an `<id>-restic-temp-<x>`
        upload file instead, which restic ignores and `unlock` does not remove: not a lock."""
        return sorted(p.name for p in (self.dir / "locks").iterdir() if re.fullmatch(r"[0-9a-f]{64}", p.name))

    def start(self, *args: str, **popen) -> subprocess.Popen:
        """A restic process of the test's own on the copy (to hold a lock)."""
        env = {"PATH": os.environ["PATH"], "HOME": "/root", "RESTIC_PASSWORD": self.password.reveal()}
        return subprocess.Popen(self.restic().argv(*args), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, **popen)

    def wait_for_lock(self, deadline: float = 10.0) -> None:
        end = time.monotonic() + deadline
        while not self.locks():
            assert time.monotonic() < end, "restic created no lock"
            time.sleep(0.005)


@pytest.fixture
def repo_copy(lab_dir, web1, web1_password, runtime, tmp_path):
    copy = RepoCopy(lab_dir, web1, web1_password, runtime.settings.ssh.known_hosts, tmp_path)
    try:
        yield copy
    finally:
        shutil.rmtree(copy.dir, ignore_errors=True)


# -- reading the real repository ----------------------------------------------------------------------

def test_version_is_at_least_014(restic):
    assert restic.version().version >= (0, 14, 0)


def test_restore_verify_gives_the_source_bytes(restic, latest, lab_dir, tmp_path):
    nodes = restic.ls(latest.id)
    files = [n for n in nodes if n.type == "file"]
    assert any(n.path == "/srv/ephi/patients.csv" for n in files)

    result = restic.restore(latest.id, tmp_path / "restore", verify=True)

    assert result.verified_files == len(files)
    assert result.seconds > 0 and "verifying" in result.stdout_tail
    source_root = lab_dir / "hosts" / "web-1"
    for node in files:
        restored = tmp_path / "restore" / node.path.lstrip("/")
        assert restored.stat().st_size == node.size
        assert _sha256(restored) == _sha256(source_root / node.path.lstrip("/")), node.path


def test_dump_sha256_matches_the_source(restic, latest, lab_dir):
    source = lab_dir / "hosts" / "web-1" / "srv" / "ephi" / "patients.csv"
    digest, size = restic.dump_sha256(latest.id, "/srv/ephi/patients.csv")
    assert (digest, size) == (_sha256(source), source.stat().st_size)


def test_unknown_snapshot_is_not_found(restic):
    with pytest.raises(ResticNotFound, match="web-1-data"):
        restic.ls("deadbeef")
    with pytest.raises(ResticNotFound):
        restic.dump_sha256("latest", "/srv/ephi/no-such-file")


def test_wrong_password(web1, runtime, cache_dir):
    canary = Secret(f"wrong-canary-{uuid.uuid4().hex}")
    restic = Restic(web1, canary, known_hosts=runtime.settings.ssh.known_hosts, timeout=60, cache_dir=cache_dir)
    with pytest.raises(ResticWrongPassword) as info:
        restic.snapshots()
    message = str(info.value)
    assert "web-1-data" in message and web1.url in message and "wrong password" in message
    assert canary.reveal() not in message and "\n" not in message


def test_missing_repository(web1, web1_password, runtime, cache_dir):
    repo = web1.model_copy(update={"url": f"sftp:root@10.77.0.13:/srv/restic/missing-{uuid.uuid4().hex[:8]}"})
    restic = Restic(repo, web1_password, known_hosts=runtime.settings.ssh.known_hosts, timeout=60, cache_dir=cache_dir)
    with pytest.raises(ResticRepoMissing, match=repo.url):
        restic.snapshots()


def test_repository_id_is_stable(restic):
    rid = restic.repository_id()
    assert len(rid) == 64 and rid == restic.repository_id()


# -- locks, damage, timeouts and writes: on copies ------------------------------------------------------

def test_stale_lock_of_a_killed_restic_is_removed_and_the_call_succeeds(repo_copy, latest):
    holder = repo_copy.start("check", "--read-data")  # takes an exclusive lock: it blocks even snapshots
    repo_copy.wait_for_lock()
    holder.kill()
    holder.wait()
    assert repo_copy.locks(), "the killed restic left no lock to test with"

    snapshots = repo_copy.restic().snapshots()

    assert latest.id in [s.id for s in snapshots]
    assert repo_copy.locks() == []


def test_lock_of_a_live_process_raises_locked_naming_it(repo_copy):
    # A backup reading a pipe that stays open holds its (shared) lock; check needs an exclusive one.
    holder = repo_copy.start("backup", "--stdin", "--stdin-filename", "held.txt", "--host", "holder",
                             stdin=subprocess.PIPE)
    try:
        repo_copy.wait_for_lock()
        with pytest.raises(ResticLocked, match=rf"locked by PID {holder.pid} on \S+ by root") as info:
            repo_copy.restic().check()
        assert "live process" in str(info.value) and repo_copy.repo.name in str(info.value)
        assert repo_copy.locks(), "unlock must not remove a live process's lock"
    finally:
        holder.kill()
        holder.wait()


def test_corrupted_pack(repo_copy, latest, tmp_path):
    pack = max((p for p in (repo_copy.dir / "data").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(pack, "r+b") as f:  # root writes through the pack's 0400 mode
        f.seek(pack.stat().st_size // 2)
        f.write(b"\0CORRUPTED-BY-TEST\0" * 4)
    restic = repo_copy.restic()

    # restic 0.14's plain check only compares packs with the index (names, sizes): it says all is well.
    assert restic.check().ok is True

    result = restic.check(read_data_subset="100%")
    assert result.ok is False
    assert any("Pack ID does not match" in e for e in result.errors), result.errors
    with pytest.raises(ResticDataError):
        restic.check(read_data_subset="100%", raise_on_error=True)
    with pytest.raises(ResticDataError, match="ciphertext verification failed|There were"):
        restic.restore(latest.id, tmp_path / "restore", verify=True)


def _children_named(name: str) -> list[int]:
    pids = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == name:
                    pids.append(int(pid))
            except FileNotFoundError:
                pass
    return pids


def _sigint_pending(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    shared = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("ShdPnd:")), 16)
    return bool(shared & (1 << (signal.SIGINT - 1)))


class FreezeWhenLocked(threading.Thread):
    """Stops our restic child with SIGSTOP once it holds its lock, so a timeout hits it mid-operation.

    With `thaw_on_sigint`, it resumes restic as soon as the SIGINT is pending (restic then cleans up
    itself); without, restic stays frozen like a hung process and only SIGKILL ends it.
    """

    def __init__(self, copy: RepoCopy, *, thaw_on_sigint: bool) -> None:
        super().__init__(daemon=True)
        self.copy, self.thaw_on_sigint = copy, thaw_on_sigint
        self.pid: int | None = None
        self.cmdline = self.environ = b""

    def run(self) -> None:
        end = time.monotonic() + 10
        while time.monotonic() < end and self.pid is None:
            pids = _children_named("restic")
            if pids and self.copy.locks():
                os.kill(pids[0], signal.SIGSTOP)
                self.pid = pids[0]
                self.cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes()
                self.environ = Path(f"/proc/{self.pid}/environ").read_bytes()
            time.sleep(0.005)
        while self.thaw_on_sigint and self.pid and time.monotonic() < end:
            try:
                if _sigint_pending(self.pid):
                    os.kill(self.pid, signal.SIGCONT)
                    return
            except FileNotFoundError:
                return
            time.sleep(0.005)


def test_timeout_interrupts_restic_which_removes_its_own_lock(repo_copy):
    restic = repo_copy.restic(timeout=2.0)
    freezer = FreezeWhenLocked(repo_copy, thaw_on_sigint=True)
    freezer.start()
    started = time.monotonic()
    try:
        with pytest.raises(ResticTimedOut, match=repo_copy.repo.name) as info:
            restic.check(read_data_subset="100%")
    finally:
        freezer.join()
    assert freezer.pid, "restic was never seen holding its lock"
    assert time.monotonic() - started < 2.0 + INTERRUPT_GRACE + UNLOCK_AFTER_STOP_TIMEOUT
    assert "SIGKILL" not in str(info.value)  # it obeyed SIGINT within the grace period
    # restic 0.14 interrupted on an SFTP repository exits 130 but leaves its lock: the unlock after it removes it.
    assert repo_copy.locks() == []


def test_restic_that_ignores_sigint_is_killed_and_its_lock_removed(repo_copy, web1_password):
    restic = repo_copy.restic(timeout=2.0)
    restic.interrupt_grace = 0.5
    freezer = FreezeWhenLocked(repo_copy, thaw_on_sigint=False)
    freezer.start()
    started = time.monotonic()
    try:
        with pytest.raises(ResticTimedOut, match="SIGKILL"):
            restic.check(read_data_subset="100%")
    finally:
        freezer.join()
    assert freezer.pid, "restic was never seen holding its lock"
    assert time.monotonic() - started < 2.0 + 0.5 + UNLOCK_AFTER_STOP_TIMEOUT
    assert not Path(f"/proc/{freezer.pid}").exists()
    assert repo_copy.locks() == [], "the unlock after the kill must remove the dead process's lock"
    # The password was in the child's environment, never on its command line.
    password = web1_password.reveal().encode()
    assert password not in freezer.cmdline
    assert b"RESTIC_PASSWORD=" + password in freezer.environ.split(b"\0")


def test_backup_then_snapshots_by_host(repo_copy, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "note.txt").write_text("restore-test canary\n")
    restic = repo_copy.restic()

    summary = restic.backup([source], host="crashcart-test", tags=["restic-test"])

    assert summary.snapshot_id and summary.files_new == 1 and summary.total_bytes_processed == 20
    [snap] = restic.snapshots(host="crashcart-test")
    assert snap.id.startswith(summary.snapshot_id)  # 0.14 prints the short id in the summary
    assert snap.tags == ("restic-test",) and snap.paths == (str(source),)
    assert restic.dump_sha256(snap.id, f"{source}/note.txt") == (
        hashlib.sha256(b"restore-test canary\n").hexdigest(), 20)
    assert restic.repository_id() == repo_copy.restic().repository_id()
