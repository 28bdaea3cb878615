"""The command line as a user types it: help, hosts, check, and one-line errors with exit codes."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CRASHCART = str(ROOT / ".venv" / "bin" / "crashcart")


def cli(*args: str, config: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CRASHCART_CONFIG"}
    env["COLUMNS"] = "200"
    if config:
        env["CRASHCART_CONFIG"] = str(config)
    return subprocess.run([CRASHCART, *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_help_lists_every_command_with_one_line():
    result = cli("--help")
    assert result.returncode == 0
    for command in ("hosts", "check", "isolate-host", "release-host", "rotate-credentials", "lab"):
        assert command in result.stdout


@pytest.mark.lab
def test_hosts_lists_the_inventory(lab_config):
    result = cli("hosts", config=lab_config)
    assert result.returncode == 0, result.stderr
    for name in ("web-1", "db-1", "backup-1", "peer-1"):
        assert name in result.stdout
    assert "staging" in result.stdout


@pytest.mark.lab
def test_check_reports_every_lab_host_ready(lab_config):
    result = cli("check", "--json", config=lab_config)
    assert result.returncode == 0, result.stdout + result.stderr
    import json

    reports = {r["host"]: r for r in json.loads(result.stdout)}
    assert {"web-1", "db-1", "backup-1", "peer-1"} <= set(reports)
    for r in reports.values():
        assert r["ready"] and r["host_key"] == "pinned" and r["firewalld_state"] == "running"


@pytest.mark.lab
@pytest.mark.parametrize("args, code, message", [
    (("check", "web-1;touch /tmp/x"), 2, "host name 'web-1;touch /tmp/x' is not allowed"),
    (("check", "-oProxyCommand=id"), 2, "No such option"),
    (("check", "web-9"), 2, "unknown host 'web-9'"),
    (("isolate-host", "web-1;id", "--reason", "x"), 2, "host name 'web-1;id' is not allowed"),
    (("isolate-host", "--group", "nobody", "--reason", "x"), 2, "group 'nobody' has no hosts"),
])
def test_bad_input_gets_one_line_and_an_exit_code(lab_config, args, code, message):
    marker = Path("/tmp/x")
    existed = marker.exists()
    result = cli(*args, config=lab_config)
    assert result.returncode == code, result.stdout + result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len([l for l in result.stderr.splitlines() if "rror" in l]) == 1
    assert marker.exists() == existed


@pytest.mark.lab
def test_a_broken_inventory_is_one_line(lab_config, tmp_path):
    for name in ("crashcart.toml",):
        shutil.copy(lab_config.parent / name, tmp_path / name)
    (tmp_path / "crashcart.toml").write_text((tmp_path / "crashcart.toml").read_text().replace(
        'inventory = "inventory.yaml"', f'inventory = "{tmp_path / "inventory.yaml"}"'))
    (tmp_path / "inventory.yaml").write_text((lab_config.parent / "inventory.yaml").read_text().replace(
        "address: 10.77.0.11", "address: 10.77.0.311"))
    result = cli("hosts", config=tmp_path / "crashcart.toml")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"crashcart: error: {tmp_path / 'inventory.yaml'}: hosts.web-1.address: "
                                     "address '10.77.0.311' is not an IP address")


def test_a_failed_status_is_a_non_zero_exit(tmp_path):
    """typer.Exit codes reach the shell (click returns them in non-standalone mode)."""
    env = {**os.environ, "CRASHCART_LAB_DIR": str(tmp_path / "no-lab")}
    result = subprocess.run([CRASHCART, "lab", "status"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 7 and '"up": false' in result.stdout
