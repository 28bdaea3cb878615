"""`crashcart deploy` and `crashcart serve`: deploy/prefect.yaml validated, registered on the lab's Prefect, executed."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from crashcart.errors import InvalidDeployment
from crashcart.evidence.ledger import iter_records
from crashcart.runtime import Runtime
from flows.deploy import DEPLOYMENTS_FILE, entrypoint_module, load_deployments, parse_deployments, resolve_timezone

ROOT = Path(__file__).resolve().parents[1]
CRASHCART = str(ROOT / ".venv" / "bin" / "crashcart")
QUARTERLY = "0 3 1 1,4,7,10 *"


def cli(*args: str, config: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "CRASHCART_CONFIG": str(config), "COLUMNS": "200"}
    return subprocess.run([CRASHCART, *args], capture_output=True, text=True, env=env, timeout=timeout)


# -- the file -------------------------------------------------------------------------------------------------

def test_the_deployments_file_holds_the_quarterly_restore_test_and_the_containment_flows():
    specs = {s.name: s for s in load_deployments(DEPLOYMENTS_FILE)}
    restore = specs["restore-test"]
    assert (restore.module, restore.function) == ("flows.restore", "restore_test")
    assert [(s.cron, s.timezone) for s in restore.schedules] == [(QUARTERLY, "UTC")]
    assert restore.work_pool == "crashcart" and restore.parameters == {"snapshot": "latest"}
    for name, fn in (("isolate-host", "isolate_host"), ("release-host", "release_host")):
        assert (specs[name].module, specs[name].function, specs[name].schedules) == ("flows.isolate", fn, ())


@pytest.mark.parametrize("entry, message", [
    ("{name: x, entrypoint: ../evil.py:f}", "must be like flows/restore.py:restore_test"),
    ("{name: x, entrypoint: flows/nope.py:f}", "flows/nope.py does not exist"),
    ("{name: x, entrypoint: flows/restore.py:restore_test, schedules: [{cron: '61 * * * *'}]}", "not a valid cron"),
    ("{name: x, entrypoint: flows/restore.py:restore_test, schedules: [{cron: '* * * * *', interval: 60}]}",
     "exactly one of cron or interval"),
    ("{name: x, entrypoint: flows/restore.py:restore_test, pull: []}", "unknown key(s) pull"),
    ("{name: 'x;rm', entrypoint: flows/restore.py:restore_test}", "identifier 'x;rm' is not allowed"),
])
def test_a_bad_entry_is_refused_naming_it(entry, message):
    with pytest.raises(InvalidDeployment) as info:
        parse_deployments(f"deployments:\n  - {entry}\n", "prefect.yaml")
    assert message in str(info.value) and str(info.value).startswith("prefect.yaml: deployment 1")


def test_duplicates_and_timezones():
    two = "deployments:\n" + "  - {name: x, entrypoint: flows/restore.py:restore_test}\n" * 2
    with pytest.raises(InvalidDeployment, match="x appear more than once"):
        parse_deployments(two)
    assert resolve_timezone("UTC", "America/New_York") == "America/New_York"
    assert resolve_timezone(None, "Europe/Berlin") == "Europe/Berlin"
    assert resolve_timezone("Asia/Tokyo", "Europe/Berlin") == "Asia/Tokyo"
    with pytest.raises(InvalidDeployment, match="not an IANA time zone"):
        resolve_timezone("Mars/Olympus", "UTC")
    assert entrypoint_module("flows/isolate.py:isolate_host") == ("flows.isolate", "isolate_host")


# -- against the lab's Prefect server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deployed(lab_config) -> tuple[str, str]:
    """`crashcart deploy` as a user types it, then once more in-process, with the lab's settings: what each said."""
    from flows.deploy import register_deployments

    result = cli("deploy", config=lab_config)
    assert result.returncode == 0, result.stdout + result.stderr
    lines: list[str] = []
    register_deployments(Runtime.load(lab_config), say=lines.append)
    return result.stdout, "\n".join(lines)


@pytest.mark.lab
def test_deploy_registers_the_quarterly_restore_test_once(deployed):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    first, second = deployed
    assert "restore-test/restore-test" in first and QUARTERLY in first
    assert "work pool crashcart (process): exists" in second and "updated restore-test/restore-test" in second
    with get_client(sync_client=True) as client:
        found = client.read_deployments(deployment_filter=DeploymentFilter(
            name=DeploymentFilterName(any_=["restore-test", "isolate-host", "release-host"])))
        by_name: dict[str, list] = {}
        for d in found:
            by_name.setdefault(d.name, []).append(d)
        assert {name: len(ds) for name, ds in by_name.items()} == {"restore-test": 1, "isolate-host": 1, "release-host": 1}
        [restore] = by_name["restore-test"]
        assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in restore.schedules] == [(QUARTERLY, "UTC", True)]
        assert restore.work_pool_name == "crashcart" and restore.entrypoint == "flows.restore.restore_test"
        assert client.read_flow(restore.flow_id).name == "restore-test"
        assert [d.schedules for d in by_name["isolate-host"] + by_name["release-host"]] == [[], []]
        assert client.read_work_pool("crashcart").type == "process"


@pytest.mark.lab
def test_serve_executes_a_deployment_run_and_stops_on_sigterm(deployed, lab_copy):
    from prefect.deployments import run_deployment

    config = lab_copy()
    env = {**os.environ, "CRASHCART_CONFIG": str(config), "COLUMNS": "200"}
    worker = subprocess.Popen([CRASHCART, "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        run = run_deployment("restore-test/restore-test", timeout=120, poll_interval=1,
                             parameters={"repos": ["web-1-data"], "config": str(config), "triggered_by": "api:test"})
    finally:
        worker.send_signal(signal.SIGTERM)
        output = worker.communicate(timeout=30)[0]
    assert run.state.is_completed(), (run.state, output)
    assert worker.returncode == 0 and "crashcart worker stopped" in output, output
    evidence = Runtime.load(config).settings.evidence.dir
    [started] = [r for r in iter_records(evidence, kind="run_started") if r.body["flow_run_id"] == str(run.id)]
    assert started.body["trigger"] == {"kind": "api", "who": "test"}
    [result] = [r.body for r in iter_records(evidence, kind="restore_test", run=started.run)]
    assert result["status"] == "passed" and result["repository"] == "web-1-data"
