"""The append-only, hash-chained, checkpoint-signed evidence ledger: one JSON-lines file per UTC month."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import logging
import math
import os
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timezone
from enum import Enum
from hashlib import sha256
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from crashcart.errors import CrashcartError, EvidenceError, IntegrationError
from crashcart.evidence.merkle import LEAF_PREFIX, Frontier
from crashcart.evidence.signing import (
    SIGNER_KINDS,
    LocalEd25519Signer,
    Signer,
    decode_signature,
)
from crashcart.secrets import MASK, Secret, mask

if TYPE_CHECKING:  # pydantic models cost ~0.2 s to import; the CLI must stay quick
    from crashcart.settings import EvidenceSettings

log = logging.getLogger("crashcart.evidence")

GENESIS = "0" * 64
FILE_RE = re.compile(r"^evidence-(\d{4})-(\d{2})\.jsonl$")
TS_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
HEAD_NAME = "HEAD"
LOCK_NAME = ".lock"
TORN_DIR = "torn"
ARCHIVE_DIR = "archive"
RECORD_KEYS = frozenset({"seq", "prev", "ts", "kind", "run", "body"})

KIND_CHECKPOINT = "checkpoint"
KIND_TORN = "torn_tail_recovered"
KIND_PRUNED = "pruned"
# Only the ledger writes these: a caller-made "checkpoint" without a signature would break the chain.
RESERVED_KINDS = frozenset({KIND_CHECKPOINT, KIND_TORN, KIND_PRUNED})
KIND_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")

CHECKPOINT_KEYS = frozenset(
    {"count", "root", "head", "prev_checkpoint_seq", "prev_checkpoint_hash", "signer", "key_id", "signature"}
)
PRUNED_KEYS = frozenset(
    {"files", "last_seq_pruned", "last_hash_pruned", "frontier", "prev_checkpoint_seq", "prev_checkpoint_hash"}
)
RETENTION_YEARS = 6  # 45 CFR 164.316(b)(2)(i)


def _default(value: object) -> object:
    if isinstance(value, Secret):
        return MASK
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


# One shared encoder: json.dumps with non-default options builds a new encoder on every call.
ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_default
)


def canonical_json(obj: object) -> str:
    """The canonical JSON text of `obj`: sorted keys, no spaces, UTF-8 characters kept as they are."""
    return ENCODER.encode(obj)


def checkpoint_payload(count: int, root: str, head: str, prev_checkpoint_hash: str | None) -> bytes:
    """The bytes a checkpoint signature covers."""
    doc = {"count": count, "root": root, "head": head, "prev_checkpoint_hash": prev_checkpoint_hash}
    return canonical_json(doc).encode("utf-8")


def file_name(month: str) -> str:
    """The ledger file of a UTC month given as "YYYY-MM"."""
    return f"evidence-{month}.jsonl"


def file_month(name: str) -> str:
    """The "YYYY-MM" month of a ledger file name."""
    return name[9:16]


def format_ts(moment: datetime) -> str:
    """UTC ISO-8601 with microseconds and Z; a naive datetime is refused (its zone is a guess)."""
    if moment.tzinfo is None:
        raise EvidenceError("evidence clock returned a naive datetime; it must carry a time zone")
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Record:
    """One ledger record as written: its fields, its raw line bytes (no newline) and their SHA-256."""

    seq: int
    prev: str
    ts: str
    kind: str
    run: str | None
    body: dict
    raw: bytes
    hash: str

    @classmethod
    def from_raw(cls, raw: bytes, where: str = "evidence record") -> "Record":
        """Parse one line (without its newline); raises EvidenceError when it is not a record."""
        try:
            obj = json.loads(raw)
        except ValueError:
            raise EvidenceError(f"{where} is not valid JSON") from None
        if type(obj) is not dict or obj.keys() != RECORD_KEYS:
            raise EvidenceError(f"{where} does not have exactly the fields {', '.join(sorted(RECORD_KEYS))}")
        seq, prev, ts, kind, run, body = (obj[k] for k in ("seq", "prev", "ts", "kind", "run", "body"))
        if (
            type(seq) is not int
            or type(prev) is not str
            or type(ts) is not str
            or type(kind) is not str
            or not (run is None or type(run) is str)
            or type(body) is not dict
        ):
            raise EvidenceError(f"{where} has a field of the wrong type")
        return cls(seq, prev, ts, kind, run, body, bytes(raw), sha256(raw).hexdigest())

    @property
    def month(self) -> str:
        """The UTC month of the record, "YYYY-MM" (the file it belongs in)."""
        return self.ts[:7]


# -- files ---------------------------------------------------------------------------------------


def ledger_files(directory: str | os.PathLike[str], *, archive: bool = False) -> list[str]:
    """Names of the monthly ledger files in `directory` (or its archive/), oldest first."""
    folder = Path(directory) / ARCHIVE_DIR if archive else Path(directory)
    try:
        names = [e.name for e in os.scandir(folder) if FILE_RE.match(e.name) and e.is_file(follow_symlinks=False)]
    except FileNotFoundError:
        return []
    except OSError as e:
        raise EvidenceError(f"{folder}: cannot list the evidence ledger ({e.strerror})") from None
    return sorted(names)  # "evidence-YYYY-MM" sorts by month


def iter_lines(path: Path, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """(offset, raw line without newline) for each complete line from `offset`; a torn last fragment is skipped."""
    with open(path, "rb", buffering=1 << 20) as f:
        f.seek(offset)
        pos = offset
        for line in f:
            if line[-1:] != b"\n":
                return
            yield pos, line[:-1]
            pos += len(line)


def iter_records(
    directory: str | os.PathLike[str],
    since: datetime | None = None,
    kind: str | None = None,
    run: str | None = None,
) -> Iterator[Record]:
    """Records of the live ledger in order, optionally only from `since` on, of one kind or of one run.

    This reads; it does not verify (use crashcart.evidence.verify for that). A torn last fragment is
    not a record and is skipped; any other unreadable line raises EvidenceError.
    """
    directory = Path(directory)
    since_ts = format_ts(since if since.tzinfo else since.replace(tzinfo=timezone.utc)) if since else None
    for name in ledger_files(directory):
        if since_ts and file_month(name) < since_ts[:7]:
            continue
        for lineno, (_, raw) in enumerate(iter_lines(directory / name), 1):
            rec = Record.from_raw(raw, f"{name} line {lineno}")
            if since_ts and rec.ts < since_ts:
                continue
            if kind is not None and rec.kind != kind:
                continue
            if run is not None and rec.run != run:
                continue
            yield rec


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_private_dir(path: Path) -> None:
    """Create `path` with mode 0700 (and make the new entry durable) if it does not exist."""
    if path.is_dir():
        return
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        if not path.is_dir():
            raise EvidenceError(f"{path}: exists and is not a directory") from None
        return
    os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask; be exact
    _fsync_dir(path.parent)


def _last_line(fd: int, size: int) -> tuple[bytes, int, int] | None:
    """The last complete line of an open file, read backwards from the end.

    Returns (raw line without newline, its offset, offset just past its newline), or None when the file
    has no complete line. Bytes after the last newline (a torn tail) are ignored.
    """
    buf = b""
    pos = size
    end = None  # offset just past the last newline
    step = 4096
    while pos > 0:
        take = min(pos, step)
        pos -= take
        buf = os.pread(fd, take, pos) + buf
        step *= 2  # a long line costs O(log n) reads, not O(n)
        if end is None:
            i = buf.rfind(b"\n")
            if i < 0:
                continue
            end = pos + i + 1
        j = buf.rfind(b"\n", 0, end - pos - 1)
        if j >= 0:
            return buf[j + 1 : end - pos - 1], pos + j + 1, end
    if end is None:
        return None
    return buf[: end - 1], 0, end


# -- body scrubbing ------------------------------------------------------------------------------


def _clean_text(text: str) -> str:
    text = mask(str.__str__(text))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates (e.g. from surrogateescape-decoded command output) are not UTF-8.
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _clean_key(key: object, where: str) -> str:
    if isinstance(key, str):
        return _clean_text(key)
    if key is None or isinstance(key, (bool, int, float)):
        return json.dumps(key)  # what json would have made of it
    raise EvidenceError(f"evidence {where}: a key of type {type(key).__name__} cannot be recorded")


def scrub(value: Any, where: str = "body", depth: int = 0) -> Any:
    """Turn a body into plain JSON values with every secret masked.

    Secret objects become the mask and every string (keys too) goes through crashcart.secrets.mask();
    dates, paths, enums, dataclasses and pydantic models become their JSON forms.
    """
    if depth > 64:
        raise EvidenceError(f"evidence {where} is nested too deeply")
    if isinstance(value, Secret):
        return MASK
    if isinstance(value, Enum):
        return scrub(value.value, where, depth + 1)
    if isinstance(value, str):
        return _clean_text(value)
    if value is None or type(value) is bool:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise EvidenceError(f"evidence {where}: {value!r} is not a JSON number")
        return float(value)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            key = _clean_key(k, where)
            if key in out:
                raise EvidenceError(f"evidence {where}: two keys are the same after masking")
            out[key] = scrub(v, f"{where}.{key}", depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [scrub(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, (set, frozenset)):
        items = [scrub(v, f"{where}[]", depth + 1) for v in value]
        return sorted(items, key=canonical_json)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, PurePath):
        return _clean_text(str(value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # Not dataclasses.asdict: it deep-copies, and a Secret refuses to be copied.
        return scrub({f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, where, depth + 1)
    if hasattr(value, "model_dump"):
        return scrub(value.model_dump(), where, depth + 1)
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise EvidenceError(f"evidence {where}: bytes cannot be recorded; record their digest or decoded text")
    raise EvidenceError(f"evidence {where}: a {type(value).__name__} cannot be recorded as JSON")


def _acquire_lock(path: Path, timeout: float) -> int:
    """Open `path` and take an exclusive flock on it, waiting at most `timeout` seconds; returns the fd."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise EvidenceError(f"{path.parent}: cannot open the evidence ledger lock ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        pass
    except OSError as e:
        os.close(fd)
        raise EvidenceError(f"{path.parent}: cannot lock the evidence ledger ({e.strerror})") from None
    # Wait in the kernel's queue: polling with LOCK_NB lets a busy writer starve the others. The wait
    # runs in a helper thread so that it can time out; an abandoned wait releases the lock once it gets it.
    state: dict[str, object] = {}
    guard = threading.Lock()
    acquired = threading.Event()

    def wait() -> None:
        error = None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            error = e
        with guard:
            if state.get("abandoned"):
                os.close(fd)
                return
            state["done"], state["error"] = True, error
        acquired.set()

    threading.Thread(target=wait, name="evidence-lock-wait", daemon=True).start()
    acquired.wait(timeout)
    with guard:
        if not state.get("done"):
            state["abandoned"] = True
            raise EvidenceError(f"{path.parent}: another process held the evidence ledger lock for over {timeout:g}s")
    if state["error"] is not None:
        os.close(fd)
        raise EvidenceError(f"{path.parent}: cannot lock the evidence ledger ({state['error'].strerror})")
    return fd


# -- the ledger ----------------------------------------------------------------------------------


@dataclass
class _Head:
    seq: int
    hash: str
    ts: str
    kind: str
    raw: bytes


@dataclass
class _ChainState:
    """What checkpoints need, kept current in memory: the Merkle frontier and the last checkpoint."""

    frontier: Frontier
    head_hash: str
    last_cp_seq: int | None
    last_cp_hash: str | None
    since_cp: int  # records after the last checkpoint
    file: str | None  # where the last record read ends, to catch up from there
    ino: int
    offset: int

    def add(self, raw: bytes, digest: str, seq: int, kind: str) -> None:
        self.frontier.append(sha256(LEAF_PREFIX + raw).digest())
        self.head_hash = digest
        if kind == KIND_CHECKPOINT:
            self.last_cp_seq, self.last_cp_hash, self.since_cp = seq, digest, 0
        else:
            self.since_cp += 1


class _Diverged(Exception):
    """The cached chain state no longer continues into the files (rebuild it)."""


def find_prune_anchor(directory: Path, names: list[str], first_seq: int) -> dict | None:
    """The body of the "pruned" record that anchors a chain whose files start at `first_seq`."""
    needle = b'"kind":"' + KIND_PRUNED.encode() + b'"'
    for name in names:
        for _, raw in iter_lines(directory / name):
            if needle not in raw:
                continue
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            body = obj.get("body") if isinstance(obj, dict) else None
            if obj.get("kind") == KIND_PRUNED and isinstance(body, dict) and body.get("last_seq_pruned") == first_seq - 1:
                return body
    return None


def _years_before(day: date, years: int) -> date:
    try:
        return day.replace(year=day.year - years)
    except ValueError:  # 29 February
        return day.replace(year=day.year - years, day=28)


def _month_end(name: str) -> date:
    """The first day after the month of a ledger file."""
    year, month = int(name[9:13]), int(name[14:16])
    return date(year + month // 12, month % 12 + 1, 1)


class Ledger:
    """The evidence ledger in one directory; safe to append to from many processes at once.

    Args:
        directory: the ledger folder (created 0700 on first append).
        signer: signs checkpoints (normally Vault transit).
        fallback_signer: signs when `signer` raises IntegrationError (normally the local Ed25519 key).
        checkpoint_every: append a signed checkpoint after this many records.
        clock: returns the current time (aware datetime); for tests.
        lock_timeout: seconds to wait for another process's append before giving up.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        signer: Signer,
        fallback_signer: Signer | None = None,
        checkpoint_every: int = 1000,
        clock: Callable[[], datetime] | None = None,
        lock_timeout: float = 30.0,
    ) -> None:
        if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise EvidenceError(f"checkpoint_every must be a positive integer, not {checkpoint_every!r}")
        self.directory = Path(directory)
        self.signer = signer
        self.fallback_signer = fallback_signer
        self.checkpoint_every = checkpoint_every
        self.clock = clock or (lambda: datetime.now(timezone.utc))
        self.lock_timeout = lock_timeout
        self._mutex = threading.Lock()  # flock keeps other processes out; this, other threads sharing our caches
        self._head_cache: tuple[tuple, _Head] | None = None
        self._state: _ChainState | None = None

    @classmethod
    def from_settings(
        cls, settings: EvidenceSettings, signer: Signer | None = None, clock: Callable[[], datetime] | None = None
    ) -> "Ledger":
        """The ledger the settings describe; the local key is the fallback (or the only signer)."""
        local = LocalEd25519Signer(settings.local_signing_key)
        return cls(
            settings.dir,
            signer=signer or local,
            fallback_signer=local if signer is not None else None,
            checkpoint_every=settings.checkpoint_every,
            clock=clock,
        )

    # -- public --------------------------------------------------------------------------------

    def append(self, kind: str, body: Mapping[str, Any], run: str | None = None) -> Record:
        """Append one record and make it durable before returning it.

        Raises EvidenceError when the record cannot be written (the caller must not go on with the step
        it describes).
        """
        if not isinstance(kind, str) or not KIND_RE.match(kind):
            raise EvidenceError(f"evidence kind {kind!r} must be lower-case letters, digits, '_', '.' or '-'")
        if kind in RESERVED_KINDS:
            raise EvidenceError(f"evidence kind {kind!r} is written by the ledger itself")
        if run is not None and not isinstance(run, str):
            raise EvidenceError("evidence run id must be a string or None")
        if not isinstance(body, Mapping):
            raise EvidenceError(f"evidence body must be a mapping, not {type(body).__name__}")
        clean_body = scrub(body)
        clean_run = _clean_text(run) if run is not None else None
        with self._locked():
            self._recover_torn_tail()
            record = self._write(kind, clean_body, clean_run)
            self._auto_checkpoint()
        return record

    def checkpoint(self) -> Record:
        """Append a signed checkpoint over every record so far, or return the last one if nothing followed it."""
        with self._locked():
            self._recover_torn_tail()
            return self._checkpoint()

    def head(self) -> Record | None:
        """The last complete record, or None for an empty ledger."""
        if not self.directory.is_dir():
            return None
        with self._locked():
            head = self._read_head()
        return Record.from_raw(head.raw) if head else None

    def prune(self, before: date, now: datetime | None = None) -> Record | None:
        """Move monthly files that end before `before` to archive/ and record that; None when none qualify.

        Refuses (EvidenceError) a `before` later than six years ago: HIPAA 45 CFR 164.316(b)(2)(i).
        The "pruned" record keeps the last pruned seq and hash and the Merkle frontier there, so the
        chain and later checkpoints still verify without the archived files.
        """
        today = format_ts(now or self.clock())[:10]
        limit = _years_before(date.fromisoformat(today), RETENTION_YEARS)
        if before > limit:
            raise EvidenceError(
                f"refusing to prune evidence before {before.isoformat()}: records must be kept six years "
                f"(45 CFR 164.316(b)(2)(i)); the latest allowed date today is {limit.isoformat()}"
            )
        with self._locked():
            self._recover_torn_tail()
            names = ledger_files(self.directory)
            old = [n for n in names if _month_end(n) <= before]
            if not old:
                return None
            state = self._scan(names[: len(old)], names)
            body = {
                "files": old,
                "last_seq_pruned": state.frontier.count - 1,
                "last_hash_pruned": state.head_hash,
                "frontier": state.frontier.to_hex(),
                "prev_checkpoint_seq": state.last_cp_seq,
                "prev_checkpoint_hash": state.last_cp_hash,
            }
            # Record first: a crash before the moves leaves a record whose files are still here,
            # which verify accepts; the reverse would leave a hole with no explanation.
            record = self._write(KIND_PRUNED, body, None)
            archive = self.directory / ARCHIVE_DIR
            try:
                _make_private_dir(archive)
                for name in old:
                    if (archive / name).exists():
                        raise EvidenceError(f"{archive / name}: already exists; not overwriting archived evidence")
                    os.rename(self.directory / name, archive / name)
                _fsync_dir(archive)
                _fsync_dir(self.directory)
            except OSError as e:
                raise EvidenceError(f"{archive}: cannot move pruned evidence files ({e.strerror})") from None
            self._state = None  # its file positions may name moved files
            self._auto_checkpoint()
            return record

    # -- locking -------------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._mutex:
            _make_private_dir(self.directory)
            fd = _acquire_lock(self.directory / LOCK_NAME, self.lock_timeout)
            try:
                yield
            finally:
                try:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                finally:
                    os.close(fd)

    # -- reading the head and the chain state (lock held) --------------------------------------

    def _read_head(self) -> _Head | None:
        for name in reversed(ledger_files(self.directory)):
            path = self.directory / name
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise EvidenceError(f"{path}: cannot open ({e.strerror})") from None
            try:
                st = os.fstat(fd)
                key = (name, st.st_dev, st.st_ino, st.st_size)
                if self._head_cache and self._head_cache[0] == key:
                    return self._head_cache[1]
                found = _last_line(fd, st.st_size)
            finally:
                os.close(fd)
            if found is None:
                continue  # empty (e.g. created just before a crash); the head is in an older file
            rec = Record.from_raw(found[0], f"{name}: the last record")
            head = _Head(rec.seq, rec.hash, rec.ts, rec.kind, rec.raw)
            self._head_cache = (key, head)
            return head
        return None

    def _sync_state(self, head: _Head | None) -> _ChainState:
        """The chain state up to `head`: cached, caught up from where it stopped, or rebuilt by a scan."""
        want_count = head.seq + 1 if head else 0
        want_hash = head.hash if head else GENESIS
        st = self._state
        if st is not None and (st.frontier.count, st.head_hash) != (want_count, want_hash):
            try:
                self._catch_up(st)
            except _Diverged:
                st = None
        if st is None:
            names = ledger_files(self.directory)
            st = self._scan(names, names)
        if (st.frontier.count, st.head_hash) != (want_count, want_hash):
            self._state = None
            raise EvidenceError(
                f"{self.directory}: the evidence chain does not lead to its last record (seq {want_count - 1}); "
                "run `crashcart evidence verify`"
            )
        self._state = st
        return st

    def _catch_up(self, st: _ChainState) -> None:
        """Read records other processes appended since `st` was current."""
        names = ledger_files(self.directory)
        if st.file is None or st.file not in names:
            raise _Diverged
        for name in names[names.index(st.file) :]:
            path = self.directory / name
            ino = os.stat(path).st_ino
            offset = 0
            if name == st.file:
                if ino != st.ino:
                    raise _Diverged
                offset = st.offset
            for pos, raw in iter_lines(path, offset):
                try:
                    obj = json.loads(raw)
                    seq, prev, kind = obj["seq"], obj["prev"], obj["kind"]
                except (ValueError, KeyError, TypeError):
                    raise _Diverged from None
                if seq != st.frontier.count or prev != st.head_hash:
                    raise _Diverged
                st.add(raw, sha256(raw).hexdigest(), seq, kind)
                st.file, st.ino, st.offset = name, ino, pos + len(raw) + 1

    def _scan(self, names: list[str], all_names: list[str]) -> _ChainState:
        """Build the chain state from scratch over the live files `names` (a prefix of `all_names`)."""
        st: _ChainState | None = None
        for name in names:
            path = self.directory / name
            ino = os.stat(path).st_ino
            for pos, raw in iter_lines(path):
                try:
                    obj = json.loads(raw)
                    seq, kind = obj["seq"], obj["kind"]
                except (ValueError, KeyError, TypeError):
                    raise EvidenceError(f"{path}: a record at offset {pos} is not valid; run `crashcart evidence verify`") from None
                if st is None:
                    st = self._start_state(seq, all_names)
                st.add(raw, sha256(raw).hexdigest(), seq, kind)
                st.file, st.ino, st.offset = name, ino, pos + len(raw) + 1
        return st or _ChainState(Frontier(), GENESIS, None, None, 0, None, 0, 0)

    def _start_state(self, first_seq: int, names: list[str]) -> _ChainState:
        if first_seq == 0:
            return _ChainState(Frontier(), GENESIS, None, None, 0, None, 0, 0)
        anchor = find_prune_anchor(self.directory, names, first_seq)
        if anchor is None:
            raise EvidenceError(
                f"{self.directory}: the ledger starts at seq {first_seq} and no pruned record explains "
                f"records 0..{first_seq - 1}; run `crashcart evidence verify`"
            )
        try:
            frontier = Frontier.from_hex(first_seq, anchor["frontier"])
            return _ChainState(
                frontier, str(anchor["last_hash_pruned"]), anchor["prev_checkpoint_seq"],
                anchor["prev_checkpoint_hash"], 0, None, 0, 0,
            )
        except (ValueError, TypeError, KeyError):
            raise EvidenceError(f"{self.directory}: the pruned record anchoring seq {first_seq} is malformed") from None

    # -- writing (lock held) -------------------------------------------------------------------

    def _recover_torn_tail(self) -> None:
        """Move a partial last line (a crash mid-append) to torn/ and record that, before anything else."""
        for name in reversed(ledger_files(self.directory)):
            path = self.directory / name
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as e:
                raise EvidenceError(f"{path}: cannot open ({e.strerror})") from None
            try:
                size = os.fstat(fd).st_size
                if size == 0:
                    continue
                if os.pread(fd, 1, size - 1) == b"\n":
                    return
                found = _last_line(fd, size)
                cut = found[2] if found else 0
                fragment = os.pread(fd, size - cut, cut)
                saved = self._save_fragment(name, cut, fragment)
                os.ftruncate(fd, cut)
                os.fsync(fd)
            except OSError as e:
                raise EvidenceError(f"{path}: cannot recover the torn last record ({e.strerror})") from None
            finally:
                os.close(fd)
            self._head_cache = None
            body = {
                "file": name,
                "offset": cut,
                "length": len(fragment),
                "sha256": sha256(fragment).hexdigest(),
                "saved_as": saved,
            }
            log.warning("evidence ledger: moved a %d-byte torn record from %s offset %d to %s", len(fragment), name, cut, saved)
            self._write(KIND_TORN, body, None)
            return

    def _save_fragment(self, name: str, offset: int, fragment: bytes) -> str:
        folder = self.directory / TORN_DIR
        _make_private_dir(folder)
        for n in range(1000):
            rel = f"{TORN_DIR}/{name}.{offset}.torn" + (f".{n}" if n else "")
            path = self.directory / rel
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                if path.read_bytes() == fragment:
                    return rel  # an earlier recovery saved it and then died before truncating
                continue
            try:
                os.write(fd, fragment)
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_dir(folder)
            return rel
        raise EvidenceError(f"{folder}: too many torn fragments at {name} offset {offset}")

    def _now(self, head: _Head | None) -> str:
        ts = format_ts(self.clock())
        # Time in the ledger never runs backwards (a stepped clock would otherwise put a record in an
        # older month's file than its predecessor).
        return max(ts, head.ts) if head else ts

    def _serialise(self, seq: int, prev: str, ts: str, kind: str, run: str | None, body: dict) -> bytes:
        obj = {"seq": seq, "prev": prev, "ts": ts, "kind": kind, "run": run, "body": body}
        try:
            text = ENCODER.encode(obj)
        except (TypeError, ValueError) as e:
            raise EvidenceError(f"evidence record {seq} cannot be serialised ({e})") from None
        masked = mask(text)
        if masked != text:
            # Defence in depth. Caller text was masked already, so a hit here is either a secret that
            # only appears once serialised (kept masked) or a coincidental match in text the ledger
            # generated (hashes, timestamps): masking that would break the chain, so it is left.
            try:
                again = json.loads(masked)
            except ValueError:
                again = None
            if (
                type(again) is dict
                and kind not in RESERVED_KINDS
                and again.keys() == obj.keys()
                and all(again[k] == obj[k] for k in ("seq", "prev", "ts", "kind"))
                and type(again["body"]) is dict
            ):
                text = ENCODER.encode(again)
        return text.encode("utf-8")

    def _write(self, kind: str, body: dict, run: str | None) -> Record:
        head = self._read_head()
        state = self._sync_state(head)
        seq = head.seq + 1 if head else 0
        prev = head.hash if head else GENESIS
        ts = self._now(head)
        raw = self._serialise(seq, prev, ts, kind, run, body)
        digest = sha256(raw).hexdigest()
        name = file_name(ts[:7])
        path = self.directory / name
        created = not path.exists()
        size = None
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise EvidenceError(f"{path}: cannot open for append ({e.strerror})") from None
        try:
            if created:
                os.fchmod(fd, 0o600)
            size = os.fstat(fd).st_size
            # One write of the whole line: with O_APPEND and the lock, nothing can land inside it.
            written = os.write(fd, raw + b"\n")
            if written != len(raw) + 1:
                raise OSError(errno.EIO, f"short write ({written} of {len(raw) + 1} bytes)")
            os.fsync(fd)
            st = os.fstat(fd)
        except OSError as e:
            if size is not None:
                try:  # leave no partial line behind; the recovery path would otherwise meet it next time
                    os.ftruncate(fd, size)
                except OSError:
                    pass
            raise EvidenceError(f"{path}: cannot append evidence record {seq} ({e.strerror})") from None
        finally:
            os.close(fd)
        try:
            # This also makes a newly created monthly file's directory entry durable.
            self._write_head_file(seq, digest)
        except OSError as e:
            raise EvidenceError(f"{self.directory}: record {seq} is written but HEAD could not be updated ({e.strerror})") from None
        self._head_cache = ((name, st.st_dev, st.st_ino, st.st_size), _Head(seq, digest, ts, kind, raw))
        state.add(raw, digest, seq, kind)
        state.file, state.ino, state.offset = name, st.st_ino, st.st_size
        return Record.from_raw(raw)  # exactly what was written, after masking

    def _write_head_file(self, seq: int, digest: str) -> None:
        tmp = self.directory / ".HEAD.tmp"  # one name is enough: only the lock holder writes it
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, (canonical_json({"hash": digest, "seq": seq}) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.directory / HEAD_NAME)
        _fsync_dir(self.directory)

    # -- checkpoints (lock held) ---------------------------------------------------------------

    def _auto_checkpoint(self) -> None:
        st = self._state
        if st is None or st.since_cp < self.checkpoint_every:
            return
        try:
            self._checkpoint()
        except CrashcartError as e:
            # The record the caller asked for is already durable; failing its append would tell the
            # caller it was not. The checkpoint is retried on the next append and by checkpoint().
            log.error("evidence ledger: automatic checkpoint failed, will retry on the next append: %s", mask(str(e)))

    def _checkpoint(self) -> Record:
        head = self._read_head()
        st = self._sync_state(head)
        if head is not None and head.kind == KIND_CHECKPOINT:
            return Record.from_raw(head.raw)
        count = st.frontier.count
        root = st.frontier.root().hex()
        payload = checkpoint_payload(count, root, st.head_hash, st.last_cp_hash)
        signer, signature = self._sign(payload)
        body = {
            "count": count,
            "root": root,
            "head": st.head_hash,
            "prev_checkpoint_seq": st.last_cp_seq,
            "prev_checkpoint_hash": st.last_cp_hash,
            "signer": signer.kind,
            "key_id": signer.key_id,
            "signature": signature,
        }
        return self._write(KIND_CHECKPOINT, body, None)

    def _sign(self, payload: bytes) -> tuple[Signer, str]:
        try:
            return self.signer, self._signed_by(self.signer, payload)
        except IntegrationError as e:
            if self.fallback_signer is None:
                raise EvidenceError(f"cannot sign the evidence checkpoint: {mask(str(e))}") from None
            log.warning("evidence checkpoint: %s signer failed (%s); signing with %s",
                        self.signer.kind, mask(str(e)), self.fallback_signer.kind)
            try:
                return self.fallback_signer, self._signed_by(self.fallback_signer, payload)
            except IntegrationError as e2:
                raise EvidenceError(f"cannot sign the evidence checkpoint with either signer: {mask(str(e2))}") from None

    @staticmethod
    def _signed_by(signer: Signer, payload: bytes) -> str:
        if signer.kind not in SIGNER_KINDS:
            raise EvidenceError(f"signer kind {signer.kind!r} is not one of {', '.join(SIGNER_KINDS)}")
        signature = signer.sign(payload)
        if decode_signature(signature) is None:
            raise EvidenceError(f"signer {signer.key_id!r} returned something other than a base64 Ed25519 signature")
        return signature


def prune(
    directory: str | os.PathLike[str],
    before: date,
    now: datetime | None = None,
    *,
    signer: Signer,
    fallback_signer: Signer | None = None,
) -> Record | None:
    """Archive monthly files older than `before` (at least six years ago); see Ledger.prune."""
    return Ledger(directory, signer=signer, fallback_signer=fallback_signer).prune(before, now)
