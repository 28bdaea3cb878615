"""Run and step records: what was done, when, by whom and with what result, written to the ledger."""

from __future__ import annotations

import getpass
import json
import os
import platform
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from crashcart.errors import EvidenceError
from crashcart.secrets import MASK, Secret, mask

OPEN_RUNS = "open-runs.json"
RUN_STATUSES = ("contained", "applied_unverified", "rolled_back", "failed", "planned", "released", "passed",
                "succeeded", "partial", "cancelled", "crashed", "exercised", "unchanged", "deferred")


@dataclass(frozen=True)
class Trigger:
    """Who or what started a run: an OS user at the CLI, a Slack user, a schedule or the API."""

    kind: str   # cli | slack | schedule | api | tabletop
    who: str

    @classmethod
    def from_environment(cls) -> "Trigger":
        user = os.environ.get("SUDO_USER") or getpass.getuser()
        return cls("cli", f"{user}@{socket.gethostname()}")

    def as_dict(self) -> dict:
        return {"kind": self.kind, "who": self.who}


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def clean_params(params: dict[str, Any]) -> dict[str, Any]:
    """Parameters for the evidence: Secrets become the mask, everything else as JSON-safe values."""

    def clean(value: Any) -> Any:
        if isinstance(value, Secret):
            return MASK
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple, set)):
            return [clean(v) for v in value]
        if isinstance(value, (str, int, float, bool)) or value is None:
            return mask(value) if isinstance(value, str) else value
        return mask(str(value))

    return clean(params)


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


class RunRecorder:
    """Writes one run's records: run_started, step_intent/step_result, events, run_finished + checkpoint.

    A step's intent is written before any side effect; if it cannot be written the step does not run
    (EvidenceError propagates). The run is listed in open-runs.json until it is closed, so a run
    whose process was killed is closed later as `crashed` by `close_orphaned_runs`.
    """

    def __init__(self, ledger, *, kind: str, runbook: dict | None, params: dict, hosts: list[dict],
                 trigger: Trigger, hipaa: list[str], flow_run_id: str | None = None,
                 tool_versions: dict | None = None, mode: str = "execute", incident: str | None = None) -> None:
        self.ledger = ledger
        self.run_id = str(uuid.uuid4())
        self.kind = kind
        self.runbook = runbook
        self.params = clean_params(params)
        self.hosts = hosts
        self.trigger = trigger
        self.hipaa = hipaa
        self.flow_run_id = flow_run_id
        self.tool_versions = tool_versions or {}
        self.mode = mode
        self.incident = incident
        self.started = time.time()
        self.finished = False
        self._lock = threading.Lock()

    # -- records -----------------------------------------------------------------------------
    def append(self, kind: str, body: dict) -> Any:
        with self._lock:
            return self.ledger.append(kind, body, run=self.run_id)

    def start(self) -> "RunRecorder":
        self.append("run_started", {
            "run_kind": self.kind, "mode": self.mode, "runbook": self.runbook, "hipaa": self.hipaa,
            "params": self.params, "hosts": self.hosts, "trigger": self.trigger.as_dict(),
            "incident": self.incident, "flow_run_id": self.flow_run_id, "started": utcnow(),
            "pid": os.getpid(), "boot_id": boot_id(), "machine": socket.gethostname(),
            "tool_versions": {**tool_versions(), **self.tool_versions},
        })
        _open_runs(self.ledger.directory, add=(self.run_id, os.getpid(), boot_id()))
        return self

    def intent(self, host: str, step: dict, plan: dict) -> int:
        """Record what a step is about to do; returns the intent's sequence number."""
        record = self.append("step_intent", {"host": host, "step": step, "plan": plan, "at": utcnow()})
        return record.seq

    def result(self, host: str, step_id: str, intent_seq: int | None, body: dict) -> None:
        self.append("step_result", {"host": host, "step": step_id, "intent_seq": intent_seq, **body})

    def event(self, kind: str, body: dict) -> None:
        """A record that is neither a step nor the run's start or end (custody, notification, decision)."""
        self.append(kind, body)

    def finish(self, status: str, summary: str, detail: dict | None = None) -> None:
        """Close the run with its final status and sign a checkpoint. Safe to call once."""
        if self.finished:
            return
        if status not in RUN_STATUSES:
            raise ValueError(f"unknown run status {status!r}")
        self.append("run_finished", {
            "status": status, "summary": mask(summary), "detail": detail or {}, "ended": utcnow(),
            "duration": round(time.time() - self.started, 3),
        })
        self.finished = True
        _open_runs(self.ledger.directory, remove=self.run_id)
        try:
            self.ledger.checkpoint()
        except EvidenceError:
            raise
        except Exception as e:  # the run is recorded; a checkpoint failure must not hide that
            raise EvidenceError(f"run {self.run_id} recorded, but its checkpoint failed: {mask(str(e))}") from e

    def __enter__(self) -> "RunRecorder":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.finished:
            if exc_type is None:
                self.finish("failed", "run ended without a final status")
            elif issubclass(exc_type, (KeyboardInterrupt, SystemExit)) or exc_type.__name__ in (
                    "TerminationSignal", "CancelledError", "Abort"):
                self.finish("cancelled", f"run cancelled ({exc_type.__name__})")
            else:
                self.finish("failed", f"{exc_type.__name__}: {mask(str(exc))}")
        return False


def tool_versions() -> dict:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for dist in ("crashcart", "prefect", "fabric", "paramiko", "hvac", "slack-sdk"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


# -- runs left open by a killed process -----------------------------------------------------------
_open_lock = threading.Lock()


def _open_runs(directory: Path, add: tuple | None = None, remove: str | None = None) -> dict:
    """Read and update the index of open runs (a convenience index; the ledger stays the record)."""
    import fcntl

    path = Path(directory) / OPEN_RUNS
    if not Path(directory).is_dir():  # nothing has been recorded yet, so nothing is open
        return {}
    with _open_lock, open(Path(directory) / ".open-runs.lock", "a") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        try:
            runs = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:
            runs = {}
        if add:
            runs[add[0]] = {"pid": add[1], "boot_id": add[2], "machine": socket.gethostname()}
        if remove:
            runs.pop(remove, None)
        if add or remove:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(runs))
            os.replace(tmp, path)
        return runs


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def close_orphaned_runs(ledger) -> list[str]:
    """Close, as `crashed`, every open run whose process is gone (killed, or the machine rebooted)."""
    closed = []
    me = socket.gethostname()
    for run_id, info in _open_runs(ledger.directory).items():
        if info.get("machine") != me:
            continue
        if info.get("boot_id") == boot_id() and _process_alive(int(info.get("pid", 0))):
            continue
        ledger.append("run_finished", {
            "status": "crashed", "summary": "the process running this flow died before closing it",
            "detail": {"detected_by": "crashcart (orphaned run check)", "pid": info.get("pid")},
            "ended": utcnow(), "duration": None,
        }, run=run_id)
        _open_runs(ledger.directory, remove=run_id)
        closed.append(run_id)
    if closed:
        ledger.checkpoint()
    return closed
