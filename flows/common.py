"""What every crashcart flow shares: the ledger, per-host locks, hooks and carrying a runbook out on hosts."""

from __future__ import annotations

import concurrent.futures as cf
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from crashcart.errors import LockBusy
from crashcart.evidence.ledger import Ledger
from crashcart.evidence.recorder import RunRecorder, Trigger, close_orphaned_runs
from crashcart.hooks import Event, Hooks
from crashcart.inventory import Host
from crashcart.runbook import Runbook, load_runbook
from crashcart.runtime import Runtime
from flows.engine import HostRun, execute_runbook
from flows.steps import REGISTRY, Services, StepContext
from integrations.ssh import SessionPool

# Importing the step modules registers their steps.
import flows.containment  # noqa: F401,E402
import flows.credentials  # noqa: F401,E402
import flows.forensics  # noqa: F401,E402
import flows.restore  # noqa: F401,E402
import flows.rotation  # noqa: F401,E402

log = logging.getLogger("crashcart.flows")


class LazyTransitSigner:
    """The Vault transit signer, made on first use so a Vault outage only surfaces at signing time."""

    kind = "vault-transit"

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._signer = None

    def _real(self):
        if self._signer is None:
            from integrations.vault import Vault

            self._signer = Vault.from_runtime(self._runtime).transit_signer()
        return self._signer

    @property
    def key_id(self) -> str:
        return self._real().key_id

    def sign(self, payload: bytes) -> str:
        return self._real().sign(payload)


_ledgers: dict[tuple, Ledger] = {}


def open_ledger(runtime: Runtime) -> Ledger:
    """The evidence ledger, signing checkpoints with Vault transit and falling back to the local key.

    One Ledger object per directory and process: a long-running process (the responder, the worker)
    keeps its head and Merkle frontier warm instead of rescanning the files at every run.
    """
    ev = runtime.settings.evidence
    key = (str(ev.dir), str(ev.local_signing_key), ev.checkpoint_every, str(runtime.settings.config_path))
    if key not in _ledgers:
        _ledgers[key] = Ledger.from_settings(ev, signer=LazyTransitSigner(runtime))
    return _ledgers[key]


def vault_factory(runtime: Runtime):
    def make():
        from integrations.vault import Vault

        return Vault.from_runtime(runtime)

    return make


def runbook(name: str) -> Runbook:
    return load_runbook(name, REGISTRY)


# -- per-host lock ------------------------------------------------------------------------------
def lock_name(host: str) -> str:
    return f"crashcart-host-{host}"


@contextmanager
def host_locks(hosts: list[str], wait_seconds: float) -> Iterator[None]:
    """Hold every host's Prefect global concurrency slot (limit 1 each, strict) for the block.

    Two responders, or an isolation and a key rotation, never act on one host at once: the second
    waits up to `wait_seconds`, then gets LockBusy. All the hosts of a run are taken in one request,
    atomically: one request instead of one per host (they contend on the server's database), and
    two runs over overlapping hosts cannot each hold half and wait for the other.
    """
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency

    names = [lock_name(h) for h in hosts]
    with get_client(sync_client=True) as client:
        for name in names:
            client.upsert_global_concurrency_limit_by_name(name, 1)
    try:
        with concurrency(names, occupy=1, timeout_seconds=wait_seconds, strict=True):
            yield
    except TimeoutError:
        raise LockBusy(f"{', '.join(hosts)}: locked by another crashcart run (waited {wait_seconds:g}s): "
                       "see `crashcart evidence list`, then try again") from None


def host_lock(host: str, wait_seconds: float):
    """The lock of one host (see host_locks)."""
    return host_locks([host], wait_seconds)


# -- running a runbook over hosts ---------------------------------------------------------------
@dataclass
class RunOutcome:
    """What a flow returns (and the CLI prints): no secrets, JSON-safe via as_dict()."""

    run_id: str
    runbook: str
    status: str
    summary: str
    hosts: dict[str, dict] = field(default_factory=dict)
    dry_run: bool = False
    flow_run_id: str | None = None

    def as_dict(self) -> dict:
        return {"run_id": self.run_id, "runbook": self.runbook, "status": self.status, "summary": self.summary,
                "hosts": self.hosts, "dry_run": self.dry_run, "flow_run_id": self.flow_run_id}


def current_flow_run_id() -> str | None:
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id) if flow_run.id else None
    except Exception:
        return None


def trigger_of(triggered_by: str | None) -> Trigger:
    """`cli:user@host`, `slack:U123`, `tabletop:...`; none given means a deployment (schedule or API)."""
    if triggered_by:
        kind, _, who = triggered_by.partition(":")
        return Trigger(kind or "api", who or "unknown")
    try:
        from prefect.client.orchestration import get_client
        from prefect.runtime import deployment, flow_run

        if deployment.id:
            # Only the scheduler sets auto_scheduled; a run started from the UI or API does not.
            with get_client(sync_client=True) as client:
                run = client.read_flow_run(flow_run.id)
            creator = getattr(run, "created_by", None)
            who = f"deployment {deployment.name}" + (f" ({creator.display_value})" if creator and getattr(creator, "display_value", None) else "")
            return Trigger("schedule" if run.auto_scheduled else "api", who)
    except Exception as e:  # the trigger is evidence, but a lookup failure must not stop the run
        log.warning("could not tell how this deployment run was started: %s", e)
        return Trigger("api", "deployment (unknown)")
    return Trigger.from_environment()


def make_hooks(runtime: Runtime, recorder: RunRecorder) -> Hooks:
    """The hooks of a run: Slack notifications when configured; failures are recorded, never raised."""

    def failed(name: str, event: Event, reason: str) -> None:
        recorder.event("hook_failed", {"hook": name, "event": event.kind, "reason": reason})

    hooks = Hooks(on_failure=failed)
    try:
        from flows.notify import register_notifications
    except ImportError:
        return hooks
    register_notifications(hooks, runtime, recorder)
    return hooks


Decide = Callable[[Host, HostRun, bool], tuple[str, str]]


def carry_out(runtime: Runtime, book: Runbook, hosts: list[Host], *, params: dict, kind: str,
              triggered_by: str | None, dry_run: bool, decide: Decide, lock: bool = True,
              incident: str | None = None, event_kinds: dict[str, str] | None = None) -> RunOutcome:
    """Run `book` on every host in parallel under each host's lock, record everything, decide the outcome.

    `decide(host, host_run, dry_run)` maps a host's step results to (final state, one-line summary).
    """
    ledger = open_ledger(runtime)
    close_orphaned_runs(ledger)
    trigger = trigger_of(triggered_by)
    recorder = RunRecorder(
        ledger, kind=kind, runbook=book.identity(), params=params,
        hosts=[{"name": h.name, "environment": h.environment, "address": h.address} for h in hosts],
        trigger=trigger, hipaa=list(book.hipaa), flow_run_id=current_flow_run_id(),
        mode="dry_run" if dry_run else "execute", incident=incident,
    )
    outcome = RunOutcome(recorder.run_id, book.name, "failed", "", dry_run=dry_run, flow_run_id=recorder.flow_run_id)
    with recorder:
        hooks = make_hooks(runtime, recorder)
        host_names = tuple(h.name for h in hosts)
        hooks.emit(Event("run_started", recorder.run_id, book.name, "started",
                         f"{book.title}: {', '.join(host_names)}" + (" (dry run)" if dry_run else ""),
                         host_names, incident, {"params": recorder.params, "trigger": trigger.as_dict(),
                                                "dry_run": dry_run}))
        services = Services({"vault": vault_factory(runtime)})
        results: dict[str, tuple[str, str, HostRun | None]] = {}
        with SessionPool(runtime.settings.ssh) as pool:
            def one(host: Host) -> None:
                ctx = StepContext(runtime, host, pool, params, dry_run=dry_run, services=services, recorder=recorder)
                run = execute_runbook(book, ctx, recorder, hooks)
                status, summary = decide(host, run, dry_run)
                results[host.name] = (status, summary, run)

            def all_hosts() -> None:
                with cf.ThreadPoolExecutor(max_workers=min(16, len(hosts)), thread_name_prefix="crashcart-host") as workers:
                    for future in [workers.submit(one, h) for h in hosts]:
                        future.result()

            try:
                if lock and not dry_run:
                    with host_locks(list(host_names), runtime.settings.lock_wait_seconds):
                        all_hosts()
                else:
                    all_hosts()
            except LockBusy as e:
                recorder.event("lock_busy", {"hosts": list(host_names), "reason": str(e)})
                for host in hosts:
                    results.setdefault(host.name, ("failed", str(e), None))
        for host in hosts:
            status, summary, run = results[host.name]
            outcome.hosts[host.name] = {
                "status": status, "summary": summary,
                "steps": [{"id": s.step_id, "status": s.status.value, "summary": s.summary,
                           "duration": round(s.duration, 3), "commands": s.plan.commands if s.plan else [],
                           "verification": s.verification} for s in (run.steps if run else [])],
            }
        statuses = [r[0] for r in results.values()]
        outcome.status = worst(statuses)
        outcome.summary = "; ".join(f"{name}: {r[0]} ({r[1]})" for name, r in results.items())
        recorder.finish(outcome.status, outcome.summary, {"hosts": {n: r[0] for n, r in results.items()}})
        for name, (status, summary, _) in results.items():
            if event_kinds and status in event_kinds:
                hooks.emit(Event(event_kinds[status], recorder.run_id, book.name, status, summary, (name,), incident,
                                 {"host": name}))
        hooks.emit(Event("run_finished", recorder.run_id, book.name, outcome.status, outcome.summary, host_names,
                         incident, {"hosts": {n: r[0] for n, r in results.items()}, "dry_run": dry_run}))
        # No drain here: the containment result never waits for Slack. Deliveries finish in the
        # background; the CLI waits a bounded time after printing the result (crashcart.hooks.drain_all)
        # and whatever is still in flight at exit is recorded as failed for `crashcart notify retry`.
        hooks.close()
    publish_artifact(runtime, outcome)
    return outcome


SEVERITY = ["failed", "rollback_failed", "rolled_back", "applied_unverified", "deferred", "partial", "cancelled",
            "contained", "released", "succeeded", "passed", "unchanged", "planned", "exercised"]


def worst(statuses: list[str]) -> str:
    """The overall status of a multi-host run: the most severe of its hosts'."""
    if not statuses:
        return "failed"
    return min(statuses, key=lambda s: SEVERITY.index(s) if s in SEVERITY else 0)


def publish_artifact(runtime: Runtime, outcome: RunOutcome) -> None:
    """A Prefect markdown artifact for people reading the UI; the ledger, not this, is the evidence."""
    if not outcome.flow_run_id:
        return
    try:
        from prefect.artifacts import create_markdown_artifact

        lines = [f"# {outcome.runbook}: {outcome.status}", "", outcome.summary, "",
                 f"Evidence: run `{outcome.run_id}` in `{runtime.settings.evidence.dir}` "
                 f"(`crashcart evidence show {outcome.run_id}`)", "", "| host | status | summary |", "|---|---|---|"]
        lines += [f"| {h} | {r['status']} | {r['summary']} |" for h, r in outcome.hosts.items()]
        create_markdown_artifact("\n".join(lines), key=f"evidence-{outcome.runbook}",
                                 description=f"crashcart evidence run {outcome.run_id}")
    except Exception as e:  # the UI artifact is a convenience; its failure changes nothing recorded
        log.warning("could not publish the Prefect artifact: %s", e)
