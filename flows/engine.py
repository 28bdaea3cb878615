"""Carry out a runbook on one host: plan each step, record its intent, apply, verify, roll back."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from crashcart.errors import CrashcartError, EvidenceError
from crashcart.evidence.recorder import RunRecorder
from crashcart.hooks import Event, Hooks
from crashcart.runbook import Runbook, StepSpec
from crashcart.secrets import mask
from flows.steps import REGISTRY, CheckResult, CheckStatus, Outcome, Plan, StepContext, StepStatus, command_evidence

log = logging.getLogger("crashcart.engine")


@dataclass
class StepResult:
    """One step as it ended on one host (what the flow decides its final state from)."""

    step_id: str
    kind: str
    uses: str
    status: StepStatus
    summary: str
    started: float
    duration: float
    plan: Plan | None = None
    detail: dict = field(default_factory=dict)
    verification: list[dict] = field(default_factory=list)
    rollback: dict | None = None


@dataclass
class HostRun:
    host: str
    steps: list[StepResult] = field(default_factory=list)

    def step(self, step_id: str) -> StepResult | None:
        return next((s for s in self.steps if s.step_id == step_id), None)

    def timings(self) -> dict[str, float]:
        return {s.step_id: round(s.duration, 3) for s in self.steps}


def _safe(fn, *args):
    """Run a step hook, turning any failure into (None, message) so the runbook decides what follows."""
    try:
        return fn(*args), None
    except EvidenceError:
        raise
    except CrashcartError as e:
        return None, str(e)
    except Exception as e:  # a bug in a step must still leave a failed record, not a half-written run
        log.exception("step raised")
        return None, mask(f"{type(e).__name__}: {e}")


def _plan_record(step: StepSpec, plan: Plan | None) -> dict:
    return {"summary": plan.summary if plan else None, "commands": plan.commands if plan else [],
            "nothing_to_do": bool(plan and plan.nothing_to_do)}


def _check(ctx: StepContext, spec, dry: bool) -> dict:
    cls = REGISTRY[spec.uses]
    instance = cls()
    plan, error = _safe(lambda: instance.plan(ctx, **spec.args))
    if error:
        return {"check": spec.uses, "status": CheckStatus.INCONCLUSIVE.value, "summary": f"could not plan: {error}"}
    if dry:
        return {"check": spec.uses, "status": CheckStatus.DRY.value, "summary": plan.summary, "commands": plan.commands}
    result, error = _safe(instance.apply, ctx, plan)
    if error:
        return {"check": spec.uses, "status": CheckStatus.INCONCLUSIVE.value, "summary": error}
    assert isinstance(result, CheckResult), f"check {spec.uses} returned {type(result).__name__}"
    return {"check": spec.uses, "status": result.status.value, "summary": result.summary, "detail": result.detail}


def execute_runbook(runbook: Runbook, ctx: StepContext, recorder: RunRecorder, hooks: Hooks | None = None,
                    *, only: set[str] | None = None) -> HostRun:
    """Carry out every step of `runbook` on ctx.host (or only the steps named in `only`).

    Each step: plan (no side effects) -> intent record -> apply -> verifications -> rollback when
    its on_failure says so -> result record. A dry run applies only read-only checks; every other
    step is recorded as `dry`. A step failing with on_failure=abort (or after a rollback) stops the
    runbook: the remaining steps are recorded as `skipped`.
    """
    run = HostRun(ctx.host.name)
    stopped: str | None = None
    for spec in runbook.steps:
        if only is not None and spec.id not in only:
            continue
        started = time.time()
        ctx.commands = []
        step_ref = {"id": spec.id, "kind": spec.kind, "uses": spec.uses, "args": spec.args,
                    "description": spec.description}
        if stopped:
            result = StepResult(spec.id, spec.kind, spec.uses, StepStatus.SKIPPED, f"not run: {stopped}", started, 0.0)
            recorder.result(ctx.host.name, spec.id, None, {"status": result.status.value, "summary": result.summary,
                                                           "started": started, "ended": started, "duration": 0.0})
            run.steps.append(result)
            continue
        instance = REGISTRY[spec.uses]()
        if spec.unless and ctx.facts.get(spec.unless):
            plan, error = Plan(f"nothing to do: {spec.unless.replace('_', ' ')}", nothing_to_do=True), None
        else:
            plan, error = _safe(lambda: instance.plan(ctx, **spec.args))
        intent_seq = recorder.intent(ctx.host.name, step_ref, _plan_record(spec, plan))
        verification: list[dict] = []
        rollback: dict | None = None
        detail: dict = {}
        if error:
            status, summary = StepStatus.FAILED, f"planning failed: {error}"
        elif plan.nothing_to_do:
            status, summary = StepStatus.UNCHANGED, plan.summary
        elif ctx.dry_run and not instance.read_only:
            status, summary = StepStatus.DRY, plan.summary
            verification = [_check(ctx, c, dry=True) for c in spec.verify]
        else:
            outcome, error = _safe(instance.apply, ctx, plan)
            if error:
                status, summary = StepStatus.FAILED, error
            elif isinstance(outcome, CheckResult):
                status = {CheckStatus.PASSED: StepStatus.SUCCEEDED, CheckStatus.FAILED: StepStatus.FAILED,
                          CheckStatus.INCONCLUSIVE: StepStatus.UNVERIFIED}.get(outcome.status, StepStatus.FAILED)
                summary, detail = outcome.summary, outcome.detail
            else:
                assert isinstance(outcome, Outcome), f"step {spec.uses} returned {type(outcome).__name__}"
                status, summary, detail = outcome.status, outcome.summary, outcome.detail
            if status is StepStatus.SUCCEEDED and spec.verify:
                verification = _verify(ctx, spec)
                states = {v["status"] for v in verification}
                repair = getattr(instance, "repair", None)
                if CheckStatus.FAILED.value in states and repair:
                    # One repair and one more verification (e.g. firewalld out of step with nftables).
                    note, repair_error = _safe(repair, ctx, plan, verification)
                    if note or repair_error:
                        detail = {**detail, "repair": note or f"repair failed: {repair_error}",
                                  "verification_before_repair": verification}
                    if note:
                        summary = f"{summary}; {note}"
                        verification = _verify(ctx, spec)
                        states = {v["status"] for v in verification}
                if CheckStatus.FAILED.value in states:
                    failed = [v for v in verification if v["status"] == CheckStatus.FAILED.value]
                    status, summary = StepStatus.FAILED, f"verification failed: {failed[0]['summary']}"
                elif CheckStatus.INCONCLUSIVE.value in states:
                    status, summary = StepStatus.UNVERIFIED, f"{summary}; verification inconclusive"
            if status is StepStatus.FAILED and spec.on_failure == "rollback" and spec.rollback:
                rollback = _rollback(ctx, spec)
                status = StepStatus.ROLLED_BACK if rollback["status"] == StepStatus.SUCCEEDED.value else StepStatus.ROLLBACK_FAILED
                summary = f"{summary}; rollback {rollback['status']}: {rollback['summary']}"
        ended = time.time()
        result = StepResult(spec.id, spec.kind, spec.uses, status, mask(summary), started, ended - started,
                            plan, detail, verification, rollback)
        recorder.result(ctx.host.name, spec.id, intent_seq, {
            "status": status.value, "summary": result.summary, "started": started, "ended": ended,
            "duration": round(ended - started, 4), "commands": command_evidence(ctx.commands),
            "detail": detail, "verification": verification, "rollback": rollback,
        })
        run.steps.append(result)
        log.info("%s %s: %s (%.2fs) %s", ctx.host.name, spec.id, status.value, ended - started, result.summary)
        if hooks:
            hooks.emit(Event("step_finished", recorder.run_id, recorder.runbook["name"] if recorder.runbook else "",
                             status.value, result.summary, (ctx.host.name,), recorder.incident,
                             {"step": spec.id}))
        if status in (StepStatus.FAILED, StepStatus.ROLLED_BACK, StepStatus.ROLLBACK_FAILED) and spec.on_failure != "continue":
            stopped = f"step {spec.id!r} {status.value}"
    return run


def _verify(ctx: StepContext, spec: StepSpec, attempts: int = 3, pause: float = 1.0) -> list[dict]:
    """Run a step's verifications side by side; retry the inconclusive ones a few times."""
    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(max_workers=len(spec.verify), thread_name_prefix="crashcart-verify") as pool:
        results = list(pool.map(lambda c: _check(ctx, c, dry=False), spec.verify))
    for _ in range(attempts - 1):
        again = [i for i, r in enumerate(results) if r["status"] == CheckStatus.INCONCLUSIVE.value]
        if not again:
            break
        time.sleep(pause)
        for i in again:
            results[i] = _check(ctx, spec.verify[i], dry=False)
    return results


def _rollback(ctx: StepContext, spec: StepSpec) -> dict:
    cls = REGISTRY[spec.rollback.uses]
    instance = cls()
    commands_before = len(ctx.commands)
    plan, error = _safe(lambda: instance.plan(ctx, **spec.rollback.args))
    if error:
        return {"uses": spec.rollback.uses, "status": StepStatus.FAILED.value, "summary": f"planning failed: {error}"}
    outcome, error = _safe(instance.apply, ctx, plan)
    body = {"uses": spec.rollback.uses, "plan": plan.commands,
            "commands": command_evidence(ctx.commands[commands_before:])}
    if error:
        return {**body, "status": StepStatus.FAILED.value, "summary": error}
    return {**body, "status": outcome.status.value, "summary": outcome.summary, "detail": outcome.detail}
