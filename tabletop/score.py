"""Scoring a tabletop exercise from its records: each response met, late or missed, and what to revise (pure)."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence


class Outcome(str, enum.Enum):
    """The closed set of outcomes of one expected response."""

    MET = "met"                        # done as the plan says, within the time allowed
    LATE = "late"                      # done as the plan says, after the time allowed
    MISSED = "missed"                  # not done: the runbook did not reach its final state, or another choice
    NOT_EXERCISED = "not_exercised"    # a decision in an unfacilitated exercise: neither met nor missed
    DRY = "dry"                        # a runbook planned only (dry run): neither met nor missed


COUNTED = (Outcome.MET, Outcome.LATE, Outcome.MISSED)
NOT_FACILITATED = "not exercised (unfacilitated)"


def scenario_minutes(real_seconds: float, speed: float) -> float:
    """Real seconds on the scenario clock: at speed N, one real second is N/60 scenario minutes."""
    return real_seconds * speed / 60.0


def _min(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} min"


def _real(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def judge_runbook(*, status: str | None, summary: str, error: str | None, minutes: float | None, allowed: float,
                  done: Sequence[str], dry_run: bool) -> tuple[Outcome, str]:
    """A runbook response: met/late when it reached one of its `done` states, else missed, with why."""
    if error:
        return Outcome.MISSED, error
    if dry_run:
        return Outcome.DRY, "dry run: plan shown, nothing changed"
    if status in done:
        if minutes is not None and minutes > allowed:
            return Outcome.LATE, f"{status}, after {_min(minutes)} against {allowed:g} allowed"
        return Outcome.MET, f"{status} in {_min(minutes)} ({allowed:g} allowed)"
    return Outcome.MISSED, f"{status or 'no result'}: {summary}" if summary else f"{status or 'no result'}"


def judge_decision(*, facilitated: bool, chosen: str | None, expected: str, minutes: float | None,
                   allowed: float, no_answer: str | None = None) -> tuple[Outcome, str]:
    """A decision: not exercised without a facilitator; met/late for the expected choice; missed otherwise."""
    if not facilitated:
        return Outcome.NOT_EXERCISED, NOT_FACILITATED
    if chosen is None:
        return Outcome.MISSED, f"no decision ({no_answer or 'no answer'})"
    if chosen != expected:
        return Outcome.MISSED, f"chose {chosen!r}, the plan says {expected!r}"
    if minutes is not None and minutes > allowed:
        return Outcome.LATE, f"chose {chosen!r} after {_min(minutes)} against {allowed:g} allowed"
    return Outcome.MET, f"chose {chosen!r} in {_min(minutes)} ({allowed:g} allowed)"


def fault_handled(outcome: Outcome, status: str | None, expect: str, expect_status: str | None) -> bool | None:
    """Whether a faulted response ended as the scenario expected (late counts as met: it was done)."""
    if outcome not in COUNTED:
        return None
    if expect_status is not None and status != expect_status:
        return False
    return (outcome is Outcome.MISSED) == (expect == "missed")


@dataclass
class ResponseScore:
    """The judgement of one expected response."""

    id: str
    inject: str
    kind: str                     # runbook | decision
    what: str
    outcome: Outcome
    why: str
    allowed_minutes: float
    minutes: float | None = None
    real_seconds: float | None = None
    status: str | None = None
    run_id: str | None = None
    chosen: str | None = None
    who: str | None = None
    fault: str | None = None
    expect: str | None = None
    expect_status: str | None = None
    as_expected: bool | None = None

    def as_dict(self) -> dict:
        return {**asdict(self), "outcome": self.outcome.value}


@dataclass
class Score:
    """The exercise's score and the after-action findings, as recorded in the evidence."""

    responses: list[ResponseScore]
    counts: dict[str, int]
    faults: dict[str, int]
    time_to_contain: dict | None
    decisions: list[dict]
    rto: list[dict]
    went_well: list[str] = field(default_factory=list)
    gaps: list[str] = field(default_factory=list)
    revision_items: list[str] = field(default_factory=list)

    @property
    def summary(self) -> str:
        c = self.counts
        line = (f"{c.get('met', 0)} met, {c.get('late', 0)} late, {c.get('missed', 0)} missed"
                + (f", {c['not_exercised']} not exercised" if c.get("not_exercised") else "")
                + (f", {c['dry']} dry" if c.get("dry") else ""))
        if self.faults.get("total"):
            line += f"; faults handled as expected: {self.faults['as_expected']}/{self.faults['total']}"
        return line

    def as_dict(self) -> dict:
        return {"summary": self.summary, "responses": [r.as_dict() for r in self.responses], "counts": self.counts,
                "faults": self.faults, "time_to_contain": self.time_to_contain, "decisions": self.decisions,
                "rto": self.rto, "went_well": self.went_well, "gaps": self.gaps,
                "revision_items": self.revision_items}


def score_exercise(*, speed: float, dry_run: bool, facilitated: bool, injects: Sequence[Mapping[str, Any]],
                   responses: Sequence[Mapping[str, Any]], decisions: Sequence[Mapping[str, Any]],
                   cleanups: Sequence[Mapping[str, Any]] = ()) -> Score:
    """Judge every response from the exercise's records (the bodies of tabletop_* records), in scenario order.

    `responses` are the finished runbook responses, `decisions` the decision records, `injects` the
    fired injects (for the time to contain, measured from the first one).
    """
    scored: list[ResponseScore] = []
    for r in responses:
        fault = r.get("fault") or {}
        outcome, why = judge_runbook(status=r.get("status"), summary=r.get("summary") or "", error=r.get("error"),
                                     minutes=r.get("minutes"), allowed=float(r["allowed_minutes"]),
                                     done=r.get("done") or (), dry_run=dry_run)
        s = ResponseScore(r["id"], r["inject"], "runbook", f"{r['runbook']} {', '.join(r.get('targets') or ())}",
                          outcome, why, float(r["allowed_minutes"]), r.get("minutes"), r.get("seconds"),
                          r.get("status"), r.get("run_id"))
        if fault:
            s.fault, s.expect, s.expect_status = fault["kind"], fault["expect"], fault.get("status")
            s.as_expected = fault_handled(outcome, s.status, s.expect, s.expect_status)
        scored.append(s)
    for d in decisions:
        outcome, why = judge_decision(facilitated=facilitated, chosen=d.get("chosen"), expected=d["expected"],
                                      minutes=d.get("minutes"), allowed=float(d["allowed_minutes"]),
                                      no_answer=d.get("no_answer"))
        scored.append(ResponseScore(d["id"], d["inject"], "decision", f"decision: {d['question']}", outcome, why,
                                    float(d["allowed_minutes"]), d.get("minutes"), d.get("seconds"),
                                    chosen=d.get("chosen"), who=d.get("who")))
    order = {rid: n for n, rid in enumerate(_scenario_order(injects, responses, decisions))}
    scored.sort(key=lambda s: order.get(s.id, len(order)))

    counts = {o.value: sum(1 for s in scored if s.outcome is o) for o in Outcome}
    faulted = [s for s in scored if s.fault]
    faults = {"total": len(faulted), "as_expected": sum(1 for s in faulted if s.as_expected),
              "not_as_expected": sum(1 for s in faulted if s.as_expected is False)}
    contain = _time_to_contain(injects, responses, speed)
    decision_times = [{"id": s.id, "question": s.what.removeprefix("decision: "), "outcome": s.outcome.value,
                       "minutes": s.minutes, "allowed_minutes": s.allowed_minutes, "chosen": s.chosen, "who": s.who}
                      for s in scored if s.kind == "decision"]
    rto = [dict(item, response=r["id"]) for r in responses for item in (r.get("rto") or [])]
    score = Score(scored, counts, faults, contain, decision_times, rto)
    _findings(score, responses, cleanups, speed, dry_run)
    return score


def _scenario_order(injects, responses, decisions) -> list[str]:
    ids: list[str] = []
    for inject in injects:
        ids += list(inject.get("responses") or ())
    return ids + [r["id"] for r in [*responses, *decisions] if r["id"] not in ids]


def _time_to_contain(injects, responses, speed: float) -> dict | None:
    """Scenario minutes from the first inject to the first isolate-host response that ended contained."""
    if not injects:
        return None
    first = min(float(i["offset_seconds"]) for i in injects)
    contained = [r for r in responses if r["runbook"] == "isolate-host" and r.get("status") == "contained"
                 and r.get("finished_offset") is not None]
    if not contained:
        return None
    best = min(contained, key=lambda r: float(r["finished_offset"]))
    seconds = float(best["finished_offset"]) - first
    return {"response": best["id"], "hosts": list(best.get("targets") or ()), "real_seconds": round(seconds, 3),
            "minutes": round(scenario_minutes(seconds, speed), 2)}


def _findings(score: Score, responses, cleanups, speed: float, dry_run: bool) -> None:
    """What went well, the gaps, and the revision items, in words a facilitator can paste into the plan."""
    well, gaps, items = score.went_well, score.gaps, score.revision_items
    for s in score.responses:
        timing = f"{_min(s.minutes)} against {s.allowed_minutes:g} allowed" + (
            f" ({_real(s.real_seconds)} real at x{speed:g})" if s.real_seconds is not None and speed != 1 else "")
        if s.fault:
            handled = "as expected" if s.as_expected else "NOT as expected"
            line = f"fault {s.fault} on {s.id!r} ({s.what}): {s.status or s.outcome.value} {handled}"
            if s.as_expected:
                well.append(line)
                items.append(f"fault {s.fault}: {s.what} ended {s.status or s.outcome.value} as expected "
                             "(keep this fallback in the plan)")
            elif s.as_expected is False:
                gaps.append(f"{line}: expected {s.expect}" + (f" ({s.expect_status})" if s.expect_status else "")
                            + f", got {s.outcome.value}: {s.why}")
                items.append(f"fault {s.fault}: {s.what} did not fail safe as the plan expects; review the runbook")
            continue
        if s.outcome is Outcome.MET:
            well.append(f"{s.what}: met ({timing})" if s.kind == "runbook"
                        else f"decision {s.id!r}: {s.why}" + (f" by {s.who}" if s.who else ""))
        elif s.outcome is Outcome.LATE:
            gaps.append(f"{s.what}: late ({timing})")
            items.append(f"{'decision ' + repr(s.id) if s.kind == 'decision' else s.what} took {timing}")
        elif s.outcome is Outcome.MISSED:
            gaps.append(f"{s.what}: missed: {s.why}")
            items.append(f"{'decision ' + repr(s.id) if s.kind == 'decision' else s.what} was missed ({s.why}); "
                         "revise the plan or the runbook")
        elif s.outcome is Outcome.NOT_EXERCISED:
            gaps.append(f"decision {s.id!r}: {NOT_FACILITATED}")
    if any(s.outcome is Outcome.NOT_EXERCISED for s in score.responses):
        items.append("run the exercise facilitated (--facilitated) so that the decisions are exercised too")
    if score.time_to_contain:
        t = score.time_to_contain
        well.append(f"time to contain {', '.join(t['hosts'])}: {t['minutes']:.1f} min from the first inject"
                    + (f" ({_real(t['real_seconds'])} real)" if speed != 1 else ""))
    elif not dry_run and any(r["runbook"] == "isolate-host" and (r.get("fault") or {}).get("expect") != "missed"
                             for r in responses):
        gaps.append("no isolate-host response ended contained: the exercise never contained a host")
    for r in score.rto:
        seconds, target = r.get("seconds"), r.get("target_minutes")
        if seconds is None or target is None:
            continue
        took = f"{seconds / 60:.1f} min" + (f" ({seconds:.1f} s)" if seconds < 120 else "")
        line = f"restore of {r['repository']} took {took} against a {target:g} min RTO"
        if r.get("ok"):
            well.append(f"RTO met: {line}")
        else:
            gaps.append(f"RTO breach: {line}")
            items.append(line)
    for c in cleanups:
        if c.get("status") in ("released", "unchanged"):
            items.append(f"{c['host']} was still isolated when the scenario ended; crashcart released it "
                         "(add a release step to the scenario or the plan)")
        else:
            gaps.append(f"{c['host']} could not be released after the exercise ({c.get('status')}: "
                        f"{c.get('summary')}): release it by hand")
    if speed > 1 and any(s.kind == "runbook" and s.outcome is Outcome.LATE for s in score.responses):
        items.append(f"runbook times are real and read on the scenario clock (x{speed:g}); "
                     "rerun at --speed 1 before revising an allowed time")
