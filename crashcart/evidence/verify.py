"""Verify the evidence ledger end to end: chain, files, checkpoints, signatures, HEAD and torn tails."""

from __future__ import annotations

import itertools
import json
import json.decoder
import json.encoder
import multiprocessing
import os
import threading
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from hashlib import sha256
from pathlib import Path
from typing import Iterator

from crashcart.evidence.ledger import (
    ARCHIVE_DIR,
    CHECKPOINT_KEYS,
    ENCODER,
    GENESIS,
    HEAD_NAME,
    KIND_CHECKPOINT,
    KIND_PRUNED,
    KIND_TORN,
    PRUNED_KEYS,
    RECORD_KEYS,
    TORN_DIR,
    TS_RE,
    checkpoint_payload,
    find_prune_anchor,
    file_month,
    format_ts,
    iter_lines,
    ledger_files,
)
from crashcart.evidence.merkle import LEAF_PREFIX, NODE_PREFIX, Frontier
from crashcart.evidence.signing import TrustedKeys, decode_signature


# The C scanner and encoder called directly: json.loads/JSONEncoder.encode add microseconds of Python
# around them per call, which is most of the budget at 100,000 records a second. The encoder has the
# ledger's canonical options (sorted keys, compact separators, UTF-8 kept, no NaN).
_scan = json.decoder.JSONDecoder().scan_once
_encode_chunks = json.encoder.c_make_encoder(
    None, None, json.encoder.c_encode_basestring, None, ":", ",", True, False, False
) if json.encoder.c_make_encoder is not None else None


def _canonical_text(obj: object) -> str:
    if _encode_chunks is None:  # a Python without the C accelerator
        return ENCODER.encode(obj)
    return "".join(_encode_chunks(obj, 0))


class Status(str, Enum):
    """The closed set of verification outcomes."""

    INTACT = "INTACT"
    TAMPERED = "TAMPERED"
    TRUNCATED = "TRUNCATED"
    TORN_TAIL = "TORN_TAIL"
    BAD_SIGNATURE = "BAD_SIGNATURE"
    UNKNOWN_KEY = "UNKNOWN_KEY"
    BROKEN_CHECKPOINT = "BROKEN_CHECKPOINT"
    MISSING_FILE = "MISSING_FILE"


# Exit codes for `crashcart evidence verify`: distinct per status, clear of the error codes in errors.py.
EXIT_CODES: dict[Status, int] = {
    Status.INTACT: 0,
    Status.TORN_TAIL: 20,
    Status.TRUNCATED: 21,
    Status.TAMPERED: 22,
    Status.BAD_SIGNATURE: 23,
    Status.UNKNOWN_KEY: 24,
    Status.BROKEN_CHECKPOINT: 25,
    Status.MISSING_FILE: 26,
}


@dataclass
class VerifyReport:
    """What verify found.

    `seq` is the earliest record the problem can be pinned to: the altered record, the first record of
    the range a failed checkpoint or HEAD covers (`range`, inclusive), or for TRUNCATED and TORN_TAIL
    the last good record. `records` and `checkpoints` count what was verified before any problem;
    `since_records` counts records from `since` on (the chain itself is always verified from seq 0).
    """

    ok: bool
    status: Status
    seq: int | None
    message: str
    records: int
    checkpoints: int
    warnings: list[str] = field(default_factory=list)
    range: tuple[int, int] | None = None
    first_seq: int | None = None
    last_seq: int | None = None
    since_records: int | None = None

    @property
    def exit_code(self) -> int:
        """The CLI exit code for this status."""
        return EXIT_CODES[self.status]


class _Problem(Exception):
    def __init__(self, status: Status, seq: int | None, message: str, range_: tuple[int, int] | None = None) -> None:
        super().__init__(message)
        self.status, self.seq, self.message, self.range = status, seq, message, range_


def verify(
    directory: str | os.PathLike[str],
    trusted_keys: TrustedKeys | str | os.PathLike[str],
    since: datetime | None = None,
    *,
    check_head: bool = True,
    workers: int | None = None,
) -> VerifyReport:
    """Verify the ledger in `directory` against the pinned `trusted_keys` (a TrustedKeys or its file).

    The whole chain is checked from seq 0 (or from the prune anchor when older files were archived
    away) whatever `since` says: `since` only narrows what the report counts and lists, because a
    record can only be trusted if everything before it is. `check_head=False` skips the comparison with
    the HEAD file (for copies of a ledger taken without it). `workers` is how many processes parse
    and hash lines (None: one per CPU for ledgers over 32 MB, else in this process).

    Verify does not take the ledger lock (a long verify must not hold up containment): it reads HEAD,
    then the files up to the sizes they had just after, so appends made meanwhile are left out.
    """
    keys = trusted_keys if isinstance(trusted_keys, TrustedKeys) else TrustedKeys.load(trusted_keys)
    return _Verifier(Path(directory), keys, since, check_head, workers).run()


# -- the per-line work, done in chunks (in this process or in workers) ---------------------------

PARALLEL_MIN_BYTES = 32 << 20
CHUNK_BYTES = 8 << 20
# Problems with a chunk's first line that come before checking its links to the previous chunk.
_STOP_CODES = frozenset({"json", "record", "canonical", "changed", "unreadable", "newline"})


@dataclass
class _Chunk:
    """What one chunk of a file showed; `ok` records passed every check that needs no outside state.

    Checks that need the previous chunk (the first record's seq, prev and time order) and the ones
    that need the whole chain (Merkle frontier, checkpoints, prunes) are left to the caller, which
    gets the leaf hashes, the first record's links and the special records for that.
    """

    ok: int
    first_seq: object = None
    first_prev: object = None
    first_ts: object = None
    last_hash: str = ""
    last_ts: str = ""
    leaves: bytes = b""
    specials: list = field(default_factory=list)  # (index, seq, kind, ts, prev, digest, body)
    hash_at_head: str | None = None
    since_records: int = 0
    problem: tuple | None = None  # (index, code, detail)
    torn: tuple[int, int] | None = None  # (offset, length) of a partial last line


def _scan_chunk(path: str, start: int, end: int, month: str, may_tear: bool, head_seq: int, since_ts: str | None) -> _Chunk:
    """Check the complete lines in bytes [start, end) of one ledger file."""
    out = _Chunk(ok=0)
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
    except OSError as e:
        out.problem = (0, "unreadable", e.strerror)
        return out
    if len(data) != end - start:
        out.problem = (0, "changed", None)
        return out
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the chunk ends with a newline
    scan, encode, ts_ok, keys = _scan, _canonical_text, TS_RE.match, RECORD_KEYS
    leaves: list[bytes] = []
    specials = out.specials
    last_hash = last_ts = ""
    first_seq = 0
    since_records = 0
    i = -1
    problem = None
    for i, raw in enumerate(lines):
        try:
            text = raw.decode("utf-8")
            obj, stop = scan(text, 0)
        except (ValueError, StopIteration, RecursionError):
            problem = (i, "json", None)
            break
        if type(obj) is not dict or obj.keys() != keys:
            problem = (i, "record", None)
            break
        try:
            canonical = stop == len(text) and encode(obj) == text
        except (ValueError, TypeError):
            canonical = False
        if not canonical:
            problem = (i, "canonical", None)
            break
        seq, prev, ts = obj["seq"], obj["prev"], obj["ts"]
        if i == 0:
            out.first_seq, out.first_prev, out.first_ts = seq, prev, ts
            if type(seq) is not int:
                problem = (i, "seq", seq)
                break
            first_seq = seq
        else:
            if seq != first_seq + i or type(seq) is not int:
                problem = (i, "seq", seq)
                break
            if prev != last_hash:
                problem = (i, "prev", None)
                break
        if type(ts) is not str or not ts_ok(ts):
            problem = (i, "ts_format", None)
            break
        if ts[:7] != month:
            problem = (i, "ts_month", ts[:7])
            break
        if ts < last_ts:
            problem = (i, "ts_order", None)
            break
        kind, run, body = obj["kind"], obj["run"], obj["body"]
        if type(kind) is not str or not (run is None or type(run) is str) or type(body) is not dict:
            problem = (i, "types", None)
            break
        digest = sha256(raw).hexdigest()
        leaves.append(sha256(LEAF_PREFIX + raw).digest())
        if kind in _SPECIAL_KINDS:
            specials.append((i, seq, kind, ts, prev, digest, body))
        if seq == head_seq:
            out.hash_at_head = digest
        if since_ts is not None and ts >= since_ts:
            since_records += 1
        last_hash, last_ts = digest, ts
    else:
        if tail:
            if may_tear:
                out.torn = (end - len(tail), len(tail))
            else:
                problem = (len(lines), "newline", None)
    out.ok = len(leaves)
    out.leaves = b"".join(leaves)
    out.last_hash, out.last_ts = last_hash, last_ts
    out.since_records = since_records
    out.problem = problem
    return out


_SPECIAL_KINDS = frozenset({KIND_CHECKPOINT, KIND_PRUNED, KIND_TORN})


def _split(path: Path, size: int, target: int) -> list[tuple[int, int]]:
    """Byte ranges of about `target` bytes covering [0, size), each ending just after a newline."""
    ranges = []
    start = 0
    with open(path, "rb") as f:
        while start < size:
            cut = start + target
            if cut >= size:
                ranges.append((start, size))
                break
            f.seek(cut)
            f.readline()
            cut = min(f.tell(), size)
            ranges.append((start, cut))
            start = cut
    return ranges



class _Verifier:
    def __init__(
        self, directory: Path, keys: TrustedKeys, since: datetime | None, check_head: bool, workers: int | None
    ) -> None:
        self.directory = directory
        self.keys = keys
        self.since_ts = None
        if since is not None:
            self.since_ts = format_ts(since if since.tzinfo else since.replace(tzinfo=timezone.utc))
        self.check_head = check_head
        self.workers = workers
        self.warnings: list[str] = []
        self.frontier = Frontier()
        self.expected = 0
        self.start = 0  # first seq of the verified chain
        self.last_hash = GENESIS
        self.last_ts = ""
        self.last_cp_seq: int | None = None
        self.last_cp_hash: str | None = None
        self.ok_from = 0  # records before this are covered by a checkpoint that verified
        self.records = 0
        self.checkpoints = 0
        self.since_records = 0
        self.snapshots: dict[int, tuple[str, list[str], int | None, str | None]] = {}
        self.torn_records: list[dict] = []
        self.torn: tuple[str, int, int] | None = None  # (file, offset, length) of a partial last line
        self.head_seq: int | None = None
        self.head_hash: str | None = None
        self.hash_at_head: str | None = None

    def run(self) -> VerifyReport:
        try:
            self._run()
        except _Problem as p:
            return self._report(p.status, p.seq, p.message, p.range)
        last = self.expected - 1 if self.records else None
        if self.torn:
            name, offset, length = self.torn
            return self._report(
                Status.TORN_TAIL,
                last,
                f"TORN_TAIL after seq {last}: {name} ends with a {length}-byte partial record at offset {offset} "
                "(a crash mid-append); the next append moves it to torn/",
            )
        if self.records == 0:
            return self._report(Status.INTACT, None, "INTACT: the ledger is empty")
        return self._report(
            Status.INTACT,
            last,
            f"INTACT: {self.records} records (seq {self.start}..{last}), {self.checkpoints} checkpoints",
        )

    def _report(self, status: Status, seq: int | None, message: str, range_=None) -> VerifyReport:
        return VerifyReport(
            ok=status is Status.INTACT,
            status=status,
            seq=seq,
            message=message,
            records=self.records,
            checkpoints=self.checkpoints,
            warnings=self.warnings,
            range=range_,
            first_seq=self.start if self.records else None,
            last_seq=self.expected - 1 if self.records else None,
            since_records=self.since_records if self.since_ts else None,
        )

    # -- the walk ------------------------------------------------------------------------------

    def _run(self) -> None:
        if not self.directory.is_dir():
            raise _Problem(Status.MISSING_FILE, None, f"MISSING_FILE: no evidence ledger at {self.directory}")
        if self.check_head:
            self._read_head()  # before the sizes: every record HEAD names is then inside them
        live = ledger_files(self.directory)
        archived = ledger_files(self.directory, archive=True)
        both = set(live) & set(archived)
        if both:
            raise _Problem(Status.TAMPERED, None, f"TAMPERED: {sorted(both)[0]} is both in the ledger and in archive/")
        sources = []
        for name, path in sorted([(n, self.directory / ARCHIVE_DIR / n) for n in archived] + [(n, self.directory / n) for n in live]):
            try:
                sources.append((name, path, path.stat().st_size))
            except OSError as e:
                raise _Problem(Status.MISSING_FILE, None, f"MISSING_FILE: cannot read {name} ({e.strerror})") from None
        if not sources:
            if self.head_seq is not None:
                raise _Problem(Status.MISSING_FILE, None, f"MISSING_FILE: no ledger files, but HEAD says seq {self.head_seq}")
            return
        self._start_chain([p for _, p, _ in sources], live)
        # Only the newest non-empty live file can end in a torn append.
        live_sizes = {name: size for name, path, size in sources if path.parent == self.directory}
        newest_live = next((n for n in reversed(live) if live_sizes.get(n)), None)
        total = sum(size for _, _, size in sources)
        workers = self.workers
        if workers is None:
            workers = len(os.sched_getaffinity(0)) if total >= PARALLEL_MIN_BYTES else 1
        target = CHUNK_BYTES if workers <= 1 else max(1 << 12, min(CHUNK_BYTES, total // (workers * 4) + 1))
        jobs = []
        for i, (name, path, size) in enumerate(sources):
            may_tear = name == newest_live
            ranges = _split(path, size, target) or [(0, 0)]
            for j, (a, b) in enumerate(ranges):
                last_of_file = j == len(ranges) - 1
                jobs.append((name, j == 0, last_of_file, (str(path), a, b, file_month(name), may_tear and last_of_file)))
        head_seq = self.head_seq if self.head_seq is not None else -1
        line_base = 0
        for (name, file_start, file_end, _), chunk in zip(jobs, self._results(jobs, workers, head_seq)):
            if file_start:
                line_base = 0
            self._apply(name, chunk, line_base, file_start)
            line_base += chunk.ok
            if file_end:
                self.snapshots[self.expected - 1] = (
                    self.last_hash, self.frontier.to_hex(), self.last_cp_seq, self.last_cp_hash,
                )
        self._check_torn_files()
        if self.check_head:
            self._check_head()

    def _results(self, jobs: list, workers: int, head_seq: int) -> Iterator[_Chunk]:
        """The chunks' results in file order, scanned here or by `workers` processes."""
        since_ts = self.since_ts
        if workers <= 1 or len(jobs) < 2:
            for *_, (path, a, b, month, may_tear) in jobs:
                yield _scan_chunk(path, a, b, month, may_tear, head_seq, since_ts)
            return
        # fork is instant, but only safe when this process has no other threads (e.g. inside Prefect).
        method = "fork" if threading.active_count() == 1 else "spawn"
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method))
        try:
            pending: deque = deque()
            todo = iter(jobs)
            for *_, (path, a, b, month, may_tear) in itertools.islice(todo, workers * 2):
                pending.append(pool.submit(_scan_chunk, path, a, b, month, may_tear, head_seq, since_ts))
            while pending:
                chunk = pending.popleft().result()
                # Keep a bounded number in flight: results hold 32 bytes of leaf hash per record.
                for *_, (path, a, b, month, may_tear) in itertools.islice(todo, 1):
                    pending.append(pool.submit(_scan_chunk, path, a, b, month, may_tear, head_seq, since_ts))
                yield chunk
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _apply(self, name: str, chunk: _Chunk, line_base: int, file_start: bool) -> None:
        """Join one chunk onto the chain: its first record's links, then leaves, checkpoints and prunes."""
        problem = chunk.problem
        if problem and problem[0] == 0 and problem[1] in _STOP_CODES:
            raise self._problem(name, problem, line_base)
        if chunk.first_seq is not None:
            seq = chunk.first_seq
            if seq != self.expected or type(seq) is not int:
                self._wrong_seq(name, line_base + 1, seq)
            if chunk.first_prev != self.last_hash:
                raise self._prev_problem(seq)
            if problem and problem[0] == 0:
                raise self._problem(name, problem, line_base)
            if chunk.first_ts < self.last_ts:
                raise self._tampered(seq, f"record {seq} is dated before record {seq - 1}")
        frontier = self.frontier
        nodes = frontier.nodes
        count = frontier.count
        leaves = chunk.leaves
        specials = chunk.specials
        k = 0
        next_special = specials[0][0] if specials else -1
        for i in range(chunk.ok):
            if i == next_special:
                _, seq, kind, ts, prev, digest, body = specials[k]
                frontier.count = count
                self.last_hash = prev
                if kind == KIND_CHECKPOINT:
                    self._check_checkpoint(seq, body)
                elif kind == KIND_PRUNED:
                    self._check_pruned(seq, body)
                else:
                    self._note_torn(seq, ts, body)
                if kind == KIND_CHECKPOINT:
                    self.last_cp_seq, self.last_cp_hash, self.ok_from = seq, digest, seq
                    self.checkpoints += 1
                k += 1
                next_special = specials[k][0] if k < len(specials) else -1
            # RFC 6962 frontier append, inlined (see merkle.Frontier.append).
            nodes.append(leaves[32 * i : 32 * i + 32])
            c = count
            while c & 1:
                right = nodes.pop()
                nodes[-1] = sha256(NODE_PREFIX + nodes[-1] + right).digest()
                c >>= 1
            count += 1
            self.records += 1
        frontier.count = count
        if chunk.ok:
            self.expected += chunk.ok
            self.last_hash, self.last_ts = chunk.last_hash, chunk.last_ts
        if chunk.hash_at_head is not None:
            self.hash_at_head = chunk.hash_at_head
        self.since_records += chunk.since_records
        if problem:
            raise self._problem(name, problem, line_base)
        if chunk.torn:
            self.torn = (name, *chunk.torn)

    def _problem(self, name: str, problem: tuple, line_base: int) -> _Problem:
        index, code, detail = problem
        seq = self.expected  # the records before the problem have been joined already
        lineno = line_base + index + 1
        if code == "json":
            return self._tampered(seq, f"{name} line {lineno} is not valid JSON")
        if code == "record":
            return self._tampered(seq, f"{name} line {lineno} is not a ledger record")
        if code == "canonical":
            return self._tampered(seq, f"{name} line {lineno} is not in canonical JSON form")
        if code == "newline":
            return self._tampered(seq, f"{name} does not end with a newline (line {lineno} is cut short)")
        if code == "changed":
            return self._tampered(seq, f"{name} shrank while it was being verified")
        if code == "unreadable":
            return _Problem(Status.MISSING_FILE, seq, f"MISSING_FILE at seq {seq}: cannot read {name} ({detail})", (seq, seq))
        if code == "seq":
            self._wrong_seq(name, lineno, detail)
        if code == "prev":
            return self._prev_problem(seq)
        if code == "ts_format":
            return self._tampered(seq, f"record {seq} has a malformed timestamp")
        if code == "ts_month":
            return self._tampered(seq, f"record {seq} is dated {detail} but sits in {name}")
        if code == "ts_order":
            return self._tampered(seq, f"record {seq} is dated before record {seq - 1}")
        return self._tampered(seq, f"record {seq} has a field of the wrong type")

    def _prev_problem(self, seq: int) -> _Problem:
        if seq == self.start:
            return self._tampered(seq, f"prev hash of record {seq} is not the start of the chain")
        return _Problem(
            Status.TAMPERED, seq - 1,
            f"TAMPERED at seq {seq - 1}: prev hash of record {seq} does not match record {seq - 1} "
            "(one of the two was altered)",
            (seq - 1, seq),
        )

    def _read_head(self) -> None:
        path = self.directory / HEAD_NAME
        try:
            doc = json.loads(path.read_bytes())
        except FileNotFoundError:
            self.warnings.append("no HEAD file: removal of the newest records cannot be detected")
            return
        except (OSError, ValueError):
            raise _Problem(Status.TAMPERED, None, "TAMPERED: the HEAD file is not valid JSON") from None
        if (
            not isinstance(doc, dict)
            or type(doc.get("seq")) is not int
            or not isinstance(doc.get("hash"), str)
            or doc["seq"] < 0
        ):
            raise _Problem(Status.TAMPERED, None, "TAMPERED: the HEAD file does not hold {seq, hash}")
        self.head_seq, self.head_hash = doc["seq"], doc["hash"]

    def _start_chain(self, paths: list[Path], live: list[str]) -> None:
        first_seq = None
        for path in paths:
            for _, raw in iter_lines(path):
                try:
                    first_seq = json.loads(raw).get("seq")
                except (ValueError, AttributeError):
                    pass
                break
            if first_seq is not None or path.stat().st_size:
                break
        if type(first_seq) is not int or first_seq <= 0:
            return  # a chain from 0, or a first line the walk will report
        anchor = find_prune_anchor(self.directory, live, first_seq)
        if anchor is None:
            raise _Problem(
                Status.MISSING_FILE, 0,
                f"MISSING_FILE at seq 0: the ledger starts at seq {first_seq} and no pruned record accounts "
                f"for records 0..{first_seq - 1}",
                (0, first_seq - 1),
            )
        try:
            self.frontier = Frontier.from_hex(first_seq, anchor["frontier"])
            self.last_hash = str(anchor["last_hash_pruned"])
            self.last_cp_seq = anchor["prev_checkpoint_seq"]
            self.last_cp_hash = anchor["prev_checkpoint_hash"]
        except (KeyError, TypeError, ValueError):
            raise _Problem(Status.TAMPERED, first_seq, f"TAMPERED: the pruned record anchoring seq {first_seq} is malformed") from None
        self.start = self.expected = self.ok_from = first_seq
        self.snapshots[first_seq - 1] = (self.last_hash, self.frontier.to_hex(), self.last_cp_seq, self.last_cp_hash)
        self.warnings.append(
            f"records 0..{first_seq - 1} were pruned (files archived away); the chain is verified from the prune anchor"
        )

    def _tampered(self, seq: int, detail: str) -> _Problem:
        return _Problem(Status.TAMPERED, seq, f"TAMPERED at seq {seq}: {detail}", (seq, seq))

    def _wrong_seq(self, name: str, lineno: int, seq: object) -> None:
        expected = self.expected
        if type(seq) is not int:
            raise self._tampered(expected, f"{name} line {lineno} has no integer seq")
        if seq < expected:
            raise _Problem(
                Status.TAMPERED, seq,
                f"TAMPERED at seq {seq}: {name} line {lineno} holds seq {seq} again where seq {expected} belongs "
                "(a duplicated or reordered record)",
                (seq, expected),
            )
        if lineno == 1:
            raise _Problem(
                Status.MISSING_FILE, expected,
                f"MISSING_FILE at seq {expected}: records {expected}..{seq - 1} are missing before {name} "
                "(a monthly file was removed?)",
                (expected, seq - 1),
            )
        raise _Problem(
            Status.TAMPERED, expected,
            f"TAMPERED at seq {expected}: {name} line {lineno} jumps to seq {seq}; records {expected}..{seq - 1} are "
            "missing or reordered",
            (expected, seq - 1),
        )

    # -- special records -----------------------------------------------------------------------

    def _check_checkpoint(self, seq: int, body: dict) -> None:
        start = self.ok_from
        suspect = (start, seq)

        def broken(detail: str) -> _Problem:
            return _Problem(
                Status.BROKEN_CHECKPOINT, start,
                f"BROKEN_CHECKPOINT at seq {seq}: {detail}; records {start}..{seq} are suspect", suspect,
            )

        if body.keys() != CHECKPOINT_KEYS:
            raise _Problem(Status.BROKEN_CHECKPOINT, seq, f"BROKEN_CHECKPOINT at seq {seq}: the checkpoint body is malformed", (seq, seq))
        count, root, head = body["count"], body["root"], body["head"]
        if type(count) is not int or type(root) is not str or type(head) is not str:
            raise _Problem(Status.BROKEN_CHECKPOINT, seq, f"BROKEN_CHECKPOINT at seq {seq}: the checkpoint body is malformed", (seq, seq))
        if count > seq:
            raise _Problem(
                Status.TRUNCATED, start,
                f"TRUNCATED before seq {seq}: the checkpoint there covers {count} records but only {seq} precede it",
                suspect,
            )
        if count != seq:
            raise broken(f"it covers {count} records but {seq} precede it")
        if head != self.last_hash:
            raise broken(f"its head is not the hash of record {seq - 1}")
        if root != self.frontier.root().hex():
            raise broken(f"its Merkle root does not match records 0..{seq - 1}")
        if body["prev_checkpoint_seq"] != self.last_cp_seq or body["prev_checkpoint_hash"] != self.last_cp_hash:
            raise broken("it does not link to the previous checkpoint")
        key = self.keys.get(body["key_id"]) if isinstance(body["key_id"], str) else None
        if key is None:
            raise _Problem(
                Status.UNKNOWN_KEY, seq, f"UNKNOWN_KEY at seq {seq}: checkpoint signed by key {body['key_id']!r}, which is not pinned",
                (seq, seq),
            )
        if key.kind != body["signer"]:
            raise _Problem(
                Status.UNKNOWN_KEY, seq,
                f"UNKNOWN_KEY at seq {seq}: key {key.key_id!r} is pinned as {key.kind}, the checkpoint says {body['signer']!r}",
                (seq, seq),
            )
        signature = decode_signature(body["signature"])
        payload = checkpoint_payload(count, root, head, body["prev_checkpoint_hash"])
        if signature is None or not key.verifies(payload, signature):
            raise _Problem(
                Status.BAD_SIGNATURE, seq, f"BAD_SIGNATURE at seq {seq}: the checkpoint signature does not verify with key {key.key_id!r}",
                (seq, seq),
            )

    def _check_pruned(self, seq: int, body: dict) -> None:
        if body.keys() != PRUNED_KEYS or type(body["last_seq_pruned"]) is not int:
            raise self._tampered(seq, "the pruned record is malformed")
        last = body["last_seq_pruned"]
        if last < self.start - 1:
            return  # an older prune, of records before the verified part of the chain
        snap = self.snapshots.get(last)
        if snap is None:
            raise self._tampered(seq, f"the pruned record names seq {last}, which does not end a ledger file")
        claimed = (body["last_hash_pruned"], body["frontier"], body["prev_checkpoint_seq"], body["prev_checkpoint_hash"])
        if claimed != snap:
            raise self._tampered(seq, f"the pruned record does not match the chain at seq {last}")
        self.warnings.append(f"records up to seq {last} pruned to archive/ at seq {seq} ({', '.join(map(str, body['files']))})")

    def _note_torn(self, seq: int, ts: str, body: dict) -> None:
        self.torn_records.append(body)
        if self.since_ts is None or ts >= self.since_ts:
            self.warnings.append(
                f"torn tail recovered at seq {seq}: {body.get('length')} bytes at {body.get('file')} offset "
                f"{body.get('offset')} kept in {body.get('saved_as')}"
            )

    def _check_torn_files(self) -> None:
        """Fragments moved to torn/ must match their records, and none may lack one."""
        folder = self.directory / TORN_DIR
        referenced = set()
        for body in self.torn_records:
            rel = body.get("saved_as")
            if not isinstance(rel, str):
                continue
            referenced.add(rel)
            try:
                data = (self.directory / rel).read_bytes()
            except OSError:
                self.warnings.append(f"torn fragment {rel} named by the ledger is missing")
                continue
            if sha256(data).hexdigest() != body.get("sha256"):
                self.warnings.append(f"torn fragment {rel} does not match the sha256 its record gives")
        try:
            present = {f"{TORN_DIR}/{e.name}" for e in os.scandir(folder)}
        except FileNotFoundError:
            return
        for rel in sorted(present - referenced):
            self.warnings.append(f"torn fragment {rel} has no torn_tail_recovered record (a crash during recovery?)")

    def _check_head(self) -> None:
        if self.head_seq is None:
            return
        last = self.expected - 1 if self.records else None
        if last is None or last < self.head_seq:
            raise _Problem(
                Status.TRUNCATED, last,
                f"TRUNCATED after seq {last}: HEAD says the ledger reaches seq {self.head_seq}",
                None if last is None else (last, self.head_seq),
            )
        if self.hash_at_head != self.head_hash:
            start = min(self.ok_from, self.head_seq)
            raise _Problem(
                Status.TAMPERED, start,
                f"TAMPERED at seq {start}: record {self.head_seq} does not have the hash HEAD gives; "
                f"records {start}..{self.head_seq} are suspect",
                (start, self.head_seq),
            )
        if last > self.head_seq + 1:
            self.warnings.append(
                f"{last - self.head_seq} records follow the one HEAD names (seq {self.head_seq}); an append leaves at most one"
            )
