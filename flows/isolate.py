"""The isolate-host, release-host and rotate-credentials flows."""

from __future__ import annotations

from prefect import flow

from crashcart import validation as v
from crashcart.errors import ConfirmationRefused, InvalidInput
from crashcart.inventory import Host
from crashcart.runtime import Runtime
from flows.common import RunOutcome, carry_out, current_flow_run_id, runbook
from flows.engine import HostRun
from flows.steps import StepStatus as S


def decide_containment(host: Host, run: HostRun, dry_run: bool) -> tuple[str, str]:
    """contained | applied_unverified | rolled_back | failed (planned for a dry run)."""
    if dry_run:
        return "planned", "dry run: plan shown, nothing changed"
    pre, quarantine, persist = run.step("pre-state"), run.step("quarantine"), run.step("persist")
    if pre is None or pre.status is not S.SUCCEEDED:
        return "failed", pre.summary if pre else "pre-state not read"
    notes = []
    for step_id, label in (("volatile", "volatile capture"), ("triage", "triage archive"), ("rotate", "credential rotation")):
        step = run.step(step_id)
        if step and step.status in (S.FAILED, S.DEFERRED, S.UNVERIFIED):
            notes.append(f"{label} {step.status.value}: {step.summary}")
    tail = ("; " + "; ".join(notes)) if notes else ""
    if quarantine.status is S.UNCHANGED:
        return "contained", "already contained: nothing to do" + tail
    if quarantine.status is S.ROLLED_BACK:
        return "rolled_back", quarantine.summary + tail
    if quarantine.status in (S.FAILED, S.ROLLBACK_FAILED, S.SKIPPED):
        return "failed", quarantine.summary + tail
    if quarantine.status is S.UNVERIFIED:
        return "applied_unverified", quarantine.summary + tail
    if persist is None or persist.status is not S.SUCCEEDED:
        return "applied_unverified", f"verified at runtime but not made permanent: {persist.summary if persist else 'skipped'}" + tail
    return "contained", "isolated and verified from outside" + tail


def decide_release(host: Host, run: HostRun, dry_run: bool) -> tuple[str, str]:
    if dry_run:
        return "planned", "dry run: plan shown, nothing changed"
    step = run.step("release")
    if step.status is S.UNCHANGED:
        return "unchanged", step.summary
    if step.status is S.SUCCEEDED:
        return "released", "services reachable again from the probe host"
    return "failed", step.summary


def decide_rotation(host: Host, run: HostRun, dry_run: bool) -> tuple[str, str]:
    if dry_run:
        return "planned", "dry run: plan shown, nothing changed"
    step = run.step("rotate")
    return {S.SUCCEEDED: "succeeded", S.DEFERRED: "deferred", S.UNCHANGED: "unchanged"}.get(step.status, "failed"), step.summary


def select_hosts(runtime: Runtime, hosts: list[str] | None, group: str | None, confirmed_production: bool) -> list[Host]:
    """The targets, validated before anything runs; production hosts need an explicit confirmation."""
    chosen = runtime.inventory.select(hosts or [], group)
    production = [h.name for h in chosen if h.is_production]
    if production and not confirmed_production:
        raise ConfirmationRefused(f"{', '.join(production)} {'is' if len(production) == 1 else 'are'} production: "
                                  "confirm at the prompt or pass --yes")
    return chosen


def _dead_man(value: int | None) -> int | None:
    if value is not None and not 10 <= int(value) <= 600:
        raise InvalidInput(f"dead_man_seconds {value} must be between 10 and 600")
    return value


@flow(name="isolate-host", persist_result=False, validate_parameters=True)
def isolate_host(hosts: list[str] | None = None, reason: str = "", incident: str | None = None,
                 group: str | None = None, dry_run: bool = False, confirmed_production: bool = False,
                 triggered_by: str | None = None, dead_man_seconds: int | None = None,
                 config: str | None = None, break_glass: bool = False) -> dict:
    """Contain hosts: snapshot, quarantine with a dead man's switch, verify from outside, rotate.

    With slack.require_approval on, production targets wait for an approver's Slack click before
    anything is applied (`break_glass` skips that during a declared emergency; a review is owed).
    """
    from flows.notify import approval_required, request_approval

    runtime = Runtime.load(config)
    reason = v.free_text(reason, "reason")
    incident = v.incident_id(incident) if incident else None
    chosen = select_hosts(runtime, hosts, group, confirmed_production)
    params = {"hosts": [h.name for h in chosen], "reason": reason, "incident": incident, "group": group,
              "dry_run": dry_run, "dead_man_seconds": _dead_man(dead_man_seconds), "operator": triggered_by}
    if approval_required(runtime, chosen, dry_run):
        approval = request_approval(runtime, chosen, runbook_name="isolate-host", params=params, incident=incident,
                                    triggered_by=triggered_by, break_glass=break_glass)
        if not approval.allows:
            summary = f"{approval.summary()}: nothing applied"
            return RunOutcome(approval.run_id, "isolate-host", "failed", summary,
                              {h.name: {"status": "failed", "summary": summary, "steps": []} for h in chosen},
                              flow_run_id=current_flow_run_id()).as_dict()
        params["approval"] = approval.as_params()
    outcome = carry_out(runtime, runbook("isolate-host"), chosen, params=params, kind="isolate-host",
                        triggered_by=triggered_by, dry_run=dry_run, decide=decide_containment, incident=incident,
                        event_kinds={"contained": "contained", "applied_unverified": "containment_unverified",
                                     "rolled_back": "containment_failed", "failed": "containment_failed"})
    return outcome.as_dict()


@flow(name="release-host", persist_result=False, validate_parameters=True)
def release_host(hosts: list[str] | None = None, reason: str = "", incident: str | None = None,
                 group: str | None = None, dry_run: bool = False, confirmed_production: bool = False,
                 triggered_by: str | None = None, config: str | None = None) -> dict:
    """Undo an isolation: recorded zones back, quarantine removed, services reachable again."""
    runtime = Runtime.load(config)
    reason = v.free_text(reason, "reason")
    incident = v.incident_id(incident) if incident else None
    chosen = select_hosts(runtime, hosts, group, confirmed_production)
    params = {"hosts": [h.name for h in chosen], "reason": reason, "incident": incident, "dry_run": dry_run,
              "operator": triggered_by}
    outcome = carry_out(runtime, runbook("release-host"), chosen, params=params, kind="release-host",
                        triggered_by=triggered_by, dry_run=dry_run, decide=decide_release, incident=incident,
                        event_kinds={"released": "released", "failed": "release_failed"})
    return outcome.as_dict()


@flow(name="rotate-credentials", persist_result=False, validate_parameters=True)
def rotate_credentials(hosts: list[str] | None = None, group: str | None = None, accounts: list[str] | None = None,
                       dry_run: bool = False, confirmed_production: bool = False, triggered_by: str | None = None,
                       reason: str = "routine rotation", config: str | None = None) -> dict:
    """Rotate the inventory accounts' passwords and SSH keys on hosts (the isolate-host step on its own)."""
    runtime = Runtime.load(config)
    chosen = select_hosts(runtime, hosts, group, confirmed_production)
    accounts = [v.user_name(a) for a in accounts or []]
    params = {"hosts": [h.name for h in chosen], "accounts": accounts, "dry_run": dry_run,
              "reason": v.free_text(reason, "reason"), "operator": triggered_by}
    outcome = carry_out(runtime, runbook("rotate-credentials"), chosen, params=params, kind="rotate-credentials",
                        triggered_by=triggered_by, dry_run=dry_run, decide=decide_rotation,
                        event_kinds={"succeeded": "rotation", "deferred": "rotation", "failed": "rotation"})
    return outcome.as_dict()
