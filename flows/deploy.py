"""Prefect deployments of crashcart: read deploy/prefect.yaml, register deployments and schedules, run the worker."""

from __future__ import annotations

import importlib
import inspect
import logging
import re
import signal
import socket
import zoneinfo
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from crashcart import validation as v
from crashcart.errors import CrashcartError, DeploymentError, InvalidDeployment
from crashcart.runtime import Runtime

log = logging.getLogger("crashcart.deploy")

ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENTS_FILE = ROOT / "deploy" / "prefect.yaml"
WORK_POOL = "crashcart"
# ENVIRONMENT.md: a process worker polling every second starts a deployment run ~4 s after the trigger
# (Prefect's default of 10 s would make an isolation requested from Slack wait up to 10 s longer).
QUERY_SECONDS = 1.0

_DEPLOYMENT_KEYS = {"name", "entrypoint", "description", "parameters", "schedules", "work_pool", "tags", "version",
                    "paused", "concurrency_limit", "enforce_parameter_schema"}
_SCHEDULE_KEYS = {"cron", "interval", "timezone", "active", "day_or"}
_ENTRYPOINT_RE = re.compile(r"^(?P<file>[A-Za-z_][A-Za-z0-9_]*(?:/[A-Za-z_][A-Za-z0-9_]*)*\.py):(?P<fn>[A-Za-z_][A-Za-z0-9_]*)$")


@dataclass(frozen=True)
class ScheduleSpec:
    """A cron or interval schedule of a deployment; `timezone` None means the settings' timezone."""

    cron: str | None = None
    interval: float | None = None
    timezone: str | None = None
    active: bool = True
    day_or: bool = True

    def describe(self, timezone: str) -> str:
        what = f"cron {self.cron!r}" if self.cron else f"every {self.interval:g}s"
        return f"{what} ({timezone}{'' if self.active else ', inactive'})"


@dataclass(frozen=True)
class DeploymentSpec:
    """One entry of prefect.yaml's `deployments:` list, validated."""

    name: str
    entrypoint: str
    module: str
    function: str
    description: str | None = None
    parameters: dict = field(default_factory=dict)
    schedules: tuple[ScheduleSpec, ...] = ()
    work_pool: str = WORK_POOL
    job_variables: dict = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    version: str | None = None
    paused: bool | None = None
    concurrency_limit: int | None = None
    enforce_parameter_schema: bool = True


@dataclass(frozen=True)
class Registered:
    """What `crashcart deploy` did for one deployment."""

    full_name: str
    deployment_id: str
    action: str  # created | updated
    work_pool: str
    schedules: tuple[str, ...]

    def line(self) -> str:
        when = "; ".join(self.schedules) if self.schedules else "no schedule (run from the UI, API or Slack)"
        return f"{self.action} {self.full_name} [{self.deployment_id}] pool {self.work_pool}: {when}"


# -- reading the file (no side effects) ---------------------------------------------------------------


def entrypoint_module(entrypoint: str, root: Path = ROOT) -> tuple[str, str]:
    """`flows/restore.py:restore_test` as ("flows.restore", "restore_test"), the file checked to exist under `root`.

    Deployments are registered by module path, not file path: Prefect would load a file entrypoint
    as a script under another module name, running the module a second time (and registering its
    runbook steps twice).
    """
    m = _ENTRYPOINT_RE.fullmatch(entrypoint or "")
    if not m:
        raise InvalidDeployment(f"entrypoint {entrypoint!r} must be like flows/restore.py:restore_test")
    if not (root / m["file"]).is_file():
        raise InvalidDeployment(f"entrypoint {entrypoint!r}: {m['file']} does not exist under {root}")
    return m["file"][:-3].replace("/", "."), m["fn"]


def resolve_timezone(declared: str | None, default: str) -> str:
    """The schedule's timezone: the settings' timezone where the file says UTC or nothing, else the file's."""
    zone = default if declared in (None, "", "UTC") else declared
    try:
        zoneinfo.ZoneInfo(zone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise InvalidDeployment(f"timezone {zone!r} is not an IANA time zone (e.g. America/New_York)") from None
    return zone


def _schedule(where: str, raw: Any) -> ScheduleSpec:
    if not isinstance(raw, dict) or not raw:
        raise InvalidDeployment(f"{where}: a schedule is a mapping with cron or interval")
    unknown = set(raw) - _SCHEDULE_KEYS
    if unknown:
        raise InvalidDeployment(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(_SCHEDULE_KEYS))})")
    if ("cron" in raw) == ("interval" in raw):
        raise InvalidDeployment(f"{where}: give exactly one of cron or interval")
    if "cron" in raw:
        from prefect.client.schemas.schedules import CronSchedule

        cron = raw["cron"]
        try:
            CronSchedule(cron=cron)  # Prefect's own validation, so the file fails here rather than at the API
        except ValueError:  # pydantic's ValidationError is a ValueError
            raise InvalidDeployment(f"{where}: cron {cron!r} is not a valid cron expression") from None
        spec = ScheduleSpec(cron=cron)
    else:
        interval = raw["interval"]
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or interval <= 0:
            raise InvalidDeployment(f"{where}: interval {interval!r} must be a positive number of seconds")
        spec = ScheduleSpec(interval=float(interval))
    for key in ("active", "day_or"):
        if key in raw and not isinstance(raw[key], bool):
            raise InvalidDeployment(f"{where}: {key} must be true or false")
    timezone = raw.get("timezone")
    if timezone is not None and not isinstance(timezone, str):
        raise InvalidDeployment(f"{where}: timezone must be a name such as UTC")
    return ScheduleSpec(spec.cron, spec.interval, timezone, raw.get("active", True), raw.get("day_or", True))


def parse_deployments(text: str, where: str = "prefect.yaml", root: Path = ROOT) -> list[DeploymentSpec]:
    """The `deployments:` of a Prefect 3 prefect.yaml, validated; other top-level keys are Prefect's own."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise InvalidDeployment(f"{where}: not valid YAML{f' at line {mark.line + 1}' if mark else ''}") from None
    if not isinstance(data, dict) or not isinstance(data.get("deployments"), list) or not data["deployments"]:
        raise InvalidDeployment(f"{where}: expected a mapping with a non-empty deployments: list")
    specs: list[DeploymentSpec] = []
    for i, raw in enumerate(data["deployments"], 1):
        here = f"{where}: deployment {i}"
        if not isinstance(raw, dict):
            raise InvalidDeployment(f"{here}: expected a mapping")
        if isinstance(raw.get("name"), str):
            here = f"{where}: deployment {i} {raw['name']!r}"
        unknown = set(raw) - _DEPLOYMENT_KEYS
        if unknown:
            raise InvalidDeployment(f"{here}: unknown key(s) {', '.join(sorted(unknown))}")
        try:
            name = v.identifier(raw.get("name"))
        except CrashcartError as e:
            raise InvalidDeployment(f"{here}: {e}") from None
        if not raw.get("entrypoint"):
            raise InvalidDeployment(f"{here}: entrypoint is missing")
        try:
            module, function = entrypoint_module(raw["entrypoint"], root)
        except InvalidDeployment as e:
            raise InvalidDeployment(f"{here}: {e}") from None
        parameters = raw.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InvalidDeployment(f"{here}: parameters must be a mapping")
        schedules = raw.get("schedules") or []
        if not isinstance(schedules, list):
            raise InvalidDeployment(f"{here}: schedules must be a list")
        pool = raw.get("work_pool") or {}
        if not isinstance(pool, dict):
            raise InvalidDeployment(f"{here}: work_pool must be a mapping with a name")
        try:
            pool_name = v.identifier(pool.get("name") or WORK_POOL)
        except CrashcartError as e:
            raise InvalidDeployment(f"{here}: work_pool: {e}") from None
        job_variables = pool.get("job_variables") or {}
        if not isinstance(job_variables, dict):
            raise InvalidDeployment(f"{here}: work_pool.job_variables must be a mapping")
        tags = raw.get("tags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise InvalidDeployment(f"{here}: tags must be a list of names")
        limit = raw.get("concurrency_limit")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise InvalidDeployment(f"{here}: concurrency_limit must be a positive integer")
        specs.append(DeploymentSpec(
            name=name, entrypoint=raw["entrypoint"], module=module, function=function,
            description=raw.get("description"), parameters=dict(parameters),
            schedules=tuple(_schedule(f"{here}: schedule {j}", s) for j, s in enumerate(schedules, 1)),
            work_pool=pool_name, job_variables=dict(job_variables), tags=tuple(tags),
            version=str(raw["version"]) if raw.get("version") is not None else None,
            paused=raw.get("paused"), concurrency_limit=limit,
            enforce_parameter_schema=bool(raw.get("enforce_parameter_schema", True)),
        ))
    names = [s.name for s in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InvalidDeployment(f"{where}: deployment name(s) {', '.join(twice)} appear more than once")
    return specs


def load_deployments(path: Path = DEPLOYMENTS_FILE) -> list[DeploymentSpec]:
    """Read and validate the deployments file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InvalidDeployment(f"{path}: deployments file not found") from None
    return parse_deployments(text, str(path))


def load_flow(spec: DeploymentSpec):
    """The Prefect flow a deployment names, with its parameters checked against the flow's signature."""
    from prefect import Flow

    try:
        module = importlib.import_module(spec.module)
    except Exception as e:  # an import error in a flow module must name the deployment, not crash deploy
        raise InvalidDeployment(f"deployment {spec.name!r}: cannot import {spec.module} ({type(e).__name__}: {e})") from None
    fn = getattr(module, spec.function, None)
    if not isinstance(fn, Flow):
        raise InvalidDeployment(f"deployment {spec.name!r}: {spec.entrypoint} is not a Prefect flow")
    try:
        inspect.signature(fn.fn).bind_partial(**spec.parameters)
    except TypeError as e:
        raise InvalidDeployment(f"deployment {spec.name!r}: parameters do not fit {spec.entrypoint}: {e}") from None
    return fn


# -- registering (the side effects) ----------------------------------------------------------------


def _prefect_schedules(spec: DeploymentSpec, default_tz: str) -> list:
    from prefect.schedules import Cron, Interval

    out = []
    for s in spec.schedules:
        tz = resolve_timezone(s.timezone, default_tz)
        if s.cron:
            out.append(Cron(s.cron, timezone=tz, day_or=s.day_or, active=s.active))
        else:
            out.append(Interval(s.interval, timezone=tz, active=s.active))
    return out


def ensure_work_pool(name: str) -> str:
    """Create the process work pool `name` if it is missing; 'created' or 'exists'. Another type is an error."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    try:
        with get_client(sync_client=True) as client:
            try:
                pool = client.read_work_pool(name)
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(name=name, type=ProcessWorker.type,
                                                       base_job_template=ProcessWorker.get_default_base_job_template(),
                                                       description="crashcart flow runs (crashcart serve)"))
                return "created"
    except CrashcartError:
        raise
    except Exception as e:
        raise DeploymentError(f"work pool {name!r}: {type(e).__name__}: {e}") from None
    if pool.type != ProcessWorker.type:
        raise DeploymentError(f"work pool {name!r} exists with type {pool.type!r}; crashcart needs a process pool")
    return "exists"


def register_deployments(runtime: Runtime, path: Path = DEPLOYMENTS_FILE,
                         say: Callable[[str], None] = print) -> list[Registered]:
    """Register every deployment and schedule of `path` with the configured Prefect API (idempotent).

    Everything is validated first (the file, each flow, its parameters, schedules, time zones), so a
    bad entry registers nothing. Re-running updates the deployments in place; Prefect replaces a
    deployment's schedules on update, so they never pile up.
    """
    from prefect.client.orchestration import get_client
    from prefect.deployments.runner import EntrypointType
    from prefect.exceptions import ObjectNotFound

    specs = load_deployments(path)
    tz = runtime.settings.timezone
    prepared = []
    for spec in specs:
        fl = load_flow(spec)
        schedules = _prefect_schedules(spec, tz)
        deployment = fl.to_deployment(
            name=spec.name, schedules=schedules, parameters=spec.parameters, description=spec.description,
            tags=list(spec.tags), version=spec.version, paused=spec.paused, concurrency_limit=spec.concurrency_limit,
            enforce_parameter_schema=spec.enforce_parameter_schema, work_pool_name=spec.work_pool,
            job_variables=spec.job_variables, entrypoint_type=EntrypointType.MODULE_PATH,
        )
        prepared.append((spec, deployment, tuple(s.describe(resolve_timezone(s.timezone, tz)) for s in spec.schedules)))
    for pool in sorted({spec.work_pool for spec in specs}):
        say(f"work pool {pool} (process): {ensure_work_pool(pool)}")
    done = []
    for spec, deployment, shown in prepared:
        try:
            with get_client(sync_client=True) as client:
                try:
                    client.read_deployment_by_name(deployment.full_name)
                    action = "updated"
                except ObjectNotFound:
                    action = "created"
            deployment_id = deployment.apply()
        except Exception as e:  # Prefect raises its own and httpx errors here; name the deployment
            raise DeploymentError(f"deployment {deployment.full_name}: {type(e).__name__}: {e}") from None
        registered = Registered(deployment.full_name, str(deployment_id), action, spec.work_pool, shown)
        say(registered.line())
        done.append(registered)
    return done


# -- executing deployment runs --------------------------------------------------------------------------


def serve(runtime: Runtime, *, pool: str = WORK_POOL, limit: int | None = None, run_once: bool = False,
          say: Callable[[str], None] = print) -> None:
    """Run a Prefect process worker for `pool` until SIGTERM or Ctrl-C: it executes every deployment run.

    A process worker (not `flow.serve`): `crashcart deploy` registers the deployments once, against
    the work pool, and any number of workers on management machines take their runs. Each run is a
    child process (`python -m prefect.engine`) that inherits this process's environment, so
    CRASHCART_CONFIG set for the worker is the settings every scheduled run uses.
    """
    import anyio
    from prefect.settings import PREFECT_WORKER_QUERY_SECONDS, temporary_settings
    from prefect.workers.process import ProcessWorker

    v.identifier(pool)
    ensure_work_pool(pool)
    worker = ProcessWorker(work_pool_name=pool, limit=limit, name=f"crashcart-{socket.gethostname()}")
    say(f"crashcart worker for work pool {pool}: polling {runtime.settings.prefect_api_url or 'the Prefect API'} "
        f"every {QUERY_SECONDS:g}s (settings {runtime.settings.config_path})")
    # systemd stops a service with SIGTERM: end the worker the way Ctrl-C does, so it deregisters cleanly.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with temporary_settings(updates={PREFECT_WORKER_QUERY_SECONDS: QUERY_SECONDS}):
            anyio.run(lambda: worker.start(run_once=run_once, printer=say))
    except KeyboardInterrupt:
        say("crashcart worker stopped")
    finally:
        signal.signal(signal.SIGTERM, previous)
