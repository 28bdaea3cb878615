"""Running a tabletop exercise: injects on a clock, the real runbooks against staging, decisions, faults, evidence."""

from __future__ import annotations

import concurrent.futures as cf
import getpass
import importlib
import json
import logging
import math
import os
import queue
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import yaml

from crashcart import validation as v
from crashcart.errors import CrashcartError, InvalidInput, SSHError
from crashcart.evidence.ledger import iter_records
from crashcart.evidence.recorder import RunRecorder, close_orphaned_runs, utcnow
from crashcart.hooks import Event
from crashcart.inventory import Inventory
from crashcart.runtime import Runtime
from crashcart.secrets import mask
from crashcart.settings import Settings
from tabletop import report as reporting
from tabletop.scenario import (
    RUNBOOKS,
    UNAVAILABLE_VAULT,
    UNREACHABLE_ADDRESS,
    FaultKind,
    Inject,
    Response,
    Scenario,
    TargetKind,
    check_against_inventory,
)
from tabletop.score import scenario_minutes, score_exercise

# An exercise is planned first (no side effects: the schedule, each response's flow call, each fault's
# copy of the configuration), then carried out. Runbook responses start when their inject fires, as
# ordinary crashcart runs triggered by `tabletop:<exercise id>`; two responses on the same host or
# repository run in scenario order (the per-host lock would serialise them anyway, but in no
# particular order). Faults are applied to copies of the inventory and settings written under
# state_dir/tabletop/<exercise id>/, one per faulted response, and removed afterwards; the shared
# inventory is never touched.
#
# Decisions are typed at the terminal in a facilitated exercise. Without a facilitator they are
# recorded as "not exercised (unfacilitated)" and count neither met nor missed: choosing the expected
# option automatically would score the plan on an answer nobody gave. Injects are announced in Slack
# (event `tabletop_inject`, with the decision's question) when Slack is configured, so participants
# away from the terminal follow along; their answers are still typed at the facilitator's terminal.

log = logging.getLogger("crashcart.tabletop")

EXERCISE_DIR = "tabletop"
MAX_SPEED = 10_000.0
FLOWS = {
    "isolate-host": "flows.isolate:isolate_host",
    "release-host": "flows.isolate:release_host",
    "rotate-credentials": "flows.isolate:rotate_credentials",
    "rotate-luks": "flows.rotation:rotate_luks",
    "rotate-tls": "flows.rotation:rotate_tls",
    "restore-test": "flows.restore:restore_test",
}
# A quarantine step in one of these states may have left the host cut off: the exercise releases it.
_APPLIED = frozenset({"succeeded", "unverified", "failed", "rollback_failed"})
_COPY_NAME_RE = re.compile(r"^/.+/tabletop-[0-9a-f]{8}-[A-Za-z0-9._-]+$")


@dataclass(frozen=True)
class ExerciseOptions:
    """How to run an exercise: the clock's speed, whether people decide, whether runbooks only plan."""

    speed: float = 1.0
    facilitated: bool = False
    dry_run: bool = False
    triggered_by: str | None = None

    def checked(self) -> "ExerciseOptions":
        speed = self.speed
        if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not math.isfinite(speed) \
                or not 0 < speed <= MAX_SPEED:
            raise InvalidInput(f"speed {speed!r} must be a number above 0 and at most {MAX_SPEED:g} "
                               "(1 is real time; 60 makes a scenario minute last a second)")
        return ExerciseOptions(float(speed), self.facilitated, self.dry_run, self.triggered_by)


# -- decisions -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecisionPrompt:
    """A decision put to the participants, with the inject that called for it."""

    inject: Inject
    response: Response
    scenario_minute: float


@dataclass(frozen=True)
class Answer:
    """What the participants chose, who decided, and when (monotonic, for timing; UTC, for the record)."""

    choice: str
    who: str
    who_source: str             # typed | os_user | scripted
    chosen_at: float
    at: str


class NoAnswer(Exception):
    """Raised by a decider when no decision was made (input closed, nobody chose a valid option)."""


Decider = Callable[[DecisionPrompt], Answer]


def os_user() -> str:
    return os.environ.get("SUDO_USER") or getpass.getuser()


class TerminalDecider:
    """Asks the people at the terminal: the option (by number or id), then who decided (default: the OS user)."""

    ATTEMPTS = 5

    def __init__(self, read: Callable[[str], str] = input, write: Callable[[str], None] = print,
                 default_who: str | None = None) -> None:
        self.read = read
        self.write = write
        self.default_who = default_who or os_user()
        self._lock = threading.Lock()

    def __call__(self, prompt: DecisionPrompt) -> Answer:
        r = prompt.response
        with self._lock:
            self.write(f"\n[T+{prompt.scenario_minute:.1f} min] DECISION {r.id!r} ({prompt.inject.title}): {r.decision}")
            for n, option in enumerate(r.options, 1):
                self.write(f"  {n}) {option.id}: {option.text}")
            choice = None
            for _ in range(self.ATTEMPTS):
                try:
                    text = self.read(f"Choice [1-{len(r.options)} or id]: ").strip()
                except EOFError:
                    raise NoAnswer("input closed") from None
                chosen_at, at = time.monotonic(), utcnow()
                choice = self._match(text, r)
                if choice is not None:
                    break
                self.write(f"  not an option: {text[:40]!r}")
            if choice is None:
                raise NoAnswer(f"no valid choice after {self.ATTEMPTS} attempts")
            who, source = self.default_who, "os_user"
            for _ in range(self.ATTEMPTS):
                try:
                    typed = self.read(f"Decided by [{self.default_who}]: ").strip()
                except EOFError:
                    typed = ""
                if not typed:
                    break
                try:
                    who, source = v.free_text(typed, "name", 100), "typed"
                    break
                except CrashcartError as e:
                    self.write(f"  {e}")
            return Answer(choice, who, source, chosen_at, at)

    @staticmethod
    def _match(text: str, response: Response) -> str | None:
        ids = [o.id for o in response.options]
        if text.isdigit() and 1 <= int(text) <= len(ids):
            return ids[int(text) - 1]
        return text if text in ids else None


# -- the plan (no side effects) -------------------------------------------------------------------------


@dataclass(frozen=True)
class RepoCopyPlan:
    """corrupted_backup: the repository copied on its server, one data pack damaged, the URL pointed at it."""

    repo: str
    server: str
    source: str
    copy: str
    url: str


@dataclass(frozen=True)
class FaultPlan:
    """A fault injected into one response's copy of the configuration."""

    response: str
    kind: FaultKind
    expect: str
    status: str | None
    changes: dict
    repo_copy: RepoCopyPlan | None = None

    def as_dict(self) -> dict:
        return {"response": self.response, "kind": self.kind.value, "expect": self.expect, "status": self.status,
                "changes": self.changes,
                "repo_copy": None if self.repo_copy is None else {
                    "repo": self.repo_copy.repo, "server": self.repo_copy.server, "source": self.repo_copy.source,
                    "copy": self.repo_copy.copy, "url": self.repo_copy.url}}


@dataclass(frozen=True)
class ResponsePlan:
    """One runbook response: the flow it calls, with what, under which copy of the configuration."""

    inject: Inject
    response: Response
    flow: str
    kwargs: dict
    config_key: str
    keys: tuple[str, ...]
    done: tuple[str, ...]
    fault: FaultPlan | None = None


@dataclass(frozen=True)
class ExercisePlan:
    """Everything an exercise will do, decided before it starts."""

    exercise_id: str
    incident: str
    scenario: Scenario
    options: ExerciseOptions
    directory: Path
    schedule: tuple[tuple[Inject, float], ...]
    responses: tuple[ResponsePlan, ...]
    faults: tuple[FaultPlan, ...]

    def config_path(self, key: str) -> Path:
        return self.directory / key / "crashcart.toml"

    def response(self, response_id: str) -> ResponsePlan | None:
        return next((p for p in self.responses if p.response.id == response_id), None)

    def lines(self) -> list[str]:
        """The plan as a person reads it."""
        o = self.options
        out = [f"exercise {self.exercise_id} ({self.incident}): {self.scenario.title} "
               f"[{self.scenario.duration_minutes:g} scenario min at x{o.speed:g} = "
               f"{self.scenario.duration_minutes * 60 / o.speed:.0f} s of clock, plus the runbooks' own time]"
               + (" DRY RUN" if o.dry_run else "") + (" facilitated" if o.facilitated else " unfacilitated")]
        for inject, due in self.schedule:
            out.append(f"  T+{inject.minute:g} min (+{due:.1f} s): {inject.title}")
            for r in inject.responses:
                fault = self.response(r.id).fault if r.runbook else None
                out.append(f"      {r.id}: {r.describe()} within {r.allowed_minutes:g} min"
                           + (f" [fault {fault.kind.value}, expected {fault.expect}]" if fault else ""))
        return out


def default_reason(scenario: Scenario, inject: Inject) -> str:
    return v.free_text(f"tabletop {scenario.name}: {inject.title}"[:500], "reason")


def plan_exercise(inventory: Inventory, settings: Settings, scenario: Scenario, options: ExerciseOptions,
                  exercise_id: str) -> ExercisePlan:
    """The exercise's schedule, flow calls and fault copies (pure: nothing is written or run)."""
    options = options.checked()
    short = exercise_id.replace("-", "")[:8]
    incident = f"TABLETOP-{short}"
    trigger = f"tabletop:{exercise_id}"
    schedule = tuple((inject, inject.minute * 60.0 / options.speed) for inject in scenario.injects)
    plans: list[ResponsePlan] = []
    faults: list[FaultPlan] = []
    for inject, response in scenario.responses():
        if response.runbook is None:
            continue
        rules = RUNBOOKS[response.runbook]
        params = dict(response.params)
        if rules.targets is TargetKind.HOST:
            kwargs = {"hosts": list(response.target), "reason": params.pop("reason", None) or default_reason(scenario, inject),
                      "confirmed_production": False, **params}
            if response.runbook in ("isolate-host", "release-host"):
                kwargs["incident"] = incident
            keys = tuple(f"host:{t}" for t in response.target)
        else:
            kwargs = {"repos": list(response.target), "snapshot": params.get("snapshot", "latest")}
            keys = tuple(f"repo:{t}" for t in response.target)
        kwargs.update(dry_run=options.dry_run, triggered_by=trigger)
        fault = _plan_fault(inventory, response, short) if response.fault else None
        if fault:
            faults.append(fault)
        plans.append(ResponsePlan(inject, response, FLOWS[response.runbook], kwargs,
                                  response.id if fault else "base", keys, tuple(sorted(rules.done)), fault))
    directory = Path(settings.state_dir) / EXERCISE_DIR / exercise_id
    return ExercisePlan(exercise_id, incident, scenario, options, directory, schedule, tuple(plans), tuple(faults))


def _plan_fault(inventory: Inventory, response: Response, short: str) -> FaultPlan:
    fault = response.fault
    assert fault is not None
    base = {"response": response.id, "kind": fault.kind, "expect": fault.expect.value, "status": fault.status}
    if fault.kind is FaultKind.HOST_UNREACHABLE:
        address = fault.address or UNREACHABLE_ADDRESS
        return FaultPlan(**base, changes={f"hosts.{t}.address": address for t in response.target})
    if fault.kind is FaultKind.VAULT_UNAVAILABLE:
        return FaultPlan(**base, changes={"vault.address": fault.address or UNAVAILABLE_VAULT})
    from integrations.restic import parse_sftp_url

    [name] = response.target  # the document check allows exactly one repository here
    repo = inventory.repo(name)
    target = parse_sftp_url(repo.url)
    server = next(h for h in inventory.hosts.values() if target.host in (h.address, h.name))
    source = v.remote_path(target.path)
    copy = v.remote_path(f"{source.rsplit('/', 1)[0] or ''}/tabletop-{short}-{response.id}")
    user = f"{target.user}@" if target.user else ""
    url = (f"sftp://{user}{target.host}:{target.port}/{copy}" if repo.url.startswith("sftp://")
           else f"sftp:{user}{target.host}:{copy}")
    return FaultPlan(**base, changes={f"restic_repositories.{name}.url": url},
                     repo_copy=RepoCopyPlan(name, server.name, source, copy, url))


def inventory_document(inventory: Inventory, fault: FaultPlan | None = None) -> dict:
    """The inventory as a self-contained document (Ansible hosts and defaults resolved), with a fault's changes."""
    doc = inventory.model_dump(mode="json", exclude={"path"})
    for dotted, value in (fault.changes if fault else {}).items():
        node = doc
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return doc


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v_) for v_ in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def settings_toml(settings: Settings, inventory_path: Path) -> str:
    """The settings as a TOML file with absolute paths and another inventory (the exercise's copy)."""
    data = settings.model_dump(mode="json", exclude={"config_path"})
    data["inventory"] = str(inventory_path)
    lines = ["# Written by crashcart tabletop: this exercise's copy of the settings; removed when it ends."]
    lines += [f"{k} = {_toml_value(val)}" for k, val in data.items() if not isinstance(val, dict) and val is not None]
    for section, values in data.items():
        if isinstance(values, dict):
            lines += ["", f"[{section}]"]
            lines += [f"{k} = {_toml_value(val)}" for k, val in values.items() if val is not None]
    return "\n".join(lines) + "\n"


# -- carrying it out -------------------------------------------------------------------------------------


@dataclass
class ResponseResult:
    """A runbook response once its runbook returned (handed to `on_response` before later responses start)."""

    id: str
    inject: str
    runbook: str
    targets: tuple[str, ...]
    status: str | None
    summary: str
    run_id: str | None
    error: str | None
    seconds: float
    minutes: float
    outcome_hosts: dict = field(default_factory=dict)


@dataclass
class ExerciseResult:
    """What an exercise returns (and the CLI prints)."""

    run_id: str
    scenario: str
    status: str
    summary: str
    score: dict
    reports: dict
    dry_run: bool

    def as_dict(self) -> dict:
        return {"run_id": self.run_id, "scenario": self.scenario, "status": self.status, "summary": self.summary,
                "score": self.score, "reports": self.reports, "dry_run": self.dry_run}


def run_exercise(runtime: Runtime, scenario: Scenario, options: ExerciseOptions, *, decider: Decider | None = None,
                 say: Callable[[str], None] | None = None,
                 on_response: Callable[[ResponseResult], None] | None = None) -> ExerciseResult:
    """Run a validated scenario against the (staging) inventory and record it as an exercise of the plan.

    Refused before anything runs (InvalidScenario, nothing recorded) when a target is missing or
    production in `runtime.inventory`, whatever the options.
    """
    options = options.checked()
    check_against_inventory(scenario, runtime.inventory)
    if options.facilitated and decider is None:
        raise InvalidInput("a facilitated exercise needs someone to decide: run it from a terminal")
    from flows.common import current_flow_run_id, make_hooks, open_ledger, trigger_of

    ledger = open_ledger(runtime)
    hosts = sorted({t for _, r in scenario.responses() if r.runbook and RUNBOOKS[r.runbook].targets is TargetKind.HOST
                    for t in r.target})
    repos = sorted({t for _, r in scenario.responses() if r.runbook == "restore-test" for t in r.target})
    recorder = RunRecorder(
        ledger, kind="tabletop", runbook=scenario.identity(),
        params={"scenario": scenario.name, "speed": options.speed, "facilitated": options.facilitated,
                "dry_run": options.dry_run},
        hosts=[{"name": h, "environment": runtime.inventory.hosts[h].environment,
                "address": runtime.inventory.hosts[h].address} for h in hosts]
        + [{"name": r, "kind": "restic_repository"} for r in repos],
        trigger=trigger_of(options.triggered_by), hipaa=list(scenario.hipaa), flow_run_id=current_flow_run_id(),
        mode="dry_run" if options.dry_run else "execute",
    )
    plan = plan_exercise(runtime.inventory, runtime.settings, scenario, options, recorder.run_id)
    recorder.incident = plan.incident
    close_orphaned_runs(ledger)
    with recorder:
        hooks = make_hooks(runtime, recorder)
        try:
            exercise = _Exercise(runtime, plan, recorder, hooks, decider, say or (lambda line: None), on_response)
            result = exercise.run()
        finally:
            left = hooks.drain(timeout=3.0)
            if left:
                log.warning("%d notification(s) still in flight; they continue in the background", left)
            hooks.close()
    return result


class _Exercise:
    """One exercise being carried out (threads: the clock here, one per running response, one for decisions)."""

    def __init__(self, runtime: Runtime, plan: ExercisePlan, recorder: RunRecorder, hooks, decider: Decider | None,
                 say: Callable[[str], None], on_response: Callable[[ResponseResult], None] | None) -> None:
        self.runtime = runtime
        self.plan = plan
        self.recorder = recorder
        self.hooks = hooks
        self.decider = decider
        self.say = say
        self.on_response = on_response
        self.speed = plan.options.speed
        self.t0 = time.monotonic()
        self.since = datetime.now(timezone.utc) - timedelta(minutes=1)
        self.results: dict[str, dict] = {}
        self._results_lock = threading.Lock()
        self._latest: dict[str, threading.Event] = {}
        self._decisions: queue.Queue = queue.Queue()
        self._pending_decisions = 0
        self._decided = threading.Condition()
        self._made_copies: list[RepoCopyPlan] = []

    # -- clock ---------------------------------------------------------------------------------
    def offset(self, at: float | None = None) -> float:
        return round((time.monotonic() if at is None else at) - self.t0, 3)

    def minute(self, at: float | None = None) -> float:
        return round(scenario_minutes(self.offset(at), self.speed), 2)

    def run(self) -> ExerciseResult:
        plan = self.plan
        scenario = plan.scenario
        self.recorder.event("tabletop_scenario", {
            "exercise": plan.exercise_id, "incident": plan.incident, "scenario": scenario.model_dump(mode="json", by_alias=True),
            "speed": self.speed, "facilitated": plan.options.facilitated, "dry_run": plan.options.dry_run,
            "faults": [f.as_dict() for f in plan.faults], "plan": plan.lines(), "at": utcnow()})
        for line in plan.lines():
            self.say(line)
        futures: list[cf.Future] = []
        try:
            self._setup()
            if plan.options.facilitated:
                threading.Thread(target=self._decision_worker, name="crashcart-tabletop-decide", daemon=True).start()
            self.t0 = time.monotonic()
            for inject, due in plan.schedule:
                wait = self.t0 + due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                futures += self._fire(inject, due)
            for future in futures:
                future.result()
            with self._decided:
                while self._pending_decisions:
                    self._decided.wait()
        finally:
            for future in futures:  # a cancelled exercise still waits for runbooks already started
                try:
                    future.result()
                except Exception as e:  # recorded by the response itself; nothing more to do here
                    log.error("tabletop response failed: %s", mask(str(e)))
            self._decisions.put(None)
            try:
                self._cleanup()
            finally:
                self._teardown()
        return self._finish()

    # -- faults ---------------------------------------------------------------------------------
    def _setup(self) -> None:
        """Write the configuration copies and make the damaged repository copies (before the clock starts)."""
        plan = self.plan
        settings = self.runtime.settings
        keys = {"base": None, **{f.response: f for f in plan.faults}}
        for key, fault in keys.items():
            folder = plan.directory / key
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            inventory_path = folder / "inventory.yaml"
            _write_private(inventory_path, yaml.safe_dump(inventory_document(self.runtime.inventory, fault), sort_keys=False))
            _write_private(folder / "crashcart.toml", settings_toml(settings, inventory_path))
            copy = Runtime.load(folder / "crashcart.toml")
            if Path(copy.settings.inventory) != inventory_path:
                raise InvalidInput(f"the environment overrides the exercise's inventory ({copy.settings.inventory}): "
                                   "unset CRASHCART_INVENTORY to run an exercise")
        for fault in plan.faults:
            body = {**fault.as_dict(), "config": str(plan.config_path(fault.response))}
            if fault.repo_copy is not None and not plan.options.dry_run:
                body["damaged_pack"] = self._make_damaged_copy(fault.repo_copy)
            elif fault.repo_copy is not None:
                body["note"] = "dry run: the damaged copy is not made"
            self.recorder.event("tabletop_fault", {**body, "event": "applied", "at": utcnow()})
            self.say(f"fault {fault.kind.value} applied to {fault.response!r}: "
                     + ", ".join(f"{k} = {val}" for k, val in fault.changes.items()))

    def _make_damaged_copy(self, copy: RepoCopyPlan) -> str:
        from integrations.ssh import SessionPool, script

        if not _COPY_NAME_RE.match(copy.copy):
            raise InvalidInput(f"refusing to make a repository copy at {copy.copy!r}")
        host = self.runtime.inventory.host(copy.server)
        self._made_copies.append(copy)  # before the copy starts: a half-made copy is removed as well
        with SessionPool(self.runtime.settings.ssh) as pool:
            session = pool.get(host)
            # The largest pack holds file data (restic keeps tree blobs in their own, small packs), so a
            # restore of the latest snapshot has to read it.
            result = session.run(script(
                'set -e; test ! -e "$2"; cp -a "$1" "$2"; '
                'pack=$(find "$2/data" -type f -printf "%s %p\\n" | sort -n | tail -n 1 | cut -d" " -f2-); '
                'test -n "$pack"; size=$(stat -c %s "$pack"); '
                'printf "CRASHCART-TABLETOP-DAMAGE" | dd of="$pack" bs=1 seek=$((size / 2)) conv=notrunc status=none; '
                'echo "$pack"', copy.source, copy.copy))
        return result.stdout.strip().splitlines()[-1]

    def _teardown(self) -> None:
        """Remove the repository copies and the configuration copies (recorded)."""
        from integrations.ssh import SessionPool, script

        for copy in self._made_copies:
            body = {"response": next(f.response for f in self.plan.faults if f.repo_copy == copy),
                    "kind": FaultKind.CORRUPTED_BACKUP.value, "event": "removed", "copy": copy.copy, "at": utcnow()}
            try:
                with SessionPool(self.runtime.settings.ssh) as pool:
                    pool.get(self.runtime.inventory.host(copy.server)).run(script('rm -rf -- "$1"', copy.copy))
            except SSHError as e:
                body.update(event="remove_failed", error=str(e))
                log.error("could not remove the damaged repository copy %s on %s: %s", copy.copy, copy.server, e)
            self.recorder.event("tabletop_fault", body)
        self._made_copies.clear()
        shutil.rmtree(self.plan.directory, ignore_errors=True)

    # -- injects and responses -------------------------------------------------------------------
    def _fire(self, inject: Inject, due: float) -> list[cf.Future]:
        fired = time.monotonic()
        offset = self.offset(fired)
        question = next((r.decision for r in inject.responses if r.decision), None)
        self.recorder.event("tabletop_inject", {
            "id": inject.id, "title": inject.title, "description": inject.description, "minute": inject.minute,
            "due_seconds": round(due, 3), "offset_seconds": offset, "lag_seconds": round(offset - due, 3),
            "at": utcnow(), "responses": [r.id for r in inject.responses]})
        self.hooks.emit(Event("tabletop_inject", self.recorder.run_id, "tabletop", "exercised",
                              inject.description or inject.title, (), self.plan.incident,
                              {"scenario": self.plan.scenario.name, "title": inject.title, "prompt": question,
                               "minute": inject.minute}))
        self.say(f"[T+{inject.minute:g} min, +{offset:.1f} s] INJECT {inject.id}: {inject.title}")
        futures = []
        for response in inject.responses:
            if response.decision is not None:
                self._ask(inject, response, fired)
                continue
            rp = self.plan.response(response.id)
            waits = [self._latest[k] for k in rp.keys if k in self._latest]
            done = threading.Event()
            for k in rp.keys:
                self._latest[k] = done
            futures.append(self._start(rp, fired, waits, done))
        return futures

    def _start(self, rp: ResponsePlan, fired: float, waits: list[threading.Event], done: threading.Event) -> cf.Future:
        """The response in its own thread (not a pool: a response waiting for another must never hold a worker)."""
        thread_future: cf.Future = cf.Future()

        def work() -> None:
            try:
                self._respond(rp, fired, waits)
                thread_future.set_result(None)
            except BaseException as e:  # noqa: BLE001 - handed to the clock thread through the future
                thread_future.set_exception(e)
            finally:
                done.set()

        threading.Thread(target=work, name=f"crashcart-tabletop-{rp.response.id}").start()
        return thread_future

    def _respond(self, rp: ResponsePlan, fired: float, waits: list[threading.Event]) -> None:
        r = rp.response
        for event in waits:
            event.wait()
        started = time.monotonic()
        config = self.plan.config_path(rp.config_key)
        common = {"id": r.id, "inject": rp.inject.id, "runbook": r.runbook, "targets": list(r.target),
                  "fault": None if rp.fault is None else {"kind": rp.fault.kind.value, "expect": rp.fault.expect,
                                                         "status": rp.fault.status}}
        self.recorder.event("tabletop_response", {**common, "event": "started", "at": utcnow(),
                                                  "offset_seconds": self.offset(started),
                                                  "waited_seconds": round(started - fired, 3),
                                                  "params": {k: val for k, val in rp.kwargs.items() if k != "triggered_by"},
                                                  "config": rp.config_key})
        self.say(f"[+{self.offset(started):.1f} s] START {r.id}: {r.describe()}"
                 + (f" (fault {rp.fault.kind.value})" if rp.fault else ""))
        outcome: dict = {}
        error = None
        try:
            outcome = flow_function(rp.flow)(**rp.kwargs, config=str(config))
        except CrashcartError as e:
            error = f"{type(e).__name__}: {e}"
        except Exception as e:  # a runbook's bug is this response's miss, recorded; the exercise goes on
            log.exception("tabletop response %s: %s raised", r.id, r.runbook)
            error = mask(f"{type(e).__name__}: {e}")
        finished = time.monotonic()
        seconds = finished - fired
        status = outcome.get("status")
        body = {**common, "event": "finished", "at": utcnow(), "offset_seconds": self.offset(finished),
                "fired_offset": self.offset(fired), "started_offset": self.offset(started),
                "finished_offset": self.offset(finished), "seconds": round(seconds, 3),
                "minutes": round(scenario_minutes(seconds, self.speed), 2), "runbook_seconds": round(finished - started, 3),
                "allowed_minutes": r.allowed_minutes, "done": list(rp.done), "status": status,
                "summary": outcome.get("summary") or "", "run_id": outcome.get("run_id"), "error": error,
                "hosts": {h: {"status": o.get("status"), "summary": o.get("summary"),
                              "steps": {s["id"]: s["status"] for s in o.get("steps") or ()}}
                          for h, o in (outcome.get("hosts") or {}).items()}}
        if r.runbook == "restore-test" and outcome.get("run_id") and not self.plan.options.dry_run:
            body["rto"] = self._rto(outcome["run_id"])
        self.recorder.event("tabletop_response", body)
        with self._results_lock:
            self.results[r.id] = body
        self.say(f"[+{self.offset(finished):.1f} s] DONE  {r.id}: {status or 'error'} after "
                 f"{body['minutes']:.1f} scenario min ({seconds:.1f} s) - {error or body['summary']}")
        if self.on_response is not None:
            self.on_response(ResponseResult(r.id, rp.inject.id, r.runbook or "", r.target, status, body["summary"],
                                            body["run_id"], error, body["seconds"], body["minutes"], body["hosts"]))

    def _rto(self, run_id: str) -> list[dict]:
        """RTO achieved against the target, per repository, from the restore test's own result records."""
        found = []
        for rec in iter_records(self.runtime.settings.evidence.dir, since=self.since, kind="restore_test", run=run_id):
            rto = rec.body.get("rto") or {}
            found.append({"repository": rec.body.get("repository"), "status": rec.body.get("status"),
                          "seconds": rto.get("seconds"), "target_minutes": rto.get("target_minutes"),
                          "ok": rto.get("ok"), "breach": rto.get("breach")})
        return found

    # -- decisions ----------------------------------------------------------------------------------
    def _ask(self, inject: Inject, response: Response, fired: float) -> None:
        base = {"id": response.id, "inject": inject.id, "question": response.decision,
                "options": [{"id": o.id, "text": o.text} for o in response.options], "expected": response.expected,
                "allowed_minutes": response.allowed_minutes, "asked_at": utcnow(), "asked_offset": self.offset(fired)}
        if not self.plan.options.facilitated:
            self.recorder.event("tabletop_decision", {**base, "mode": "unfacilitated", "chosen": None, "who": None,
                                                      "answered_at": None, "seconds": None, "minutes": None})
            self.say(f"           DECISION {response.id}: not exercised (unfacilitated)")
            return
        with self._decided:
            self._pending_decisions += 1
        self._decisions.put((inject, response, fired, base))

    def _decision_worker(self) -> None:
        while True:
            item = self._decisions.get()
            if item is None:
                return
            inject, response, fired, base = item
            body = {**base, "mode": "facilitated"}
            try:
                answer = self.decider(DecisionPrompt(inject, response, self.minute(fired)))
                seconds = answer.chosen_at - fired
                body.update(chosen=answer.choice, who=answer.who, who_source=answer.who_source, answered_at=answer.at,
                            answered_offset=self.offset(answer.chosen_at), seconds=round(seconds, 3),
                            minutes=round(scenario_minutes(seconds, self.speed), 2))
            except NoAnswer as e:
                body.update(chosen=None, who=None, answered_at=None, seconds=None, minutes=None, no_answer=str(e))
            except Exception as e:  # the decider's bug: the decision is recorded as unanswered, the exercise goes on
                log.exception("tabletop decider failed")
                body.update(chosen=None, who=None, answered_at=None, seconds=None, minutes=None,
                            no_answer=mask(f"{type(e).__name__}: {e}"))
            try:
                self.recorder.event("tabletop_decision", body)
                self.say(f"           DECISION {response.id}: " + (
                    f"{body['chosen']} by {body['who']} after {body['minutes']:.1f} scenario min"
                    if body.get("chosen") else f"no decision ({body.get('no_answer')})"))
            finally:
                with self._decided:
                    self._pending_decisions -= 1
                    self._decided.notify_all()

    # -- the end ------------------------------------------------------------------------------------
    def _cleanup(self) -> None:
        """Release every host this exercise cut off that no later release-host response released."""
        if self.plan.options.dry_run:
            return
        with self._results_lock:
            results = list(self.results.values())
        isolated: dict[str, str] = {}
        for body in sorted(results, key=lambda b: b["finished_offset"]):
            if body["runbook"] == "isolate-host":
                for host, outcome in body["hosts"].items():
                    if (outcome.get("steps") or {}).get("quarantine") in _APPLIED:
                        isolated[host] = body["id"]
            elif body["runbook"] == "release-host":
                for host, outcome in body["hosts"].items():
                    if outcome.get("status") in ("released", "unchanged"):
                        isolated.pop(host, None)
        if not isolated:
            return
        release_host = flow_function(FLOWS["release-host"])
        for host, by in isolated.items():
            self.say(f"cleanup: {host} is still isolated by {by!r}; releasing it")
            body = {"host": host, "isolated_by": by, "at": utcnow()}
            try:
                out = release_host(hosts=[host], reason=f"tabletop exercise {self.plan.incident} over: release what it isolated",
                                   incident=self.plan.incident, confirmed_production=False,
                                   triggered_by=f"tabletop:{self.plan.exercise_id}", config=str(self.plan.config_path("base")))
                body.update(status=out["status"], summary=out["summary"], run_id=out["run_id"])
            except CrashcartError as e:
                body.update(status="failed", summary=str(e), run_id=None)
            self.recorder.event("tabletop_cleanup", body)

    def _finish(self) -> ExerciseResult:
        """Score from the records as written, record the score, render the reports from the records, close the run."""
        evidence = self.runtime.settings.evidence.dir
        run_id = self.recorder.run_id
        collected = reporting.collect(reporting.exercise_records(evidence, run_id, since=self.since))
        score = score_exercise(speed=self.speed, dry_run=self.plan.options.dry_run,
                               facilitated=self.plan.options.facilitated, injects=collected["injects"],
                               responses=collected["responses"], decisions=collected["decisions"],
                               cleanups=collected["cleanups"])
        self.recorder.event("tabletop_score", score.as_dict())
        view = reporting.exercise_view(reporting.exercise_records(evidence, run_id, since=self.since))
        reports = reporting.write_reports(evidence, run_id, view)
        for fmt, info in reports.items():
            self.say(f"report ({fmt}): {info['path']} sha256 {info['sha256']}")
        self.recorder.finish("exercised", f"{self.plan.scenario.name}: {score.summary}",
                             {"score": {"summary": score.summary, "counts": score.counts, "faults": score.faults,
                                        "time_to_contain": score.time_to_contain},
                              "reports": reports, "incident": self.plan.incident})
        self.hooks.emit(Event("run_finished", run_id, "tabletop", "exercised",
                              f"Tabletop exercise {self.plan.scenario.title}: {score.summary}", (), self.plan.incident,
                              {"hosts": {s.id: s.outcome.value for s in score.responses},
                               "dry_run": self.plan.options.dry_run}))
        return ExerciseResult(run_id, self.plan.scenario.name, "exercised", score.summary, score.as_dict(), reports,
                              self.plan.options.dry_run)


def flow_function(entry: str) -> Callable[..., dict]:
    """The flow a FLOWS entry names (`module:function`), imported when a response first needs it."""
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
