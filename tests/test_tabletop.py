"""Tabletop exercises without the lab: scenario validation, scoring, reports, and the runner's clock with fake runbooks."""

from __future__ import annotations

import copy
import hashlib
import threading
import time
from pathlib import Path

import pytest
import yaml

from crashcart.errors import InvalidInput, InvalidScenario
from crashcart.evidence.signing import LocalEd25519Signer, pin_key
from crashcart.inventory import load_inventory
from crashcart.runtime import Runtime
from crashcart.settings import load_settings
from tabletop import runner as tt_runner
from tabletop.report import collect, exercise_records, exercise_view, render, rerender
from tabletop.runner import (
    Answer,
    DecisionPrompt,
    ExerciseOptions,
    NoAnswer,
    TerminalDecider,
    inventory_document,
    plan_exercise,
    run_exercise,
    settings_toml,
)
from tabletop.scenario import (
    EXERCISE_SPEC,
    check_against_inventory,
    load_scenario,
    shipped_scenarios,
)
from tabletop.score import Outcome, fault_handled, judge_decision, judge_runbook, score_exercise

INVENTORY = {
    "management_networks": ["10.77.0.1/32"],
    "probe_host": "peer-1",
    "host_defaults": {"identity_file": "/nonexistent/id_ed25519", "environment": "staging"},
    "hosts": {
        "web-1": {"address": "10.77.0.11",
                  "accounts": [{"user": "root", "password": "vault:secret/hosts/web-1#root_password"},
                               {"user": "deploy", "ssh_key": "vault:secret/hosts/web-1/deploy#private_key"}],
                  "tls": [{"names": ["web-1.lab.crashcart.test"], "cert_path": "/etc/nginx/tls/web-1.crt",
                           "key_path": "/etc/nginx/tls/web-1.key"}]},
        "db-1": {"address": "10.77.0.12", "accounts": [{"user": "root", "password": "vault:secret/hosts/db-1#root_password"}],
                 "luks": [{"device": "/srv/luks/ephi.img", "passphrase": "vault:secret/luks/db-1#passphrase"}]},
        "backup-1": {"address": "10.77.0.13"},
        "peer-1": {"address": "10.77.0.14"},
    },
    # A port nothing listens on: the ledger's Vault signer fails over to the local key without waiting.
    "vault": {"address": "http://127.0.0.1:9"},
    "restic_repositories": {
        "web-1-data": {"url": "sftp:root@10.77.0.13:/srv/restic/web-1", "password": "vault:secret/restic/web-1#password",
                       "source_host": "web-1", "source_path": "/srv/ephi", "rto_minutes": 30},
        "db-1-data": {"url": "sftp:root@10.77.0.13:/srv/restic/db-1", "password": "vault:secret/restic/db-1#password",
                      "source_host": "db-1", "source_path": "/srv/ephi", "rto_minutes": 10},
    },
}

BASE = {
    "scenario": "drill", "version": 1, "title": "Drill", "narrative": "A drill.",
    "hipaa": [EXERCISE_SPEC],
    "lessons": [{"id": "contain-first", "text": "Contain first."}],
    "injects": [
        {"id": "edr-alert", "minute": 0, "title": "EDR alert on web-1",
         "responses": [
             {"id": "isolate", "runbook": "isolate-host", "target": "web-1", "allowed_minutes": 15,
              "lessons": ["contain-first"]},
             {"id": "declare", "decision": "Declare an incident?", "allowed_minutes": 5, "expected": "declare",
              "options": [{"id": "declare", "text": "Declare it now"}, {"id": "wait", "text": "Wait an hour"}]}]},
        {"id": "backup-alert", "minute": 10, "title": "backup-1 reports encrypted files",
         "responses": [{"id": "restore", "runbook": "restore-test", "target": "web-1-data", "allowed_minutes": 30}]},
    ],
}


@pytest.fixture
def inventory(tmp_path):
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(INVENTORY))
    return load_inventory(path)


def write_scenario(folder: Path, doc: dict, name: str = "drill") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def edited(edit) -> dict:
    doc = copy.deepcopy(BASE)
    edit(doc)
    return doc


def _set(path: str, value):
    """An edit setting `injects.0.responses.1.expected`-style paths (None deletes the key)."""
    def edit(doc):
        *parents, leaf = path.split(".")
        node = doc
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        key = int(leaf) if leaf.isdigit() else leaf
        if value is None:
            del node[key]
        else:
            node[key] = value
    return edit


KNOWN = "isolate-host, release-host, rotate-credentials, rotate-luks, rotate-tls, restore-test"
I1, I2 = "inject 1 'edr-alert'", "inject 2 'backup-alert'"


# -- the shipped scenarios ---------------------------------------------------------------------------------------

def test_the_shipped_scenarios_are_valid_and_fit_the_lab_inventory(inventory):
    found = dict(shipped_scenarios())
    assert {"ransomware-ephi-host", "phished-admin", "lost-laptop"} <= set(found)
    for doc in found.values():
        assert not isinstance(doc, Exception), doc
        assert EXERCISE_SPEC in doc.hipaa and doc.lessons and doc.duration_minutes > 0
        check_against_inventory(doc, inventory)
    ransomware = found["ransomware-ephi-host"]
    runbooks = [(r.runbook, r.target) for _, r in ransomware.responses() if r.runbook]
    assert runbooks == [("isolate-host", ("web-1",)), ("restore-test", ("web-1-data",)),
                        ("rotate-credentials", ("db-1",)), ("release-host", ("web-1",))]
    assert any(r.decision for _, r in found["phished-admin"].responses())
    assert {r.runbook for _, r in found["lost-laptop"].responses() if r.runbook} == {
        "rotate-credentials", "rotate-tls", "rotate-luks"}
    assert ransomware.path == "tabletop/scenarios/ransomware-ephi-host.yaml" and len(ransomware.sha256) == 64


# -- malformed scenarios: one precise line each ------------------------------------------------------------------

MALFORMED = [
    (_set("injects.1.responses.0.runbook", "restor-test"),
     f"{I2}: response 1 'restore': unknown runbook 'restor-test' (known: {KNOWN})"),
    (_set("injects.1.minute", -1), f"{I2}: minute: Input should be greater than or equal to 0"),
    (lambda d: (d["injects"][0].__setitem__("minute", 20)),
     f"{I2}: minute 10 comes before the previous inject's minute 20 (minutes must not decrease)"),
    (_set("injects.1.id", "edr-alert"), "inject 2 'edr-alert': duplicate inject id"),
    (_set("injects.1.responses.0.id", "isolate"), f"{I2}: response 1 'isolate': duplicate response id"),
    (_set("injects.0.responses.0.allowed_minutes", 0),
     f"{I1}: response 1 'isolate': allowed_minutes: Input should be greater than 0"),
    (_set("injects.0.responses.0.allowed_minutes", None), f"{I1}: response 1 'isolate': allowed_minutes: Field required"),
    (_set("injects.0.responses.1.expected", "nope"),
     f"{I1}: response 2 'declare': expected 'nope' is not one of the options (declare, wait)"),
    (_set("injects.0.responses.1.options", [{"id": "declare", "text": "x"}]),
     f"{I1}: response 2 'declare': a decision needs at least two options"),
    (_set("injects.0.responses.1.runbook", "isolate-host"),
     f"{I1}: response 2 'declare': give exactly one of runbook or decision"),
    (_set("injects.0.responses.0.with", {"hosts": ["db-1"]}),
     f"{I1}: response 1 'isolate': with: unknown parameter 'hosts' for isolate-host (allowed: reason, dead_man_seconds)"),
    (_set("injects.0.responses.0.with", {"dead_man_seconds": 5}),
     f"{I1}: response 1 'isolate': with.dead_man_seconds: dead_man_seconds 5 must be an integer from 10 to 600"),
    (_set("injects.0.responses.0.fault", {"kind": "meteor", "expect": "missed"}),
     f"{I1}: response 1 'isolate': fault.kind: Input should be 'host_unreachable', 'vault_unavailable' or 'corrupted_backup'"),
    (_set("injects.0.responses.0.fault", {"kind": "corrupted_backup", "expect": "missed"}),
     (f"{I1}: response 1 'isolate': fault corrupted_backup cannot be injected into isolate-host "
      "(possible: host_unreachable, vault_unavailable)")),
    (_set("injects.0.responses.0.fault", {"kind": "vault_unavailable", "expect": "met", "status": "failed"}),
     f"{I1}: response 1 'isolate': fault: status 'failed' means the response is missed, but expect says met"),
    (_set("injects.0.responses.0.fault", {"kind": "vault_unavailable", "expect": "missed", "status": "exploded"}),
     (f"{I1}: response 1 'isolate': fault: status 'exploded' is not a final state of isolate-host "
      "(contained, applied_unverified, rolled_back, failed, planned)")),
    (_set("injects.0.responses.0.target", None),
     f"{I1}: response 1 'isolate': target is missing (the host(s) isolate-host runs on)"),
    (_set("injects.0.responses.0.lessons", ["nope"]),
     f"{I1}: response 1 'isolate': unknown lesson 'nope' (declared: contain-first)"),
    (_set("lessons", [{"id": "contain-first", "text": "x"}, {"id": "spare", "text": "y"}]),
     "lesson 'spare' is not exercised by any response"),
    (_set("hipaa", ["164.308(a)(6)(ii)"]),
     f"hipaa: must include {EXERCISE_SPEC} (Testing and revision procedures): an exercise tests the plan"),
    (_set("owner", "alice"), "owner: Extra inputs are not permitted"),
    (_set("injects", []), "injects: Tuple should have at least 1 item after validation, not 0"),
    (_set("injects.0.title", "two\nlines"), f"{I1}: title: title must be one line without control characters"),
    (_set("scenario", "other"), "scenario: name 'other' differs from the file name 'drill'"),
]


@pytest.mark.parametrize("edit, message", MALFORMED, ids=[m[:60] for _, m in MALFORMED])
def test_a_malformed_scenario_is_refused_with_one_precise_line(tmp_path, edit, message):
    path = write_scenario(tmp_path, edited(edit))
    with pytest.raises(InvalidScenario) as info:
        load_scenario(path)
    text = str(info.value)
    assert "\n" not in text
    assert text == f"{path}: {message}"


def test_not_yaml_missing_files_and_hostile_names(tmp_path):
    bad = tmp_path / "drill.yaml"
    bad.write_text("scenario: drill\ninjects: [\n")
    with pytest.raises(InvalidScenario, match=r"drill.yaml: not valid YAML at line 3$"):
        load_scenario(bad)
    with pytest.raises(InvalidScenario,
                       match=r"tabletop/scenarios/nope.yaml: scenario not found \(shipped: .*ransomware-ephi-host"):
        load_scenario("nope")
    with pytest.raises(InvalidScenario, match=r"scenario '\.\.': identifier"):
        load_scenario("..")


INV = "inventory.yaml"


@pytest.mark.parametrize("edit, inv_edit, message", [
    (_set("injects.0.responses.0.target", "web-9"), None,
     f"{I1}: response 1 'isolate': unknown host 'web-9': not in {{inv}} (known: backup-1, db-1, peer-1, web-1)"),
    (_set("injects.1.responses.0.target", "x-data"), None,
     f"{I2}: response 1 'restore': unknown restic repository 'x-data' (known: db-1-data, web-1-data)"),
    (None, lambda inv: inv["hosts"]["web-1"].__setitem__("environment", "production"),
     f"{I1}: response 1 'isolate': web-1 is production in {{inv}}: tabletop exercises run against staging only; nothing was run"),
    (_set("injects.0.responses.0.target", "db-1"), lambda inv: inv["hosts"]["web-1"].__setitem__("environment", "production"),
     (f"{I2}: response 1 'restore': web-1-data (the backup of web-1) is production in {{inv}}: "
      "tabletop exercises run against staging only; nothing was run")),
    (_set("injects.0.responses.0.runbook", "rotate-luks"), None, f"{I1}: response 1 'isolate': web-1 lists no LUKS volume"),
    (lambda d: d["injects"][0]["responses"][0].update(runbook="rotate-credentials", target="db-1",
                                                      **{"with": {"accounts": ["deploy"]}}), None,
     f"{I1}: response 1 'isolate': account 'deploy' is not listed for db-1 (listed: root)"),
    (_set("injects.0.responses.0.fault", {"kind": "host_unreachable", "expect": "missed", "address": "10.77.0.12"}), None,
     f"{I1}: response 1 'isolate': fault: 10.77.0.12 is the address of an inventory host, not an unused one"),
    (_set("injects.0.responses.0.fault", {"kind": "host_unreachable", "expect": "missed", "address": "192.0.2.1"}), None,
     (f"{I1}: response 1 'isolate': fault: 192.0.2.1 is not on the inventory hosts' own network (10.77.0.0/24) "
      "nor loopback: an exercise sends no traffic elsewhere")),
])
def test_targets_are_checked_against_the_inventory_and_production_is_refused(tmp_path, edit, inv_edit, message):
    inv = copy.deepcopy(INVENTORY)
    if inv_edit:
        inv_edit(inv)
    (tmp_path / INV).write_text(yaml.safe_dump(inv))
    inventory = load_inventory(tmp_path / INV)
    path = write_scenario(tmp_path, edited(edit or (lambda d: None)))
    scenario = load_scenario(path)
    with pytest.raises(InvalidScenario) as info:
        check_against_inventory(scenario, inventory)
    assert str(info.value) == f"{path}: " + message.format(inv=tmp_path / INV)


# -- planning: pure --------------------------------------------------------------------------------------------

@pytest.fixture
def settings_file(tmp_path):
    """Settings of a self-contained, lab-less world: its own inventory, state, evidence and signing key."""
    (tmp_path / "inventory.yaml").write_text(yaml.safe_dump(INVENTORY))
    signer, public = LocalEd25519Signer.generate(tmp_path / "keys" / "evidence.pem")
    pin_key(tmp_path / "trusted-keys.json", signer.key_id, signer.kind, public)
    (tmp_path / "known_hosts").write_text("")
    path = tmp_path / "crashcart.toml"
    path.write_text('inventory = "inventory.yaml"\nstate_dir = "state"\n[ssh]\nknown_hosts = "known_hosts"\n'
                    '[evidence]\ndir = "evidence"\nlocal_signing_key = "keys/evidence.pem"\n'
                    'trusted_keys = "trusted-keys.json"\n')
    return path


def test_the_plan_decides_everything_and_writes_nothing(tmp_path, settings_file):
    rt = Runtime.load(settings_file)
    doc = edited(lambda d: d["injects"][0]["responses"][0].update(
        fault={"kind": "host_unreachable", "expect": "missed", "status": "failed"}))
    doc["injects"][1]["responses"][0]["fault"] = {"kind": "corrupted_backup", "expect": "missed"}
    scenario = load_scenario(write_scenario(tmp_path, doc))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    plan = plan_exercise(rt.inventory, rt.settings, scenario, ExerciseOptions(speed=600), "0a1b2c3d-0000-4000-8000-000000000000")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert [(i.id, due) for i, due in plan.schedule] == [("edr-alert", 0.0), ("backup-alert", 1.0)]
    isolate, restore = plan.responses
    assert isolate.kwargs == {"hosts": ["web-1"], "reason": "tabletop drill: EDR alert on web-1", "confirmed_production": False,
                              "incident": "TABLETOP-0a1b2c3d", "dry_run": False,
                              "triggered_by": "tabletop:0a1b2c3d-0000-4000-8000-000000000000"}
    assert isolate.fault.changes == {"hosts.web-1.address": "10.77.0.250"} and isolate.config_key == "isolate"
    assert restore.fault.repo_copy.copy == "/srv/restic/tabletop-0a1b2c3d-restore"
    assert restore.fault.changes == {
        "restic_repositories.web-1-data.url": "sftp:root@10.77.0.13:/srv/restic/tabletop-0a1b2c3d-restore"}
    assert plan.directory == rt.settings.state_dir / "tabletop" / "0a1b2c3d-0000-4000-8000-000000000000"
    with pytest.raises(InvalidInput, match="speed 0 must be a number above 0"):
        plan_exercise(rt.inventory, rt.settings, scenario, ExerciseOptions(speed=0), "x")


def test_the_exercise_copies_round_trip_and_carry_only_the_fault(tmp_path, settings_file):
    rt = Runtime.load(settings_file)
    scenario = load_scenario(write_scenario(tmp_path, edited(lambda d: d["injects"][0]["responses"][0].update(
        fault={"kind": "vault_unavailable", "expect": "missed"}))))
    plan = plan_exercise(rt.inventory, rt.settings, scenario, ExerciseOptions(), "0a1b2c3d-0000-4000-8000-000000000000")
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    (copy_dir / "inventory.yaml").write_text(yaml.safe_dump(inventory_document(rt.inventory, plan.faults[0])))
    (copy_dir / "crashcart.toml").write_text(settings_toml(rt.settings, copy_dir / "inventory.yaml"))
    copied = Runtime.load(copy_dir / "crashcart.toml")
    assert copied.inventory.vault.address == "http://127.0.0.1:1"
    assert copied.inventory.model_dump(exclude={"path", "vault"}) == rt.inventory.model_dump(exclude={"path", "vault"})
    assert copied.settings.model_dump(exclude={"config_path", "inventory"}) == rt.settings.model_dump(
        exclude={"config_path", "inventory"})
    assert load_settings(settings_file).inventory == tmp_path / "inventory.yaml"  # the shared file is untouched
    assert rt.inventory.vault.address == "http://127.0.0.1:9"


# -- scoring -------------------------------------------------------------------------------------------------

def test_judgements():
    assert judge_runbook(status="contained", summary="", error=None, minutes=4, allowed=15, done=["contained"],
                         dry_run=False)[0] is Outcome.MET
    assert judge_runbook(status="contained", summary="", error=None, minutes=16, allowed=15, done=["contained"],
                         dry_run=False) == (Outcome.LATE, "contained, after 16.0 min against 15 allowed")
    assert judge_runbook(status="deferred", summary="db-1: Vault down", error=None, minutes=1, allowed=15,
                         done=["succeeded"], dry_run=False) == (Outcome.MISSED, "deferred: db-1: Vault down")
    assert judge_runbook(status=None, summary="", error="LockBusy: web-1 is locked", minutes=1, allowed=15,
                         done=["contained"], dry_run=False) == (Outcome.MISSED, "LockBusy: web-1 is locked")
    assert judge_runbook(status="planned", summary="", error=None, minutes=1, allowed=15, done=["contained"],
                         dry_run=True)[0] is Outcome.DRY
    assert judge_decision(facilitated=False, chosen=None, expected="a", minutes=None, allowed=5) == (
        Outcome.NOT_EXERCISED, "not exercised (unfacilitated)")
    assert judge_decision(facilitated=True, chosen="b", expected="a", minutes=1, allowed=5)[0] is Outcome.MISSED
    assert judge_decision(facilitated=True, chosen="a", expected="a", minutes=12, allowed=5)[0] is Outcome.LATE
    assert judge_decision(facilitated=True, chosen=None, expected="a", minutes=None, allowed=5,
                          no_answer="input closed") == (Outcome.MISSED, "no decision (input closed)")
    assert fault_handled(Outcome.MISSED, "deferred", "missed", "deferred") is True
    assert fault_handled(Outcome.MISSED, "failed", "missed", "deferred") is False
    assert fault_handled(Outcome.LATE, "contained", "met", None) is True  # late is still done
    assert fault_handled(Outcome.MET, "succeeded", "missed", None) is False
    assert fault_handled(Outcome.DRY, "planned", "missed", None) is None


def _response(rid, runbook, targets, status, finished, fired=0.0, allowed=15, fault=None, done=("contained",), rto=None,
              speed=1.0):
    seconds = finished - fired
    return {"id": rid, "inject": "i", "runbook": runbook, "targets": targets, "status": status, "summary": f"{status}",
            "error": None, "fired_offset": fired, "finished_offset": finished, "seconds": seconds,
            "minutes": seconds * speed / 60, "allowed_minutes": allowed, "done": list(done), "fault": fault,
            "rto": rto or [], "run_id": None}


def test_the_score_names_what_went_well_the_gaps_and_the_revision_items():
    injects = [{"id": "i", "offset_seconds": 0.0, "responses": ["isolate", "restore", "rotate", "notify"]}]
    responses = [
        _response("isolate", "isolate-host", ["web-1"], "contained", 240.0),
        _response("restore", "restore-test", ["db-1-data"], "passed", 900.0, allowed=30, done=["passed"],
                  rto=[{"repository": "db-1-data", "seconds": 840.0, "target_minutes": 10, "ok": False, "status": "passed"}]),
        _response("rotate", "rotate-credentials", ["db-1"], "deferred", 30.0, done=["succeeded"],
                  fault={"kind": "vault_unavailable", "expect": "missed", "status": "deferred"}),
    ]
    decisions = [{"id": "notify", "inject": "i", "question": "Notify?", "expected": "yes", "chosen": "yes", "who": "dana",
                  "minutes": 12.0, "seconds": 720.0, "allowed_minutes": 5}]
    score = score_exercise(speed=1.0, dry_run=False, facilitated=True, injects=injects, responses=responses,
                           decisions=decisions)
    assert [(s.id, s.outcome.value) for s in score.responses] == [
        ("isolate", "met"), ("restore", "met"), ("rotate", "missed"), ("notify", "late")]
    assert score.summary == "2 met, 1 late, 1 missed; faults handled as expected: 1/1"
    assert score.time_to_contain == {"response": "isolate", "hosts": ["web-1"], "real_seconds": 240.0, "minutes": 4.0}
    assert "restore of db-1-data took 14.0 min against a 10 min RTO" in score.revision_items
    assert "decision 'notify' took 12.0 min against 5 allowed" in score.revision_items
    assert ("fault vault_unavailable: rotate-credentials db-1 ended deferred as expected (keep this fallback in the plan)"
            in score.revision_items)
    assert any(line.startswith("RTO breach") for line in score.gaps)
    assert "time to contain web-1: 4.0 min from the first inject" in score.went_well
    assert score.decisions == [{"id": "notify", "question": "Notify?", "outcome": "late", "minutes": 12.0,
                                "allowed_minutes": 5.0, "chosen": "yes", "who": "dana"}]


def test_unfacilitated_decisions_count_neither_way_and_high_speed_lateness_is_explained():
    injects = [{"id": "i", "offset_seconds": 0.0, "responses": ["isolate", "d"]}]
    responses = [_response("isolate", "isolate-host", ["web-1"], "contained", 20.0, speed=600)]
    decisions = [{"id": "d", "inject": "i", "question": "Q?", "expected": "a", "chosen": None, "allowed_minutes": 5}]
    score = score_exercise(speed=600, dry_run=False, facilitated=False, injects=injects, responses=responses,
                           decisions=decisions)
    assert score.counts["not_exercised"] == 1 and score.counts["missed"] == 0
    assert score.responses[0].outcome is Outcome.LATE and score.responses[0].minutes == pytest.approx(200.0)
    assert any("rerun at --speed 1" in line for line in score.revision_items)
    assert "decision 'd': not exercised (unfacilitated)" in score.gaps


# -- the terminal ------------------------------------------------------------------------------------------------

def _prompt() -> DecisionPrompt:
    scenario = load_scenario("ransomware-ephi-host")
    inject, response = scenario.responses()[1]
    return DecisionPrompt(inject, response, 0.0)


def test_the_terminal_asks_for_an_option_and_who_decided():
    answers = iter(["9", "investigate-first", "Dana (incident commander)"])
    shown: list[str] = []
    answer = TerminalDecider(read=lambda _: next(answers), write=shown.append, default_who="alice")(_prompt())
    assert (answer.choice, answer.who, answer.who_source) == ("investigate-first", "Dana (incident commander)", "typed")
    assert any("not an option: '9'" in line for line in shown) and any("1) declare" in line for line in shown)
    answers = iter(["1", ""])
    assert TerminalDecider(read=lambda _: next(answers), write=shown.append, default_who="alice")(_prompt()).who == "alice"

    def closed(_):
        raise EOFError

    with pytest.raises(NoAnswer, match="input closed"):
        TerminalDecider(read=closed, write=shown.append)(_prompt())


# -- the runner's clock, with fake runbooks (no lab, no Prefect runs) ----------------------------------------------

CALLS: list[dict] = []
_CALLS_LOCK = threading.Lock()


def _fake(kind: str, status: str, kwargs: dict) -> dict:
    started = time.monotonic()
    time.sleep(0.2)
    with _CALLS_LOCK:
        CALLS.append({"kind": kind, "kwargs": kwargs, "started": started, "ended": time.monotonic()})
    hosts = kwargs.get("hosts") or kwargs.get("repos")
    steps = [{"id": "quarantine", "status": "succeeded"}] if kind == "isolate" else []
    return {"run_id": None, "runbook": kind, "status": status, "summary": f"{kind} {status}",
            "hosts": {h: {"status": status, "summary": status, "steps": steps} for h in hosts}}


def fake_isolate(**kwargs) -> dict:
    return _fake("isolate", "contained", kwargs)


def fake_release(**kwargs) -> dict:
    return _fake("release", "released", kwargs)


def fake_rotate(**kwargs) -> dict:
    # The fault must reach the flow through its copy of the configuration, like the real flow reads it.
    vault = Runtime.load(kwargs["config"]).inventory.vault.address
    return _fake("rotate", "deferred" if vault == "http://127.0.0.1:1" else "succeeded", kwargs)


class Scripted:
    """A decider answering from a script, like participants would."""

    def __init__(self, choices: dict[str, str]) -> None:
        self.choices = choices

    def __call__(self, prompt: DecisionPrompt) -> Answer:
        from crashcart.evidence.recorder import utcnow

        return Answer(self.choices[prompt.response.id], "tester", "scripted", time.monotonic(), utcnow())


def test_the_clock_orders_responses_per_host_faults_copies_and_cleans_up(tmp_path, settings_file, monkeypatch):
    for runbook, fn in (("isolate-host", "fake_isolate"), ("release-host", "fake_release"),
                        ("rotate-credentials", "fake_rotate")):
        monkeypatch.setitem(tt_runner.FLOWS, runbook, f"{__name__}:{fn}")
    CALLS.clear()
    doc = {
        "scenario": "drill", "version": 1, "title": "Drill", "narrative": "A drill.", "hipaa": [EXERCISE_SPEC],
        "lessons": [{"id": "l", "text": "A lesson."}],
        "injects": [
            {"id": "alert", "minute": 0, "title": "Alert", "responses": [
                {"id": "isolate-web", "runbook": "isolate-host", "target": "web-1", "allowed_minutes": 15, "lessons": ["l"]},
                {"id": "declare", "decision": "Declare?", "expected": "yes", "allowed_minutes": 5,
                 "options": [{"id": "yes", "text": "Yes"}, {"id": "no", "text": "No"}]}]},
            {"id": "clean", "minute": 1, "title": "Clean", "responses": [
                {"id": "release-web", "runbook": "release-host", "target": "web-1", "allowed_minutes": 15}]},
            {"id": "vault", "minute": 2, "title": "Vault down", "responses": [
                {"id": "rotate-db", "runbook": "rotate-credentials", "target": "db-1", "allowed_minutes": 20,
                 "fault": {"kind": "vault_unavailable", "expect": "missed", "status": "deferred"}}]},
            {"id": "spread", "minute": 3, "title": "db-1 too", "responses": [
                {"id": "isolate-db", "runbook": "isolate-host", "target": "db-1", "allowed_minutes": 15}]},
        ],
    }
    scenario = load_scenario(write_scenario(tmp_path, doc))
    rt = Runtime.load(settings_file)
    shared = hashlib.sha256((tmp_path / "inventory.yaml").read_bytes()).hexdigest()
    seen: list[str] = []
    result = run_exercise(rt, scenario, ExerciseOptions(speed=600, facilitated=True, triggered_by="cli:tester@here"),
                          decider=Scripted({"declare": "no"}), on_response=lambda r: seen.append(r.id))

    by = {s["id"]: s for s in result.score["responses"]}
    assert {k: s["outcome"] for k, s in by.items()} == {"isolate-web": "met", "declare": "missed", "release-web": "met",
                                                        "rotate-db": "missed", "isolate-db": "met"}
    assert by["rotate-db"]["as_expected"] is True and by["declare"]["why"] == "chose 'no', the plan says 'yes'"
    calls = {(c["kind"], tuple(c["kwargs"]["hosts"])): c for c in CALLS}
    # release-host waited for the isolation of the same host, though its inject came first.
    assert calls[("release", ("web-1",))]["started"] >= calls[("isolate", ("web-1",))]["ended"]
    for c in CALLS:
        assert c["kwargs"]["triggered_by"] == f"tabletop:{result.run_id}" and c["kwargs"]["confirmed_production"] is False
    assert Path(calls[("rotate", ("db-1",))]["kwargs"]["config"]).parent.name == "rotate-db"
    # db-1 was left isolated by the scenario: the exercise released it and says so.
    cleanup = calls[("release", ("db-1",))]["kwargs"]
    assert "over" in cleanup["reason"] and Path(cleanup["config"]).parent.name == "base"
    assert any("db-1 was still isolated" in line for line in result.score["revision_items"])
    assert sorted(seen) == ["isolate-db", "isolate-web", "release-web", "rotate-db"]
    assert not (rt.settings.state_dir / "tabletop" / result.run_id).exists()
    assert hashlib.sha256((tmp_path / "inventory.yaml").read_bytes()).hexdigest() == shared

    records = exercise_records(rt.settings.evidence.dir, result.run_id)
    kinds = [r.kind for r in records]
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished"
    assert kinds.count("tabletop_inject") == 4 and kinds.count("tabletop_decision") == 1
    c = collect(records)
    assert c["started"]["run_kind"] == "tabletop" and EXERCISE_SPEC in c["started"]["hipaa"]
    assert c["finished"]["status"] == "exercised"
    assert [d["who"] for d in c["decisions"]] == ["tester"]
    # The stored reports are what the records render to, byte for byte.
    for fmt in ("md", "html"):
        text, recorded = rerender(rt.settings.evidence.dir, result.run_id[:8], fmt)
        assert Path(recorded["path"]).read_text() == text
        assert hashlib.sha256(text.encode()).hexdigest() == recorded["sha256"] == result.reports[fmt]["sha256"]
    from crashcart.evidence.verify import verify

    report = verify(rt.settings.evidence.dir, rt.settings.evidence.trusted_keys)
    assert report.ok, report.message


def test_a_production_target_refuses_the_exercise_before_anything_is_recorded(tmp_path, settings_file):
    inv = copy.deepcopy(INVENTORY)
    inv["hosts"]["web-1"]["environment"] = "production"
    (tmp_path / "inventory.yaml").write_text(yaml.safe_dump(inv))
    rt = Runtime.load(settings_file)
    for options in (ExerciseOptions(), ExerciseOptions(dry_run=True), ExerciseOptions(facilitated=True)):
        with pytest.raises(InvalidScenario, match="web-1 is production"):
            run_exercise(rt, load_scenario("ransomware-ephi-host"), options, decider=Scripted({}))
    assert not rt.settings.evidence.dir.exists() and not rt.settings.state_dir.exists()


# -- reports -----------------------------------------------------------------------------------------------------

def test_the_report_shows_every_inject_and_response_with_both_clocks(tmp_path, settings_file, monkeypatch):
    monkeypatch.setitem(tt_runner.FLOWS, "isolate-host", f"{__name__}:fake_isolate")
    monkeypatch.setitem(tt_runner.FLOWS, "release-host", f"{__name__}:fake_release")
    scenario = load_scenario(write_scenario(tmp_path, edited(lambda d: d["injects"].pop(1))))
    rt = Runtime.load(settings_file)
    result = run_exercise(rt, scenario, ExerciseOptions(speed=60))
    view = exercise_view(exercise_records(rt.settings.evidence.dir, result.run_id))
    md, html = render(view, "md"), render(view, "html")
    assert md == render(view, "md")  # deterministic: no clock reading while rendering
    for text in (md, html):
        assert "EDR alert on web-1" in text and "isolate: isolate-host web-1" in text and "T+0.0 min" in text
        assert "not exercised (unfacilitated)" in text and EXERCISE_SPEC in text and "UTC" in text
    assert "## Timeline" in md and "## What went well" in md and "## Gaps" in md and "## Revision items" in md
    assert "<script" not in html and html.startswith("<!DOCTYPE html>")
    with pytest.raises(InvalidInput, match="report format 'pdf'"):
        render(view, "pdf")
