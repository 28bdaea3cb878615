"""Run lists, run stories and the auditor's report, built from the evidence ledger as plain data."""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

from crashcart.errors import EvidenceError, InvalidInput
from crashcart.evidence.ledger import KIND_CHECKPOINT, Record, format_ts, iter_lines, ledger_files
from crashcart.evidence.signing import TrustedKeys
from crashcart.evidence.verify import VerifyReport, verify
from crashcart.hipaa import EXPECTED_CADENCE_DAYS, SPECIFICATIONS

# Final run statuses by what they mean for an auditor (crashcart.evidence.recorder.RUN_STATUSES).
SUCCESS = frozenset({"contained", "released", "succeeded", "passed", "unchanged", "exercised"})
UNSUCCESSFUL = frozenset({"failed", "rolled_back", "rollback_failed", "applied_unverified", "partial", "cancelled",
                          "crashed", "deferred"})
OPEN = "open"  # a run with no run_finished record (yet)

# The specifications the report always shows, with or without runs in the period.
REPORTED_SPECS = ("164.308(a)(6)(ii)", "164.308(a)(7)(ii)(A)", "164.308(a)(7)(ii)(B)", "164.308(a)(7)(ii)(D)",
                  "164.312(a)(2)(iv)", "164.312(e)(2)(ii)", "164.312(b)")
ROTATION_KINDS = ("rotate-luks", "rotate-tls", "rotate-credentials")
CONTAINMENT_KINDS = ("isolate-host", "release-host")
EXERCISE_KIND = "tabletop"
EXERCISE_TRIGGER = "tabletop"  # runs an exercise starts are triggered by "tabletop:<exercise id>"
# Which runs keep a specification's cadence, where not any successful run serving it (hipaa.EXPECTED_CADENCE_DAYS).
CADENCE_KINDS = {"164.308(a)(7)(ii)(D)": ("restore-test",)}
APPROVAL_KIND = "approval"
# A break-glass approval is reviewed by a record of this kind naming it: body {"approval_run": RUN, "reviewer", ...},
# or written inside the approval run itself.
REVIEW_KIND = "approval_review"
# Records too chatty for a timeline: the result says what the intent said, and checkpoints have their own section.
QUIET_KINDS = frozenset({"step_intent", KIND_CHECKPOINT})


def tone(status: str | None) -> str:
    """How a status reads at a glance: ok, bad, warn, open or info (badge colours, gap severities)."""
    if status in SUCCESS or status in ("INTACT", "delivered", "approved", "reviewed"):
        return "ok"
    if status in ("failed", "rolled_back", "rollback_failed", "crashed", "denied", "timed_out") or (
            isinstance(status, str) and status.isupper()):
        return "bad"
    if status == OPEN:
        return "open"
    if status in UNSUCCESSFUL or status in ("break_glass", "pending", "unverified", "inconclusive", "no result"):
        return "warn"
    return "info"


# -- reading -------------------------------------------------------------------------------------------


def read_records(directory: str | os.PathLike[str], unreadable: list[str]) -> Iterator[Record]:
    """Every readable record of the live ledger in order; lines that are not records are named in `unreadable`.

    Unlike iter_records this goes on past a damaged line, so that a report on a tampered ledger still
    shows the rest (and says which lines it could not read). It reads; `verify` judges.
    """
    directory = Path(directory)
    for name in ledger_files(directory):
        for lineno, (_, raw) in enumerate(iter_lines(directory / name), 1):
            try:
                yield Record.from_raw(raw, f"{name} line {lineno}")
            except EvidenceError as e:
                unreadable.append(str(e))


def _dict(value: object) -> dict:
    """`value` if it is a mapping, else {}: an odd record must not stop a report on all the others."""
    return value if isinstance(value, dict) else {}


def _names(hosts: object) -> list[str]:
    if not isinstance(hosts, list):
        return []
    return [str(h.get("name")) if isinstance(h, dict) else str(h) for h in hosts]


def _text(value: object, limit: int = 240) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe(kind: str, body: dict) -> str:
    """One line saying what a record records, in the field's words (for lists and timelines)."""
    b = body
    if kind == "run_started":
        trigger = b.get("trigger") or {}
        text = f"{b.get('run_kind')} on {', '.join(_names(b.get('hosts'))) or '-'} by {trigger.get('kind')}:{trigger.get('who')}"
        if b.get("mode") not in (None, "execute"):
            text += f" ({str(b['mode']).replace('_', ' ')})"
        return text + (f", incident {b['incident']}" if b.get("incident") else "")
    if kind == "step_intent":
        step, plan = b.get("step") or {}, b.get("plan") or {}
        return f"{b.get('host')} {step.get('id')}: about to {plan.get('summary') or step.get('uses')}"
    # Statuses are shown beside this text (record_status), so results say only what happened.
    if kind == "step_result":
        return f"{b.get('host')} {b.get('step')}: {_text(b.get('summary') or '')}"
    if kind == "run_finished":
        return _text(b.get("summary") or "")
    if kind == KIND_CHECKPOINT:
        return f"checkpoint over {b.get('count')} records, signed by {b.get('key_id')}"
    if kind == "custody":
        match = "matches the source" if b.get("match") else "DOES NOT match the source"
        return (f"{b.get('host')}: {b.get('artifact')} ({b.get('bytes')} bytes) sha256 "
                f"{b.get('sha256_destination')} {match}")
    if kind == "notification":
        return f"Slack {b.get('event')} to {b.get('channel') or '-'}: {b.get('status')}" + (
            f" ({_text(b['error'], 120)})" if b.get("error") else "")
    if kind == "approval":
        who = f" by {b['approver']}" if b.get("approver") else ""
        owed = ", review owed" if b.get("review_owed") else ""
        return f"{str(b.get('decision')).replace('_', ' ')}{who} for {', '.join(b.get('hosts') or []) or '-'}{owed}"
    if kind == "approval_requested":
        return f"approval requested for {', '.join(b.get('hosts') or [])} from {', '.join(b.get('approvers') or [])}"
    if kind in ("approval_refused", "slack_refused"):
        return f"{b.get('user')} refused ({b.get('reason')})" + (f": {b['attempted']}" if b.get("attempted") else "")
    if kind == REVIEW_KIND:
        return f"break-glass approval {b.get('approval_run')} reviewed by {b.get('reviewer')}" + (
            f": {_text(b['outcome'], 120)}" if b.get("outcome") else "")
    if kind == "hook_failed":
        return f"hook {b.get('hook')} failed on {b.get('event')}: {_text(b.get('reason') or '', 160)}"
    if kind == "lock_busy":
        return f"{b.get('host')}: {_text(b.get('reason') or '', 160)}"
    if kind == "restore_test":
        return f"{b.get('repository')}: {_text(b.get('summary') or '', 160)}"
    if kind == "torn_tail_recovered":
        return f"torn tail recovered: {b.get('length')} bytes at {b.get('file')} offset {b.get('offset')}"
    if kind == "pruned":
        return f"pruned to archive/: {', '.join(map(str, b.get('files') or []))}"
    return _text(b, 160)


def record_status(kind: str, body: dict) -> str | None:
    """The status a record carries, if any (a step's, a run's, a notification's, an approval's decision)."""
    if kind == "approval":
        return body.get("decision")
    status = body.get("status")
    return status if isinstance(status, str) else None


# -- the data model ------------------------------------------------------------------------------------


@dataclass
class RunSummary:
    """One run as a row: what ran, where, started by whom, and how it ended (`open` while unfinished)."""

    run_id: str
    run_kind: str
    mode: str
    runbook: str | None
    runbook_version: object
    runbook_sha256: str | None
    hipaa: list[str]
    hosts: list[str]
    trigger: str
    incident: str | None
    started: str
    ended: str | None = None
    status: str = OPEN
    summary: str = ""
    duration: float | None = None
    host_status: dict[str, str] = field(default_factory=dict)
    flow_run_id: str | None = None
    first_seq: int = 0
    last_seq: int = 0
    pid: int | None = None
    boot_id: str | None = None
    machine: str | None = None

    @property
    def executed(self) -> bool:
        """Whether the run acted (not a dry run); a tabletop exercise is held even when its runbooks were previewed."""
        return self.mode == "execute" or self.run_kind == EXERCISE_KIND

    @property
    def exercise(self) -> bool:
        """Whether the run is a tabletop exercise or one of the runs it started (a drill, not an incident)."""
        return self.run_kind == EXERCISE_KIND or self.trigger.startswith(f"{EXERCISE_TRIGGER}:")

    @property
    def held(self) -> bool:
        """Whether the run is evidence that the procedure was carried out successfully."""
        return self.executed and self.status in SUCCESS and self.run_kind != APPROVAL_KIND

    def status_of(self, host: str) -> str:
        """The final status on one host (or repository), else the run's."""
        return self.host_status.get(host, self.status)


@dataclass
class TimelineEntry:
    """One record on a timeline."""

    ts: str
    seq: int
    run_id: str | None
    kind: str
    host: str | None
    status: str | None
    text: str


@dataclass
class CheckpointInfo:
    """A signed checkpoint: it covers records 0..count-1."""

    seq: int
    ts: str
    count: int
    signer: str
    key_id: str


@dataclass
class SignerSeen:
    """A key that signed checkpoints, and whether it is pinned in the trusted keys."""

    key_id: str
    signer: str
    checkpoints: int
    first_ts: str
    last_ts: str
    pinned: bool


@dataclass
class Integrity:
    """What verify said about the whole ledger, plus who signed its checkpoints."""

    status: str
    ok: bool
    exit_code: int
    message: str
    records: int
    checkpoints: int
    first_seq: int | None
    last_seq: int | None
    since_records: int | None
    warnings: list[str]
    signers: list[SignerSeen]
    last_checkpoint: CheckpointInfo | None
    unreadable: list[str]


@dataclass
class SpecCoverage:
    """One HIPAA implementation specification: the runs that serve it in the period and whether it is met."""

    id: str
    title: str
    runs: list[RunSummary]
    outcomes: dict[str, int]
    dry_runs: int
    last_held: str | None
    cadence_days: int | None
    status: str  # ok | gap | attention | none
    note: str


@dataclass
class Incident:
    """The runs of one incident id (or of containment runs that named none) and their timeline."""

    incident: str | None
    runs: list[RunSummary]
    hosts: list[str]
    first: str
    last: str
    status: str
    timeline: list[TimelineEntry]


@dataclass
class RestoreFigure:
    """One repository's restore test: RPO and RTO against their targets, and what was proved."""

    run_id: str
    ts: str
    repository: str
    status: str
    snapshot: str | None
    snapshot_time: str | None
    rpo_hours: float | None
    rpo_target_hours: float | None
    rpo_ok: bool | None
    rto_seconds: float | None
    rto_target_minutes: float | None
    rto_ok: bool | None
    throughput_mb_s: float | None
    files_verified: int | None
    files_expected: int | None
    bytes_verified: int | None
    reasons: list[str]


@dataclass
class ApprovalInfo:
    """An approval gate's decision; break glass owes a review."""

    run_id: str
    ts: str
    decision: str
    approver: str | None
    requested_by: str | None
    hosts: list[str]
    incident: str | None
    review_owed: bool
    reviewed_at: str | None = None
    reviewed_by: str | None = None


@dataclass
class Exercise:
    """A tabletop exercise and the runs it started (against staging)."""

    run: RunSummary
    exercise_id: str | None
    responses: list[RunSummary]
    outcomes: dict[str, int]


@dataclass
class Gap:
    """Something an auditor will ask about: a missed cadence, a failure left standing, an owed review, an open run."""

    kind: str  # integrity | cadence | failed | review_owed | open_run
    severity: str  # bad | warn
    message: str
    spec: str | None = None
    run_id: str | None = None


@dataclass
class Report:
    """Everything the auditor's report shows; the templates and the JSON output render this and nothing else."""

    generated_at: str
    since: str | None
    until: str
    directory: str
    integrity: Integrity
    totals: dict[str, int]
    specifications: list[SpecCoverage]
    incidents: list[Incident]
    restore_tests: list[RestoreFigure]
    exercises: list[Exercise]
    rotations: list[RunSummary]
    approvals: list[ApprovalInfo]
    gaps: list[Gap]
    runs: list[RunSummary]

    def as_dict(self) -> dict:
        """Plain JSON values."""
        return dataclasses.asdict(self)


# -- one pass over the ledger ----------------------------------------------------------------------------


@dataclass
class _Run:
    summary: RunSummary
    in_period: bool
    entries: list[TimelineEntry] = field(default_factory=list)
    restore: list[tuple[str, dict]] = field(default_factory=list)
    measures: dict[str, dict] = field(default_factory=dict)  # host -> {step: detail} for rpo/rto
    approvals: list[tuple[str, dict]] = field(default_factory=list)
    exercise_id: str | None = None  # from a tabletop run's tabletop_scenario record


@dataclass
class LedgerIndex:
    """What one pass over the ledger collects: runs (with detail for those started in the period), checkpoints, reviews."""

    runs: dict[str, _Run]
    checkpoints: list[CheckpointInfo]
    reviews: dict[str, tuple[str, dict]]
    unreadable: list[str]
    records: int

    def open_runs(self) -> list[RunSummary]:
        """Runs that have no run_finished record."""
        return [r.summary for r in self.runs.values() if r.summary.status == OPEN]


def index_ledger(directory: str | os.PathLike[str], since_ts: str | None = None, until_ts: str | None = None,
                 detail: bool = True) -> LedgerIndex:
    """Read the ledger once. Runs started in [since, until) keep their timelines when `detail` is set.

    Every run is indexed whatever its date: cadence and "failed without a later success" look before
    the period, and a run's end may be recorded after it.
    """
    unreadable: list[str] = []
    runs: dict[str, _Run] = {}
    checkpoints: list[CheckpointInfo] = []
    reviews: dict[str, tuple[str, dict]] = {}
    count = 0
    for rec in read_records(directory, unreadable):
        count += 1
        body = rec.body
        if rec.kind == KIND_CHECKPOINT:
            checkpoints.append(CheckpointInfo(rec.seq, rec.ts, body.get("count", 0), str(body.get("signer")),
                                              str(body.get("key_id"))))
            continue
        if rec.kind == REVIEW_KIND:
            target = body.get("approval_run") or rec.run
            if isinstance(target, str):
                reviews.setdefault(target, (rec.ts, body))
                reviewed = runs.get(target)
                if detail and reviewed and reviewed.in_period and rec.run != target:
                    # Written after the approval run ended, outside it: still part of that incident's story.
                    reviewed.entries.append(TimelineEntry(rec.ts, rec.seq, target, rec.kind, None, "reviewed",
                                                          describe(rec.kind, body)))
        if rec.kind == "run_started" and rec.run:
            runs[rec.run] = _start(rec, since_ts, until_ts)
        run = runs.get(rec.run) if rec.run else None
        if run is None:
            continue  # not part of a run, or its start was pruned away
        s = run.summary
        s.last_seq = rec.seq
        if rec.kind == "run_finished":
            s.status = str(body.get("status"))
            s.summary = str(body.get("summary") or "")
            s.ended = rec.ts
            s.duration = body.get("duration")
            outcome = _dict(body.get("detail"))
            per_host = outcome.get("hosts") or outcome.get("repositories")
            if isinstance(per_host, dict):
                s.host_status = {str(k): str(v) for k, v in per_host.items()}
        elif rec.kind == "restore_test":
            run.restore.append((rec.ts, body))
        elif rec.kind == "approval":
            run.approvals.append((rec.ts, body))
        elif rec.kind == "tabletop_scenario" and isinstance(body.get("exercise"), str):
            run.exercise_id = body["exercise"]
        elif rec.kind == "step_result" and s.run_kind == "restore-test" and body.get("step") in ("rpo", "rto"):
            run.measures.setdefault(str(body.get("host")), {})[body["step"]] = _dict(body.get("detail"))
        if detail and run.in_period and rec.kind not in QUIET_KINDS:
            if rec.kind == "notification" and body.get("status") == "pending":
                continue  # its delivered or failed record follows
            host = body.get("host") if isinstance(body.get("host"), str) else body.get("repository")
            run.entries.append(TimelineEntry(rec.ts, rec.seq, rec.run, rec.kind, host,
                                             record_status(rec.kind, body), describe(rec.kind, body)))
    return LedgerIndex(runs, checkpoints, reviews, unreadable, count)


def _start(rec: Record, since_ts: str | None, until_ts: str | None) -> _Run:
    b = rec.body
    book, trigger = _dict(b.get("runbook")), _dict(b.get("trigger"))
    summary = RunSummary(
        run_id=rec.run or "", run_kind=str(b.get("run_kind")), mode=str(b.get("mode") or "execute"),
        runbook=book.get("name"), runbook_version=book.get("version"), runbook_sha256=book.get("sha256"),
        hipaa=[str(s) for s in b.get("hipaa") or []], hosts=_names(b.get("hosts")),
        trigger=f"{trigger.get('kind')}:{trigger.get('who')}", incident=b.get("incident"), started=rec.ts,
        flow_run_id=b.get("flow_run_id"), first_seq=rec.seq, last_seq=rec.seq,
        pid=b.get("pid") if isinstance(b.get("pid"), int) else None, boot_id=b.get("boot_id"),
        machine=b.get("machine"),
    )
    in_period = (since_ts is None or rec.ts >= since_ts) and (until_ts is None or rec.ts < until_ts)
    return _Run(summary, in_period)


# -- lists ---------------------------------------------------------------------------------------------


def list_runs(directory: str | os.PathLike[str], since: datetime | None = None,
              until: datetime | None = None) -> tuple[list[RunSummary], list[str]]:
    """Runs started in [since, until), oldest first, and any unreadable lines met."""
    index = index_ledger(directory, _ts(since), _ts(until), detail=False)
    return [r.summary for r in index.runs.values() if r.in_period], index.unreadable


def list_records(directory: str | os.PathLike[str], kind: str, since: datetime | None = None,
                 until: datetime | None = None) -> tuple[list[dict], list[str], set[str]]:
    """Records of one kind in [since, until) as {seq, ts, kind, run, status, text, hash, body}.

    Also returns the unreadable lines met and every kind the ledger holds (to name them when none match).
    """
    since_ts, until_ts = _ts(since), _ts(until)
    unreadable: list[str] = []
    kinds: set[str] = set()
    rows = []
    for rec in read_records(directory, unreadable):
        kinds.add(rec.kind)
        if rec.kind != kind or (since_ts and rec.ts < since_ts) or (until_ts and rec.ts >= until_ts):
            continue
        rows.append({"seq": rec.seq, "ts": rec.ts, "kind": rec.kind, "run": rec.run,
                     "status": record_status(rec.kind, rec.body), "text": describe(rec.kind, rec.body),
                     "hash": rec.hash, "body": rec.body})
    return rows, unreadable, kinds


def _ts(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return format_ts(moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc))


# -- the story of one run ------------------------------------------------------------------------------


@dataclass
class StepStory:
    """A step from intent to result: the plan, the commands run and their exit codes, checks, rollback."""

    host: str | None
    step: str
    uses: str | None
    kind: str | None
    description: str | None
    intent_seq: int | None
    intent_ts: str | None
    plan: str | None
    planned_commands: list[str]
    result_seq: int | None
    result_ts: str | None
    status: str
    summary: str
    duration: float | None
    commands: list[dict]
    verification: list[dict]
    rollback: dict | None
    detail: dict


@dataclass
class RunStory:
    """The whole story of one run, as `crashcart evidence show` tells it."""

    run: RunSummary
    runbook_path: str | None
    params: dict
    trigger: dict
    tool_versions: dict
    steps: list[StepStory]
    custody: list[dict]
    notifications: list[dict]
    approvals: list[dict]
    restore_tests: list[RestoreFigure]
    events: list[TimelineEntry]
    finished: dict | None
    checkpoint: CheckpointInfo | None
    records: int

    def as_dict(self) -> dict:
        """Plain JSON values."""
        return dataclasses.asdict(self)


def _command(c: dict) -> dict:
    # Output text stays in the ledger; its hashes and size say what it was.
    return {k: c.get(k) for k in ("host", "command", "exit_code", "duration", "stdout_bytes", "stdout_sha256",
                                  "stderr_sha256") if k in c}


def run_story(directory: str | os.PathLike[str], ref: str) -> RunStory:
    """The story of the run whose id is `ref` or starts with it (at least 4 characters).

    Raises InvalidInput when no run, or more than one, matches.
    """
    ref = ref.strip().lower()
    if len(ref) < 4:
        raise InvalidInput(f"run id {ref!r} is too short: give at least 4 characters of it")
    unreadable: list[str] = []
    records: dict[str, list[Record]] = {}
    starts: set[str] = set()
    checkpoints: list[CheckpointInfo] = []
    for rec in read_records(directory, unreadable):
        if rec.kind == KIND_CHECKPOINT:
            checkpoints.append(CheckpointInfo(rec.seq, rec.ts, rec.body.get("count", 0), str(rec.body.get("signer")),
                                              str(rec.body.get("key_id"))))
        elif rec.run and rec.run.startswith(ref):
            records.setdefault(rec.run, []).append(rec)
            if rec.kind == "run_started":
                starts.add(rec.run)
        elif rec.kind == REVIEW_KIND and str(rec.body.get("approval_run") or "").startswith(ref):
            records.setdefault(str(rec.body["approval_run"]), []).append(rec)  # reviewed later, outside the run
    if not starts:
        raise InvalidInput(f"no run {ref!r} in the evidence ledger at {directory} (see `crashcart evidence list`)")
    if len(starts) > 1:
        raise InvalidInput(f"run id {ref!r} is ambiguous: it starts {len(starts)} runs ({', '.join(sorted(starts))})")
    run_id = starts.pop()
    recs = records[run_id]
    first = next(r for r in recs if r.kind == "run_started")
    run = _start(first, None, None)
    s = run.summary
    b = first.body
    story = RunStory(run=s, runbook_path=_dict(b.get("runbook")).get("path"), params=_dict(b.get("params")),
                     trigger=_dict(b.get("trigger")), tool_versions=_dict(b.get("tool_versions")), steps=[], custody=[],
                     notifications=[], approvals=[], restore_tests=[], events=[], finished=None, checkpoint=None,
                     records=len(recs))
    by_intent: dict[int, StepStory] = {}
    notifications: dict[str, dict] = {}
    for rec in recs:
        body = rec.body
        if rec.run == run_id:
            s.last_seq = rec.seq
        if rec.kind == "step_intent":
            step, plan = _dict(body.get("step")), _dict(body.get("plan"))
            by_intent[rec.seq] = StepStory(
                host=body.get("host"), step=str(step.get("id")), uses=step.get("uses"), kind=step.get("kind"),
                description=step.get("description"), intent_seq=rec.seq, intent_ts=rec.ts, plan=plan.get("summary"),
                planned_commands=[str(c) for c in plan.get("commands") or []], result_seq=None, result_ts=None,
                status="no result", summary="intent recorded, no result (the run stopped here)", duration=None,
                commands=[], verification=[], rollback=None, detail={})
            story.steps.append(by_intent[rec.seq])
        elif rec.kind == "step_result":
            story_step = by_intent.get(body.get("intent_seq"))
            if story_step is None:
                story_step = StepStory(host=body.get("host"), step=str(body.get("step")), uses=None, kind=None,
                                       description=None, intent_seq=None, intent_ts=None, plan=None, planned_commands=[],
                                       result_seq=None, result_ts=None, status="", summary="", duration=None,
                                       commands=[], verification=[], rollback=None, detail={})
                story.steps.append(story_step)
            rollback = body.get("rollback")
            if isinstance(rollback, dict):
                rollback = {**rollback, "commands": [_command(c) for c in rollback.get("commands") or []]}
            story_step.result_seq, story_step.result_ts = rec.seq, rec.ts
            story_step.status, story_step.summary = str(body.get("status")), str(body.get("summary") or "")
            story_step.duration = body.get("duration")
            story_step.commands = [_command(c) for c in body.get("commands") or [] if isinstance(c, dict)]
            story_step.verification = [{k: v.get(k) for k in ("check", "status", "summary")}
                                       for v in body.get("verification") or [] if isinstance(v, dict)]
            story_step.rollback = rollback
            story_step.detail = _dict(body.get("detail"))
        elif rec.kind == "custody":
            story.custody.append({"seq": rec.seq, "ts": rec.ts, **body})
        elif rec.kind == "notification":
            nid = str(body.get("id") or rec.seq)
            known = notifications.setdefault(nid, {"id": nid, "first_ts": rec.ts, "records": 0})
            known.update({k: v for k, v in body.items() if v is not None})
            known["records"] += 1
            known["ts"] = rec.ts
        elif rec.kind in ("approval", "approval_requested", "approval_refused", REVIEW_KIND):
            story.approvals.append({"seq": rec.seq, "ts": rec.ts, "kind": rec.kind, **body,
                                    "text": describe(rec.kind, body)})
        elif rec.kind == "restore_test":
            story.restore_tests.append(_figure(s.run_id, rec.ts, body))
        elif rec.kind == "run_finished":
            story.finished = {"seq": rec.seq, "ts": rec.ts, **body}
            s.status, s.summary, s.ended, s.duration = (str(body.get("status")), str(body.get("summary") or ""),
                                                        rec.ts, body.get("duration"))
        elif rec.kind != "run_started":
            story.events.append(TimelineEntry(rec.ts, rec.seq, rec.run, rec.kind, body.get("host"),
                                              record_status(rec.kind, body), describe(rec.kind, body)))
    story.notifications = list(notifications.values())
    story.checkpoint = next((c for c in checkpoints if c.count > s.last_seq), None)
    return story


# -- restore figures -----------------------------------------------------------------------------------


def _figure(run_id: str, ts: str, body: dict) -> RestoreFigure:
    rpo, rto, snap = _dict(body.get("rpo")), _dict(body.get("rto")), _dict(body.get("snapshot"))
    return RestoreFigure(
        run_id=run_id, ts=ts, repository=str(body.get("repository")), status=str(body.get("status")),
        snapshot=snap.get("short_id"), snapshot_time=snap.get("time"),
        rpo_hours=rpo.get("age_hours"), rpo_target_hours=rpo.get("target_hours"), rpo_ok=rpo.get("ok"),
        rto_seconds=rto.get("seconds"), rto_target_minutes=rto.get("target_minutes"), rto_ok=rto.get("ok"),
        throughput_mb_s=rto.get("throughput_mb_s"), files_verified=body.get("files_verified"),
        files_expected=body.get("files_expected"), bytes_verified=body.get("bytes_verified"),
        reasons=[str(r.get("text")) if isinstance(r, dict) else str(r) for r in body.get("reasons") or []],
    )


def _figures(run: _Run) -> list[RestoreFigure]:
    """Per repository: the restore_test record, or (a run that stopped before writing it) the RPO/RTO steps."""
    s = run.summary
    out = [_figure(s.run_id, ts, body) for ts, body in run.restore]
    done = {f.repository for f in out}
    for repo, steps in run.measures.items():
        if repo not in done:
            out.append(_figure(s.run_id, s.ended or s.started, {
                "repository": repo, "status": s.status_of(repo), "rpo": steps.get("rpo"), "rto": steps.get("rto")}))
    return out


# -- the report ----------------------------------------------------------------------------------------


def build_report(directory: str | os.PathLike[str], trusted_keys: TrustedKeys | str | os.PathLike[str],
                 since: datetime | None = None, until: datetime | None = None,
                 now: datetime | None = None) -> Report:
    """The auditor's report for runs started in [since, until) (until defaults to `now`).

    Cadence gaps are judged at `until`, looking back before `since` too: a quarterly restore test
    held a month before the period still counts.
    """
    now = now or datetime.now(timezone.utc)
    now_ts = _ts(now)
    since_ts, until_ts = _ts(since), _ts(until) or now_ts
    if since_ts and since_ts >= until_ts:
        raise InvalidInput(f"the period is empty: since {since_ts} is not before until {until_ts}")
    keys = trusted_keys if isinstance(trusted_keys, TrustedKeys) else TrustedKeys.load(trusted_keys)
    verdict = verify(directory, keys, since)
    index = index_ledger(directory, since_ts, until_ts)
    integrity = _integrity(verdict, index, keys)
    upto = [r for r in index.runs.values() if r.summary.started < until_ts]
    period = [r for r in upto if r.in_period]
    summaries = [r.summary for r in period]

    approvals = _approvals(upto, index.reviews)
    gaps = _gaps(integrity, upto, approvals, until_ts)
    specs = _specifications(summaries, upto, gaps, until_ts)
    restore = [f for r in period if r.summary.run_kind == "restore-test" and r.summary.executed for f in _figures(r)]
    statuses = Counter(tone(s.status) for s in summaries if s.executed)
    totals = {
        "runs": len(summaries),
        "executed": sum(1 for s in summaries if s.executed),
        "dry_runs": sum(1 for s in summaries if not s.executed),
        "succeeded": statuses["ok"],
        "unsuccessful": statuses["bad"] + statuses["warn"],
        "open": statuses["open"],
        "incidents": 0,
        "restore_tests": len(restore),
        "exercises": sum(1 for s in summaries if s.run_kind == EXERCISE_KIND),
        "rotations": sum(1 for s in summaries if s.run_kind in ROTATION_KINDS and s.executed),
        "gaps": len(gaps),
    }
    incidents = _incidents(period)
    totals["incidents"] = sum(1 for i in incidents if i.incident)
    return Report(
        generated_at=now_ts, since=since_ts, until=until_ts, directory=str(directory), integrity=integrity,
        totals=totals, specifications=specs, incidents=incidents, restore_tests=restore,
        exercises=_exercises(period, upto),
        rotations=[s for s in summaries if s.run_kind in ROTATION_KINDS and s.executed],
        approvals=[a for a in approvals if since_ts is None or a.ts >= since_ts or (a.review_owed and not a.reviewed_at)],
        gaps=gaps, runs=summaries,
    )


def _integrity(verdict: VerifyReport, index: LedgerIndex, keys: TrustedKeys) -> Integrity:
    # Only checkpoints inside the part verify got through count as seen signers.
    verified_to = (verdict.first_seq or 0) + verdict.records
    seen: dict[str, SignerSeen] = {}
    for cp in index.checkpoints:
        if cp.seq >= verified_to:
            continue
        known = seen.get(cp.key_id)
        if known is None:
            seen[cp.key_id] = SignerSeen(cp.key_id, cp.signer, 1, cp.ts, cp.ts, cp.key_id in keys)
        else:
            known.checkpoints += 1
            known.last_ts = cp.ts
    last = next((cp for cp in reversed(index.checkpoints) if cp.seq < verified_to), None)
    return Integrity(
        status=verdict.status.value, ok=verdict.ok, exit_code=verdict.exit_code, message=verdict.message,
        records=verdict.records, checkpoints=verdict.checkpoints, first_seq=verdict.first_seq,
        last_seq=verdict.last_seq, since_records=verdict.since_records, warnings=list(verdict.warnings),
        signers=sorted(seen.values(), key=lambda s: s.first_ts), last_checkpoint=last, unreadable=index.unreadable,
    )


def _approvals(runs: list[_Run], reviews: dict[str, tuple[str, dict]]) -> list[ApprovalInfo]:
    out = []
    for run in runs:
        for ts, body in run.approvals:
            info = ApprovalInfo(run.summary.run_id, ts, str(body.get("decision")), body.get("approver"),
                                body.get("requested_by"), [str(h) for h in body.get("hosts") or []],
                                run.summary.incident, bool(body.get("review_owed")))
            review = reviews.get(run.summary.run_id)
            if review:
                info.reviewed_at = review[0]
                info.reviewed_by = review[1].get("reviewer")
            out.append(info)
    return out


def _day(ts: str) -> str:
    return ts[:10]


def _gaps(integrity: Integrity, runs: list[_Run], approvals: list[ApprovalInfo], until_ts: str) -> list[Gap]:
    gaps = []
    if not integrity.ok:
        gaps.append(Gap("integrity", "bad", f"the evidence ledger does not verify: {integrity.message}"))
    if integrity.unreadable:
        gaps.append(Gap("integrity", "bad", f"{len(integrity.unreadable)} ledger line(s) could not be read, "
                                            f"first: {integrity.unreadable[0]}"))
    until = _parse(until_ts)
    for spec, days in EXPECTED_CADENCE_DAYS.items():
        last = _last_held(runs, spec)
        if last is None or _parse(last) < until - timedelta(days=days):
            what = _CADENCE_WORDS.get(spec, "successful run")
            since_last = f"the last was on {_day(last)}" if last else "none is recorded"
            gaps.append(Gap("cadence", "bad", f"no {what} in the {days} days before {_day(until_ts)} "
                                              f"({spec} {SPECIFICATIONS.get(spec, '')}); {since_last}", spec=spec))
    gaps += _standing_failures(runs)
    for a in approvals:
        if a.review_owed and not a.reviewed_at:
            gaps.append(Gap("review_owed", "bad",
                            f"break-glass approval on {_day(a.ts)} for {', '.join(a.hosts) or '-'}"
                            f"{' (' + a.incident + ')' if a.incident else ''} has no review (run {a.run_id[:8]})",
                            run_id=a.run_id))
    for run in runs:
        s = run.summary
        if s.status == OPEN:
            gaps.append(Gap("open_run", "warn",
                            f"{s.run_kind} on {', '.join(s.hosts) or '-'} started {s.started[:19].replace('T', ' ')} "
                            f"has no final record: still running, or its process died "
                            f"(`crashcart evidence close-orphans`) (run {s.run_id[:8]})", run_id=s.run_id))
    return gaps


_CADENCE_WORDS = {
    "164.308(a)(7)(ii)(D)": "successful restore test",
    "164.308(a)(6)(ii)": "incident response or tabletop exercise",
}


def _standing_failures(runs: list[_Run]) -> list[Gap]:
    """Executed runs that ended unsuccessfully on a host, with no later success of the same kind there."""
    gaps = []
    ordered = sorted((r.summary for r in runs), key=lambda s: s.started)
    for i, s in enumerate(ordered):
        # A drill's failure (often an injected fault) is the exercise's finding, and a drill does not put a real failure right.
        if not s.executed or s.run_kind == APPROVAL_KIND or s.status == OPEN or s.exercise:
            continue
        later = [t for t in ordered[i + 1:] if t.run_kind == s.run_kind and t.executed and t.status != OPEN
                 and not t.exercise]
        standing = [h for h in (s.hosts or [""]) if s.status_of(h) in UNSUCCESSFUL
                    and not any(h in t.hosts and t.status_of(h) in SUCCESS for t in later)]
        if standing:
            states = ", ".join(f"{h}: {s.status_of(h)}" for h in standing)
            gaps.append(Gap("failed", "bad", f"{s.run_kind} on {_day(s.started)} ended {s.status} ({states}) "
                                             f"with no later success (run {s.run_id[:8]})", run_id=s.run_id))
    return gaps


def _specifications(period: list[RunSummary], runs: list[_Run], gaps: list[Gap], until_ts: str) -> list[SpecCoverage]:
    seen = [spec for s in period for spec in s.hipaa]
    ids = list(REPORTED_SPECS) + sorted({spec for spec in seen if spec not in REPORTED_SPECS})
    failed_runs = {g.run_id for g in gaps if g.kind == "failed"}
    out = []
    for spec in ids:
        serving = [s for s in period if spec in s.hipaa and s.executed and s.run_kind != APPROVAL_KIND]
        dry = sum(1 for s in period if spec in s.hipaa and not s.executed)
        cadence = EXPECTED_CADENCE_DAYS.get(spec)
        if any(g.kind == "cadence" and g.spec == spec for g in gaps):
            status, note = "gap", f"expected at least every {cadence} days"
        elif any(s.run_id in failed_runs for s in serving):
            status, note = "attention", "a failure in the period has no later success"
        elif not serving:
            status, note = "none", "no runs in the period"
        else:
            status, note = "ok", f"held within {cadence} days" if cadence else "runs in the period"
        out.append(SpecCoverage(
            id=spec, title=SPECIFICATIONS.get(spec, "(not a known specification)"), runs=serving,
            outcomes=dict(Counter(s.status for s in serving)), dry_runs=dry, last_held=_last_held(runs, spec),
            cadence_days=cadence, status=status, note=note))
    return out


def _incidents(period: list[_Run]) -> list[Incident]:
    groups: dict[str | None, list[_Run]] = {}
    for run in period:
        s = run.summary
        if s.exercise:
            continue  # shown with its exercise
        if s.incident or (s.run_kind in CONTAINMENT_KINDS and s.executed):
            groups.setdefault(s.incident, []).append(run)
    out = []
    for incident, members in groups.items():
        summaries = [r.summary for r in members]
        timeline = sorted((e for r in members for e in r.entries), key=lambda e: e.seq)
        hosts = sorted({h for s in summaries for h in s.hosts})
        last = max(summaries, key=lambda s: s.started)
        out.append(Incident(incident, summaries, hosts, min(s.started for s in summaries),
                            max(s.ended or s.started for s in summaries), last.status, timeline))
    # Named incidents first, by when they began; containment without an incident id last.
    return sorted(out, key=lambda i: (i.incident is None, i.first))


def _last_held(runs: list[_Run], spec: str) -> str | None:
    """When the last run that carried out `spec` successfully started (restore tests only, for testing)."""
    kinds = CADENCE_KINDS.get(spec)
    return max((r.summary.started for r in runs if spec in r.summary.hipaa and r.summary.held
                and (kinds is None or r.summary.run_kind in kinds)), default=None)


def _exercises(period: list[_Run], runs: list[_Run]) -> list[Exercise]:
    """Tabletop runs in the period, each with the runs it started (by trigger, or by its exercise incident id)."""
    out = []
    for run in period:
        s = run.summary
        if s.run_kind != EXERCISE_KIND:
            continue
        trigger = f"{EXERCISE_TRIGGER}:{run.exercise_id}" if run.exercise_id else None
        responses = [r.summary for r in runs if r is not run and (
            (trigger and r.summary.trigger == trigger) or (s.incident and r.summary.incident == s.incident))]
        out.append(Exercise(s, run.exercise_id, responses, dict(Counter(r.status for r in responses))))
    return out


def _parse(ts: str) -> datetime:
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)


# -- rendering -----------------------------------------------------------------------------------------

FORMATS = ("html", "md", "json")


def render_report(report: Report, fmt: str) -> str:
    """The report as HTML (one self-contained page), Markdown or JSON."""
    if fmt == "json":
        return json.dumps(report.as_dict(), indent=2, ensure_ascii=False) + "\n"
    if fmt not in FORMATS:
        raise InvalidInput(f"report format {fmt!r} is not one of {', '.join(FORMATS)}")
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("crashcart", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default_for_string=False),
        undefined=jinja2.StrictUndefined,  # a misspelt field is a bug to see, not an empty cell
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(when=when, day=lambda ts: ts[:10] if ts else "-", duration=duration, size=size,
                       md=md_cell, short=lambda run_id: (run_id or "")[:8], hours=hours)
    env.globals.update(tone=tone, specifications=SPECIFICATIONS)
    return env.get_template(f"report.{fmt}.j2").render(r=report)


def when(ts: str | None) -> str:
    """A ledger timestamp as "YYYY-MM-DD HH:MM:SS" (UTC)."""
    return ts[:19].replace("T", " ") if ts else "-"


def duration(seconds: float | None) -> str:
    """Seconds for people: 0.94 s, 2 min 5 s, 1 h 3 min."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"


def hours(value: float | None) -> str:
    """Hours with a sensible precision."""
    if value is None:
        return "-"
    return f"{value:.1f} h" if value < 100 else f"{value:.0f} h"


def size(n: int | None) -> str:
    """Bytes for people (decimal units, as restic and the restore summaries print them)."""
    if n is None:
        return "-"
    for unit, factor in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= factor:
            return f"{n / factor:.2f} {unit}"
    return f"{n} B"


def md_cell(value: object) -> str:
    """Text safe inside a Markdown table cell (pipes escaped, one line)."""
    return " ".join(str(value if value is not None else "-").split()).replace("|", "\\|")
