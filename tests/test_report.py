"""The auditor's report and run stories, from a ledger written with the real Ledger and RunRecorder APIs."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from hashlib import sha256
from pathlib import Path

import pytest

from crashcart.errors import InvalidInput
from crashcart.evidence.ledger import Ledger
from crashcart.evidence.recorder import RunRecorder, Trigger
from crashcart.evidence.report import build_report, render_report, run_story
from crashcart.evidence.signing import LocalEd25519Signer, TrustedKeys

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
UNTIL = datetime(2026, 12, 1, tzinfo=timezone.utc)

# A flow process killed mid-run: run_started and a step intent, then nothing (no run_finished).
KILLED_RUN = """
import os, sys
from datetime import datetime, timezone
from crashcart.evidence.ledger import Ledger
from crashcart.evidence.recorder import RunRecorder, Trigger
from crashcart.evidence.signing import LocalEd25519Signer
ledger = Ledger(sys.argv[1], signer=LocalEd25519Signer(sys.argv[2]),
                clock=lambda: datetime(2026, 11, 20, 3, 0, tzinfo=timezone.utc))
book = {"name": "rotate-tls", "version": 1, "path": "runbooks/rotate-tls.yaml", "sha256": "ab" * 32,
        "hipaa": ["164.312(e)(2)(ii)"]}
rec = RunRecorder(ledger, kind="rotate-tls", runbook=book, params={"hosts": ["web-1"]}, hosts=[{"name": "web-1"}],
                  trigger=Trigger("schedule", "deployment rotate-tls"), hipaa=["164.312(e)(2)(ii)"]).start()
rec.intent("web-1", {"id": "served", "kind": "check", "uses": "tls.served"}, {"summary": "read the served certificate"})
print(rec.run_id, flush=True)
os._exit(137)
"""


class Clock:
    """The ledger's clock: jump it to a moment with `at`; every reading moves it on by a second."""

    def __init__(self) -> None:
        self.now = datetime(2026, 6, 1, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        current = self.now
        self.now += timedelta(seconds=1)
        return current

    def at(self, *args: int) -> None:
        self.now = datetime(*args, tzinfo=timezone.utc)


@dataclass
class Sample:
    """A ledger in a folder, the key that signed its checkpoints, and the ids of its runs by name."""

    folder: Path
    evidence: Path
    key_path: Path
    keys_path: Path
    keys: TrustedKeys
    runs: dict[str, str]


def book(name: str, hipaa: list[str]) -> dict:
    return {"name": name, "version": 1, "path": f"runbooks/{name}.yaml",
            "sha256": sha256(name.encode()).hexdigest(), "hipaa": hipaa}


def step(host: str, step_id: str, status: str, summary: str, *, exit_code: int = 0, verification=(),
         rollback: dict | None = None, detail: dict | None = None) -> tuple:
    return host, step_id, status, summary, exit_code, list(verification), rollback, detail or {}


def record_run(ledger: Ledger, kind: str, hipaa: list[str], hosts: list[str], status: str, summary: str, *,
               steps=(), events=(), mode: str = "execute", incident: str | None = None,
               trigger: Trigger = Trigger("cli", "alice@jump-1"), detail: dict | None = None) -> str:
    """One run as a flow records it: start, intent -> result per step, events, finish (with its checkpoint)."""
    rec = RunRecorder(ledger, kind=kind, runbook=book(kind, hipaa), params={"hosts": hosts, "reason": "test"},
                      hosts=[{"name": h} for h in hosts], trigger=trigger, hipaa=hipaa, mode=mode, incident=incident)
    rec.start()
    for host, step_id, st, text, code, checks, rollback, extra in steps:
        seq = rec.intent(host, {"id": step_id, "kind": "action", "uses": f"lab.{step_id}"},
                         {"summary": f"plan of {step_id}", "commands": [f"do-{step_id} {host}"]})
        rec.result(host, step_id, seq, {
            "status": st, "summary": text, "started": 0.0, "ended": 1.5, "duration": 1.5,
            "commands": [{"host": host, "command": f"do-{step_id} {host}", "exit_code": code, "duration": 0.4,
                          "stdout": "ok\n", "stdout_sha256": "00" * 32}],
            "detail": extra, "verification": checks, "rollback": rollback})
    for event_kind, body in events:
        rec.event(event_kind, body)
    rec.finish(status, summary, detail or {"hosts": {h: status for h in hosts}})
    return rec.run_id


def restore_body(repo: str, status: str, rto_seconds: float, rto_ok: bool) -> dict:
    return {
        "repository": repo, "status": status, "summary": f"{repo}: {status}", "hipaa": "164.308(a)(7)(ii)(D)",
        "snapshot": {"short_id": "256cbec5", "time": "2026-06-30T22:00:00+00:00"},
        "rpo": {"age_hours": 12.0, "target_hours": 26.0, "ok": True, "breach": None},
        "rto": {"seconds": rto_seconds, "target_minutes": 30.0, "ok": rto_ok, "throughput_mb_s": 2.0,
                "breach": None if rto_ok else f"RTO breach: restore and verification took {rto_seconds:.0f} s, target 30 min"},
        "files_verified": 46, "files_expected": 46, "bytes_verified": 1151752,
        "reasons": [] if rto_ok else [{"step": "rto", "code": "rto_breach", "text": "RTO breach: 41 min, target 30 min"}],
    }


def restore_run(ledger: Ledger, results: dict[str, tuple[str, float, bool]]) -> str:
    """A restore test of several repositories: RPO/RTO steps and one restore_test record per repository."""
    hipaa = ["164.308(a)(7)(ii)(A)", "164.308(a)(7)(ii)(B)", "164.308(a)(7)(ii)(D)"]
    steps, events = [], []
    for repo, (st, seconds, ok) in results.items():
        steps.append(step(repo, "rto", "succeeded" if ok else "failed", f"RTO {seconds:.0f} s (target 30 min)",
                          detail={"seconds": seconds, "target_minutes": 30.0, "ok": ok}))
        events.append(("restore_test", restore_body(repo, st, seconds, ok)))
    overall = "failed" if any(r[0] == "failed" for r in results.values()) else "passed"
    return record_run(ledger, "restore-test", hipaa, list(results), overall, "; ".join(results), steps=steps,
                      events=events, detail={"repositories": {k: v[0] for k, v in results.items()}})


def write_sample_ledger(folder: Path) -> Sample:
    """Half a year of runs an auditor meets: restore tests (one breaching its RTO), rotations (a failure put
    right the next day), a tabletop exercise whose drill on staging failed (an injected fault), two incidents
    behind break-glass approvals (one reviewed, one not; one containment rolled back), a dry run, and a
    rotation whose process was killed (still open)."""
    signer, public = LocalEd25519Signer.generate(folder / "keys" / "evidence-ed25519.pem")
    keys = TrustedKeys()
    keys.add(signer.key_id, signer.kind, public)
    keys.save(folder / "trusted-keys.json")
    clock = Clock()
    ledger = Ledger(folder / "evidence", signer=signer, clock=clock)
    contain = ["164.308(a)(6)(ii)", "164.312(b)"]
    runs: dict[str, str] = {}

    clock.at(2026, 7, 1, 10)
    runs["restore_july"] = restore_run(ledger, {"web-1-data": ("passed", 0.9, True), "db-1-data": ("passed", 1.1, True)})
    clock.at(2026, 8, 10, 9)
    runs["luks"] = record_run(ledger, "rotate-luks", ["164.312(a)(2)(iv)"], ["db-1"], "succeeded",
                              "db-1: keyslot 0 replaced by 2", steps=[step("db-1", "rotate", "succeeded", "keyslot 0 replaced by 2")])
    clock.at(2026, 8, 12, 9)
    runs["tls_failed"] = record_run(ledger, "rotate-tls", ["164.312(e)(2)(ii)"], ["web-1"], "failed",
                                    "web-1: Vault PKI refused the request",
                                    steps=[step("web-1", "rotate", "failed", "Vault PKI refused the request", exit_code=1)])
    clock.at(2026, 8, 13, 9)
    runs["tls_fixed"] = record_run(ledger, "rotate-tls", ["164.312(e)(2)(ii)"], ["web-1"], "succeeded",
                                   "web-1: new certificate served, old one revoked")
    clock.at(2026, 9, 5, 14)
    # As tabletop/runner.py records one: its own run (incident TABLETOP-<id>), and the runbooks it starts are
    # ordinary runs triggered by "tabletop:<exercise id>".
    runs["tabletop"] = record_run(ledger, "tabletop", ["164.308(a)(6)(ii)"], ["web-1"], "exercised",
                                  "ransomware-ephi-host: 5 of 6 responses in time", incident="TABLETOP-ab12cd",
                                  trigger=Trigger("cli", "bob@jump-1"),
                                  events=[("tabletop_scenario", {"exercise": "ab12cd34", "incident": "TABLETOP-ab12cd"})])
    clock.at(2026, 9, 5, 14, 5)
    runs["drill"] = record_run(ledger, "isolate-host", contain, ["web-1"], "failed", "web-1: failed (injected: sshd down)",
                               incident="TABLETOP-ab12cd", trigger=Trigger("tabletop", "ab12cd34"))

    clock.at(2026, 10, 2, 3)
    runs["approval_owed"] = record_run(ledger, "approval", contain, ["db-1"], "succeeded",
                                       "break glass: approval skipped during a declared emergency; review owed",
                                       incident="INC-2041", events=[("approval", {
                                           "decision": "break_glass", "approver": None, "requested_by": "cli:alice@jump-1",
                                           "hosts": ["db-1"], "review_owed": True, "at": "2026-10-02T03:00:01Z"})])
    runs["isolate_db"] = record_run(
        ledger, "isolate-host", contain, ["db-1"], "contained", "db-1: contained (isolated and verified from outside)",
        incident="INC-2041",
        steps=[step("db-1", "quarantine", "succeeded", "quarantine applied; dead man's switch armed for 30s",
                    verification=[{"check": "probe.peer_blocked", "status": "passed", "summary": "peer-1 cannot reach db-1"}])],
        events=[("custody", {"host": "db-1", "artifact": "volatile-db-1.txt", "bytes": 14924, "match": True,
                             "sha256_source": "9" * 64, "sha256_destination": "9" * 64, "collected_by": "cli:alice@jump-1"}),
                ("notification", {"id": "n1", "status": "pending", "event": "contained", "channel": "#ir"}),
                ("notification", {"id": "n1", "status": "delivered", "event": "contained", "channel": "#ir"})])
    clock.at(2026, 10, 3, 9)
    runs["release_db"] = record_run(ledger, "release-host", contain, ["db-1"], "released",
                                    "db-1: released (services reachable again)", incident="INC-2041")

    clock.at(2026, 10, 15, 2)
    runs["restore_breach"] = restore_run(ledger, {"web-1-data": ("failed", 2460.0, False),
                                                  "db-1-data": ("passed", 1.2, True)})

    clock.at(2026, 10, 20, 22)
    runs["approval_reviewed"] = record_run(ledger, "approval", contain, ["web-1"], "succeeded",
                                           "break glass: review owed", incident="INC-2042", events=[("approval", {
                                               "decision": "break_glass", "approver": None, "hosts": ["web-1"],
                                               "requested_by": "slack:U0ONCALL", "review_owed": True, "at": "x"})])
    runs["isolate_web"] = record_run(
        ledger, "isolate-host", contain, ["web-1"], "rolled_back", "web-1: rolled_back (web-1 still reaches peer-1:22)",
        incident="INC-2042",
        steps=[step("web-1", "quarantine", "rolled_back", "verification failed: web-1 still reaches peer-1:22",
                    verification=[{"check": "probe.outbound_blocked", "status": "failed", "summary": "web-1 still reaches peer-1:22"}],
                    rollback={"uses": "firewalld.revert_quarantine", "status": "succeeded", "summary": "reverted",
                              "commands": [{"host": "web-1", "command": "firewall-cmd --remove", "exit_code": 0}]})])
    clock.at(2026, 10, 22, 9)
    ledger.append("approval_review", {"approval_run": runs["approval_reviewed"], "reviewer": "carol (CISO)",
                                      "outcome": "justified: active exfiltration"})
    clock.at(2026, 11, 1, 9)
    runs["dry"] = record_run(ledger, "isolate-host", contain, ["web-1"], "planned", "web-1: planned (dry run)",
                             mode="dry_run")
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(folder / "evidence"), str(signer.path)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert killed.returncode == 137, killed.stderr
    runs["killed"] = killed.stdout.strip()
    return Sample(folder, folder / "evidence", signer.path, folder / "trusted-keys.json", keys, runs)


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Sample:
    return write_sample_ledger(tmp_path_factory.mktemp("sample"))


@pytest.fixture(scope="module")
def report(sample):
    return build_report(sample.evidence, sample.keys, until=UNTIL, now=UNTIL)


# -- the model ---------------------------------------------------------------------------------------


def test_the_report_says_the_ledger_verifies_and_who_signed_it(report, sample):
    integrity = report.integrity
    assert integrity.ok and integrity.status == "INTACT" and integrity.exit_code == 0
    assert integrity.records > 40 and integrity.checkpoints == len(sample.runs) - 1  # the killed run never signed
    [signer] = integrity.signers
    assert signer.signer == "local-ed25519" and signer.pinned and signer.checkpoints == integrity.checkpoints
    assert integrity.last_checkpoint.key_id == signer.key_id


def test_every_gap_an_auditor_would_ask_about_is_listed_and_nothing_else(report, sample):
    by_kind = {}
    for gap in report.gaps:
        by_kind.setdefault(gap.kind, []).append(gap)
    assert sorted(by_kind) == ["cadence", "failed", "open_run", "review_owed"]
    [cadence] = by_kind["cadence"]
    assert cadence.spec == "164.308(a)(7)(ii)(D)"  # incident response was exercised and held in time
    assert "no successful restore test in the 92 days before 2026-12-01" in cadence.message
    assert "the last was on 2026-07-01" in cadence.message
    failed = {g.run_id for g in by_kind["failed"]}
    # The TLS failure of 12 August was put right the next day, the drill's failure is the exercise's finding;
    # these two were not put right.
    assert failed == {sample.runs["restore_breach"], sample.runs["isolate_web"]}
    assert [g.run_id for g in by_kind["review_owed"]] == [sample.runs["approval_owed"]]
    assert [g.run_id for g in by_kind["open_run"]] == [sample.runs["killed"]]
    assert "web-1-data: failed" in next(g.message for g in by_kind["failed"] if g.run_id == sample.runs["restore_breach"])


def test_each_specification_lists_the_runs_that_serve_it_with_outcomes(report, sample):
    specs = {s.id: s for s in report.specifications}
    for required in ("164.308(a)(6)(ii)", "164.308(a)(7)(ii)(A)", "164.308(a)(7)(ii)(B)", "164.308(a)(7)(ii)(D)",
                     "164.312(a)(2)(iv)", "164.312(e)(2)(ii)", "164.312(b)"):
        assert required in specs
    response = specs["164.308(a)(6)(ii)"]
    assert response.title == "Response and reporting"
    assert {s.run_id for s in response.runs} == {sample.runs[n] for n in (
        "tabletop", "drill", "isolate_db", "release_db", "isolate_web")}
    assert response.outcomes == {"exercised": 1, "failed": 1, "contained": 1, "released": 1, "rolled_back": 1}
    assert response.dry_runs == 1 and response.status == "attention"
    testing = specs["164.308(a)(7)(ii)(D)"]
    assert testing.status == "gap" and testing.outcomes == {"passed": 1, "failed": 1}
    assert testing.last_held.startswith("2026-07-01")
    assert specs["164.312(a)(2)(iv)"].status == "ok"
    assert specs["164.312(e)(2)(ii)"].outcomes == {"failed": 1, "succeeded": 1, "open": 1}


def test_restore_figures_show_the_rto_breach_against_its_target(report, sample):
    figures = {(f.run_id, f.repository): f for f in report.restore_tests}
    assert len(figures) == 4
    breach = figures[(sample.runs["restore_breach"], "web-1-data")]
    assert breach.status == "failed" and breach.rto_ok is False
    assert breach.rto_seconds == 2460.0 and breach.rto_target_minutes == 30.0
    assert breach.reasons == ["RTO breach: 41 min, target 30 min"]
    good = figures[(sample.runs["restore_july"], "db-1-data")]
    assert good.rto_ok and good.rpo_ok and good.files_verified == 46 and good.bytes_verified == 1151752


def test_incidents_are_grouped_by_id_with_a_timeline(report, sample):
    incidents = {i.incident: i for i in report.incidents}
    assert set(incidents) == {"INC-2041", "INC-2042"}  # neither the dry run nor the tabletop drill is an incident
    first = incidents["INC-2041"]
    assert [s.run_id for s in first.runs] == [sample.runs[n] for n in ("approval_owed", "isolate_db", "release_db")]
    assert first.status == "released" and first.hosts == ["db-1"]
    kinds = [e.kind for e in first.timeline]
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished"
    assert "custody" in kinds and "approval" in kinds and "step_intent" not in kinds
    # Only the delivered notification, not its pending record.
    assert [e.status for e in first.timeline if e.kind == "notification"] == ["delivered"]
    assert report.totals["incidents"] == 2
    # The review of INC-2042's break glass was written after its approval run, outside it: it is still on the timeline.
    review = [e for e in incidents["INC-2042"].timeline if e.kind == "approval_review"]
    assert [(e.run_id, e.status) for e in review] == [(sample.runs["approval_reviewed"], "reviewed")]
    assert "reviewed by carol (CISO)" in review[0].text


def test_exercises_rotations_and_approvals(report, sample):
    [exercise] = report.exercises
    assert exercise.run.run_id == sample.runs["tabletop"] and exercise.run.status == "exercised"
    assert exercise.exercise_id == "ab12cd34" and exercise.run.incident == "TABLETOP-ab12cd"
    assert [s.run_id for s in exercise.responses] == [sample.runs["drill"]] and exercise.outcomes == {"failed": 1}
    assert [s.run_id for s in report.rotations] == [sample.runs[n] for n in ("luks", "tls_failed", "tls_fixed", "killed")]
    approvals = {a.run_id: a for a in report.approvals}
    owed, reviewed = approvals[sample.runs["approval_owed"]], approvals[sample.runs["approval_reviewed"]]
    assert owed.review_owed and owed.reviewed_at is None and owed.incident == "INC-2041"
    assert reviewed.reviewed_by == "carol (CISO)" and reviewed.reviewed_at.startswith("2026-10-22")


def test_since_narrows_the_runs_but_not_the_cadence_look_back(sample):
    report = build_report(sample.evidence, sample.keys, since=datetime(2026, 10, 1, tzinfo=timezone.utc),
                          until=UNTIL, now=UNTIL)
    assert all(s.started >= "2026-10-01" for s in report.runs)
    assert {f.run_id for f in report.restore_tests} == {sample.runs["restore_breach"]}
    assert report.exercises == [] and report.integrity.since_records < report.integrity.records
    assert any(g.kind == "cadence" and "2026-07-01" in g.message for g in report.gaps)


def test_cadence_is_judged_at_the_end_of_the_period(sample):
    before_exercise = build_report(sample.evidence, sample.keys, until=datetime(2026, 9, 1, tzinfo=timezone.utc),
                                   now=UNTIL)
    assert [g.spec for g in before_exercise.gaps] == ["164.308(a)(6)(ii)"]
    assert "no incident response or tabletop exercise in the 366 days" in before_exercise.gaps[0].message
    # After the tabletop exercise of 5 September, with July's restore test inside its quarter, the TLS failure
    # put right and no break glass yet: nothing to explain.
    after = build_report(sample.evidence, sample.keys, until=datetime(2026, 9, 10, tzinfo=timezone.utc), now=UNTIL)
    assert after.gaps == []
    assert {s.id: s.status for s in after.specifications}["164.308(a)(7)(ii)(D)"] == "ok"


def test_an_empty_period_is_refused():
    with pytest.raises(InvalidInput, match="period is empty"):
        build_report("/nonexistent", TrustedKeys(), since=UNTIL, until=UNTIL - timedelta(days=1), now=UNTIL)


def test_run_story_follows_each_step_from_intent_to_result(sample):
    story = run_story(sample.evidence, sample.runs["isolate_web"][:8])
    assert story.run.run_id == sample.runs["isolate_web"] and story.run.status == "rolled_back"
    assert story.run.runbook_sha256 == sha256(b"isolate-host").hexdigest()
    [quarantine] = story.steps
    assert quarantine.intent_seq < quarantine.result_seq and quarantine.status == "rolled_back"
    assert quarantine.commands == [{"host": "web-1", "command": "do-quarantine web-1", "exit_code": 0, "duration": 0.4,
                                    "stdout_sha256": "00" * 32}]
    assert quarantine.verification[0]["status"] == "failed"
    assert quarantine.rollback["status"] == "succeeded"
    assert story.checkpoint is not None and story.checkpoint.count > quarantine.result_seq
    assert story.checkpoint.signer == "local-ed25519"


def test_run_story_of_an_approval_includes_its_later_review(sample):
    story = run_story(sample.evidence, sample.runs["approval_reviewed"])
    assert [a["kind"] for a in story.approvals] == ["approval", "approval_review"]
    assert story.approvals[1]["reviewer"] == "carol (CISO)"
    # The checkpoint is the one over the run itself; the review came two days later.
    assert story.checkpoint.ts.startswith("2026-10-20")


def test_run_story_of_an_open_run_has_no_checkpoint_and_no_end(sample):
    story = run_story(sample.evidence, sample.runs["killed"])
    assert story.run.status == "open" and story.finished is None and story.checkpoint is None
    assert story.steps[0].status == "no result"


def test_run_story_refuses_unknown_and_short_ids(sample):
    with pytest.raises(InvalidInput, match="no run 'ffffffff'"):
        run_story(sample.evidence, "ffffffff")
    with pytest.raises(InvalidInput, match="too short"):
        run_story(sample.evidence, "ab")


# -- rendering ---------------------------------------------------------------------------------------


def test_json_is_the_model_itself(report):
    data = json.loads(render_report(report, "json"))
    assert data["integrity"]["status"] == "INTACT"
    assert len(data["gaps"]) == len(report.gaps) and data["totals"] == report.totals


def test_markdown_has_every_section(report, sample):
    text = render_report(report, "md")
    for heading in ("# HIPAA Security Rule evidence report", "## Gaps", "## Ledger integrity",
                    "## HIPAA implementation specifications", "## Incidents", "### INC-2041",
                    "## Restore tests", "## Exercises", "## Key rotations", "## Approvals", "## All runs in the period"):
        assert heading in text
    assert "**BREACH**" in text and "**review owed**" in text and "reviewed 2026-10-22 by carol (CISO)" in text
    # Every table row has as many cells as its header.
    for block in re.findall(r"(?m)^(\|.*\|\n)(\|[-:|]+\|\n)((?:\|.*\|\n)*)", text):
        width = block[1].count("|")
        for row in block[2].splitlines():
            assert row.replace("\\|", "").count("|") == width, row


def test_html_is_one_self_contained_page(report):
    page = render_report(report, "html")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    lowered = page.lower()
    for external in ("<script", "<link", "<img", "@import", "url(", "http://", "https://", "@font-face"):
        assert external not in lowered, external
    assert "INC-2041" in page and "review owed" in page and "breach" in page


def test_html_escapes_what_the_ledger_holds(tmp_path):
    signer, public = LocalEd25519Signer.generate(tmp_path / "k.pem")
    keys = TrustedKeys()
    keys.add(signer.key_id, signer.kind, public)
    ledger = Ledger(tmp_path / "evidence", signer=signer)
    record_run(ledger, "isolate-host", ["164.308(a)(6)(ii)"], ["<script>alert(1)</script>"], "failed",
               "</td><b>injected</b>", incident="INC-1")
    page = render_report(build_report(tmp_path / "evidence", keys), "html")
    assert "<script>alert" not in page and "<b>injected" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


# -- how it looks: a real browser draws it ---------------------------------------------------------


def read_png(data: bytes) -> tuple[int, int, list[bytes], int]:
    """Width, height, unfiltered rows and bytes per pixel of an 8-bit, non-interlaced RGB or RGBA PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat.append(chunk)
        elif kind == b"IEND":
            break
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(b"".join(idat))
    stride = width * bpp
    rows, prev = [], bytearray(stride)
    for y in range(height):
        at = y * (stride + 1)
        kind, line = raw[at], bytearray(raw[at + 1:at + 1 + stride])
        if kind == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 255
        elif kind == 2:
            line = bytearray((a + b) & 255 for a, b in zip(line, prev))
        elif kind == 3:
            for i in range(stride):
                line[i] = (line[i] + ((line[i - bpp] if i >= bpp else 0) + prev[i]) // 2) & 255
        elif kind == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b, c = prev[i], prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, rows, bpp


def test_chromium_draws_the_report_with_its_header_badges_and_tables(report, tmp_path):
    page = tmp_path / "report.html"
    page.write_text(render_report(report, "html"), encoding="utf-8")
    shot = tmp_path / "report.png"
    profile = tempfile.mkdtemp(prefix="crashcart-chromium-")
    try:
        result = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1280,900", page.as_uri()],
            capture_output=True, text=True, timeout=90)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    width, height, rows, bpp = read_png(shot.read_bytes())
    assert (width, height) == (1280, 900)
    pixels = [row[i:i + 3] for row in rows for i in range(0, len(row), bpp * 4)]  # every fourth pixel
    white = sum(1 for p in pixels if p == b"\xff\xff\xff")
    header_blue = sum(1 for p in pixels if abs(p[0] - 0x0b) < 12 and abs(p[1] - 0x3d) < 12 and abs(p[2] - 0x6e) < 12)
    badge_red = sum(1 for p in pixels if p[0] > 140 and p[1] < 60 and p[2] < 80)  # the "bad" red, #a40e26
    assert white < 0.9 * len(pixels), "the page is (nearly) blank"
    assert header_blue > 0.05 * len(pixels), "the summary header was not drawn with its colours"
    assert badge_red > 0, "no red of a failing status or gap was drawn"


def test_chromium_is_installed():
    # deploy/setup.sh installs it; a missing browser must fail the visual test, never skip it.
    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} is missing: run deploy/setup.sh"
