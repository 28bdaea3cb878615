"""The kinds of runbook step (checks and actions), their plans and outcomes, and the registry."""

from __future__ import annotations

import enum
import hashlib
import threading
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

from crashcart.inventory import Host
from crashcart.runtime import Runtime
from integrations.ssh import CommandResult, SessionPool, Stdin


class StepStatus(str, enum.Enum):
    """The closed set of step statuses recorded in the evidence."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    UNVERIFIED = "unverified"        # applied, but a verification could not decide
    UNCHANGED = "unchanged"          # nothing to do: the desired state was already there
    DEFERRED = "deferred"            # could not run now (e.g. Vault sealed) and is owed later
    SKIPPED = "skipped"              # not run because an earlier step stopped the runbook
    DRY = "dry"                      # planned only (dry run or tabletop preview)
    ROLLED_BACK = "rolled_back"
    ROLLBACK_FAILED = "rollback_failed"


class CheckStatus(str, enum.Enum):
    PASSED = "passed"
    FAILED = "failed"
    INCONCLUSIVE = "inconclusive"
    DRY = "dry"


@dataclass
class Plan:
    """What a step will do, built without side effects; `commands` is what a dry run prints."""

    summary: str
    commands: list[str] = field(default_factory=list)
    data: Any = None            # private to the step (never recorded: may hold secrets)
    nothing_to_do: bool = False


@dataclass
class Outcome:
    status: StepStatus
    summary: str
    detail: dict = field(default_factory=dict)


@dataclass
class CheckResult:
    status: CheckStatus
    summary: str
    detail: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status is CheckStatus.PASSED


class StepContext:
    """What a step sees: the runtime, its host, a shared SSH pool, run parameters and facts.

    `facts` carries what earlier steps learnt about the host (e.g. the pre-isolation firewall state).
    Every command a step runs through `run()` is kept for the evidence record of that step.
    """

    def __init__(self, runtime: Runtime, host: Host, pool: SessionPool, params: dict, *,
                 dry_run: bool = False, services: "Services | None" = None, recorder=None) -> None:
        self.runtime = runtime
        self.recorder = recorder
        self.host = host
        self.pool = pool
        self.params = params
        self.dry_run = dry_run
        self.facts: dict[str, Any] = {}
        self.services = services if services is not None else Services({})
        self.commands: list[CommandResult] = []
        self._lock = threading.Lock()

    @property
    def run_id(self) -> str:
        return self.recorder.run_id if self.recorder else "no-run"

    @property
    def inventory(self):
        return self.runtime.inventory

    @property
    def settings(self):
        return self.runtime.settings

    def session(self, host: Host | None = None):
        return self.pool.get(host or self.host)

    def run(self, argv: Sequence[str], *, host: Host | None = None, timeout: float | None = None,
            stdin: Stdin = None, check: bool = True) -> CommandResult:
        """Run a command on the step's host (or another inventory host) and keep it for the evidence."""
        result = self.session(host).run(argv, timeout=timeout, stdin=stdin, check=False)
        with self._lock:
            self.commands.append(result)
        return result.check() if check else result


class Services:
    """Clients for outside systems shared by every step of a run, each built on first use."""

    def __init__(self, factories: dict[str, Any]) -> None:
        self._factories = factories
        self._made: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, name: str):
        with self._lock:
            if name not in self._made:
                if name not in self._factories:
                    raise KeyError(f"no {name!r} service configured for this run")
                self._made[name] = self._factories[name]()
            return self._made[name]


class Step:
    """Base of every registered step: `plan` has no side effects, `apply` carries the plan out."""

    name: ClassVar[str]
    kind: ClassVar[str] = "action"      # "action" or "check"
    read_only: ClassVar[bool] = False   # a read-only check runs even in a dry run (it gathers facts)

    def plan(self, ctx: StepContext) -> Plan:
        raise NotImplementedError

    def apply(self, ctx: StepContext, plan: Plan) -> Outcome | CheckResult:
        raise NotImplementedError


REGISTRY: dict[str, type[Step]] = {}


def register(name: str, kind: str = "action", read_only: bool = False):
    """Class decorator: make a step available to runbooks as `name`."""

    def wrap(cls: type[Step]) -> type[Step]:
        if name in REGISTRY:
            raise ValueError(f"step {name} registered twice")
        cls.name, cls.kind, cls.read_only = name, kind, read_only
        REGISTRY[name] = cls
        return cls

    return wrap


def command_evidence(results: list[CommandResult], inline_limit: int = 4096) -> list[dict]:
    """Commands for the evidence: the masked text, exit code, timing, digests and small outputs."""
    records = []
    for r in results:
        entry = {
            "host": r.host, "command": r.command, "exit_code": r.exit_code, "duration": round(r.duration, 4),
            "stdout_sha256": hashlib.sha256((r.stdout_bytes or r.stdout.encode())).hexdigest(),
            "stderr_sha256": hashlib.sha256(r.stderr.encode()).hexdigest(),
            "stdout_bytes": len(r.stdout_bytes or r.stdout.encode()),
        }
        if len(r.stdout) <= inline_limit:
            entry["stdout"] = r.stdout
        if r.stderr and len(r.stderr) <= inline_limit:
            entry["stderr"] = r.stderr
        records.append(entry)
    return records
