"""Restore tests: real restic restores into scratch, an independent content proof, measured RPO/RTO, rotating pack checks."""

from __future__ import annotations

import concurrent.futures as cf
import csv
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import shlex
import shutil
import stat
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Iterator, Mapping, Sequence

from prefect import flow

from crashcart import validation as v
from crashcart.errors import (
    CrashcartError,
    EvidenceError,
    InvalidInput,
    ResticDataError,
    ResticError,
    ResticLocked,
    ResticNotFound,
    ResticRepoMissing,
    ResticTimedOut,
    ResticWrongPassword,
    SSHError,
    StateFileError,
    VaultError,
)
from crashcart.evidence.recorder import (
    RunRecorder,
    boot_id,
    close_orphaned_runs,
    utcnow,
)
from crashcart.hooks import Event
from crashcart.inventory import AppCheck, Inventory, ResticRepo
from crashcart.runbook import Runbook, load_runbook
from crashcart.runtime import Runtime
from crashcart.secrets import Secret, mask
from flows import (
    common,  # module access only: flows.common imports this module to register its steps
)
from flows.engine import HostRun, execute_runbook
from flows.steps import (
    REGISTRY,
    CheckResult,
    CheckStatus,
    Outcome,
    Plan,
    Services,
    Step,
    StepContext,
    StepStatus,
    register,
)
from integrations.restic import Restic, Snapshot
from integrations.ssh import SessionPool

log = logging.getLogger("crashcart.restore")

HIPAA_SPEC = "164.308(a)(7)(ii)(D)"
MIN_RESTIC = (0, 14, 0)
SCRATCH_DIR = "restore-scratch"
ROTATION_FILE = "restore-check-rotation.json"
MB = 1_000_000  # throughput is in MB/s of 10^6 bytes, as disk and network vendors quote it
ERROR_LINES_KEPT = 20

# -- what the user names ----------------------------------------------------------------------------

_SNAPSHOT_ID_RE = re.compile(r"^[0-9a-f]{8,64}$")


def snapshot_selector(value: object) -> str:
    """`latest`, `random` or a snapshot id (8 to 64 lower-case hex digits); anything else is refused."""
    if value in ("latest", "random"):
        return str(value)
    if isinstance(value, str) and _SNAPSHOT_ID_RE.fullmatch(value):
        return value
    raise InvalidInput(f"snapshot {value!r} is not allowed: use latest, random or a snapshot id (8 to 64 hex digits)")


def select_repositories(inventory: Inventory, names: Sequence[str] = (), host: str | None = None) -> list[ResticRepo]:
    """The repositories to test: by name and/or the host they back up (a union); none named means every one."""
    chosen = [inventory.repo(n) for n in names]
    if host is not None:
        inventory.host(host)  # a hostile or unknown name fails here, with the inventory's message
        backing = [r for r in inventory.restic_repositories.values() if r.source_host == host]
        if not backing:
            raise InvalidInput(f"no restic repository in {inventory.path or 'the inventory'} backs up host {host!r}")
        chosen += backing
    elif not names:
        chosen = list(inventory.restic_repositories.values())
        if not chosen:
            raise InvalidInput(f"{inventory.path or 'the inventory'} lists no restic repositories to test")
    seen: dict[str, ResticRepo] = {}
    for repo in chosen:
        seen.setdefault(repo.name, repo)
    return list(seen.values())


def restore_targets(inventory: Inventory, names: Sequence[str] = (), host: str | None = None,
                    snapshot: object = "latest") -> tuple[list[ResticRepo], str]:
    """Everything a restore test is asked to do, validated before anything runs: repositories and snapshot."""
    chosen = select_repositories(inventory, names, host)
    selector = snapshot_selector(snapshot)
    if selector not in ("latest", "random") and len(chosen) != 1:
        raise InvalidInput(f"snapshot {selector} names one snapshot: choose exactly one repository with --repo")
    return chosen, selector


# -- pure judgements --------------------------------------------------------------------------------


def _hours(value: float) -> str:
    return f"{value:.1f}" if abs(value) >= 0.1 else f"{value:.2g}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass(frozen=True)
class RpoJudgement:
    """How old the tested snapshot was when the test ran, against the repository's recovery point objective."""

    snapshot_time: datetime
    measured_at: datetime
    target_hours: float

    @property
    def age_hours(self) -> float:
        return (self.measured_at - self.snapshot_time).total_seconds() / 3600

    @property
    def ok(self) -> bool:
        return self.age_hours <= self.target_hours

    @property
    def reason(self) -> str | None:
        if self.ok:
            return None
        return f"RPO breach: snapshot is {_hours(self.age_hours)} h old, target {self.target_hours:g} h"

    def as_dict(self) -> dict:
        return {"snapshot_time": self.snapshot_time.isoformat(), "measured_at": self.measured_at.isoformat(),
                "age_hours": round(self.age_hours, 4), "target_hours": self.target_hours, "ok": self.ok,
                "breach": self.reason}


def judge_rpo(snapshot_time: datetime, now: datetime, target_hours: float) -> RpoJudgement:
    """RPO = now minus the snapshot's time, judged against `target_hours` (both datetimes timezone-aware)."""
    if snapshot_time.tzinfo is None or now.tzinfo is None:
        raise ValueError("RPO needs timezone-aware times")
    return RpoJudgement(snapshot_time, now, float(target_hours))


@dataclass(frozen=True)
class RtoJudgement:
    """Wall time of restore plus verification, and restore throughput, against the recovery time objective.

    `verify_seconds` is hashing the restored tree and comparing it with the snapshot's listing (what a
    real recovery would do before declaring the data usable); the comparisons with `restic dump` and
    the source are extra proof for the test and are not counted.
    """

    restore_seconds: float
    verify_seconds: float | None
    bytes_restored: int
    target_minutes: float

    @property
    def seconds(self) -> float:
        return self.restore_seconds + (self.verify_seconds or 0.0)

    @property
    def throughput_mb_s(self) -> float | None:
        return self.bytes_restored / self.restore_seconds / MB if self.restore_seconds > 0 else None

    @property
    def ok(self) -> bool:
        return self.seconds <= self.target_minutes * 60

    @property
    def reason(self) -> str | None:
        if self.ok:
            return None
        return f"RTO breach: restore and verification took {_duration(self.seconds)}, target {self.target_minutes:g} min"

    def summary(self) -> str:
        rate = f" at {self.throughput_mb_s:.2f} MB/s" if self.throughput_mb_s is not None else ""
        return f"RTO {_duration(self.seconds)} (target {self.target_minutes:g} min){rate}"

    def as_dict(self) -> dict:
        return {"seconds": round(self.seconds, 3), "restore_seconds": round(self.restore_seconds, 3),
                "verify_seconds": None if self.verify_seconds is None else round(self.verify_seconds, 3),
                "bytes_restored": self.bytes_restored,
                "throughput_mb_s": None if self.throughput_mb_s is None else round(self.throughput_mb_s, 3),
                "target_minutes": self.target_minutes, "ok": self.ok, "breach": self.reason}


def judge_rto(restore_seconds: float, verify_seconds: float | None, bytes_restored: int,
              target_minutes: float) -> RtoJudgement:
    """RTO = restore plus verification wall time; throughput = restored bytes per restore second (MB/s)."""
    return RtoJudgement(float(restore_seconds), verify_seconds, int(bytes_restored), float(target_minutes))


def choose_snapshot(snapshots: Sequence[Snapshot], selector: str, *, host: str | None = None,
                    path: str | None = None, rng: random.Random | None = None) -> Snapshot:
    """The snapshot to test: an id (prefix), or the latest / a random one of `host` covering `path`.

    Raises ResticNotFound when there is none, InvalidInput when an id prefix is ambiguous.
    """
    if selector not in ("latest", "random"):
        matches = [s for s in snapshots if s.id.startswith(selector)]
        if not matches:
            raise ResticNotFound(f"snapshot {selector} is not in the repository ({len(snapshots)} snapshot(s))")
        if len(matches) > 1:
            raise InvalidInput(f"snapshot id {selector} is ambiguous: it matches {len(matches)} snapshots")
        return matches[0]

    def of_host(s: Snapshot) -> bool:
        return host is None or s.hostname == host or s.hostname.startswith(host + ".")

    def covers(s: Snapshot) -> bool:
        return path is None or any(p == path or path.startswith(p.rstrip("/") + "/") for p in s.paths)

    candidates = [s for s in snapshots if of_host(s) and covers(s)]
    if not candidates:
        what = f"{host or 'any host'}:{path or '/'}"
        others = f" ({len(snapshots)} snapshot(s) of other hosts or paths)" if snapshots else " (it holds no snapshots)"
        raise ResticNotFound(f"no snapshot of {what} in the repository{others}")
    if selector == "random":
        return (rng or random.SystemRandom()).choice(candidates)
    return max(candidates, key=lambda s: s.time)


RESTIC_CAPABILITIES = {
    # feature: the first release that has it (restic's changelog)
    "restore_verify": (0, 9, 6),
    "read_data_subset_n_of_t": (0, 9, 0),
    "read_data_subset_percent_or_size": (0, 12, 0),
    "retry_lock": (0, 16, 0),
    "structured_exit_codes": (0, 17, 0),
    "restore_json_summary": (0, 17, 0),
}


def restic_capabilities(version: tuple[int, int, int]) -> dict[str, bool]:
    """What this restic release can do that a restore test relies on or would use."""
    return {name: version >= since for name, since in RESTIC_CAPABILITIES.items()}


def subset_for_run(runs: int, total: int) -> tuple[int, int]:
    """The read-data subset n/t of the run after `runs` earlier ones: 1/t, 2/t, ... t/t, then 1/t again.

    restic puts a pack in subset n when the first byte of its id modulo t is n-1, so t consecutive
    runs read every pack once.
    """
    if total < 1 or runs < 0:
        raise ValueError("subset rotation needs runs >= 0 and t >= 1")
    return runs % total + 1, total


# -- content proof ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileDigest:
    """A file's size in bytes and its sha256 hex digest."""

    size: int
    sha256: str


@dataclass(frozen=True)
class SourceFile:
    """A file on the source host now: its sha256 and modification time (epoch seconds)."""

    sha256: str
    mtime: float


@dataclass(frozen=True)
class Mismatch:
    """One way the restored bytes disagree with a reference."""

    path: str
    problem: str  # missing | extra | size | dump | source
    expected: str | int | None = None
    found: str | int | None = None

    def text(self) -> str:
        what = {
            "missing": "in the snapshot but not restored",
            "extra": "restored but not in the snapshot's listing",
            "size": f"restored size {self.found} differs from the listing's {self.expected}",
            "dump": "restored bytes differ from `restic dump`",
            "source": "restored bytes differ from the source, which has not changed since the snapshot",
        }.get(self.problem, self.problem)
        return f"{self.path}: {what}"


@dataclass
class ContentProof:
    """The result of comparing restored files with the snapshot's listing, `restic dump` and the source."""

    files_expected: int
    bytes_expected: int
    files_verified: int
    bytes_verified: int
    mismatches: list[Mismatch] = field(default_factory=list)
    dump_compared: list[str] = field(default_factory=list)
    source_compared: int = 0
    changed_since_backup: list[str] = field(default_factory=list)
    deleted_since_backup: list[str] = field(default_factory=list)
    new_since_backup: list[str] = field(default_factory=list)
    not_in_snapshot: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches and self.files_verified == self.files_expected

    def summary(self) -> str:
        refs = ["listing"]
        if self.dump_compared:
            refs.append(f"{len(self.dump_compared)} dumps")
        if self.source_compared:
            refs.append(f"{self.source_compared} source files")
        text = (f"{self.files_verified}/{self.files_expected} files, {self.bytes_verified / MB:.2f} MB matched "
                f"({', '.join(refs)})")
        if self.mismatches:
            first = "; ".join(m.text() for m in self.mismatches[:3])
            more = f" (+{len(self.mismatches) - 3} more)" if len(self.mismatches) > 3 else ""
            text = f"content mismatch: {len(self.mismatches)} problem(s): {first}{more}; {text}"
        notes = [f"{len(items)} {label}" for items, label in (
            (self.changed_since_backup, "changed since backup"), (self.deleted_since_backup, "deleted since backup"),
            (self.new_since_backup, "new since backup"), (self.not_in_snapshot, "older than the snapshot but not in it"))
            if items]
        return text + (f"; {', '.join(notes)}" if notes else "")

    def as_dict(self) -> dict:
        return {"ok": self.ok, "files_expected": self.files_expected, "bytes_expected": self.bytes_expected,
                "files_verified": self.files_verified, "bytes_verified": self.bytes_verified,
                "mismatches": [asdict(m) for m in self.mismatches], "dump_compared": self.dump_compared,
                "source_compared": self.source_compared, "changed_since_backup": self.changed_since_backup,
                "deleted_since_backup": self.deleted_since_backup, "new_since_backup": self.new_since_backup,
                "not_in_snapshot": self.not_in_snapshot}


def _under(path: str, root: str | None) -> bool:
    return root is None or path == root or path.startswith(root.rstrip("/") + "/")


def compare_content(restored: Mapping[str, FileDigest], listing: Mapping[str, int], *,
                    dumped: Mapping[str, FileDigest] | None = None, source: Mapping[str, SourceFile] | None = None,
                    source_root: str | None = None, snapshot_time: datetime | None = None) -> ContentProof:
    """Compare restored files (by snapshot path) with the snapshot's own listing and independent digests.

    Args:
        restored: every regular file restored, by its absolute path in the snapshot.
        listing: every regular file of the snapshot (`restic ls --json`) and its size.
        dumped: digests of a sample of files streamed from `restic dump`.
        source: the source host's files under `source_root` now; None when it was not reachable.
        snapshot_time: a source file modified after it that differs is "changed since backup", not a mismatch.
    """
    mismatches: list[Mismatch] = []
    bad: set[str] = set()
    for path, size in sorted(listing.items()):
        got = restored.get(path)
        if got is None:
            mismatches.append(Mismatch(path, "missing", size, None))
            bad.add(path)
        elif got.size != size:
            mismatches.append(Mismatch(path, "size", size, got.size))
            bad.add(path)
    for path in sorted(set(restored) - set(listing)):
        mismatches.append(Mismatch(path, "extra", None, restored[path].size))
    for path, digest in sorted((dumped or {}).items()):
        got = restored.get(path)
        if got is not None and (got.sha256 != digest.sha256 or got.size != digest.size):
            mismatches.append(Mismatch(path, "dump", digest.sha256, got.sha256))
            bad.add(path)
    proof_lists: dict[str, list[str]] = {"changed": [], "deleted": [], "new": [], "not_in": []}
    compared = 0
    if source is not None:
        cutoff = snapshot_time.timestamp() if snapshot_time else None
        for path in sorted(p for p in listing if _under(p, source_root)):
            got, now = restored.get(path), source.get(path)
            if got is None:
                continue
            if now is None:
                proof_lists["deleted"].append(path)
                continue
            compared += 1
            if now.sha256 == got.sha256:
                continue
            if cutoff is not None and now.mtime > cutoff:
                proof_lists["changed"].append(path)
            else:
                mismatches.append(Mismatch(path, "source", now.sha256, got.sha256))
                bad.add(path)
        for path in sorted(set(source) - set(listing)):
            newer = cutoff is not None and source[path].mtime > cutoff
            proof_lists["new" if newer else "not_in"].append(path)
    good = [p for p in listing if p not in bad and p in restored]
    return ContentProof(
        files_expected=len(listing), bytes_expected=sum(listing.values()),
        files_verified=len(good), bytes_verified=sum(listing[p] for p in good),
        mismatches=mismatches, dump_compared=sorted(dumped or {}), source_compared=compared,
        changed_since_backup=proof_lists["changed"], deleted_since_backup=proof_lists["deleted"],
        new_since_backup=proof_lists["new"], not_in_snapshot=proof_lists["not_in"],
    )


def sha256_file(path: Path) -> str:
    """The sha256 hex digest of a local file, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def digest_tree(root: Path) -> dict[str, FileDigest]:
    """Every regular file under a restore target, by its path in the snapshot ("/" + path below root)."""
    root = Path(root)
    out: dict[str, FileDigest] = {}
    for directory, _dirs, files in os.walk(root, followlinks=False):
        for name in files:
            full = Path(directory) / name
            info = full.lstat()
            if stat.S_ISREG(info.st_mode):  # symlinks and devices are restored but carry no file bytes
                out["/" + str(full.relative_to(root))] = FileDigest(info.st_size, sha256_file(full))
    return out


def _unescape_sha256sum(name: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "r": "\r", "\\": "\\"}.get(m[1], m[0]), name)


def parse_sha256sum(text: str) -> dict[str, str]:
    """GNU `sha256sum` output as {path: hex digest}; a leading backslash marks a name with escapes."""
    out: dict[str, str] = {}
    for lineno, line in enumerate((text or "").split("\n"), 1):
        if not line:
            continue
        escaped = line.startswith("\\")
        m = re.fullmatch(r"([0-9a-f]{64}) [ *](.+)", line[1:] if escaped else line)
        if not m:
            raise ValueError(f"sha256sum output line {lineno} is not 'DIGEST  NAME': {line[:80]!r}")
        out[_unescape_sha256sum(m[2]) if escaped else m[2]] = m[1]
    return out


def parse_find_mtimes(text: str) -> dict[str, float]:
    """`find ... -printf '%T@ %p\\0'` output as {path: mtime in epoch seconds}."""
    out: dict[str, float] = {}
    for entry in (text or "").split("\0"):
        entry = entry.lstrip("\n")
        if not entry:
            continue
        stamp, sep, path = entry.partition(" ")
        try:
            out[path] = float(stamp)
        except ValueError:
            raise ValueError(f"find -printf output entry is not 'MTIME PATH': {entry[:80]!r}") from None
        if not sep:
            raise ValueError(f"find -printf output entry has no path: {entry[:80]!r}")
    return out


# -- application-level checks -------------------------------------------------------------------------


@dataclass(frozen=True)
class AppCheckResult:
    """Whether a restored file is usable by the application that reads it."""

    path: str
    kind: str
    ok: bool
    detail: str


def judge_csv(stream: IO[str]) -> tuple[bool, str]:
    """A CSV parses with the csv module, has a header and at least one row, every row as wide as the header."""
    try:
        reader = csv.reader(stream, strict=True)
        header = next(reader, None)
        if not header or not any(cell.strip() for cell in header):
            return False, "no header row"
        rows = 0
        for row in reader:
            if not row:
                continue
            rows += 1
            if len(row) != len(header):
                return False, f"row {rows} has {len(row)} fields, the header {len(header)}"
    except (csv.Error, UnicodeDecodeError) as e:
        return False, f"does not parse as CSV: {e}"
    if rows < 1:
        return False, "a header but no rows"
    return True, f"{len(header)} columns, {rows} rows"


def judge_json(stream: IO[str]) -> tuple[bool, str]:
    """A JSON document parses."""
    try:
        data = json.load(stream)
    except (ValueError, UnicodeDecodeError) as e:
        return False, f"does not parse as JSON: {e}"
    return True, f"parses ({type(data).__name__})"


def app_check(root: Path, check: AppCheck) -> AppCheckResult:
    """Run one inventory app check on a file under the restored copy of the backed-up path."""
    path = Path(root) / check.path
    if not path.is_file() or path.is_symlink():
        return AppCheckResult(check.path, check.kind, False, "not restored (no such regular file)")
    if check.kind == "nonempty":
        size = path.stat().st_size
        return AppCheckResult(check.path, check.kind, size > 0, f"{size} bytes")
    judge = judge_csv if check.kind == "csv" else judge_json
    with open(path, encoding="utf-8", newline="") as stream:
        ok, detail = judge(stream)
    return AppCheckResult(check.path, check.kind, ok, detail)


# -- failures as reasons ------------------------------------------------------------------------------

_REASONS: tuple[tuple[type[CrashcartError], str, str], ...] = (
    (ResticWrongPassword, "wrong_password", "wrong repository password"),
    (ResticRepoMissing, "repository_missing", "repository missing"),
    (ResticLocked, "repository_locked", "repository locked"),
    (ResticDataError, "data_damaged", "repository data damaged"),
    (ResticTimedOut, "timed_out", "restic timed out"),
    (ResticNotFound, "snapshot_not_found", "snapshot not found"),
    (VaultError, "password_unavailable", "repository password unavailable from Vault"),
    (ResticError, "restic_failed", "restic failed"),
    (InvalidInput, "invalid_input", "invalid input"),
    (CrashcartError, "failed", "failed"),
)


def failure_reason(error: CrashcartError) -> tuple[str, str]:
    """A failure's stable code and its one-line reason ("wrong repository password: ...")."""
    for cls, code, label in _REASONS:
        if isinstance(error, cls):
            return code, mask(f"{label}: {error}")
    raise TypeError(f"not a crashcart error: {type(error).__name__}")


def _failed_check(error: CrashcartError, **detail) -> CheckResult:
    code, reason = failure_reason(error)
    return CheckResult(CheckStatus.FAILED, reason, {"reason": code, "error": mask(str(error)), **detail})


def _failed_action(error: CrashcartError, **detail) -> Outcome:
    code, reason = failure_reason(error)
    return Outcome(StepStatus.FAILED, reason, {"reason": code, "error": mask(str(error)), **detail})


# -- rotation of the read-data subset -----------------------------------------------------------------


class CheckRotation:
    """The per-repository count of restore-test pack checks, so subsets n/t rotate between runs.

    Kept in `state_dir/restore-check-rotation.json` as {repo: {"runs": k, "t": t, "last": {...}}};
    each run's n/t is also in the evidence, so the rotation is provable without this file.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise StateFileError(f"{self.path}: cannot read the restore-check rotation ({e})") from None
        if not isinstance(data, dict) or not all(isinstance(v, dict) and isinstance(v.get("runs", 0), int)
                                                 for v in data.values()):
            raise StateFileError(f"{self.path}: not a restore-check rotation ({{repo: {{runs: N}}}})")
        return data

    def peek(self, repo: str, total: int) -> tuple[int, int]:
        """The subset the next check of `repo` will read (no side effect)."""
        return subset_for_run(int(self._read().get(repo, {}).get("runs", 0)), total)

    @contextmanager
    def claim(self, repo: str, total: int) -> Iterator["RotationClaim"]:
        """Hold the rotation (a file lock) while a check runs; `commit()` moves it on once the check read its subset."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lockf:
            fcntl.flock(lockf, fcntl.LOCK_EX)
            data = self._read()
            runs = int(data.get(repo, {}).get("runs", 0))
            claim = RotationClaim(repo, runs, *subset_for_run(runs, total))
            yield claim
            if claim.committed is not None:
                data[repo] = {"runs": runs + 1, "t": total, "last": claim.committed}
                tmp = self.path.with_name(self.path.name + ".tmp")
                tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
                os.replace(tmp, self.path)


@dataclass
class RotationClaim:
    repo: str
    runs_before: int
    n: int
    t: int
    committed: dict | None = None

    @property
    def subset(self) -> str:
        return f"{self.n}/{self.t}"

    def commit(self, **detail) -> None:
        self.committed = {"subset": self.subset, "at": utcnow(), **detail}


# -- the target of a restore test: a repository, not a host -------------------------------------------


@dataclass(frozen=True)
class RepositoryTarget:
    """What the engine calls the step's host: here a restic repository (the evidence names it)."""

    name: str


class RepositoryContext(StepContext):
    """A step context whose target is one restic repository; restores run on this (the management) machine.

    `measures` collects what the steps measured, for the `restore_test` record and the run's summary.
    """

    def __init__(self, runtime: Runtime, repo: ResticRepo, pool: SessionPool, params: dict, *, scratch_run: Path,
                 dry_run: bool = False, services: Services | None = None, recorder=None) -> None:
        super().__init__(runtime, RepositoryTarget(repo.name), pool, params, dry_run=dry_run, services=services,
                         recorder=recorder)
        self.repo = repo
        self.scratch_run = scratch_run
        self.target = scratch_run / repo.name
        self.cache = scratch_run / f".cache-{repo.name}"  # a fresh cache: a restore test reads the repository
        self.measures: dict = {}
        self._restic: Restic | None = None

    @property
    def timeout(self) -> float:
        # A restore far beyond its RTO is a failed test, not one to wait for.
        return max(300.0, 2 * self.repo.rto_minutes * 60)

    def planner(self) -> Restic:
        """A restic runner for rendering commands and `restic version`: neither needs the repository password."""
        return Restic(self.repo, Secret(""), known_hosts=self.settings.ssh.known_hosts, timeout=self.timeout,
                      cache_dir=self.cache)

    def restic(self) -> Restic:
        """The repository's restic runner, its password read from Vault on first use."""
        if self._restic is None:
            password = self.services.get("vault").read_secret(self.repo.password)
            self._restic = Restic(self.repo, password, known_hosts=self.settings.ssh.known_hosts,
                                  timeout=self.timeout, cache_dir=self.cache)
        return self._restic

    @property
    def snapshot(self) -> Snapshot | None:
        return self.facts.get("snapshot")

    @property
    def restored_root(self) -> Path | None:
        """Where the backed-up path lies in the restore target, once a restore succeeded."""
        if not self.facts.get("restored"):
            return None
        base = self.repo.source_path or (self.snapshot.paths[0] if self.snapshot and len(self.snapshot.paths) == 1 else "/")
        return self.target / base.lstrip("/")


def _ctx(ctx: StepContext) -> RepositoryContext:
    if not isinstance(ctx, RepositoryContext):
        raise InvalidInput("restore-test steps run on a restic repository, not on a host")
    return ctx


def _not_restored() -> Outcome:
    return Outcome(StepStatus.SKIPPED, "not run: nothing was restored")


def _make_private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask and ignored for an existing directory


# -- steps ----------------------------------------------------------------------------------------------


@register("restic.version", kind="check", read_only=True)
class ResticVersionCheck(Step):
    """The restic release on this machine and what it can do; older than 0.14 is refused."""

    def plan(self, ctx: StepContext) -> Plan:
        return Plan("read the restic release and its capabilities", [_ctx(ctx).planner().binary + " version"])

    def apply(self, ctx: StepContext, plan: Plan) -> CheckResult:
        rc = _ctx(ctx)
        try:
            version = rc.planner().version()
        except ResticError as e:
            return _failed_check(e)
        caps = restic_capabilities(version.version)
        text = ".".join(map(str, version.version))
        rc.measures["restic"] = {"version": text, "text": version.text, "capabilities": caps}
        if version.version < MIN_RESTIC:
            return CheckResult(CheckStatus.FAILED, f"restic {text} is older than {'.'.join(map(str, MIN_RESTIC))}, "
                               "the oldest release crashcart supports", {"reason": "restic_too_old", **rc.measures["restic"]})
        return CheckResult(CheckStatus.PASSED, f"restic {text}", rc.measures["restic"])


@register("restic.choose_snapshot", kind="check", read_only=True)
class ChooseSnapshot(Step):
    """`restic snapshots --json` and the repository id; the latest, a random or the named snapshot."""

    def plan(self, ctx: StepContext) -> Plan:
        rc = _ctx(ctx)
        selector = snapshot_selector(rc.params.get("snapshot", "latest"))
        of = f" of {rc.repo.source_host}:{rc.repo.source_path or '/'}" if rc.repo.source_host else ""
        planner = rc.planner()
        return Plan(f"choose the {selector} snapshot{of}" if selector in ("latest", "random") else f"use snapshot {selector}",
                    [_shown(planner.argv("snapshots", "--json")), _shown(planner.argv("cat", "config"))], data=selector)

    def apply(self, ctx: StepContext, plan: Plan) -> CheckResult:
        rc = _ctx(ctx)
        try:
            restic = rc.restic()
            with cf.ThreadPoolExecutor(max_workers=2, thread_name_prefix="crashcart-restic") as pool:
                # Two independent reads, each its own SFTP session: side by side halves the wait.
                listed, identified = pool.submit(restic.snapshots), pool.submit(restic.repository_id)
                snapshots, repository_id = listed.result(), identified.result()
            chosen = choose_snapshot(snapshots, plan.data, host=rc.repo.source_host, path=rc.repo.source_path)
        except (ResticError, VaultError, InvalidInput) as e:
            return _failed_check(e)
        rc.facts["snapshot"] = chosen
        rc.measures["repository_id"] = repository_id
        rc.measures["snapshot"] = {
            "id": chosen.id, "short_id": chosen.short_id, "time": chosen.time.isoformat(), "hostname": chosen.hostname,
            "paths": list(chosen.paths), "tags": list(chosen.tags), "selector": plan.data, "candidates": len(snapshots),
        }
        return CheckResult(CheckStatus.PASSED,
                           f"snapshot {chosen.short_id} of {chosen.hostname} taken {chosen.time:%Y-%m-%d %H:%M} UTC "
                           f"({plan.data}, {len(snapshots)} in the repository)",
                           {"snapshot": rc.measures["snapshot"], "repository_id": repository_id})


@register("restore.rpo", kind="check", read_only=True)
class JudgeRpo(Step):
    """The chosen snapshot's age against the repository's rpo_hours."""

    def plan(self, ctx: StepContext) -> Plan:
        rc = _ctx(ctx)
        return Plan(f"snapshot age against the RPO target of {rc.repo.rpo_hours:g} h")

    def apply(self, ctx: StepContext, plan: Plan) -> CheckResult:
        rc = _ctx(ctx)
        judgement = judge_rpo(rc.snapshot.time, datetime.now(timezone.utc), rc.repo.rpo_hours)
        rc.measures["rpo"] = judgement.as_dict()
        if not judgement.ok:
            return CheckResult(CheckStatus.FAILED, judgement.reason, {"reason": "rpo_breach", **judgement.as_dict()})
        return CheckResult(CheckStatus.PASSED, f"RPO {_hours(judgement.age_hours)} h (target {judgement.target_hours:g} h)",
                           judgement.as_dict())


@register("restic.restore")
class RestoreSnapshot(Step):
    """Restore the snapshot into a fresh 0700 scratch directory on this machine, with `--verify`."""

    def plan(self, ctx: StepContext) -> Plan:
        rc = _ctx(ctx)
        ref = rc.snapshot.id if rc.snapshot else rc.params.get("snapshot", "latest")
        short = rc.snapshot.short_id if rc.snapshot else ref
        return Plan(f"restore snapshot {short} into {rc.target} (0700, fresh) with --verify",
                    [_shown(rc.planner().argv("restore", ref, "--target", str(rc.target), "--verify"))], data=ref)

    def apply(self, ctx: StepContext, plan: Plan) -> Outcome:
        rc = _ctx(ctx)
        if rc.target.exists():
            raise InvalidInput(f"scratch directory {rc.target} already exists: a restore test restores only into a fresh one")
        open_scratch(rc.scratch_run)
        rc.target.mkdir(mode=0o700)
        os.chmod(rc.target, 0o700)
        try:
            result = rc.restic().restore(plan.data, rc.target, verify=True)
        except (ResticError, VaultError) as e:
            return _failed_action(e, target=str(rc.target))
        rc.facts["restored"] = True
        rc.measures["restore"] = {"target": str(rc.target), "seconds": round(result.seconds, 3),
                                  "restic_verified_files": result.verified_files, "stdout_tail": result.stdout_tail}
        return Outcome(StepStatus.SUCCEEDED,
                       f"restored into {rc.target} in {_duration(result.seconds)}; restic --verify re-read "
                       f"{result.verified_files if result.verified_files is not None else '?'} files",
                       rc.measures["restore"])


@register("restore.content_proof", kind="check")
class ContentProofCheck(Step):
    """sha256 of every restored file against the snapshot's listing, `restic dump` samples and the source."""

    def plan(self, ctx: StepContext) -> Plan:
        rc = _ctx(ctx)
        ref = rc.snapshot.id if rc.snapshot else rc.params.get("snapshot", "latest")
        commands = [f"sha256 of every file under {rc.target}", _shown(rc.planner().argv("ls", "--json", ref)),
                    f"sha256 of `restic dump` for {rc.repo.sample_files} randomly sampled files"]
        if rc.repo.source_host and rc.repo.source_path:
            commands += [f"ssh {rc.repo.source_host}: " + shlex.join(_source_hash_argv(rc.repo.source_path)),
                         f"ssh {rc.repo.source_host}: " + shlex.join(_source_mtime_argv(rc.repo.source_path))]
        return Plan("prove the restored bytes against the snapshot and the source", commands)

    def apply(self, ctx: StepContext, plan: Plan) -> CheckResult | Outcome:
        rc = _ctx(ctx)
        if not rc.facts.get("restored"):
            return _not_restored()
        snapshot = rc.snapshot
        # The source is hashed on its host while this machine hashes the restored tree and reads the
        # listing: three independent waits, taken side by side.
        pool = cf.ThreadPoolExecutor(max_workers=2, thread_name_prefix="crashcart-proof")
        try:
            source_started = time.monotonic()
            source_job = pool.submit(_source_digests, rc)
            started = time.monotonic()
            listing_job = pool.submit(rc.restic().ls, snapshot.id)
            restored = digest_tree(rc.target)
            try:
                nodes = listing_job.result()
            except ResticError as e:
                return _failed_check(e)
            listing = {n.path: n.size for n in nodes if n.type == "file"}
            verify_seconds = time.monotonic() - started
            rc.measures["verify_seconds"] = round(verify_seconds, 3)
            rc.measures["bytes_restored"] = sum(d.size for d in restored.values())
            sample = random.SystemRandom().sample(sorted(listing), min(rc.repo.sample_files, len(listing)))
            started = time.monotonic()
            try:
                dumped = _dump_digests(rc.restic(), snapshot.id, sample)
            except ResticError as e:
                return _failed_check(e)
            dump_seconds = time.monotonic() - started
            source, source_status = source_job.result()
            source_seconds = time.monotonic() - source_started
        finally:
            pool.shutdown(wait=True)
        proof = compare_content(restored, listing, dumped=dumped, source=source, source_root=rc.repo.source_path,
                                snapshot_time=snapshot.time)
        detail = {**proof.as_dict(), "verify_seconds": round(verify_seconds, 3), "dump_seconds": round(dump_seconds, 3),
                  "source_seconds": round(source_seconds, 3), "source": source_status, "sample": sample,
                  "symlinks": sum(1 for n in nodes if n.type == "symlink")}
        rc.measures["content"] = detail
        if not proof.ok:
            return CheckResult(CheckStatus.FAILED, proof.summary(), {"reason": "content_mismatch", **detail})
        return CheckResult(CheckStatus.PASSED, proof.summary() + ("" if source is not None else f"; {source_status}"),
                           detail)


@register("restore.application_checks", kind="check")
class ApplicationChecks(Step):
    """The inventory's app checks on the restored files: csv parses with rows, json parses, nonempty has bytes."""

    def plan(self, ctx: StepContext) -> Plan:
        rc = _ctx(ctx)
        if not rc.repo.app_checks:
            return Plan("nothing to do: the inventory declares no application-level check", nothing_to_do=True)
        return Plan(f"{len(rc.repo.app_checks)} application-level check(s) on the restored files",
                    [f"{c.kind}: {c.path}" for c in rc.repo.app_checks])

    def apply(self, ctx: StepContext, plan: Plan) -> CheckResult | Outcome:
        rc = _ctx(ctx)
        if not rc.facts.get("restored"):
            return _not_restored()
        results = [app_check(rc.restored_root, c) for c in rc.repo.app_checks]
        rc.measures["application"] = [asdict(r) for r in results]
        failed = [r for r in results if not r.ok]
        detail = {"checks": rc.measures["application"]}
        if failed:
            return CheckResult(CheckStatus.FAILED, "application check failed: " + "; ".join(
                f"{r.path} ({r.kind}): {r.detail}" for r in failed), {"reason": "application_check_failed", **detail})
        return CheckResult(CheckStatus.PASSED, "; ".join(f"{r.path} {r.kind} ok ({r.detail})" for r in results), detail)


@register("restore.rto", kind="check")
class JudgeRto(Step):
    """Restore plus verification wall time, and throughput, against the repository's rto_minutes."""

    def plan(self, ctx: StepContext) -> Plan:
        return Plan(f"restore and verification time against the RTO target of {_ctx(ctx).repo.rto_minutes:g} min")

    def apply(self, ctx: StepContext, plan: Plan) -> CheckResult | Outcome:
        rc = _ctx(ctx)
        if not rc.facts.get("restored"):
            return _not_restored()
        restored_bytes = rc.measures.get("bytes_restored")
        if restored_bytes is None:
            restored_bytes = sum(d.size for d in digest_tree(rc.target).values())
        judgement = judge_rto(rc.measures["restore"]["seconds"], rc.measures.get("verify_seconds"), restored_bytes,
                              rc.repo.rto_minutes)
        rc.measures["rto"] = judgement.as_dict()
        if not judgement.ok:
            return CheckResult(CheckStatus.FAILED, judgement.reason, {"reason": "rto_breach", **judgement.as_dict()})
        note = "" if judgement.verify_seconds is not None else " (verification not measured)"
        return CheckResult(CheckStatus.PASSED, judgement.summary() + note, judgement.as_dict())


@register("restic.check_subset", kind="check")
class CheckSubset(Step):
    """`restic check --read-data-subset=n/t`, n rotating between runs so t runs read every pack."""

    def plan(self, ctx: StepContext) -> Plan:
        rc = _ctx(ctx)
        n, t = _rotation(rc).peek(rc.repo.name, rc.repo.check_subsets)
        return Plan(f"read pack subset {n}/{t} (every pack is read over {t} runs)",
                    [_shown(rc.planner().argv("check", f"--read-data-subset={n}/{t}"))])

    def apply(self, ctx: StepContext, plan: Plan) -> CheckResult:
        rc = _ctx(ctx)
        rotation = _rotation(rc)
        with rotation.claim(rc.repo.name, rc.repo.check_subsets) as claim:
            detail = {"subset": claim.subset, "n": claim.n, "t": claim.t, "runs_before": claim.runs_before,
                      "rotation_file": str(rotation.path)}
            try:
                result = rc.restic().check(read_data_subset=claim.subset)
            except (ResticError, VaultError) as e:
                rc.measures["check"] = {**detail, "ok": False, "error": mask(str(e))}
                return _failed_check(e, **detail)  # the subset was not read: the rotation stays
            claim.commit(ok=result.ok, run_id=rc.run_id)
        detail.update(ok=result.ok, errors=result.errors[:ERROR_LINES_KEPT], error_lines=len(result.errors),
                      seconds=round(result.seconds, 3))
        rc.measures["check"] = detail
        if not result.ok:
            shown = "; ".join(result.errors[:2]) or "restic reported errors"
            return CheckResult(CheckStatus.FAILED, f"repository data damaged: restic check --read-data-subset="
                               f"{claim.subset} found errors: {shown}", {"reason": "data_damaged", **detail})
        return CheckResult(CheckStatus.PASSED, f"pack subset {claim.subset} read: no errors", detail)


@register("restore.wipe_scratch")
class WipeScratch(Step):
    """Remove the scratch directory (restored ePHI and restic's cache) once the proof is done; record what went."""

    def plan(self, ctx: StepContext) -> Plan:
        rc = _ctx(ctx)
        if not rc.target.exists() and not rc.cache.exists():
            return Plan("nothing to wipe: no scratch directory was created", nothing_to_do=True)
        return Plan(f"remove {rc.target} and restic's cache", [f"rm -rf {rc.target}", f"rm -rf {rc.cache}"])

    def apply(self, ctx: StepContext, plan: Plan) -> Outcome:
        rc = _ctx(ctx)
        try:
            wiped = wipe_scratch(rc.target, rc.cache)
        except OSError as e:
            return Outcome(StepStatus.FAILED, f"wipe failed: {rc.target}: {e.strerror or e}",
                           {"reason": "wipe_failed", "path": str(rc.target)})
        rc.measures["wipe"] = wiped
        return Outcome(StepStatus.SUCCEEDED, f"wiped {wiped['files_removed']} restored files, "
                       f"{wiped['bytes_removed'] / MB:.2f} MB, from {rc.target} (and restic's cache)", wiped)


# -- step helpers ---------------------------------------------------------------------------------------


def _shown(argv: list[str]) -> str:
    return mask(shlex.join(argv))


def _source_hash_argv(path: str) -> list[str]:
    return ["find", v.remote_path(path), "-type", "f", "-exec", "sha256sum", "{}", "+"]


def _source_mtime_argv(path: str) -> list[str]:
    return ["find", v.remote_path(path), "-type", "f", "-printf", "%T@ %p\\0"]


def _rotation(rc: RepositoryContext) -> CheckRotation:
    return CheckRotation(Path(rc.settings.state_dir) / ROTATION_FILE)


def _dump_digests(restic: Restic, snapshot_id: str, paths: list[str]) -> dict[str, FileDigest]:
    """sha256 of `restic dump` for each path, a few at a time (each is its own restic process and SFTP session)."""
    if not paths:
        return {}
    with cf.ThreadPoolExecutor(max_workers=min(4, len(paths)), thread_name_prefix="crashcart-dump") as pool:
        digests = list(pool.map(lambda p: restic.dump_sha256(snapshot_id, p), paths))
    return {p: FileDigest(size, digest) for p, (digest, size) in zip(paths, digests)}


def _source_digests(rc: RepositoryContext) -> tuple[dict[str, SourceFile] | None, str]:
    """The source's files now (over SSH), or None and why not; an unreachable source is not a failed test."""
    repo = rc.repo
    if not (repo.source_host and repo.source_path):
        return None, "source not compared: the inventory names no source host and path"
    host = rc.inventory.host(repo.source_host)
    timeout = max(rc.settings.ssh.command_timeout, repo.rto_minutes * 60)
    try:
        hashes = rc.run(_source_hash_argv(repo.source_path), host=host, timeout=timeout, check=False)
        mtimes = rc.run(_source_mtime_argv(repo.source_path), host=host, timeout=timeout, check=False)
    except SSHError as e:
        return None, f"source not compared: {repo.source_host} not reachable ({e})"
    for result in (hashes, mtimes):
        if result.exit_code != 0:
            last = (result.stderr.strip().splitlines() or ["no message"])[-1][:200]
            return None, f"source not compared: `{result.command}` exited {result.exit_code} on {repo.source_host}: {last}"
    try:
        digests, times = parse_sha256sum(hashes.stdout), parse_find_mtimes(mtimes.stdout)
    except ValueError as e:
        return None, f"source not compared: {e}"
    return ({p: SourceFile(d, times.get(p, float("inf"))) for p, d in digests.items()},
            f"compared with {repo.source_host}:{repo.source_path}")


def wipe(path: Path) -> dict:
    """Remove a directory tree, counting what went: {path, files_removed, bytes_removed}.

    rm -rf, not an overwrite: on journalling or copy-on-write filesystems and SSDs, overwriting in
    place proves nothing; the scratch belongs on state_dir's (encrypted) volume.
    """
    files = size = 0
    if path.exists():
        for directory, _dirs, names in os.walk(path):
            for name in names:
                info = (Path(directory) / name).lstat()
                files += 1
                size += info.st_size if stat.S_ISREG(info.st_mode) else 0
        shutil.rmtree(path)
        if path.exists():
            raise OSError(f"{path} still exists after removal")
    return {"path": str(path), "files_removed": files, "bytes_removed": size}


def wipe_scratch(target: Path, cache: Path) -> dict:
    """Wipe a repository's restore target and restic cache; the target's counts first, the cache's under "cache"."""
    started = time.monotonic()
    restored = wipe(target)
    return {**restored, "cache": wipe(cache), "seconds": round(time.monotonic() - started, 3)}


def open_scratch(run_dir: Path) -> None:
    """The run's scratch directory, 0700 (and its parent), marked with this process so that a later
    run can sweep it if this one dies before wiping."""
    _make_private_dir(run_dir.parent)
    _make_private_dir(run_dir)
    owner = run_dir / "owner.json"
    if not owner.exists():
        owner.write_text(json.dumps({"pid": os.getpid(), "boot_id": boot_id()}))


def close_scratch(run_dir: Path) -> None:
    """Remove the run's (wiped) scratch directory; anything still in it stays, marked, for the sweep."""
    if not run_dir.exists():
        return
    if any(p.name != "owner.json" for p in run_dir.iterdir()):
        log.error("scratch %s is not empty after the run; the next restore test will sweep it", run_dir)
        return
    (run_dir / "owner.json").unlink(missing_ok=True)
    run_dir.rmdir()


def _owner_alive(run_dir: Path) -> bool:
    try:
        owner = json.loads((run_dir / "owner.json").read_text())
        if owner.get("boot_id") != boot_id():
            return False
        os.kill(int(owner["pid"]), 0)
        return True
    except ProcessLookupError:
        return False
    except (OSError, ValueError, KeyError, TypeError):
        return True  # not ours to judge: leave it to a person


def sweep_abandoned_scratch(scratch_root: Path, recorder: RunRecorder) -> list[dict]:
    """Wipe scratch directories left by restore tests whose process died (a crash leaves ePHI behind)."""
    swept = []
    if not scratch_root.is_dir():
        return swept
    for run_dir in sorted(p for p in scratch_root.iterdir() if p.is_dir()):
        if run_dir.name == recorder.run_id or _owner_alive(run_dir):
            continue
        body: dict = {"path": str(run_dir), "run": run_dir.name, "why": "left by a restore test whose process died"}
        try:
            wiped = wipe(run_dir)
        except OSError as e:  # recorded, and this run goes on: the restore test itself is still owed
            recorder.event("scratch_sweep_failed", {**body, "error": str(e)})
            continue
        body.update(files_removed=wiped["files_removed"], bytes_removed=wiped["bytes_removed"])
        recorder.event("scratch_swept", body)
        swept.append(body)
    return swept


# -- deciding a repository's result ------------------------------------------------------------------------

_REASON_BY_STEP = {"restore.rpo": "rpo_breach", "restore.rto": "rto_breach", "restore.content_proof": "content_mismatch",
                   "restore.application_checks": "application_check_failed", "restic.check_subset": "check_failed",
                   "restore.wipe_scratch": "wipe_failed"}


def failure_reasons(run: HostRun) -> list[dict]:
    """Every failed step of a repository's run as {step, code, text}, in runbook order."""
    bad = (StepStatus.FAILED, StepStatus.ROLLBACK_FAILED, StepStatus.UNVERIFIED)
    return [{"step": s.step_id, "code": s.detail.get("reason") or _REASON_BY_STEP.get(s.uses, "failed"),
             "text": s.summary if s.status is not StepStatus.UNVERIFIED else f"inconclusive: {s.summary}"}
            for s in run.steps if s.status in bad]


def measures_line(measures: Mapping) -> str:
    """The one-line account of what a restore test measured (for the CLI, Slack and the run summary)."""
    parts = []
    snap = measures.get("snapshot")
    if snap:
        parts.append(f"snapshot {snap['short_id']}")
    content = measures.get("content")
    if content:
        parts.append(f"{content['files_verified']}/{content['files_expected']} files, "
                     f"{content['bytes_verified'] / MB:.2f} MB matched")
    rpo = measures.get("rpo")
    if rpo:
        parts.append(f"RPO {_hours(rpo['age_hours'])} h/{rpo['target_hours']:g} h")
    rto = measures.get("rto")
    if rto:
        rate = f" at {rto['throughput_mb_s']:.2f} MB/s" if rto.get("throughput_mb_s") is not None else ""
        parts.append(f"RTO {_duration(rto['seconds'])}/{rto['target_minutes']:g} min{rate}")
    check = measures.get("check")
    if check:
        parts.append(f"check {check['subset']} {'ok' if check.get('ok') else 'FAILED'}")
    return ", ".join(parts)


def decide_restore_test(run: HostRun, measures: Mapping, dry_run: bool) -> tuple[str, str]:
    """passed | failed (with every reason) | planned for a dry run."""
    line = measures_line(measures)
    if dry_run:
        notes = "; ".join(r["text"] for r in failure_reasons(run))
        return "planned", "dry run: plan shown, nothing restored" + (f" ({line})" if line else "") + (
            f"; {notes}" if notes else "")
    reasons = failure_reasons(run)
    if reasons:
        return "failed", "; ".join(r["text"] for r in reasons) + (f" [{line}]" if line else "")
    if not measures.get("wipe"):
        return "failed", "the scratch directory was not wiped" + (f" [{line}]" if line else "")
    return "passed", line


# -- carrying the runbook out on repositories ----------------------------------------------------------------


def run_restore_tests(runtime: Runtime, book: Runbook, repos: list[ResticRepo], *, params: dict,
                      triggered_by: str | None, dry_run: bool) -> common.RunOutcome:
    """Carry out the restore-test runbook on each repository in turn and record everything.

    Like flows.common.carry_out, but the targets are repositories (restored here, not on hosts), and
    they run one after another: parallel restores would share this machine's disk and network and
    make each RTO measurement meaningless.
    """
    ledger = common.open_ledger(runtime)
    close_orphaned_runs(ledger)
    trigger = common.trigger_of(triggered_by)
    recorder = RunRecorder(
        ledger, kind="restore-test", runbook=book.identity(), params=params,
        hosts=[{"name": r.name, "kind": "restic_repository", "url": r.url, "source_host": r.source_host,
                "source_path": r.source_path} for r in repos],
        trigger=trigger, hipaa=list(book.hipaa), flow_run_id=common.current_flow_run_id(),
        mode="dry_run" if dry_run else "execute",
    )
    outcome = common.RunOutcome(recorder.run_id, book.name, "failed", "", dry_run=dry_run,
                                flow_run_id=recorder.flow_run_id)
    scratch_root = Path(runtime.settings.state_dir) / SCRATCH_DIR
    names = tuple(r.name for r in repos)
    with recorder:
        hooks = common.make_hooks(runtime, recorder)
        hooks.emit(Event("run_started", recorder.run_id, book.name, "started",
                         f"{book.title}: {', '.join(names)}" + (" (dry run)" if dry_run else ""), names, None,
                         {"params": recorder.params, "trigger": trigger.as_dict(), "dry_run": dry_run}))
        if not dry_run:
            sweep_abandoned_scratch(scratch_root, recorder)
        services = Services({"vault": common.vault_factory(runtime)})
        results: dict[str, tuple[str, str, HostRun, dict]] = {}
        scratch_run = scratch_root / recorder.run_id
        open_scratch(scratch_run)  # before any restic call: its cache lives here too
        try:
            with SessionPool(runtime.settings.ssh) as pool:
                for repo in repos:
                    ctx = RepositoryContext(runtime, repo, pool, params, scratch_run=scratch_run, dry_run=dry_run,
                                            services=services, recorder=recorder)
                    try:
                        run = execute_runbook(book, ctx, recorder, hooks)
                    finally:
                        _wipe_leftovers(ctx, recorder)
                    status, summary = decide_restore_test(run, ctx.measures, dry_run)
                    results[repo.name] = (status, summary, run, ctx.measures)
                    if not dry_run:
                        recorder.event("restore_test", _result_record(repo, status, summary, run, ctx.measures))
        finally:
            close_scratch(scratch_run)
        for name, (status, summary, run, _) in results.items():
            outcome.hosts[name] = {
                "status": status, "summary": summary,
                "steps": [{"id": s.step_id, "status": s.status.value, "summary": s.summary,
                           "duration": round(s.duration, 3), "commands": s.plan.commands if s.plan else [],
                           "verification": s.verification} for s in run.steps],
            }
        outcome.status = common.worst([r[0] for r in results.values()])
        outcome.summary = "; ".join(f"{name}: {r[0]} ({r[1]})" for name, r in results.items())
        recorder.finish(outcome.status, outcome.summary, {"repositories": {n: r[0] for n, r in results.items()}})
        for name, (status, summary, run, measures) in results.items():
            if status in ("passed", "failed"):  # a failed test is a result to announce, like a passed one
                hooks.emit(Event("restore_test", recorder.run_id, book.name, status, summary, (name,), None,
                                 {"repository": name, "reasons": [r["text"] for r in failure_reasons(run)],
                                  "measures": _hook_measures(measures)}))
        hooks.emit(Event("run_finished", recorder.run_id, book.name, outcome.status, outcome.summary, names, None,
                         {"repositories": {n: r[0] for n, r in results.items()}, "dry_run": dry_run}))
        left = hooks.drain(timeout=3.0)
        if left:
            log.warning("%d notification(s) still in flight; they continue in the background", left)
    common.publish_artifact(runtime, outcome)
    return outcome


def _wipe_leftovers(ctx: RepositoryContext, recorder: RunRecorder) -> None:
    """The wipe step's safety net: restored ePHI never outlives the run, even when the runbook stopped early.

    In a dry run it removes restic's cache of the read-only planning steps (snapshots and index only).
    """
    if not (ctx.target.exists() or ctx.cache.exists()):
        return
    try:
        wiped = wipe_scratch(ctx.target, ctx.cache)
    except OSError as e:
        log.error("could not wipe %s: %s", ctx.target, e)
        wiped = {"path": str(ctx.target), "error": str(e)}
    ctx.measures.setdefault("wipe", wiped)
    try:
        why = ("dry run: restic's cache from the planning reads" if ctx.dry_run
               else "the runbook ended before its wipe step")
        recorder.event("scratch_wiped", {**wiped, "why": why})
    except EvidenceError:
        log.error("scratch %s wiped, but the record of it could not be written", ctx.target)
        raise


def _hook_measures(measures: Mapping) -> dict:
    """What a notification carries: ids and numbers as flat fields, most telling first (never file names)."""
    snap, rpo, rto = measures.get("snapshot") or {}, measures.get("rpo") or {}, measures.get("rto") or {}
    content, check = measures.get("content") or {}, measures.get("check") or {}
    fields = {
        "snapshot": snap.get("short_id"), "snapshot_time": snap.get("time"),
        "rpo_hours": rpo.get("age_hours"), "rpo_target_hours": rpo.get("target_hours"),
        "rto_seconds": rto.get("seconds"), "rto_target_minutes": rto.get("target_minutes"),
        "throughput_mb_s": rto.get("throughput_mb_s"),
        "files_verified": content.get("files_verified"), "files_expected": content.get("files_expected"),
        "bytes_verified": content.get("bytes_verified"),
        "mismatches": len(content["mismatches"]) if "mismatches" in content else None,
        "check": f"{check['subset']} {'ok' if check.get('ok') else 'failed'}" if check.get("subset") else None,
        "repository_id": (measures.get("repository_id") or "")[:16] or None,
    }
    return {k: v for k, v in fields.items() if v is not None}


def _result_record(repo: ResticRepo, status: str, summary: str, run: HostRun, measures: Mapping) -> dict:
    """The first-class result of one repository's restore test, as the evidence keeps it."""
    content = measures.get("content") or {}
    return {
        "repository": repo.name, "url": repo.url, "repository_id": measures.get("repository_id"),
        "status": status, "summary": summary, "reasons": failure_reasons(run), "hipaa": HIPAA_SPEC,
        "snapshot": measures.get("snapshot"), "rpo": measures.get("rpo"), "rto": measures.get("rto"),
        "restore": {k: v for k, v in (measures.get("restore") or {}).items() if k != "stdout_tail"} or None,
        "files_verified": content.get("files_verified"), "bytes_verified": content.get("bytes_verified"),
        "files_expected": content.get("files_expected"), "bytes_expected": content.get("bytes_expected"),
        "mismatches": content.get("mismatches"), "content": content or None,
        "application": measures.get("application"), "check": measures.get("check"), "wipe": measures.get("wipe"),
        "tool_versions": {"restic": (measures.get("restic") or {}).get("version"),
                          "restic_capabilities": (measures.get("restic") or {}).get("capabilities")},
        "steps": {s.step_id: s.status.value for s in run.steps},
    }


@flow(name="restore-test", persist_result=False, validate_parameters=True)
def restore_test(repos: list[str] | None = None, host: str | None = None, snapshot: str = "latest",
                 dry_run: bool = False, triggered_by: str | None = None, config: str | None = None) -> dict:
    """Restore-test restic repositories: real restores, content proof, RPO/RTO, a rotating pack check.

    Final state per repository: passed | failed | planned (dry run); the run is failed if any failed.
    """
    runtime = Runtime.load(config)
    chosen, selector = restore_targets(runtime.inventory, repos or [], host, snapshot)
    params = {"repos": [r.name for r in chosen], "host": host, "snapshot": selector, "dry_run": dry_run,
              "operator": triggered_by}
    book = load_runbook("restore-test", REGISTRY)
    outcome = run_restore_tests(runtime, book, chosen, params=params, triggered_by=triggered_by, dry_run=dry_run)
    return outcome.as_dict()
