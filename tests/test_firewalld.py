"""firewalld facts and quarantine plans: pure tests from recorded firewall-cmd output."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from crashcart.errors import InvalidInput
from integrations import firewalld as fw

FIXTURES = Path(__file__).parent / "fixtures" / "firewalld"
MGMT_RULE = 'rule family="ipv4" source address="10.77.0.1/32" port port="22" protocol="tcp" accept'


@pytest.fixture
def clean() -> fw.FirewallState:
    return fw.parse_state((FIXTURES / "state-clean.txt").read_text())


@pytest.fixture
def quarantined() -> fw.FirewallState:
    return fw.parse_state((FIXTURES / "state-quarantined.txt").read_text())


def test_a_clean_host_is_parsed(clean):
    assert clean.running and clean.default_zone == "public" and clean.interfaces == ("eth0",)
    assert clean.zone_of("eth0") is None  # unbound: the default zone applies
    assert "public" in clean.zones and "ccquarantine" not in clean.zones
    assert "ssh" in clean.zones["public"].services
    assert {s.local for s in clean.listening} >= {"0.0.0.0:22", "0.0.0.0:443"}
    assert not clean.quarantined and not clean.has_definitions


def test_a_quarantined_host_is_parsed(quarantined):
    assert quarantined.quarantined and quarantined.has_definitions
    assert quarantined.zone_of("eth0") == "ccquarantine" and quarantined.permanent_zone_of("eth0") == "ccquarantine"
    zone, policy = quarantined.zones["ccquarantine"], quarantined.policies["ccquarantine-out"]
    assert zone.target == "DROP" and zone.rich_rules == (MGMT_RULE,)
    assert policy.ingress_zones == ("HOST",) and policy.egress_zones == ("ANY",) and policy.active


def test_firewalld_not_running_is_a_fact_not_a_crash():
    text = ("@@@ default 252\nFirewallD is not running\n@@@ zones 252\nFirewallD is not running\n"
            "@@@ policies 252\n\n@@@ links 0\n1: lo: <LOOPBACK>\n2: eth0@if9: <UP>\n@@@ tcp 0\n")
    state = fw.parse_state(text)
    assert not state.running and state.interfaces == ("eth0",)
    with pytest.raises(ValueError, match="lacks"):
        fw.parse_state("@@@ zones 0\n")


def test_the_first_isolation_defines_then_applies_in_two_lanes(clean):
    plan = fw.plan_quarantine(clean, ["10.77.0.1/32"], [22])
    define = [shlex.join(c) for c in plan.define]
    assert define[0] == "firewall-cmd --permanent --new-zone=ccquarantine" and define[-1] == "firewall-cmd --reload"
    assert any("--add-ingress-zone=HOST" in c for c in define)
    assert plan.lanes == [[["firewall-cmd", "--zone=ccquarantine", "--change-interface=eth0"]],
                          [["firewall-cmd", "--policy=ccquarantine-out", "--add-egress-zone=ANY"]]]
    assert plan.last == []
    # After a reload the runtime is not the pre-state: everything is applied again.
    assert plan.again[1] == [["firewall-cmd", "--policy=ccquarantine-out", "--add-ingress-zone=HOST"],
                             ["firewall-cmd", "--policy=ccquarantine-out", "--add-egress-zone=ANY"]]
    assert plan.again[0][-1] == ["firewall-cmd", "--zone=ccquarantine", "--change-interface=eth0"]
    assert plan.revert == [["firewall-cmd", "--zone=ccquarantine", "--remove-interface=eth0"],
                           ["firewall-cmd", "--policy=ccquarantine-out", "--remove-egress-zone=ANY"]]
    assert all(c[1] == "--permanent" for lane in plan.persist for c in lane)


def test_new_management_networks_go_in_before_the_interfaces_move(quarantined):
    released = fw.FirewallState(**{**quarantined.__dict__, "zones": {
        **quarantined.zones, "ccquarantine": fw.Zone("ccquarantine", target="DROP", rich_rules=(MGMT_RULE,))},
        "policies": {**quarantined.policies, "ccquarantine-out": fw.Zone("ccquarantine-out", ingress_zones=("HOST",))}})
    plan = fw.plan_quarantine(released, ["10.88.0.0/24"], [22, 443])
    added, removed = plan.lanes[0]
    assert added[:2] == ["firewall-cmd", "--zone=ccquarantine"] and len(added) == 4  # 2 new rules
    assert removed == ["firewall-cmd", "--zone=ccquarantine", f"--remove-rich-rule={MGMT_RULE}"]
    assert plan.last == [["firewall-cmd", "--zone=ccquarantine", "--change-interface=eth0"]]


def test_release_restores_recorded_zones_runtime_and_permanent(quarantined):
    commands = [shlex.join(c) for c in fw.plan_release(quarantined, {"eth0": "internal"})]
    assert commands == ["firewall-cmd --zone=internal --change-interface=eth0",
                        "firewall-cmd --policy=ccquarantine-out --remove-egress-zone=ANY",
                        "firewall-cmd --permanent --zone=internal --change-interface=eth0",
                        "firewall-cmd --permanent --policy=ccquarantine-out --remove-egress-zone=ANY"]
    assert fw.plan_release(quarantined, {})[0] == ["firewall-cmd", "--zone=ccquarantine", "--remove-interface=eth0"]


def test_lanes_run_side_by_side_and_the_last_waits():
    script = fw.lanes_script([[["a", "1"], ["b"]], [["c"]]], [["d", "x y"]])
    assert script.startswith("( a 1 && b ) & p0=$!; ( c ) & p1=$!;")
    assert script.endswith("then exit \"$rc\"; fi; d 'x y'")
    assert fw.lanes_script([[["a"]]]) == "a"


def fake_firewall_cmd(tmp_path, fail: str, code: int) -> dict:
    """A firewall-cmd on PATH that logs its arguments and exits `code` the first time it is asked to `fail`."""
    tool = tmp_path / "firewall-cmd"
    tool.write_text(f'#!/bin/sh\necho "$*" >> {tmp_path}/log\n'
                    f'case "$*" in *{fail}*) [ -e {tmp_path}/failed ] || {{ touch {tmp_path}/failed; exit {code}; }};; esac\n')
    tool.chmod(0o755)
    return {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}


MOVE, EGRESS = "--zone=q --change-interface=eth0", "--policy=p --add-egress-zone=ANY"


@pytest.mark.parametrize("code, exit_code, calls", [
    (0, 0, [MOVE, EGRESS]),
    (13, 0, [MOVE, EGRESS, "--reload", MOVE, EGRESS]),   # COMMAND_FAILED: reload, then apply again
    (12, 12, [MOVE, EGRESS]),                           # any other failure is the lane's own exit code
])
def test_a_command_failed_lane_reloads_and_applies_again(tmp_path, code, exit_code, calls):
    lanes = fw.lanes_script([[["firewall-cmd", "--zone=q", "--change-interface=eth0"]],
                             [["firewall-cmd", "--policy=p", "--add-egress-zone=ANY"]]])
    env = fake_firewall_cmd(tmp_path, "change-interface", code)
    done = subprocess.run(["sh", "-c", fw.resynced(lanes, then=lanes)], env=env, capture_output=True, text=True)
    assert done.returncode == exit_code, done.stderr
    log = (tmp_path / "log").read_text().splitlines()
    assert sorted(log) == sorted(calls) and (log.index("--reload") == 2 if code == 13 else True)
    assert (fw.RESYNCED in done.stderr) == (code == 13)


def test_hostile_networks_and_interfaces_are_refused(clean):
    with pytest.raises(InvalidInput):
        fw.management_rules(['10.0.0.0/8" accept; rule family="ipv4'], [22])
    hostile = fw.FirewallState(**{**clean.__dict__, "interfaces": ("eth0;reboot",)})
    with pytest.raises(InvalidInput):
        fw.plan_quarantine(hostile, ["10.77.0.1/32"], [22])


def test_the_dead_mans_switch_detaches_and_cancels_itself_first():
    start = fw.deadman_start_command([["firewall-cmd", "--reload"]], 30)
    assert start[:2] == ["sh", "-c"] and "setsid -f" in start[2] and "</dev/null" in start[2]
    assert start[2].index("pkill") < start[2].index("setsid")  # an older switch is cancelled before arming
    assert "sleep 30; firewall-cmd --reload" in start[-1]
    assert "echo \"$r\"" in fw.deadman_cancel_command()[2]
