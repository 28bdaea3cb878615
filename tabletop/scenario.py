"""Tabletop scenarios: a narrative, timed injects and the expected responses, validated before anything runs."""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from crashcart import hipaa
from crashcart import validation as v
from crashcart.errors import CrashcartError, InvalidInput, InvalidScenario
from crashcart.inventory import Inventory
from crashcart.runbook import RUNBOOK_DIR

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
EXERCISE_SPEC = "164.308(a)(7)(ii)(D)"  # testing and revision of the contingency plan: what an exercise is
# Where host_unreachable points a host: an address on the lab's own network that nothing answers (packets
# to it never leave this machine); vault_unavailable: a loopback port nothing listens on.
UNREACHABLE_ADDRESS = "10.77.0.250"
UNAVAILABLE_VAULT = "http://127.0.0.1:1"
# The same rule as flows.restore.snapshot_selector (not imported: that module imports Prefect).
_SNAPSHOT_RE = re.compile(r"^(latest|random|[0-9a-f]{8,64})$")


class FaultKind(str, enum.Enum):
    """The closed set of faults an exercise can inject into one response's copy of the configuration."""

    HOST_UNREACHABLE = "host_unreachable"    # the targets point at an address nothing answers
    VAULT_UNAVAILABLE = "vault_unavailable"  # vault.address points at a port nothing listens on
    CORRUPTED_BACKUP = "corrupted_backup"    # the repository is a copy with one data pack damaged


class Expectation(str, enum.Enum):
    """What the scenario expects of a faulted response: the plan still meets it, or misses it by design."""

    MET = "met"
    MISSED = "missed"


class TargetKind(str, enum.Enum):
    HOST = "host"
    REPOSITORY = "repository"


def _reason(value: Any) -> str:
    return v.free_text(value, "reason")


def _dead_man(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 10 <= value <= 600:
        raise InvalidInput(f"dead_man_seconds {value!r} must be an integer from 10 to 600")
    return value


def _accounts(value: Any) -> list[str]:
    if not isinstance(value, list) or not value:
        raise InvalidInput("accounts must be a non-empty list of user names")
    return [v.user_name(a) for a in value]


def _service(value: Any) -> str:
    if value != "nginx":
        raise InvalidInput(f"service {value!r} is not one crashcart rotates (known: nginx)")
    return value


def _lifetime(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise InvalidInput(f"only_if_lifetime_used_over {value!r} must be a fraction between 0 and 1")
    return float(value)


def _snapshot(value: Any) -> str:
    if not isinstance(value, str) or not _SNAPSHOT_RE.fullmatch(value):
        raise InvalidInput(f"snapshot {value!r} is not allowed: use latest, random or a snapshot id (8 to 64 hex digits)")
    return value


@dataclass(frozen=True)
class RunbookRules:
    """What a scenario may ask of one runbook: its targets, its parameters, what counts as done, its faults."""

    targets: TargetKind
    params: Mapping[str, Callable[[Any], Any]]
    done: frozenset[str]
    faults: frozenset[FaultKind]


_HOST_FAULTS = frozenset({FaultKind.HOST_UNREACHABLE, FaultKind.VAULT_UNAVAILABLE})

# The runbooks an exercise may run. Hosts, dry_run, confirmations, triggers and incidents are the
# runner's to set, never the scenario's: a scenario cannot ask for production or break glass.
RUNBOOKS: dict[str, RunbookRules] = {
    "isolate-host": RunbookRules(TargetKind.HOST, {"reason": _reason, "dead_man_seconds": _dead_man},
                                 frozenset({"contained"}), _HOST_FAULTS),
    "release-host": RunbookRules(TargetKind.HOST, {"reason": _reason}, frozenset({"released", "unchanged"}), _HOST_FAULTS),
    "rotate-credentials": RunbookRules(TargetKind.HOST, {"reason": _reason, "accounts": _accounts},
                                       frozenset({"succeeded"}), _HOST_FAULTS),
    "rotate-luks": RunbookRules(TargetKind.HOST, {"reason": _reason, "device": v.remote_path},
                                frozenset({"succeeded", "unchanged"}), _HOST_FAULTS),
    "rotate-tls": RunbookRules(TargetKind.HOST, {"reason": _reason, "service": _service,
                                                 "only_if_lifetime_used_over": _lifetime},
                               frozenset({"succeeded", "unchanged"}), _HOST_FAULTS),
    "restore-test": RunbookRules(TargetKind.REPOSITORY, {"snapshot": _snapshot}, frozenset({"passed"}),
                                 frozenset({FaultKind.VAULT_UNAVAILABLE, FaultKind.CORRUPTED_BACKUP})),
}


@lru_cache(maxsize=None)
def final_states(runbook: str) -> tuple[str, ...]:
    """The final states the runbook document declares (read, never run)."""
    data = yaml.safe_load((RUNBOOK_DIR / f"{runbook}.yaml").read_text())
    return tuple(data.get("final_states") or ())


# -- the document ----------------------------------------------------------------------------------


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _one_line(value: str, what: str, limit: int) -> str:
    try:
        return v.free_text(value, what, limit)
    except CrashcartError as e:
        raise ValueError(str(e)) from None


def _ident(value: str) -> str:
    try:
        return v.identifier(value)
    except CrashcartError as e:
        raise ValueError(str(e)) from None


class _Named(_Doc):
    id: str
    text: str

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        return _ident(value)


class Lesson(_Named):
    """A lesson the scenario exercises; responses name the lessons they test."""


class Option(_Named):
    """One choice of a decision."""


class Fault(_Doc):
    """A fault injected into the response's own copy of the configuration, and what the plan should then do."""

    kind: FaultKind
    expect: Expectation
    status: str | None = None   # the runbook's final state that shows the plan handled it (e.g. deferred)
    address: str | None = None  # host_unreachable: the unused address; vault_unavailable: the dead URL


class Response(_Doc):
    """What the plan says should happen after an inject: a runbook on targets, or a person's decision."""

    id: str
    runbook: str | None = None
    target: tuple[str, ...] = ()
    params: dict[str, Any] = Field(default_factory=dict, alias="with")
    decision: str | None = None
    options: tuple[Option, ...] = ()
    expected: str | None = None
    allowed_minutes: float = Field(gt=0)
    fault: Fault | None = None
    lessons: tuple[str, ...] = ()
    description: str = ""

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        return _ident(value)

    @field_validator("target", mode="before")
    @classmethod
    def _target(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @field_validator("decision")
    @classmethod
    def _question(cls, value: str | None) -> str | None:
        return None if value is None else _one_line(value, "decision", 300)

    @property
    def is_decision(self) -> bool:
        return self.decision is not None

    def describe(self) -> str:
        """One line: `isolate-host web-1` or the decision's question."""
        return f"{self.runbook} {', '.join(self.target)}" if self.runbook else f"decision: {self.decision}"


class Inject(_Doc):
    """Something that happens at a minute of the scenario, and the responses it calls for."""

    id: str
    minute: float = Field(ge=0)
    title: str
    description: str = ""
    responses: tuple[Response, ...] = ()

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        return _ident(value)

    @field_validator("title")
    @classmethod
    def _title(cls, value: str) -> str:
        return _one_line(value, "title", 200)


class Scenario(_Doc):
    """A tabletop scenario document."""

    scenario: str
    version: int = Field(ge=1)
    title: str
    narrative: str
    hipaa: tuple[str, ...] = Field(min_length=1)
    lessons: tuple[Lesson, ...] = Field(min_length=1)
    injects: tuple[Inject, ...] = Field(min_length=1)
    path: str = ""
    sha256: str = ""

    @field_validator("scenario")
    @classmethod
    def _name(cls, value: str) -> str:
        return _ident(value)

    @field_validator("title")
    @classmethod
    def _title(cls, value: str) -> str:
        return _one_line(value, "title", 200)

    @field_validator("hipaa")
    @classmethod
    def _hipaa(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for spec in value:
            try:
                hipaa.check_spec(spec)
            except CrashcartError as e:
                raise ValueError(str(e)) from None
        if EXERCISE_SPEC not in value:
            raise ValueError(f"must include {EXERCISE_SPEC} ({hipaa.SPECIFICATIONS[EXERCISE_SPEC]}): "
                             "an exercise tests the plan")
        return value

    @property
    def name(self) -> str:
        return self.scenario

    @property
    def duration_minutes(self) -> float:
        """From the first inject to the end of the last response's allowed time."""
        return max(i.minute + max((r.allowed_minutes for r in i.responses), default=0.0) for i in self.injects)

    def responses(self) -> list[tuple[Inject, Response]]:
        """Every response with its inject, in scenario order."""
        return [(i, r) for i in self.injects for r in i.responses]

    def identity(self) -> dict:
        """What the evidence records about the scenario: name, version, title, the hash of its bytes, HIPAA specs."""
        return {"name": self.scenario, "version": self.version, "title": self.title, "sha256": self.sha256,
                "path": self.path, "hipaa": list(self.hipaa)}


# -- loading ---------------------------------------------------------------------------------------


def scenario_path(name_or_path: str | Path) -> Path:
    """A shipped scenario's file from its name, or the path given."""
    text = str(name_or_path)
    if "/" not in text and not text.endswith((".yaml", ".yml")):
        try:
            v.identifier(text)
        except CrashcartError as e:
            raise InvalidScenario(f"scenario {text!r}: {e}") from None
        return SCENARIO_DIR / f"{text}.yaml"
    return Path(text)


def _shown(path: Path) -> str:
    root = SCENARIO_DIR.parents[1]
    absolute = path.resolve()
    return str(absolute.relative_to(root)) if root in absolute.parents else str(path)


def _where(data: Any, loc: list) -> str:
    """A pydantic error location in the scenario's words: `inject 2 'backup-alert': response 1 'restore': field`."""
    parts: list[str] = []
    node = data
    i = 0
    while i < len(loc):
        key = loc[i]
        nxt = loc[i + 1] if i + 1 < len(loc) else None
        if key in ("injects", "responses", "lessons", "options") and isinstance(nxt, int):
            items = node.get(key) if isinstance(node, dict) else None
            item = items[nxt] if isinstance(items, list) and nxt < len(items) else None
            ident = item.get("id") if isinstance(item, dict) else None
            label = {"injects": "inject", "responses": "response", "lessons": "lesson", "options": "option"}[key]
            parts.append(f"{label} {nxt + 1}" + (f" {ident!r}" if isinstance(ident, str) else ""))
            node = item
            i += 2
            continue
        rest = ".".join(str(p) for p in loc[i:])
        parts.append({"params": "with"}.get(rest, rest.replace("params.", "with.")))
        break
    return ": ".join(parts) or "(top level)"


def load_scenario(name_or_path: str | Path) -> Scenario:
    """Read a scenario (a name from tabletop/scenarios/ or a path) and validate the document. No side effects.

    Targets are checked against an inventory separately (check_against_inventory), at run time.
    """
    path = scenario_path(name_or_path)
    shown = _shown(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        known = ", ".join(p.stem for p in sorted(SCENARIO_DIR.glob("*.yaml"))) or "none"
        raise InvalidScenario(f"{shown}: scenario not found (shipped: {known})") from None
    except OSError as e:
        raise InvalidScenario(f"{shown}: cannot be read ({e.strerror})") from None
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise InvalidScenario(f"{shown}: not valid YAML{f' at line {mark.line + 1}' if mark else ''}") from None
    if not isinstance(data, dict):
        raise InvalidScenario(f"{shown}: expected a mapping with scenario, version, title, narrative, hipaa, "
                              "lessons and injects")
    data = {**data, "path": shown, "sha256": hashlib.sha256(raw).hexdigest()}
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = _where(data, list(first["loc"]))
        raise InvalidScenario(f"{shown}: {where}: {first['msg'].removeprefix('Value error, ')}") from None
    check_document(scenario, shown, expected_name=path.stem)
    return scenario


def _response_where(shown: str, n_inject: int, inject: Inject, n_response: int, response: Response) -> str:
    return f"{shown}: inject {n_inject} {inject.id!r}: response {n_response} {response.id!r}"


def check_document(scenario: Scenario, shown: str, expected_name: str | None = None) -> None:
    """The checks across fields: names, order of minutes, unique ids, runbooks, parameters, decisions, lessons."""
    if expected_name is not None and scenario.scenario != expected_name:
        raise InvalidScenario(f"{shown}: scenario: name {scenario.scenario!r} differs from the file name {expected_name!r}")
    lesson_ids: set[str] = set()
    for n, lesson in enumerate(scenario.lessons, 1):
        if lesson.id in lesson_ids:
            raise InvalidScenario(f"{shown}: lesson {n} {lesson.id!r}: duplicate lesson id")
        lesson_ids.add(lesson.id)
    inject_ids: set[str] = set()
    response_ids: set[str] = set()
    exercised: set[str] = set()
    previous: float | None = None
    for n_inject, inject in enumerate(scenario.injects, 1):
        here = f"{shown}: inject {n_inject} {inject.id!r}"
        if inject.id in inject_ids:
            raise InvalidScenario(f"{here}: duplicate inject id")
        inject_ids.add(inject.id)
        if previous is not None and inject.minute < previous:
            raise InvalidScenario(f"{here}: minute {inject.minute:g} comes before the previous inject's minute "
                                  f"{previous:g} (minutes must not decrease)")
        previous = inject.minute
        for n_response, response in enumerate(inject.responses, 1):
            where = _response_where(shown, n_inject, inject, n_response, response)
            if response.id in response_ids:
                raise InvalidScenario(f"{where}: duplicate response id")
            response_ids.add(response.id)
            for lesson in response.lessons:
                if lesson not in lesson_ids:
                    raise InvalidScenario(f"{where}: unknown lesson {lesson!r} (declared: {', '.join(sorted(lesson_ids))})")
                exercised.add(lesson)
            if (response.runbook is None) == (response.decision is None):
                raise InvalidScenario(f"{where}: give exactly one of runbook or decision")
            if response.runbook is not None:
                _check_runbook_response(where, response)
            else:
                _check_decision(where, response)
    unused = [lesson.id for lesson in scenario.lessons if lesson.id not in exercised]
    if unused:
        raise InvalidScenario(f"{shown}: lesson {unused[0]!r} is not exercised by any response")


def _check_runbook_response(where: str, response: Response) -> None:
    rules = RUNBOOKS.get(response.runbook or "")
    if rules is None:
        raise InvalidScenario(f"{where}: unknown runbook {response.runbook!r} (known: {', '.join(RUNBOOKS)})")
    if response.options or response.expected is not None:
        raise InvalidScenario(f"{where}: options and expected belong to a decision, not a runbook response")
    if not response.target:
        raise InvalidScenario(f"{where}: target is missing (the {rules.targets.value}(s) {response.runbook} runs on)")
    seen: set[str] = set()
    for name in response.target:
        try:
            v.host_name(name) if rules.targets is TargetKind.HOST else v.identifier(name)
        except CrashcartError as e:
            raise InvalidScenario(f"{where}: target: {e}") from None
        if name in seen:
            raise InvalidScenario(f"{where}: target {name!r} is named twice")
        seen.add(name)
    for key, value in response.params.items():
        check = rules.params.get(key)
        if check is None:
            raise InvalidScenario(f"{where}: with: unknown parameter {key!r} for {response.runbook} "
                                  f"(allowed: {', '.join(rules.params)})")
        try:
            check(value)
        except CrashcartError as e:
            raise InvalidScenario(f"{where}: with.{key}: {e}") from None
    fault = response.fault
    if fault is None:
        return
    if fault.kind not in rules.faults:
        raise InvalidScenario(f"{where}: fault {fault.kind.value} cannot be injected into {response.runbook} "
                              f"(possible: {', '.join(sorted(f.value for f in rules.faults))})")
    if fault.kind is FaultKind.CORRUPTED_BACKUP and len(response.target) != 1:
        raise InvalidScenario(f"{where}: fault corrupted_backup damages one repository: name exactly one target")
    if fault.status is not None and fault.status not in final_states(response.runbook):
        raise InvalidScenario(f"{where}: fault: status {fault.status!r} is not a final state of {response.runbook} "
                              f"({', '.join(final_states(response.runbook))})")
    if fault.status is not None:
        done = fault.status in rules.done
        if done != (fault.expect is Expectation.MET):
            raise InvalidScenario(f"{where}: fault: status {fault.status!r} means the response is "
                                  f"{'met' if done else 'missed'}, but expect says {fault.expect.value}")
    if fault.address is not None:
        if fault.kind is FaultKind.HOST_UNREACHABLE:
            try:
                v.ip_address(fault.address)
            except CrashcartError as e:
                raise InvalidScenario(f"{where}: fault: {e}") from None
        elif fault.kind is FaultKind.VAULT_UNAVAILABLE:
            if not re.fullmatch(r"https?://(127\.0\.0\.1|\[::1\]|localhost):\d{1,5}", fault.address):
                raise InvalidScenario(f"{where}: fault: address {fault.address!r} must be a loopback URL such as "
                                      f"{UNAVAILABLE_VAULT} (an exercise never sends requests elsewhere)")
        else:
            raise InvalidScenario(f"{where}: fault: address does not apply to {fault.kind.value}")


def _check_decision(where: str, response: Response) -> None:
    if response.target or response.params or response.fault is not None:
        raise InvalidScenario(f"{where}: target, with and fault belong to a runbook response, not a decision")
    if len(response.options) < 2:
        raise InvalidScenario(f"{where}: a decision needs at least two options")
    ids: set[str] = set()
    for n, option in enumerate(response.options, 1):
        if option.id in ids:
            raise InvalidScenario(f"{where}: option {n} {option.id!r}: duplicate option id")
        ids.add(option.id)
    if response.expected is None:
        raise InvalidScenario(f"{where}: expected is missing (the option the plan says to choose)")
    if response.expected not in ids:
        raise InvalidScenario(f"{where}: expected {response.expected!r} is not one of the options "
                              f"({', '.join(o.id for o in response.options)})")


# -- against the inventory (at run time) -----------------------------------------------------------


def _repo_host(inventory: Inventory, url: str):
    """The inventory host serving an sftp: repository URL, or None."""
    from integrations.restic import parse_sftp_url  # no I/O: a parser

    try:
        target = parse_sftp_url(url)
    except CrashcartError:
        return None
    for host in inventory.hosts.values():
        if target.host in (host.address, host.name):
            return host
    return None


def check_against_inventory(scenario: Scenario, inventory: Inventory) -> None:
    """Every target exists, fits its runbook and is staging; raises InvalidScenario (one line) otherwise.

    A production host anywhere in the scenario refuses the whole exercise before anything runs, whatever
    the flags: an exercise isolates, rotates and restores for real.
    """
    shown = scenario.path or scenario.scenario
    for n_inject, inject in enumerate(scenario.injects, 1):
        for n_response, response in enumerate(inject.responses, 1):
            if response.runbook is None:
                continue
            where = _response_where(shown, n_inject, inject, n_response, response)
            rules = RUNBOOKS[response.runbook]
            for name in response.target:
                try:
                    if rules.targets is TargetKind.HOST:
                        host = inventory.host(name)
                        production = [host.name] if host.is_production else []
                    else:
                        repo = inventory.repo(name)
                        source = inventory.hosts.get(repo.source_host or "")
                        production = [source.name] if source is not None and source.is_production else []
                except CrashcartError as e:
                    raise InvalidScenario(f"{where}: {e}") from None
                if production:
                    what = name if rules.targets is TargetKind.HOST else f"{name} (the backup of {production[0]})"
                    raise InvalidScenario(f"{where}: {what} is production in {inventory.path or 'the inventory'}: "
                                          "tabletop exercises run against staging only; nothing was run")
                if rules.targets is TargetKind.HOST:
                    _check_host_fits(where, response, host)
            fault = response.fault
            if fault is None:
                continue
            if fault.kind is FaultKind.HOST_UNREACHABLE:
                _check_unused_address(where, fault.address or UNREACHABLE_ADDRESS, inventory)
            if fault.kind is FaultKind.CORRUPTED_BACKUP:
                for name in response.target:
                    server = _repo_host(inventory, inventory.repo(name).url)
                    if server is None:
                        raise InvalidScenario(f"{where}: fault corrupted_backup needs {name} to be an sftp: repository "
                                              "on an inventory host (its copy is made there over SSH)")
                    if server.is_production:
                        raise InvalidScenario(f"{where}: fault corrupted_backup would copy {name} on {server.name}, "
                                              "which is production: tabletop exercises run against staging only")


def _check_unused_address(where: str, address: str, inventory: Inventory) -> None:
    """host_unreachable's address: unused, and on the staging hosts' own segment (a /24) or loopback.

    Packets to it must stay on this machine's links: an exercise never sends traffic anywhere else.
    """
    ip = ipaddress.ip_address(address)
    if address in {h.address for h in inventory.hosts.values()}:
        raise InvalidScenario(f"{where}: fault: {address} is the address of an inventory host, not an unused one")
    segments = {ipaddress.ip_network(f"{h.address}/{24 if ip.version == 4 else 64}", strict=False)
                for h in inventory.hosts.values() if ipaddress.ip_address(h.address).version == ip.version}
    if not ip.is_loopback and not any(ip in net for net in segments):
        raise InvalidScenario(f"{where}: fault: {address} is not on the inventory hosts' own network "
                              f"({', '.join(sorted(map(str, segments)))}) nor loopback: an exercise sends no traffic elsewhere")


def _check_host_fits(where: str, response: Response, host) -> None:
    """What the runbook needs of the host: accounts to rotate, LUKS volumes, TLS services."""
    params = response.params
    if response.runbook == "rotate-credentials":
        users = {a.user for a in host.accounts}
        if not users:
            raise InvalidScenario(f"{where}: {host.name} lists no accounts to rotate")
        for user in params.get("accounts") or ():
            if user not in users:
                raise InvalidScenario(f"{where}: account {user!r} is not listed for {host.name} "
                                      f"(listed: {', '.join(sorted(users))})")
    elif response.runbook == "rotate-luks":
        devices = {vol.device for vol in host.luks}
        if not devices:
            raise InvalidScenario(f"{where}: {host.name} lists no LUKS volume")
        if params.get("device") and params["device"] not in devices:
            raise InvalidScenario(f"{where}: {host.name} has no LUKS volume {params['device']!r} "
                                  f"(listed: {', '.join(sorted(devices))})")
    elif response.runbook == "rotate-tls" and not host.tls:
        raise InvalidScenario(f"{where}: {host.name} lists no TLS service")


def shipped_scenarios() -> list[tuple[str, Scenario | InvalidScenario]]:
    """Every scenario in tabletop/scenarios/ by name: the document, or the one-line error that refused it."""
    found: list[tuple[str, Scenario | InvalidScenario]] = []
    for path in sorted(SCENARIO_DIR.glob("*.yaml")):
        try:
            found.append((path.stem, load_scenario(path)))
        except InvalidScenario as e:
            found.append((path.stem, e))
    return found

