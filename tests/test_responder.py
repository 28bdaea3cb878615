"""The warm responder: `crashcart isolate-host` handed to it gives the same containment, evidence and exit codes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from crashcart.evidence.ledger import iter_records
from crashcart.evidence.verify import verify
from crashcart.runtime import Runtime
from flows.responder import request
from conftest import LAB_DIR, ROOT, reach

pytestmark = pytest.mark.lab
CRASHCART = str(ROOT / ".venv" / "bin" / "crashcart")
WEB, PEER = "10.77.0.11", "10.77.0.14"


@pytest.fixture
def served(lab_copy):
    """A settings copy with its own ledger and state, and a responder of its own serving it."""
    config = lab_copy()
    env = {**os.environ, "CRASHCART_CONFIG": str(config), "COLUMNS": "200"}
    sock = config.parent / "state" / "responder.sock"
    proc = subprocess.Popen([CRASHCART, "responder"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the responder did not start: {proc.stdout.read() if proc.poll() is not None else 'timeout'}")
            time.sleep(0.1)
        yield config, env, sock
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        subprocess.run([CRASHCART, "release-host", "web-1", "--reason", "test cleanup"],
                       env={**env, "CRASHCART_USE_RESPONDER": "false"}, capture_output=True, timeout=180)


def run(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CRASHCART, *args], env=env, capture_output=True, text=True, timeout=180)


def triggers(config: Path) -> list[str]:
    evidence = Runtime.load(config).settings.evidence.dir
    return [r.body["trigger"]["who"] for r in iter_records(evidence, kind="run_started")]


def test_isolate_and_release_through_the_responder(served):
    config, env, sock = served
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert reach("peer-1", WEB, 443)
    isolated = run(env, "isolate-host", "web-1", "--reason", "EDR alert via the responder")
    assert isolated.returncode == 0, isolated.stdout + isolated.stderr
    assert "contained" in isolated.stdout
    # From outside crashcart: the peer is cut off both ways, management still reaches SSH.
    assert not reach("peer-1", WEB, 443) and not reach("peer-1", WEB, 22) and not reach("web-1", PEER, 22)
    check = run(env, "check", "web-1", "--json")
    assert check.returncode == 0 and json.loads(check.stdout)[0]["reachable"], check.stdout + check.stderr

    released = run(env, "release-host", "web-1", "--reason", "false positive")
    assert released.returncode == 0, released.stdout + released.stderr
    assert reach("peer-1", WEB, 443) and reach("peer-1", WEB, 22)
    # The runs are in this settings file's ledger (not the lab's), verify, and name the OS account.
    who = triggers(config)
    assert len(who) == 2 and all("via the responder" in w and w.startswith("root@") for w in who), who
    rt = Runtime.load(config)
    report = verify(rt.settings.evidence.dir, rt.settings.evidence.trusted_keys)
    assert report.ok, report.message


def test_bad_input_and_a_dry_run_through_the_responder_change_nothing(served):
    config, env, _ = served
    before = subprocess.run(["ip", "netns", "exec", "web-1", "nft", "list", "ruleset"], capture_output=True, text=True).stdout
    for args, message in ((("isolate-host", "web-1;id", "--reason", "x"), "host name 'web-1;id' is not allowed"),
                          (("isolate-host", "web-9", "--reason", "x"), "unknown host 'web-9'"),
                          (("release-host", "--group", "nobody", "--reason", "x"), "group 'nobody' has no hosts")):
        result = run(env, *args)
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr.strip().count("\n") == 0 and message in result.stderr, result.stderr
    planned = run(env, "isolate-host", "web-1", "--dry-run", "--reason", "what would happen")
    assert planned.returncode == 0 and "planned" in planned.stdout, planned.stdout + planned.stderr
    after = subprocess.run(["ip", "netns", "exec", "web-1", "nft", "list", "ruleset"], capture_output=True, text=True).stdout
    assert after == before and reach("peer-1", WEB, 443)


def test_the_responder_declines_another_settings_file_and_the_cli_runs_it_itself(served):
    config, env, sock = served
    assert request(sock, LAB_DIR / "crashcart.toml", "isolate-host", {"hosts": ["web-1"], "dry_run": True}) is None
    # Without a responder (or with it switched off) the CLI runs the flow in its own process.
    planned = run({**env, "CRASHCART_USE_RESPONDER": "false"}, "isolate-host", "web-1", "--dry-run", "--reason", "plan")
    assert planned.returncode == 0, planned.stdout + planned.stderr
    assert "via the responder" not in triggers(config)[-1]
