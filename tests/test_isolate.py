"""isolate-host and release-host against the lab: real sshd, firewalld, OpenBao and Prefect."""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path

import paramiko
import pytest

from conftest import LAB_DIR, reach
from crashcart.errors import InvalidInput
from crashcart.evidence.ledger import iter_records
from crashcart.evidence.verify import verify
from crashcart.runtime import Runtime

pytestmark = pytest.mark.lab
ROOT = Path(__file__).resolve().parents[1]
WEB, DB, PEER, MGMT = "10.77.0.11", "10.77.0.12", "10.77.0.14", "10.77.0.1"


@pytest.fixture
def flows():
    import flows.isolate as module

    return module


@pytest.fixture
def config(lab_copy):
    return lab_copy()


def password_login(address: str, user: str, password: str) -> bool:
    """A real SSH password login from the management address, independent of crashcart's SSH layer."""
    client = paramiko.SSHClient()
    client.load_host_keys(str(LAB_DIR / "known_hosts"))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(address, username=user, password=password, look_for_keys=False, allow_agent=False, timeout=5)
        return True
    except paramiko.AuthenticationException:
        return False
    finally:
        client.close()


def ssh_run(address: str, command: str) -> subprocess.CompletedProcess:
    """A command over plain OpenSSH from the management address, independent of crashcart's SSH layer."""
    return subprocess.run(["ssh", "-i", str(LAB_DIR / "keys" / "id_ed25519"), "-o", f"UserKnownHostsFile={LAB_DIR}/known_hosts",
                           "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=4",
                           f"root@{address}", command], capture_output=True, text=True, timeout=30)


def ssh_from_management(address: str) -> bool:
    return ssh_run(address, "true").returncode == 0


def run_records(config: Path, run_id: str) -> list:
    rt = Runtime.load(config)
    return list(iter_records(rt.settings.evidence.dir, run=run_id))


def assert_verifies(config: Path) -> None:
    rt = Runtime.load(config)
    report = verify(rt.settings.evidence.dir, rt.settings.evidence.trusted_keys)
    assert report.ok, report.message


def test_isolate_web1_contains_it_and_release_restores_it(flows, config, vault_admin, caplog):
    assert reach("peer-1", WEB, 443) and reach("peer-1", WEB, 22) and reach("web-1", PEER, 22)
    old_password = vault_admin.secrets.kv.v2.read_secret_version(path="hosts/web-1", mount_point="secret",
                                                                 raise_on_deleted_version=True)["data"]["data"]["root_password"]
    assert password_login(WEB, "root", old_password)
    caplog.set_level(logging.DEBUG)
    result = flows.isolate_host(hosts=["web-1"], reason="EDR alert: test", incident="INC-TEST-1",
                                triggered_by="cli:tester@mgmt", config=str(config))
    try:
        assert result["status"] == "contained", result["summary"]
        # From outside, independently of crashcart: the peer is cut off, management is not.
        assert not reach("peer-1", WEB, 443) and not reach("peer-1", WEB, 22)
        assert ssh_from_management(WEB)
        assert not reach("web-1", PEER, 22)
        new_password = vault_admin.secrets.kv.v2.read_secret_version(path="hosts/web-1", mount_point="secret",
                                                                     raise_on_deleted_version=True)["data"]["data"]["root_password"]
        assert new_password != old_password
        assert password_login(WEB, "root", new_password) and not password_login(WEB, "root", old_password)
        # The evidence verifies and holds an intent and a result for every step, in order.
        assert_verifies(config)
        records = run_records(config, result["run_id"])
        kinds = [r.kind for r in records if r.kind != "notification"]  # deliveries may land after the close
        assert kinds[0] == "run_started" and kinds[-1] == "run_finished"
        steps = [(r.body["step"]["id"], r.kind) for r in records if r.kind == "step_intent"]
        assert [s for s, _ in steps] == ["pre-state", "volatile", "quarantine", "persist", "triage", "rotate"]
        results = {r.body["step"]: r.body for r in records if r.kind == "step_result"}
        assert {k: v["status"] for k, v in results.items()} == {
            "pre-state": "succeeded", "volatile": "succeeded", "quarantine": "succeeded", "persist": "succeeded",
            "triage": "succeeded", "rotate": "succeeded"}
        checks = {c["check"]: c["status"] for c in results["quarantine"]["verification"]}
        assert checks == {"probe.management_ssh": "passed", "probe.peer_blocked": "passed", "probe.outbound_blocked": "passed"}
        started = records[0].body
        assert started["hipaa"] == ["164.308(a)(6)(ii)", "164.312(b)"] and started["trigger"]["who"] == "tester@mgmt"
        assert started["runbook"]["sha256"] and started["hosts"] == [{"name": "web-1", "environment": "staging", "address": WEB}]
        custody = [r.body for r in records if r.kind == "custody"]
        assert {c["artifact"] for c in custody} == {"volatile-web-1.txt", "triage-web-1.tar.gz", "ephi-sha256-web-1.txt"}
        assert all(c["sha256_source"] == c["sha256_destination"] for c in custody)
        # No secret anywhere: the evidence, the artifacts copied off the host, the logs.
        for root, _, files in os.walk(Runtime.load(config).settings.evidence.dir):
            for name in files:
                if name.endswith(".tar.gz"):
                    continue
                data = (Path(root) / name).read_bytes()
                assert new_password.encode() not in data and old_password.encode() not in data, name
        assert new_password not in caplog.text and old_password not in caplog.text
        # Running it again changes nothing and says so.
        again = flows.isolate_host(hosts=["web-1"], reason="second responder", config=str(config))
        assert again["status"] == "contained" and "already contained" in again["hosts"]["web-1"]["summary"]
        assert {s["status"] for s in again["hosts"]["web-1"]["steps"][1:]} == {"unchanged"}
    finally:
        released = flows.release_host(hosts=["web-1"], reason="test over", config=str(config))
    assert released["status"] == "released", released["summary"]
    assert reach("peer-1", WEB, 443) and reach("peer-1", WEB, 22) and reach("web-1", PEER, 22)
    assert_verifies(config)


def test_dry_run_prints_the_plan_and_changes_nothing(flows, config):
    before = subprocess.run(["ip", "netns", "exec", "web-1", "nft", "list", "ruleset"], capture_output=True, text=True).stdout
    result = flows.isolate_host(hosts=["web-1"], reason="what would happen", dry_run=True, config=str(config))
    assert result["status"] == "planned"
    steps = {s["id"]: s for s in result["hosts"]["web-1"]["steps"]}
    assert steps["pre-state"]["status"] == "succeeded"
    assert {steps[s]["status"] for s in ("volatile", "quarantine", "persist", "triage", "rotate")} == {"dry"}
    assert any("--change-interface=eth0" in c for c in steps["quarantine"]["commands"])
    assert [v["status"] for v in steps["quarantine"]["verification"]] == ["dry", "dry", "dry"]
    after = subprocess.run(["ip", "netns", "exec", "web-1", "nft", "list", "ruleset"], capture_output=True, text=True).stdout
    assert before == after and reach("peer-1", WEB, 443)


def test_two_simultaneous_runs_apply_once(config):
    env = {**os.environ, "CRASHCART_CONFIG": str(config), "COLUMNS": "200"}
    cmd = [str(ROOT / ".venv" / "bin" / "crashcart"), "isolate-host", "web-1", "--reason", "two responders"]
    try:
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
        outputs = [p.communicate(timeout=180)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outputs
        rt = Runtime.load(config)
        quarantines = [r.body["status"] for r in iter_records(rt.settings.evidence.dir, kind="step_result")
                       if r.body["step"] == "quarantine"]
        assert sorted(quarantines) == ["succeeded", "unchanged"]
        assert sum("already contained" in o for o in outputs) == 1
    finally:
        import flows.isolate

        assert flows.isolate.release_host(hosts=["web-1"], reason="test over", config=str(config))["status"] == "released"


def flush_quarantine_chain() -> None:
    """What an intruder with root (or a hand-run `nft`) does behind firewalld's back."""
    subprocess.run(["ip", "netns", "exec", "web-1", "nft", "flush", "chain", "inet", "firewalld",
                    "filter_OUT_policy_ccquarantine-out"], check=True)


def test_firewalld_out_of_step_with_nftables_is_reloaded_on_release_and_repaired_on_isolation(flows, config):
    """firewalld deletes rules by the handles it remembers: once nftables was changed behind its back, its
    runtime changes fail with COMMAND_FAILED (13), or succeed while the kernel does something else."""
    def isolate() -> dict:
        result = flows.isolate_host(hosts=["web-1"], reason="tampered host", config=str(config))
        assert result["status"] == "contained", result["summary"]
        assert not reach("peer-1", WEB, 443) and not reach("web-1", PEER, 22)
        return {s["id"]: s for s in result["hosts"]["web-1"]["steps"]}

    def release() -> dict:
        released = flows.release_host(hosts=["web-1"], reason="tampered host", config=str(config))
        assert released["status"] == "released", released["summary"]
        assert reach("peer-1", WEB, 443) and reach("peer-1", WEB, 22) and reach("web-1", PEER, 22)
        return {s["id"]: s for s in released["hosts"]["web-1"]["steps"]}

    try:
        isolate()
        flush_quarantine_chain()
        # Without the reload the release fails with 13; the summary says so only when that happened.
        assert "out of step with nftables and was reloaded" in release()["release"]["summary"]

        isolate()
        flush_quarantine_chain()
        assert ssh_run(WEB, "firewall-cmd --policy=ccquarantine-out --remove-egress-zone=ANY").returncode == 13
        release()
        # firewalld now reports every change as done while web-1 could still reach out: the check from
        # outside catches it, and the quarantine is applied again after a reload.
        quarantine = isolate()["quarantine"]
        assert "firewalld reloaded and the quarantine applied again" in quarantine["summary"], quarantine
        assert {v["status"] for v in quarantine["verification"]} == {"passed"}
        release()

        # firewalld believes the outbound policy is active (its removal failed) on a host that is not
        # quarantined: the pre-state is wrong, so after the reload everything is applied, not the plan's difference.
        isolate()
        flush_quarantine_chain()
        assert ssh_run(WEB, "firewall-cmd --policy=ccquarantine-out --remove-egress-zone=ANY").returncode == 13
        assert ssh_run(WEB, "firewall-cmd --zone=ccquarantine --remove-interface=eth0").returncode == 0
        assert ssh_run(WEB, "firewall-cmd --policy=ccquarantine-out --query-egress-zone=ANY").stdout.strip() == "yes"
        quarantine = isolate()["quarantine"]
        assert "reloaded" in quarantine["summary"], quarantine
    finally:
        release()
    assert_verifies(config)


def test_vault_stopped_containment_completes_rotation_deferred(flows, config, lab):
    lab.vault_stop()
    try:
        result = flows.isolate_host(hosts=["web-1"], reason="vault down", config=str(config))
        assert result["status"] == "contained"
        steps = {s["id"]: s for s in result["hosts"]["web-1"]["steps"]}
        assert steps["rotate"]["status"] == "deferred" and "Vault" in steps["rotate"]["summary"]
        assert not reach("peer-1", WEB, 443)
        rt = Runtime.load(config)
        checkpoints = [r.body for r in iter_records(rt.settings.evidence.dir, kind="checkpoint")]
        assert checkpoints and checkpoints[-1]["signer"] == "local-ed25519"
    finally:
        lab.vault_start()
        flows.release_host(hosts=["web-1"], reason="test over", config=str(config))
    assert_verifies(config)
    assert reach("peer-1", WEB, 443)


def test_a_rule_that_cuts_management_is_reverted_by_the_dead_mans_switch(flows, lab_copy):
    wrong = lab_copy(inventory=lambda t: t.replace("- 10.77.0.1/32", "- 10.99.0.0/24"))
    started = time.monotonic()
    result = flows.isolate_host(hosts=["web-1"], reason="wrong management CIDR", dead_man_seconds=10, config=str(wrong))
    elapsed = time.monotonic() - started
    host = result["hosts"]["web-1"]
    assert result["status"] == "rolled_back", result["summary"]
    assert "management lost SSH" in host["summary"] and "dead man's switch" in host["summary"]
    assert reach("peer-1", WEB, 443) and ssh_from_management(WEB)
    assert elapsed < 10 + 30  # the switch's bound, plus the probes and the confirming connection
    steps = {s["id"]: s["status"] for s in host["steps"]}
    assert steps["quarantine"] == "rolled_back" and steps["persist"] == "skipped"


def test_hostile_input_is_refused_before_anything_runs(flows, config):
    rt = Runtime.load(config)
    evidence = Path(rt.settings.evidence.dir)
    for kwargs in ({"hosts": ["web-1;touch /tmp/x"]}, {"hosts": ["-oProxyCommand=id"]}, {"hosts": ["nope-9"]},
                   {"hosts": ["web-1"], "incident": "INC;rm"}, {"hosts": ["web-1"], "reason": "two\nlines"},
                   {"hosts": ["web-1"], "dead_man_seconds": 1}):
        kwargs.setdefault("reason", "hostile")
        with pytest.raises(InvalidInput):
            flows.isolate_host(config=str(config), **kwargs)
    assert not evidence.exists() or not list(evidence.glob("*.jsonl"))


def test_a_group_is_isolated_in_parallel(flows, config):
    try:
        result = flows.isolate_host(group="ephi", reason="ransomware spreading", config=str(config))
        assert result["status"] == "contained", result["summary"]
        assert set(result["hosts"]) == {"web-1", "db-1"}
        assert not reach("peer-1", WEB, 22) and not reach("peer-1", DB, 22)
        rt = Runtime.load(config)
        spans = {}
        for r in iter_records(rt.settings.evidence.dir, kind="step_result", run=result["run_id"]):
            if r.body["step"] == "quarantine":
                spans[r.body["host"]] = (r.body["started"], r.body["ended"])
        (a0, a1), (b0, b1) = spans["web-1"], spans["db-1"]
        assert a0 < b1 and b0 < a1, f"quarantines did not overlap: {spans}"
    finally:
        released = flows.release_host(group="ephi", reason="test over", config=str(config))
    assert released["status"] == "released"
    assert reach("peer-1", WEB, 22) and reach("peer-1", DB, 22)
