"""restic: pure parsers of its output, and a thin runner with timeouts, typed errors and stale-lock handling."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import urlsplit

from crashcart import validation as v
from crashcart.errors import (
    InvalidInput,
    ResticDataError,
    ResticError,
    ResticLocked,
    ResticNotFound,
    ResticRepoMissing,
    ResticTimedOut,
    ResticUnexpectedOutput,
    ResticWrongPassword,
)
from crashcart.inventory import ResticRepo
from crashcart.secrets import Secret, mask

log = logging.getLogger("crashcart.restic")

# Seconds restic gets to stop after SIGINT before it is killed.
INTERRUPT_GRACE = 5.0
# Bounds for `restic unlock`: asked for, and run after a timeout (so ResticTimedOut comes at most
# timeout + INTERRUPT_GRACE + UNLOCK_AFTER_STOP_TIMEOUT seconds after the start).
UNLOCK_TIMEOUT = 30.0
UNLOCK_AFTER_STOP_TIMEOUT = 10.0
_STDERR_KEEP = 256 * 1024

# -- typed values ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResticVersion:
    """The restic release: `version` as (major, minor, patch) and the text it printed."""

    version: tuple[int, int, int]
    text: str


@dataclass(frozen=True)
class Snapshot:
    """One snapshot; `time` is timezone-aware UTC."""

    id: str
    short_id: str
    time: datetime
    hostname: str
    paths: tuple[str, ...]
    tags: tuple[str, ...] = ()
    tree: str | None = None
    username: str | None = None
    program_version: str | None = None


@dataclass(frozen=True)
class Node:
    """One entry of a snapshot's tree; `mode` is Go's os.FileMode (type bits plus permissions)."""

    path: str
    type: str
    size: int
    mode: int
    name: str = ""
    mtime: datetime | None = None

    @property
    def permissions(self) -> int:
        """The permission bits alone (e.g. 0o640)."""
        return self.mode & 0o777


@dataclass(frozen=True)
class BackupSummary:
    """The summary line of `backup --json`.

    restic 0.14 prints the short snapshot id (8 hex digits) here; newer releases print the full id,
    and omit it when no snapshot was made (`--skip-if-unchanged`), hence None.
    """

    snapshot_id: str | None
    files_new: int
    files_changed: int
    files_unmodified: int
    dirs_new: int
    dirs_changed: int
    dirs_unmodified: int
    data_blobs: int
    tree_blobs: int
    data_added: int
    total_files_processed: int
    total_bytes_processed: int
    total_duration: float
    data_added_packed: int | None = None
    dry_run: bool = False


@dataclass(frozen=True)
class RestoreResult:
    """A finished restore: wall time, the last lines restic printed, and how many files `--verify` checked."""

    seconds: float
    stdout_tail: str
    verified_files: int | None = None


@dataclass(frozen=True)
class CheckResult:
    """A finished `restic check`: ok, the error lines it printed (empty when ok), and wall time."""

    ok: bool
    errors: list[str]
    seconds: float


# -- pure parsers ---------------------------------------------------------------------------------

_VERSION_RE = re.compile(r"^restic (\d+)\.(\d+)\.(\d+)\S*")
_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_HEX_RE = re.compile(r"^[0-9a-f]{8,64}$")


def _unexpected(what: str, text: str) -> ResticUnexpectedOutput:
    first = text.strip().splitlines()[0][:120] if text.strip() else "(nothing)"
    return ResticUnexpectedOutput(f"unexpected output from restic {what}: {mask(first)!r}")


def parse_version(text: str) -> ResticVersion:
    """`restic version` text ("restic 0.14.0 compiled with go1.19.8 on linux/amd64") or `version --json`."""
    stripped = (text or "").strip()
    if stripped.startswith("{"):
        try:
            data = json.loads(stripped)
            raw = str(data["version"])
        except (ValueError, KeyError, TypeError):
            raise _unexpected("version --json", text) from None
        m = re.match(r"^v?(\d+)\.(\d+)\.(\d+)", raw)
        if not m:
            raise _unexpected("version --json", text)
        return ResticVersion((int(m[1]), int(m[2]), int(m[3])), stripped)
    for line in stripped.splitlines():
        m = _VERSION_RE.match(line.strip())
        if m:
            return ResticVersion((int(m[1]), int(m[2]), int(m[3])), line.strip())
    raise _unexpected("version", text)


def parse_time(text: str) -> datetime:
    """An RFC 3339 time as restic prints it (nanoseconds, 'Z' or an offset) as an aware UTC datetime."""
    m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$", text or "")
    if not m:
        raise ResticUnexpectedOutput(f"restic printed a time that is not RFC 3339: {text!r}")
    # Python keeps microseconds; restic prints nanoseconds.
    micro = (m[2] or "0")[:6].ljust(6, "0")
    zone = "+00:00" if m[3] == "Z" else m[3]
    return datetime.fromisoformat(f"{m[1]}.{micro}{zone}").astimezone(timezone.utc)


def _snapshot(data: dict, what: str) -> Snapshot:
    try:
        sid = str(data["id"])
        return Snapshot(
            id=sid,
            short_id=str(data.get("short_id") or sid[:8]),
            time=parse_time(str(data["time"])),
            hostname=str(data.get("hostname", "")),
            paths=tuple(str(p) for p in data.get("paths") or ()),
            tags=tuple(str(t) for t in data.get("tags") or ()),
            tree=data.get("tree"),
            username=data.get("username"),
            program_version=data.get("program_version"),
        )
    except (KeyError, TypeError, AttributeError):
        raise _unexpected(what, json.dumps(data)) from None


def parse_snapshots(text: str) -> list[Snapshot]:
    """`restic snapshots --json` (one JSON array) as snapshots, oldest first."""
    try:
        data = json.loads(text or "")
    except ValueError:
        raise _unexpected("snapshots --json", text) from None
    if data is None:  # some releases print null for an empty repository
        return []
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise _unexpected("snapshots --json", text)
    return sorted((_snapshot(d, "snapshots --json") for d in data), key=lambda s: s.time)


def _ls_kind(obj: dict) -> str:
    # 0.14 marks lines with struct_type only; newer releases add message_type.
    kind = obj.get("message_type") or obj.get("struct_type")
    if kind:
        return str(kind)
    if "tree" in obj and "paths" in obj:
        return "snapshot"
    if "name" in obj and "type" in obj:
        return "node"
    return "unknown"


def parse_ls(text: str) -> tuple[Snapshot | None, list[Node]]:
    """`restic ls --json` (JSON lines): the snapshot line, if any, and the nodes in order.

    restic 0.14 prints nothing on stdout (and exits 0) when the snapshot is unknown: that is (None, []).
    """
    snapshot: Snapshot | None = None
    nodes: list[Node] = []
    for line in (text or "").splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise _unexpected("ls --json", line) from None
        if not isinstance(obj, dict):
            raise _unexpected("ls --json", line)
        kind = _ls_kind(obj)
        if kind == "snapshot":
            snapshot = _snapshot(obj, "ls --json")
        elif kind == "node":
            try:
                nodes.append(Node(
                    path=str(obj["path"]),
                    type=str(obj["type"]),
                    size=int(obj.get("size", 0)),  # omitted for dirs and empty files
                    mode=int(obj.get("mode", 0)),
                    name=str(obj.get("name", "")),
                    mtime=parse_time(obj["mtime"]) if obj.get("mtime") else None,
                ))
            except (KeyError, TypeError, ValueError):
                raise _unexpected("ls --json", line) from None
        # Other message types may be added by newer releases; they are not ours to fail on.
    return snapshot, nodes


def parse_backup_summary(text: str) -> BackupSummary:
    """The last `"message_type": "summary"` line of `restic backup --json`."""
    summary = None
    for line in (text or "").splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue  # a status line cut by a progress redraw is not the summary
        if isinstance(obj, dict) and obj.get("message_type") == "summary":
            summary = obj
    if summary is None:
        raise _unexpected("backup --json (no summary line)", text)

    def n(key: str) -> int:
        return int(summary.get(key, 0))  # restic omits zero counts

    try:
        return BackupSummary(
            snapshot_id=summary.get("snapshot_id") or None,
            files_new=n("files_new"), files_changed=n("files_changed"), files_unmodified=n("files_unmodified"),
            dirs_new=n("dirs_new"), dirs_changed=n("dirs_changed"), dirs_unmodified=n("dirs_unmodified"),
            data_blobs=n("data_blobs"), tree_blobs=n("tree_blobs"), data_added=n("data_added"),
            total_files_processed=n("total_files_processed"), total_bytes_processed=n("total_bytes_processed"),
            total_duration=float(summary.get("total_duration", 0.0)),
            data_added_packed=int(summary["data_added_packed"]) if "data_added_packed" in summary else None,
            dry_run=bool(summary.get("dry_run", False)),
        )
    except (TypeError, ValueError):
        raise _unexpected("backup --json", json.dumps(summary)) from None


def parse_repository_id(text: str) -> str:
    """The repository id from `restic cat config` (a JSON document with "id")."""
    try:
        rid = json.loads(text or "")["id"]
    except (ValueError, KeyError, TypeError):
        raise _unexpected("cat config", text) from None
    if not isinstance(rid, str) or not re.fullmatch(r"[0-9a-f]{64}", rid):
        raise _unexpected("cat config", text)
    return rid


def parse_restore_verified(text: str) -> int | None:
    """How many files `restore --verify` checked ("finished verifying N files in ..."), or None."""
    found = None
    for m in re.finditer(r"finished verifying (\d+) files", text or ""):
        found = int(m[1])
    return found


# Lines that are progress or advice, never the reason a command failed.
_NOISE = (
    re.compile(r"^\[\d+:\d+(:\d+)?\]"),
    re.compile(r"^using temporary cache in "),
    re.compile(r"^unable to create temporary directory for cache during check"),
    re.compile(r"^create exclusive lock for repository$"),
    re.compile(r"^the `unlock` command can be used"),
    re.compile(r"^lock was created at "),
    re.compile(r"^storage ID [0-9a-f]+$"),
    re.compile(r"^Is there a repository at the following location\?$"),
    re.compile(r"^signal interrupt received, cleaning up$"),
)


def meaningful_lines(text: str) -> list[str]:
    """The lines of restic's stderr with colour codes, progress redraws and advice removed."""
    out = []
    for raw in re.split(r"[\r\n]+", _ANSI_RE.sub("", text or "")):
        line = raw.strip()
        if line and not any(p.search(line) for p in _NOISE):
            out.append(line)
    return out


def _exit_error(stderr: str) -> tuple[int, str] | None:
    """The `exit_error` JSON message newer releases print last on stderr with --json."""
    for line in reversed((stderr or "").splitlines()):
        line = line.strip()
        if line.startswith("{") and '"exit_error"' in line:
            try:
                obj = json.loads(line)
                return int(obj.get("code", 1)), str(obj.get("message", ""))
            except (ValueError, TypeError):
                return None
    return None


_BY_EXIT_CODE: dict[int, type[ResticError]] = {10: ResticRepoMissing, 11: ResticLocked, 12: ResticWrongPassword}

_WRONG_PASSWORD = re.compile(r"wrong password|no key found", re.I)
_LOCKED = re.compile(r"unable to create lock|already locked", re.I)
# 0.14 says "unable to open config file" for any reason it cannot read the config (over SFTP: "Lstat: file does not exist").
_REPO_MISSING = re.compile(
    r"is there a repository at the following location|repository does not exist|unable to open config file", re.I
)
_NOT_FOUND = re.compile(
    r"no matching id found|snapshot for criteria not found|no snapshot found|not found in snapshot", re.I
)
_DATA = re.compile(
    r"ciphertext verification failed|pack id does not match|hash mismatch|hash does not match"
    r"|^fatal: there were \d+ errors|repository contains errors|^check: .*errors?\b"
    r"|\bpack [0-9a-f]+.*(damaged|invalid|truncated|not found)|\bblob [0-9a-f]+.*not found"
    r"|incomplete pack file|damaged pack",
    re.I | re.M,
)


def classify_failure(stderr: str, exit_code: int) -> type[ResticError]:
    """The ResticError subclass for a failed restic run (stderr text and exit code).

    restic >= 0.17 exits 10 (no repository), 11 (locked) and 12 (wrong password); 0.14 exits 1 for
    everything, so the text decides there.
    """
    structured = _exit_error(stderr)
    if structured is not None:
        exit_code, message = structured
        stderr = f"{message}\n{stderr}"
    if exit_code in _BY_EXIT_CODE:
        return _BY_EXIT_CODE[exit_code]
    text = _ANSI_RE.sub("", stderr or "")
    if _WRONG_PASSWORD.search(text):
        return ResticWrongPassword
    if _LOCKED.search(text):
        return ResticLocked
    if _REPO_MISSING.search(text):
        return ResticRepoMissing
    if _NOT_FOUND.search(text):
        return ResticNotFound
    if _DATA.search(text):
        return ResticDataError
    return ResticError


_HOLDER_RE = re.compile(r"already locked (?P<excl>exclusively )?by (?P<who>PID \d+ on \S+ by [^\s(]+)", re.I)


def lock_holder(stderr: str) -> str | None:
    """Who holds the lock, as restic said it ("PID 4242 on backup-1 by root (exclusive)"), or None."""
    m = _HOLDER_RE.search(stderr or "")
    if not m:
        return None
    return m["who"] + (" (exclusive)" if m["excl"] else "")


def failure_reason(stderr: str) -> str:
    """The one stderr line that says why restic failed (masked)."""
    structured = _exit_error(stderr)
    if structured is not None and structured[1].strip():
        reason = structured[1].strip().splitlines()[0]
    else:
        lines = meaningful_lines(stderr)
        locked = [ln for ln in lines if _LOCKED.search(ln)]
        fatal = [ln for ln in lines if ln.startswith("Fatal:")]
        plain = [ln for ln in lines if not ln.startswith("subprocess ssh:")]
        reason = (locked or fatal or plain or lines or ["(restic printed no error)"])[-1]
        ssh = [ln for ln in lines if ln.startswith("subprocess ssh:")]
        # "unable to start the sftp session, error: EOF" hides the reason ssh gave.
        if ssh and ssh[-1] != reason:
            reason = f"{reason} ({ssh[-1].removeprefix('subprocess ').strip()})"
    return mask(reason.removeprefix("Fatal: "))


# -- the runner -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SftpTarget:
    """Where an sftp: repository lives: validated user, host, port and path."""

    user: str | None
    host: str
    port: int
    path: str


_SAFE_PATH_RE = re.compile(r"^[A-Za-z0-9._@+/~-]+$")


def parse_sftp_url(url: str) -> SftpTarget:
    """`sftp:user@host:/path` or `sftp://user@host:port//path`, each part validated."""
    if url.startswith("sftp://"):
        parts = urlsplit(url)
        try:
            port = parts.port or 22
        except ValueError:
            raise InvalidInput(f"repository url {url!r}: the port is not a number from 1 to 65535") from None
        user, host, path = parts.username, parts.hostname or "", parts.path.removeprefix("/")
    elif url.startswith("sftp:"):
        m = re.match(r"^sftp:(?:(?P<user>[^@/:]+)@)?(?P<host>\[[^\]]+\]|[^:/@]+):(?P<path>.+)$", url)
        if not m:
            raise InvalidInput(f"repository url {url!r} is not sftp:USER@HOST:/PATH or sftp://USER@HOST:PORT//PATH")
        user, host, port, path = m["user"], m["host"].strip("[]"), 22, m["path"]
    else:
        raise InvalidInput(f"repository url {url!r} is not an sftp: url")
    if user is not None:
        v.user_name(user)
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        v.dns_name(host)
    v.port(port)
    if not path or not _SAFE_PATH_RE.match(path) or ".." in path.split("/") or path.startswith("-"):
        raise InvalidInput(f"repository url {url!r}: path {path!r} must be letters, digits and . _ @ + - / ~ without '..'")
    return SftpTarget(user, host, port, path)


def _plain_file_arg(path: Path, what: str) -> str:
    # restic splits sftp.command on whitespace, so a path with spaces or quotes would break it apart.
    text = str(path)
    if not text or any(c.isspace() for c in text) or any(c in text for c in "'\"\\") or text.startswith("-"):
        raise InvalidInput(f"{what} {text!r} must not contain spaces, quotes or backslashes, or start with '-'")
    return text


def _snapshot_ref(snapshot_id: str) -> str:
    if snapshot_id != "latest" and not (isinstance(snapshot_id, str) and _HEX_RE.match(snapshot_id)):
        raise InvalidInput(f"snapshot id {snapshot_id!r} is not 'latest' or 8 to 64 lower-case hex digits")
    return snapshot_id


def _snapshot_path(path: str) -> str:
    if not isinstance(path, str) or not path.startswith("/") or ".." in path.split("/"):
        raise InvalidInput(f"path {path!r} in a snapshot must be absolute and without '..'")
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise InvalidInput(f"path {path!r} in a snapshot must not contain control characters")
    return path


_SUBSET_RE = re.compile(r"^(\d+/\d+|\d+(\.\d+)?%|\d+[KMGT]?)$")


@dataclass
class _Outcome:
    exit_code: int
    stdout: str
    stderr: str
    seconds: float
    extra: dict = field(default_factory=dict)


class Restic:
    """One restic repository, driven by the restic binary with the password in the child's environment only."""

    interrupt_grace: float = INTERRUPT_GRACE

    def __init__(self, repo: ResticRepo, password: Secret, *, known_hosts: Path, timeout: float = 600,
                 binary: str = "restic", cache_dir: Path | None = None) -> None:
        if not isinstance(password, Secret):
            raise TypeError("the repository password must be a crashcart.secrets.Secret")
        if not timeout or timeout <= 0:
            raise InvalidInput(f"restic timeout {timeout!r} must be a positive number of seconds")
        self.repo = repo
        self._password = password
        self.known_hosts = Path(known_hosts)
        self.timeout = float(timeout)
        self.binary = binary
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._global = self._global_args()

    def __repr__(self) -> str:
        return f"Restic({self.repo.name!r}, {self.repo.url!r})"

    # -- arguments --------------------------------------------------------------------------------
    def _global_args(self) -> list[str]:
        args = ["-r", self.repo.url]
        if self.repo.url.startswith("sftp:"):
            target = parse_sftp_url(self.repo.url)
            ssh = ["ssh"]
            if self.repo.sftp_identity_file is not None:
                ssh += ["-i", _plain_file_arg(self.repo.sftp_identity_file, "sftp identity file")]
            ssh += ["-o", f"UserKnownHostsFile={_plain_file_arg(self.known_hosts, 'known_hosts file')}",
                    "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5"]
            if target.port != 22:
                ssh += ["-p", str(target.port)]
            ssh += [f"{target.user}@{target.host}" if target.user else target.host, "-s", "sftp"]
            args += ["-o", "sftp.command=" + " ".join(ssh)]
        if self.cache_dir is not None:
            args += ["--cache-dir", _plain_file_arg(self.cache_dir, "cache dir")]
        return args

    def argv(self, *args: str) -> list[str]:
        """The full argument list of a restic call on this repository (for plans and previews)."""
        return [self.binary, *self._global, *args]

    def _env(self) -> dict[str, str]:
        # A clean environment: a RESTIC_REPOSITORY or RESTIC_PASSWORD_FILE of ours must not leak in.
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/root"),
            "LC_ALL": "C",
            "RESTIC_PASSWORD": self._password.reveal(),
        }
        if os.environ.get("TMPDIR"):
            env["TMPDIR"] = os.environ["TMPDIR"]
        return env

    def _where(self) -> str:
        return f"repository {self.repo.name} ({self.repo.url})"

    # -- process control --------------------------------------------------------------------------
    def _execute(self, args: list[str], *, timeout: float, sink: Callable[[bytes], None] | None = None,
                 with_repo: bool = True, unlock_after_stop: bool = True) -> _Outcome:
        argv = self.argv(*args) if with_repo else [self.binary, *args]
        what = args[0]
        log.debug("running %s", mask(shlex.join(argv)))
        if with_repo and self.cache_dir is not None:
            # check wants to make its temporary cache inside; restic creates only its default location.
            self.cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        started = time.monotonic()
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env=self._env(), start_new_session=True)
        except FileNotFoundError:
            raise ResticError(f"restic {what} on {self._where()}: restic binary {self.binary!r} not found") from None
        except OSError as e:
            raise ResticError(f"restic {what} on {self._where()}: cannot start restic ({e.strerror})") from None
        out: list[bytes] = []
        err = bytearray()
        sink_error: list[BaseException] = []

        def pump_stdout() -> None:
            try:
                for chunk in iter(lambda: proc.stdout.read1(1 << 16), b""):
                    if sink is not None:
                        sink(chunk)
                    else:
                        out.append(chunk)
            except BaseException as e:  # surfaced in the caller's thread below
                sink_error.append(e)
                for _ in iter(lambda: proc.stdout.read1(1 << 16), b""):
                    pass

        def pump_stderr() -> None:
            for chunk in iter(lambda: proc.stderr.read1(1 << 14), b""):
                err.extend(chunk)
                if len(err) > _STDERR_KEEP:  # keep the tail: the reason is printed last
                    del err[: len(err) - _STDERR_KEEP]

        readers = [threading.Thread(target=pump_stdout, daemon=True), threading.Thread(target=pump_stderr, daemon=True)]
        for t in readers:
            t.start()
        killed = timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            killed = self._stop(proc)
        except BaseException:
            self._stop(proc)  # never leave restic running behind an interrupted caller
            raise
        finally:
            for t in readers:
                t.join(timeout=5)
            proc.stdout.close()
            proc.stderr.close()
        seconds = time.monotonic() - started
        if timed_out:
            how = f"stopped with SIGINT{', then SIGKILL' if killed else ''}"
            if unlock_after_stop:
                # A killed restic leaves its lock behind, and so does restic 0.14 interrupted with SIGINT
                # on an SFTP repository (seen in the lab). unlock removes only locks of dead processes.
                try:
                    self._unlock(UNLOCK_AFTER_STOP_TIMEOUT)
                except ResticError as e:
                    log.warning("unlock after stopping restic failed: %s", e)
            raise ResticTimedOut(f"restic {what} on {self._where()} did not finish within {timeout:g}s ({how})")
        if sink_error:
            raise sink_error[0]
        return _Outcome(proc.returncode, b"".join(out).decode("utf-8", "replace"),
                        err.decode("utf-8", "replace"), seconds)

    def _stop(self, proc: subprocess.Popen) -> bool:
        """SIGINT, then SIGKILL to restic's process group after the grace period; True if it was killed."""
        try:
            proc.send_signal(signal.SIGINT)
        except ProcessLookupError:
            return False
        try:
            proc.wait(timeout=self.interrupt_grace)
            return False
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        return True

    def _failure(self, what: str, outcome: _Outcome) -> ResticError:
        cls = classify_failure(outcome.stderr, outcome.exit_code)
        if cls is ResticLocked:
            holder = lock_holder(outcome.stderr)
            return ResticLocked(f"restic {what}: {self._where()} is locked"
                                + (f" by {holder}" if holder else f": {failure_reason(outcome.stderr)}"))
        return cls(f"restic {what} on {self._where()} failed (exit {outcome.exit_code}): {failure_reason(outcome.stderr)}")

    def _call(self, args: list[str], *, sink_factory: Callable[[], Callable[[bytes], None]] | None = None,
              accept: tuple[type[ResticError], ...] = (), retry_locked: bool = True) -> _Outcome:
        """Run restic; a non-zero exit raises its classified error unless its class is in `accept`.

        On a lock, run `restic unlock` (stale locks only) and try once more.
        """
        what = args[0]
        for attempt in (1, 2):
            sink = sink_factory() if sink_factory else None
            outcome = self._execute(args, timeout=self.timeout, sink=sink)
            if sink is not None:
                outcome.extra["sink"] = sink
            if outcome.exit_code == 0:
                return outcome
            error = self._failure(what, outcome)
            if isinstance(error, accept):
                outcome.extra["error"] = error
                return outcome
            if isinstance(error, ResticLocked) and retry_locked and attempt == 1:
                log.info("%s; running restic unlock to remove stale locks and retrying once", error)
                self.unlock()
                continue
            if isinstance(error, ResticLocked) and attempt == 2:
                raise ResticLocked(f"{error}; `restic unlock` did not remove the lock, so a live process holds it") from None
            raise error
        raise AssertionError("unreachable")

    # -- operations -------------------------------------------------------------------------------
    def version(self) -> ResticVersion:
        """The restic release that will run (needs no repository)."""
        outcome = self._execute(["version"], timeout=min(self.timeout, 30), with_repo=False, unlock_after_stop=False)
        if outcome.exit_code != 0:
            raise ResticError(f"restic version failed (exit {outcome.exit_code}): {failure_reason(outcome.stderr)}")
        return parse_version(outcome.stdout)

    def snapshots(self, host: str | None = None) -> list[Snapshot]:
        """Snapshots in the repository (of `host` only, if given), oldest first."""
        args = ["snapshots", "--json"]
        if host is not None:
            args += ["--host", v.host_name(host)]
        return parse_snapshots(self._call(args).stdout)

    def ls(self, snapshot_id: str) -> list[Node]:
        """Every node of a snapshot; ResticNotFound if the snapshot does not exist."""
        outcome = self._call(["ls", "--json", _snapshot_ref(snapshot_id)])
        snapshot, nodes = parse_ls(outcome.stdout)
        if snapshot is None:
            # restic 0.14 says "Ignoring ...: no matching ID found" on stderr and exits 0.
            reason = failure_reason(outcome.stderr) if outcome.stderr.strip() else "no such snapshot"
            raise ResticNotFound(f"restic ls on {self._where()}: snapshot {snapshot_id}: {reason}")
        return nodes

    def restore(self, snapshot_id: str, target: Path, *, verify: bool = True) -> RestoreResult:
        """Restore a snapshot into `target`, an empty (or not yet existing) directory; `--verify` re-reads it."""
        target = Path(target)
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise InvalidInput(f"restore target {target} must be an empty directory")
        target.mkdir(parents=True, exist_ok=True)
        args = ["restore", _snapshot_ref(snapshot_id), "--target", str(target)]
        if verify:
            args.append("--verify")
        outcome = self._call(args)
        tail = "\n".join(outcome.stdout.strip().splitlines()[-5:])
        return RestoreResult(outcome.seconds, mask(tail), parse_restore_verified(outcome.stdout) if verify else None)

    def dump_sha256(self, snapshot_id: str, path: str) -> tuple[str, int]:
        """sha256 hex digest and size of one file in a snapshot, streamed from `restic dump` (never held in memory)."""
        class _Digest:
            def __init__(self) -> None:
                self.hash = hashlib.sha256()
                self.size = 0

            def __call__(self, chunk: bytes) -> None:
                self.hash.update(chunk)
                self.size += len(chunk)

        outcome = self._call(["dump", _snapshot_ref(snapshot_id), _snapshot_path(path)], sink_factory=_Digest)
        digest = outcome.extra["sink"]
        return digest.hash.hexdigest(), digest.size

    def check(self, read_data_subset: str | None = None, *, raise_on_error: bool = False) -> CheckResult:
        """`restic check` (optionally reading a subset of the packs: "10%", "1/5", "500M").

        Damage found is ok=False with restic's error lines; it raises ResticDataError only when
        `raise_on_error`. Note that plain check (no subset) does not read pack contents: restic 0.14
        reports a pack with overwritten bytes as fine until the subset covers it.
        """
        args = ["check"]
        if read_data_subset is not None:
            if not _SUBSET_RE.match(str(read_data_subset)):
                raise InvalidInput(f"read_data_subset {read_data_subset!r} must be like '10%', '1/5' or '500M'")
            args.append(f"--read-data-subset={read_data_subset}")
        outcome = self._call(args, accept=() if raise_on_error else (ResticDataError,))
        if outcome.exit_code == 0:
            return CheckResult(True, [], outcome.seconds)
        errors = [mask(ln) for ln in meaningful_lines(outcome.stderr)]
        return CheckResult(False, errors, outcome.seconds)

    def backup(self, paths: Iterable[str | Path], *, host: str, tags: Iterable[str] = ()) -> BackupSummary:
        """Back up local `paths` as a snapshot of `host` with `tags`."""
        paths = [str(p) for p in paths]
        if not paths:
            raise InvalidInput("backup needs at least one path")
        for p in paths:
            if not p.startswith("/") or any(ord(c) < 32 for c in p):
                raise InvalidInput(f"backup path {p!r} must be absolute and without control characters")
        args = ["backup", "--json", "--host", v.host_name(host)]
        for tag in tags:
            args += ["--tag", v.identifier(tag)]
        return parse_backup_summary(self._call([*args, *paths]).stdout)

    def unlock(self) -> None:
        """Remove stale locks (of dead processes, or older than 30 minutes); live locks stay."""
        self._unlock(UNLOCK_TIMEOUT)

    def _unlock(self, timeout: float) -> None:
        # Its own bound, not self.timeout (spent already after a timeout), and no unlock-after-stop loop.
        outcome = self._execute(["unlock"], timeout=timeout, unlock_after_stop=False)
        if outcome.exit_code != 0:
            raise self._failure("unlock", outcome)

    def repository_id(self) -> str:
        """The repository's id (from `restic cat config`): the same for a copy of the repository."""
        return parse_repository_id(self._call(["cat", "config"]).stdout)
