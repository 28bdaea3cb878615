"""`crashcart evidence`: verify the ledger, list and show runs, close orphaned runs, write the auditor's report."""

from __future__ import annotations

import json
import re
import socket
import sys
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from crashcart.errors import InvalidInput
from crashcart.evidence.ledger import KIND_RE
from crashcart.evidence.report import (
    FORMATS,
    OPEN,
    RunStory,
    RunSummary,
    duration,
    index_ledger,
    list_records,
    list_runs,
    run_story,
    tone,
    when,
)
from crashcart.hipaa import SPECIFICATIONS

evidence_app = typer.Typer(
    help="The evidence ledger: verify it, list and show runs, close orphaned runs, write the auditor's report.",
    no_args_is_help=True,
)
out = Console(highlight=False, soft_wrap=True)  # long lines stay whole when piped
err = Console(stderr=True, highlight=False, soft_wrap=True)

COLOUR = {"ok": "green", "bad": "red", "warn": "yellow", "open": "magenta", "info": "cyan"}
DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
SINCE_HELP = "From this date on (YYYY-MM-DD, UTC, or an ISO 8601 date-time)."
UNTIL_HELP = "Up to this date (YYYY-MM-DD includes that whole day, UTC; or an ISO 8601 date-time)."


def _evidence_settings():
    from crashcart.cli import runtime  # here, not at import: crashcart.cli imports this module

    return runtime().settings.evidence


def parse_when(value: str | None, option: str, *, end: bool = False) -> datetime | None:
    """A --since/--until value as an aware datetime; a bare date with `end` means the end of that day."""
    if value is None:
        return None
    text = value.strip()
    try:
        if DATE_RE.match(text):
            day = date.fromisoformat(text)
            moment = datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
            return moment + timedelta(days=1) if end else moment
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(f"{option} {value!r} is not a date: give YYYY-MM-DD or an ISO 8601 date-time "
                           "such as 2026-11-01T08:00Z") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _period(since: str | None, until: str | None) -> tuple[datetime | None, datetime | None]:
    start, end = parse_when(since, "--since"), parse_when(until, "--until", end=True)
    if start and end and start >= end:
        raise InvalidInput(f"--since {since} is not before --until {until}: the period is empty")
    return start, end


def _status(status: str | None) -> Text:
    return Text(str(status or "-"), style=COLOUR[tone(status)])


def _warn_unreadable(unreadable: list[str]) -> None:
    if unreadable:
        err.print(f"warning: {len(unreadable)} ledger line(s) could not be read and were left out "
                  f"(first: {unreadable[0]}); run `crashcart evidence verify`", markup=False)


def _exit(code: int) -> None:
    # Not typer.Exit: crashcart.cli.main runs the app with standalone_mode=False, where click returns
    # typer.Exit's code instead of exiting with it; a SystemExit reaches the shell intact.
    raise SystemExit(code)


def _json(value: object) -> None:
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


# -- verify ------------------------------------------------------------------------------------------


def _open_run_line(s: RunSummary) -> Text:
    """Why a run is open, as far as this machine can tell (by the test close_orphaned_runs applies)."""
    from crashcart.evidence.recorder import _process_alive, boot_id

    what = f"run {s.run_id} ({s.run_kind} on {', '.join(s.hosts) or '-'}, started {when(s.started)} UTC) has no final record"
    if s.machine != socket.gethostname():
        return Text(f"warning: {what}; it ran on {s.machine}, so only `crashcart evidence close-orphans` there can close it",
                    style="yellow")
    if s.boot_id == boot_id() and s.pid and _process_alive(s.pid):
        return Text(f"note: {what} yet: its process {s.pid} is still running")
    process = f"its process {s.pid}" if s.pid else "its process"
    return Text(f"warning: {what} and {process} is gone: `crashcart evidence close-orphans` records it as crashed",
                style="yellow")


@evidence_app.command("verify")
def verify_command(
    since: Optional[str] = typer.Option(None, "--since", help="Count records from this date (YYYY-MM-DD or ISO 8601); "
                                                             "the chain is always checked from its start."),
) -> None:
    """Check the whole ledger: chain, checkpoints and their signatures, HEAD, torn tails (writes nothing).

    Exit 0 when intact; otherwise 20 TORN_TAIL, 21 TRUNCATED, 22 TAMPERED, 23 BAD_SIGNATURE,
    24 UNKNOWN_KEY, 25 BROKEN_CHECKPOINT, 26 MISSING_FILE, with the first bad record on the first line.
    """
    from crashcart.evidence.verify import verify

    start = parse_when(since, "--since")
    ev = _evidence_settings()
    report = verify(ev.dir, ev.trusted_keys, start)
    out.print(Text(report.message, style="green" if report.ok else "bold red"))
    counted = f"records verified: {report.records}"
    if report.first_seq is not None:
        counted += f" (seq {report.first_seq}..{report.first_seq + report.records - 1})"
    if report.since_records is not None:
        counted += f", {report.since_records} since {since}"
    out.print(counted, markup=False)
    index = index_ledger(ev.dir, detail=False)
    verified_to = (report.first_seq or 0) + report.records
    checkpoints = [c for c in index.checkpoints if c.seq < verified_to]
    line = f"checkpoints verified: {report.checkpoints}"
    if checkpoints:
        last = checkpoints[-1]
        line += f", the last at seq {last.seq} ({when(last.ts)} UTC) covering records 0..{last.count - 1}"
    out.print(line, markup=False)
    signers: dict[str, list] = {}
    for c in checkpoints:
        signers.setdefault(c.key_id, [c.signer, 0])[1] += 1
    if signers:
        from crashcart.evidence.signing import TrustedKeys

        keys = TrustedKeys.load(ev.trusted_keys)
        out.print("signers seen: " + "; ".join(
            f"{key_id} ({kind}, {n} checkpoint{'s' if n != 1 else ''}{'' if key_id in keys else ', NOT PINNED'})"
            for key_id, (kind, n) in signers.items()), markup=False)
    else:
        out.print("signers seen: none (no checkpoint verified)", markup=False)
    for warning in report.warnings:
        out.print(Text(f"warning: {warning}", style="yellow"))
    for s in index.open_runs():
        out.print(_open_run_line(s))
    for problem in index.unreadable[:5]:
        out.print(Text(f"unreadable: {problem}", style="red"))
    if not report.ok:
        _exit(report.exit_code)


@evidence_app.command("close-orphans")
def close_orphans() -> None:
    """Close, as crashed, every open run whose process is gone (killed, or the machine rebooted)."""
    from crashcart.evidence.ledger import Ledger
    from crashcart.evidence.recorder import close_orphaned_runs

    ev = _evidence_settings()
    # The local key signs the closing checkpoint: it is pinned, and Vault may be what failed the run.
    closed = close_orphaned_runs(Ledger.from_settings(ev))
    if not closed:
        out.print("nothing to close: no open run of this machine has lost its process", markup=False)
        return
    for run_id in closed:
        out.print(f"closed run {run_id} as crashed", markup=False)


@evidence_app.command("review")
def review_command(
    approval_run: str = typer.Argument(..., help="The run whose break-glass approval was reviewed."),
    reviewer: str = typer.Option(..., "--reviewer", help="Who reviewed it (name or Slack id)."),
    outcome: str = typer.Option(..., "--outcome", help="What the review concluded, e.g. 'justified: active ransomware'."),
) -> None:
    """Record the review a break-glass approval owes (it then shows as reviewed in the report)."""
    from crashcart import validation as v
    from crashcart.evidence.ledger import Ledger, iter_records
    from crashcart.evidence.report import REVIEW_KIND

    ev = _evidence_settings()
    approval_run = v.identifier(approval_run)
    owed = [r for r in iter_records(ev.dir, kind="approval") if r.run == approval_run or
            r.body.get("run_id") == approval_run]
    if not any(r.body.get("review_owed") for r in owed):
        raise InvalidInput(f"run {approval_run} has no break-glass approval that owes a review")
    ledger = Ledger.from_settings(ev)
    record = ledger.append(REVIEW_KIND, {"approval_run": approval_run, "reviewer": v.free_text(reviewer, "reviewer", 200),
                                         "outcome": v.free_text(outcome, "outcome")})
    ledger.checkpoint()
    out.print(f"recorded the review of {approval_run} at seq {record.seq}", markup=False)


# -- list and show -----------------------------------------------------------------------------------


@evidence_app.command("list")
def list_command(
    kind: Optional[str] = typer.Option(None, "--kind", "-k",
                                       help="One row per record of this kind (e.g. run_started, custody, approval)."),
    since: Optional[str] = typer.Option(None, "--since", help=SINCE_HELP),
    until: Optional[str] = typer.Option(None, "--until", help=UNTIL_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List runs (one row each: id, start, runbook, hosts, trigger, final status, duration), or records of one kind."""
    start, end = _period(since, until)
    if kind is not None and not KIND_RE.match(kind):
        raise InvalidInput(f"--kind {kind!r} is not a record kind (lower-case letters, digits, '_', '.', '-')")
    ev = _evidence_settings()
    if kind:
        rows, unreadable, kinds = list_records(ev.dir, kind, start, end)
        _warn_unreadable(unreadable)
        if as_json:
            _json(rows)
            return
        if not rows:
            known = ", ".join(sorted(kinds)) or "none"
            out.print(f"no {kind} records in {ev.dir} for that period (kinds recorded: {known})", markup=False)
            return
        table = Table(title=f"{len(rows)} {kind} record(s)")
        for col in ("seq", "time (UTC)", "run", "status", "what"):
            table.add_column(col, overflow="fold")
        for r in rows:
            table.add_row(str(r["seq"]), when(r["ts"]), (r["run"] or "-")[:8], _status(r["status"]) if r["status"] else "",
                          Text(r["text"]))
        out.print(table)
        return
    runs, unreadable = list_runs(ev.dir, start, end)
    _warn_unreadable(unreadable)
    if as_json:
        _json([_run_dict(s) for s in runs])
        return
    if not runs:
        out.print(f"no runs in {ev.dir} for that period", markup=False)
        return
    table = Table(title=f"{len(runs)} run(s) in {ev.dir}")
    for col in ("run", "started (UTC)", "runbook", "hosts", "trigger", "status", "duration"):
        table.add_column(col, overflow="fold")
    for s in runs:
        book = f"{s.runbook or s.run_kind}" + (f" ({s.mode.replace('_', ' ')})" if not s.executed else "")
        table.add_row(s.run_id[:8], when(s.started), Text(book), Text(", ".join(s.hosts) or "-"), Text(s.trigger),
                      _status(s.status), duration(s.duration) if s.status != OPEN else "-")
    out.print(table)
    out.print("`crashcart evidence show RUN` tells a run's whole story (the short ids work)", markup=False)


def _run_dict(s: RunSummary) -> dict:
    from dataclasses import asdict

    return asdict(s)


@evidence_app.command("show")
def show_command(
    run: str = typer.Argument(..., help="Run id, or its first characters (at least 4)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
) -> None:
    """The whole story of one run: who, when, runbook and hash, steps from intent to result, custody, final status."""
    ev = _evidence_settings()
    story = run_story(ev.dir, run)
    if as_json:
        _json(story.as_dict())
        return
    _print_story(story)


def _field(name: str, value: object) -> None:
    out.print(Text.assemble((f"  {name:<10}", "bold"), str(value)))


def _print_story(story: RunStory) -> None:
    s = story.run
    out.print(Text.assemble(("run ", "bold"), (s.run_id, "bold"), "  ", _status(s.status)))
    _field("runbook", f"{s.runbook} v{s.runbook_version} ({story.runbook_path or '-'}, sha256 {s.runbook_sha256 or '-'})")
    _field("kind", f"{s.run_kind}, {s.mode.replace('_', ' ')}")
    _field("trigger", s.trigger)
    ended = f", ended {when(s.ended)} UTC after {duration(s.duration)}" if s.ended else ", not ended"
    _field("started", f"{when(s.started)} UTC{ended}")
    _field("hosts", ", ".join(s.hosts) or "-")
    _field("incident", s.incident or "-")
    _field("hipaa", "; ".join(f"{spec} {SPECIFICATIONS.get(spec, '')}".strip() for spec in s.hipaa) or "-")
    _field("params", json.dumps(story.params, sort_keys=True, ensure_ascii=False))
    if s.flow_run_id:
        _field("flow run", s.flow_run_id)
    if story.tool_versions:
        _field("tools", ", ".join(f"{k} {v}" for k, v in sorted(story.tool_versions.items())))
    _field("records", story.records)

    out.print(Text("\nsteps", style="bold"))
    if not story.steps:
        out.print("  (none)", markup=False)
    for st in story.steps:
        what = " ".join(x for x in (st.kind, st.uses) if x)
        head = Text.assemble("  ", (when(st.intent_ts or st.result_ts)[11:], "dim"), " ", (f"{st.host} {st.step}", "bold"),
                             f" ({what})" if what else "", "  ", _status(st.status), f"  {duration(st.duration)}")
        out.print(head)
        if st.summary:
            out.print(Text(f"      {st.summary}"))
        if st.plan and st.plan != st.summary:
            out.print(Text(f"      plan: {st.plan}", style="dim"))
        for c in st.commands:
            out.print(Text(f"      $ {_clip(c.get('command'))}  -> exit {c.get('exit_code')} on {c.get('host')} "
                           f"in {duration(c.get('duration'))}"))
        for v in st.verification:
            out.print(Text.assemble("      verify ", str(v.get("check")), ": ", _status(v.get("status")),
                                    f" - {v.get('summary') or ''}"))
        if st.rollback:
            rb = st.rollback
            out.print(Text.assemble("      rollback ", str(rb.get("uses")), ": ", _status(rb.get("status")),
                                    f" - {rb.get('summary') or ''}"))
            for c in rb.get("commands") or []:
                out.print(Text(f"        $ {_clip(c.get('command'))}  -> exit {c.get('exit_code')} on {c.get('host')}"))

    if story.restore_tests:
        out.print(Text("\nrestore tests", style="bold"))
        for f in story.restore_tests:
            rpo = f"RPO {f.rpo_hours:.2f} h / {f.rpo_target_hours:g} h" if f.rpo_hours is not None else "RPO -"
            rto = (f"RTO {duration(f.rto_seconds)} / {f.rto_target_minutes:g} min" if f.rto_seconds is not None else "RTO -")
            rpo += "" if f.rpo_ok in (True, None) else " BREACH"
            rto += "" if f.rto_ok in (True, None) else " BREACH"
            out.print(Text.assemble(f"  {f.repository}: ", _status(f.status), f"  snapshot {f.snapshot or '-'}, {rpo}, "
                                    f"{rto}, files {f.files_verified}/{f.files_expected}"))
            for reason in f.reasons:
                out.print(Text(f"      {reason}", style="red"))

    if story.custody:
        out.print(Text("\ncustody", style="bold"))
        for c in story.custody:
            match = "match" if c.get("match") else "MISMATCH"
            out.print(Text(f"  {when(c['ts'])[11:]} {c.get('host')} {c.get('artifact')} ({c.get('bytes')} bytes) "
                           f"sha256 {c.get('sha256_destination')} [{match} with source {c.get('sha256_source')}]"))
            out.print(Text(f"      collected by {c.get('collected_by')} from {c.get('collected_from')}; "
                           f"stored at {c.get('stored_at')}", style="dim"))

    if story.notifications:
        out.print(Text("\nnotifications", style="bold"))
        for n in story.notifications:
            out.print(Text.assemble(f"  {when(n.get('ts'))[11:]} {n.get('event')} to {n.get('channel') or '-'}: ",
                                    _status(n.get("status")), f" {n.get('error') or ''}"))

    if story.approvals:
        out.print(Text("\napprovals", style="bold"))
        for a in story.approvals:
            out.print(Text(f"  {when(a['ts'])[11:]} {a['kind']}: {a['text']}"))

    if story.events:
        out.print(Text("\nother records", style="bold"))
        for e in story.events:
            out.print(Text(f"  {when(e.ts)[11:]} {e.kind}: {e.text}"))

    out.print(Text("\nfinal", style="bold"))
    if story.finished:
        out.print(Text.assemble("  ", _status(s.status), f" at {when(s.ended)} UTC: {s.summary}"))
    else:
        out.print(Text("  open: no run_finished record (still running, or its process died: "
                       "`crashcart evidence close-orphans`)", style="magenta"))
    cp = story.checkpoint
    if cp:
        out.print(Text(f"  checkpoint seq {cp.seq} ({when(cp.ts)} UTC) covers records 0..{cp.count - 1}, "
                       f"signed by {cp.key_id} ({cp.signer})"))
    else:
        out.print(Text("  no checkpoint covers this run yet; the next one will", style="yellow"))


def _clip(command: object, limit: int = 200) -> str:
    text = " ".join(str(command).split())
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} chars; --json has it whole)"


# -- report ------------------------------------------------------------------------------------------


@evidence_app.command("report")
def report_command(
    fmt: Optional[str] = typer.Option(None, "--format", "-f", help="html, md or json (required)."),
    since: Optional[str] = typer.Option(None, "--since", help=SINCE_HELP),
    until: Optional[str] = typer.Option(None, "--until", help=UNTIL_HELP),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write here instead of standard output."),
) -> None:
    """The auditor's report: ledger integrity, HIPAA specifications served, incidents, restore tests, gaps.

    The report is written even when the ledger does not verify (it says so first); the exit code is
    then verify's.
    """
    from crashcart.evidence.report import build_report, render_report

    if fmt not in FORMATS:
        raise InvalidInput(f"--format {fmt!r} must be one of {', '.join(FORMATS)}" if fmt else
                           f"--format is required: one of {', '.join(FORMATS)}")
    start, end = _period(since, until)
    ev = _evidence_settings()
    report = build_report(ev.dir, ev.trusted_keys, start, end)
    text = render_report(report, fmt)
    if output is None:
        sys.stdout.write(text)
    else:
        try:
            output.write_text(text, encoding="utf-8")
        except OSError as e:
            raise InvalidInput(f"{output}: cannot write the report ({e.strerror})") from None
        out.print(f"wrote {output}: {fmt} report of {report.totals['runs']} run(s), {len(report.gaps)} gap(s), "
                  f"ledger {report.integrity.status}", markup=False)
    if not report.integrity.ok:
        err.print(f"crashcart: the evidence ledger does not verify: {report.integrity.message}", markup=False)
        _exit(report.integrity.exit_code)
