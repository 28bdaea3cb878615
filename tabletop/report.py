"""After-action reports of tabletop exercises, rendered (Markdown, HTML) from the exercise's ledger records alone."""

from __future__ import annotations

import hashlib
import os
from datetime import datetime
from pathlib import Path
from typing import Iterable

import jinja2

from crashcart import hipaa
from crashcart.errors import InvalidInput
from crashcart.evidence.ledger import Record, iter_records

# A report is a function of the run's records up to its score (never of the clock or of files that
# may change), so `crashcart tabletop report RUN` renders the same bytes as the files written when the
# exercise ended, whose sha256 the run_finished record holds.
TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
EXERCISES_DIR = "exercises"
FORMATS = {"md": "report.md", "html": "report.html"}
TABLETOP_KINDS = frozenset({"run_started", "tabletop_scenario", "tabletop_inject", "tabletop_response",
                            "tabletop_decision", "tabletop_fault", "tabletop_cleanup", "tabletop_score", "run_finished"})


def exercise_records(evidence_dir: Path, run_id: str, since: datetime | None = None) -> list[Record]:
    """The records of one exercise run that its report is made of, in ledger order."""
    return [r for r in iter_records(evidence_dir, since=since, run=run_id) if r.kind in TABLETOP_KINDS]


def collect(records: Iterable[Record]) -> dict:
    """The exercise's record bodies by kind (finished responses under "responses", their starts under "starts")."""
    out: dict = {"run_id": None, "started": None, "scenario": None, "injects": [], "starts": [], "responses": [],
                 "decisions": [], "faults": [], "cleanups": [], "score": None, "finished": None}
    lists = {"tabletop_inject": "injects", "tabletop_decision": "decisions", "tabletop_fault": "faults",
             "tabletop_cleanup": "cleanups"}
    for rec in records:
        out["run_id"] = out["run_id"] or rec.run
        if rec.kind == "run_started":
            out["started"] = {**rec.body, "ts": rec.ts}
        elif rec.kind == "tabletop_scenario":
            out["scenario"] = rec.body
        elif rec.kind == "tabletop_response":
            out["starts" if rec.body.get("event") == "started" else "responses"].append(rec.body)
        elif rec.kind in lists:
            out[lists[rec.kind]].append(rec.body)
        elif rec.kind == "tabletop_score":
            out["score"] = rec.body
        elif rec.kind == "run_finished":
            out["finished"] = {**rec.body, "ts": rec.ts}
    return out


def _clock(at: str | None) -> str:
    return f"{at[11:23]} UTC" if at else "-"


def _t(minutes: float | None) -> str:
    return "-" if minutes is None else f"T+{minutes:.1f} min"


def exercise_view(records: Iterable[Record]) -> dict:
    """What the templates show, from the records (pure). run_finished is left out: the report is made before it."""
    c = collect(records)
    if c["scenario"] is None or c["started"] is None:
        raise InvalidInput(f"run {c['run_id'] or '?'} has no tabletop exercise records to report on")
    sc = c["scenario"]
    doc = sc["scenario"]
    speed = float(sc["speed"])

    def at_minute(offset: float | None) -> float | None:
        return None if offset is None else offset * speed / 60

    rows: list[dict] = []
    for i in c["injects"]:
        rows.append({"offset": i["offset_seconds"], "scenario": _t(i["minute"]), "real": _clock(i["at"]),
                     "since_start": f"+{i['offset_seconds']:.1f} s", "kind": "inject",
                     "text": f"{i['id']}: {i['title']}", "detail": i.get("description") or ""})
    for s in c["starts"]:
        waited = s.get("waited_seconds") or 0
        rows.append({"offset": s["offset_seconds"], "scenario": _t(at_minute(s["offset_seconds"])), "real": _clock(s["at"]),
                     "since_start": f"+{s['offset_seconds']:.1f} s", "kind": "response started",
                     "text": f"{s['id']}: {s['runbook']} {', '.join(s['targets'])}"
                     + (f" (fault {s['fault']['kind']})" if s.get("fault") else ""),
                     "detail": f"waited {waited:.1f} s for earlier responses on the same target" if waited >= 0.5 else ""})
    for r in c["responses"]:
        rows.append({"offset": r["finished_offset"], "scenario": _t(at_minute(r["finished_offset"])),
                     "real": _clock(r["at"]), "since_start": f"+{r['finished_offset']:.1f} s", "kind": "response done",
                     "text": f"{r['id']}: {r.get('status') or 'error'} after {r['minutes']:.1f} scenario min "
                             f"({r['seconds']:.1f} s real)",
                     "detail": (r.get("error") or r.get("summary") or "")
                     + (f" [evidence run {r['run_id']}]" if r.get("run_id") else "")})
    for d in c["decisions"]:
        if d.get("mode") == "unfacilitated":
            offset, text = d["asked_offset"], f"{d['id']}: not exercised (unfacilitated)"
        elif d.get("chosen"):
            offset = d["answered_offset"]
            text = f"{d['id']}: chose {d['chosen']} (by {d['who']}) after {d['minutes']:.1f} scenario min"
        else:
            offset, text = d["asked_offset"], f"{d['id']}: no decision ({d.get('no_answer')})"
        rows.append({"offset": offset, "scenario": _t(at_minute(offset)), "real": _clock(d.get("answered_at") or d["asked_at"]),
                     "since_start": f"+{offset:.1f} s", "kind": "decision", "text": text, "detail": d["question"]})
    end = max((row["offset"] for row in rows), default=0.0)
    for cl in c["cleanups"]:
        rows.append({"offset": end + 0.001, "scenario": "after the scenario", "real": _clock(cl["at"]), "since_start": "",
                     "kind": "cleanup", "text": f"release {cl['host']} (isolated by {cl['isolated_by']}): {cl.get('status')}",
                     "detail": cl.get("summary") or ""})
    rows.sort(key=lambda row: row["offset"])

    score = c["score"] or {}
    outcome_of = {r["id"]: r["outcome"] for r in score.get("responses", [])}
    exercising = [(r["id"], r.get("lessons") or ()) for i in doc["injects"] for r in i.get("responses") or ()]
    lessons = [{"id": lesson["id"], "text": lesson["text"],
                "responses": [{"id": rid, "outcome": outcome_of.get(rid, "-")} for rid, ids in exercising if lesson["id"] in ids]}
               for lesson in doc["lessons"]]
    started = c["started"]
    trigger = started.get("trigger") or {}
    return {
        "run_id": c["run_id"], "incident": sc.get("incident"), "exercise": sc.get("exercise"),
        "scenario": {"name": doc["scenario"], "version": doc["version"], "title": doc["title"],
                     "narrative": doc["narrative"].strip(), "path": doc.get("path"), "sha256": doc.get("sha256")},
        "hipaa": [{"spec": s, "name": hipaa.SPECIFICATIONS.get(s, "")} for s in started.get("hipaa") or doc["hipaa"]],
        "speed": speed, "facilitated": bool(sc.get("facilitated")), "dry_run": bool(sc.get("dry_run")),
        "started": started.get("started"), "trigger": f"{trigger.get('kind')}:{trigger.get('who')}",
        "mode": started.get("mode"), "timeline": rows, "score": score, "lessons": lessons,
        "faults": [{"response": f.get("response"), "kind": f.get("kind"), "event": f.get("event"),
                    "changes": f.get("changes") or {}, "damaged_pack": f.get("damaged_pack"),
                    "copy_path": f.get("copy"), "error": f.get("error"), "note": f.get("note")} for f in c["faults"]],
        "environments": sorted({h.get("environment") for h in started.get("hosts") or () if h.get("environment")}),
    }


def _md(value: object) -> str:
    """A value safe inside a Markdown table cell: one line, pipes escaped."""
    return " ".join(str(value if value is not None else "-").split()).replace("|", "\\|")


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
                             autoescape=lambda name: bool(name) and name.endswith(".html.j2"),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["md"] = _md
    env.filters["minutes"] = lambda value: "-" if value is None else f"{value:.1f} min"
    return env


def render(view: dict, fmt: str) -> str:
    """The report as Markdown (`md`) or HTML (`html`)."""
    if fmt not in FORMATS:
        raise InvalidInput(f"report format {fmt!r} is not one of {', '.join(FORMATS)}")
    return _environment().get_template(f"{FORMATS[fmt]}.j2").render(**view)


def report_dir(evidence_dir: Path, run_id: str) -> Path:
    return Path(evidence_dir) / EXERCISES_DIR / run_id


def write_reports(evidence_dir: Path, run_id: str, view: dict) -> dict:
    """Render and store both reports under evidence.dir/exercises/<run_id>/; returns {fmt: {path, sha256}}."""
    folder = report_dir(evidence_dir, run_id)
    for directory in (folder.parent, folder):
        directory.mkdir(mode=0o700, exist_ok=True)
    written = {}
    for fmt, name in FORMATS.items():
        data = render(view, fmt).encode()
        path = folder / name
        tmp = path.with_name(f".{name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        written[fmt] = {"path": str(path), "sha256": hashlib.sha256(data).hexdigest()}
    return written


def find_exercise(evidence_dir: Path, run: str) -> str:
    """The run id of the exercise `run` names (a full id, or a prefix of at least 8 characters)."""
    if len(run) < 8 or not all(ch in "0123456789abcdef-" for ch in run):
        raise InvalidInput(f"run {run!r}: give an exercise's run id (or its first 8 characters or more)")
    found = sorted({rec.run for rec in iter_records(evidence_dir, kind="run_started")
                    if rec.run and rec.run.startswith(run) and rec.body.get("run_kind") == "tabletop"})
    if not found:
        raise InvalidInput(f"no tabletop exercise {run} in {evidence_dir} (see `crashcart tabletop list`)")
    if len(found) > 1:
        raise InvalidInput(f"run {run} is ambiguous: {len(found)} exercises start with it")
    return found[0]


def rerender(evidence_dir: Path, run: str, fmt: str) -> tuple[str, dict | None]:
    """(the report re-rendered from the ledger, what run_finished recorded about that format's file or None)."""
    run_id = find_exercise(evidence_dir, run)
    records = exercise_records(evidence_dir, run_id)
    finished = collect(records)["finished"] or {}
    return render(exercise_view(records), fmt), ((finished.get("detail") or {}).get("reports") or {}).get(fmt)


def list_exercises(evidence_dir: Path) -> list[dict]:
    """Past exercises in the ledger, oldest first: run id, when, scenario, mode, status and score line."""
    runs: dict[str, dict] = {}
    for rec in iter_records(evidence_dir):
        if rec.kind == "run_started" and rec.body.get("run_kind") == "tabletop" and rec.run:
            runbook = rec.body.get("runbook") or {}
            runs[rec.run] = {"run_id": rec.run, "started": rec.body.get("started"), "scenario": runbook.get("name"),
                             "title": runbook.get("title"), "mode": rec.body.get("mode"),
                             "speed": (rec.body.get("params") or {}).get("speed"), "status": "running",
                             "summary": ""}
        elif rec.kind == "run_finished" and rec.run in runs:
            runs[rec.run].update(status=rec.body.get("status"), summary=rec.body.get("summary") or "")
    return list(runs.values())
