"""Tabletop exercises against the lab: the ransomware scenario end to end, production refused, a fault scored."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import reach
from crashcart.evidence.ledger import iter_records
from crashcart.evidence.verify import verify
from crashcart.runtime import Runtime

pytestmark = pytest.mark.lab
ROOT = Path(__file__).resolve().parents[1]
CRASHCART = str(ROOT / ".venv" / "bin" / "crashcart")
WEB, PEER = "10.77.0.11", "10.77.0.14"


def cli(*args: str, config: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "CRASHCART_CONFIG": str(config), "COLUMNS": "200"}
    return subprocess.run([CRASHCART, *args], capture_output=True, text=True, env=env, timeout=timeout)


def wait_until_web1_is_free(limit: float = 150) -> None:
    """Another suite may hold web-1 isolated: wait for it to be released rather than fight it."""
    deadline = time.monotonic() + limit
    while not reach("peer-1", WEB, 443):
        if time.monotonic() > deadline:
            pytest.fail("web-1 stayed isolated by another run for too long")
        time.sleep(3)


def test_the_ransomware_scenario_runs_end_to_end_on_the_lab(lab_copy):
    from flows.isolate import release_host
    from tabletop.runner import ExerciseOptions, run_exercise
    from tabletop.scenario import load_scenario

    # Other suites may hold web-1's lock for a while: wait for it rather than miss the response.
    config = lab_copy(settings=lambda t: t.replace("lock_wait_seconds = 30", "lock_wait_seconds = 120"))
    rt = Runtime.load(config)
    wait_until_web1_is_free()
    seen: dict[str, object] = {}

    def on_response(r) -> None:
        # Runs before the release of web-1 may start: the isolation is checked from outside, while it holds.
        seen[r.id] = r.status
        if r.runbook == "isolate-host" and r.status == "contained":
            seen["peer_to_web_443"] = reach("peer-1", WEB, 443)
            seen["peer_to_web_22"] = reach("peer-1", WEB, 22)
            seen["web_to_peer_22"] = reach("web-1", PEER, 22)

    started = time.monotonic()
    try:
        result = run_exercise(rt, load_scenario("ransomware-ephi-host"),
                              ExerciseOptions(speed=600, triggered_by="cli:tester@lab"), on_response=on_response)
    finally:
        # The runner releases what it isolated; only if it died half-way is web-1 still ours to release.
        if seen.get("isolate-web-1") == "contained" and seen.get("release-web-1") != "released" \
                and not reach("peer-1", WEB, 443):
            release_host(hosts=["web-1"], reason="tabletop test over", config=str(config))
    elapsed = time.monotonic() - started

    assert seen["isolate-web-1"] == "contained"
    assert (seen["peer_to_web_443"], seen["peer_to_web_22"], seen["web_to_peer_22"]) == (False, False, False)
    assert seen["release-web-1"] == "released" and reach("peer-1", WEB, 443) and reach("peer-1", WEB, 22)
    assert result.status == "exercised"
    outcomes = {s["id"]: s["outcome"] for s in result.score["responses"]}
    # At x600 a real runbook second is ten scenario minutes: done, but likely late.
    assert {k: outcomes[k] in ("met", "late") for k in ("isolate-web-1", "restore-web-1-data", "rotate-db-1",
                                                         "release-web-1")} == dict.fromkeys(
        ("isolate-web-1", "restore-web-1-data", "rotate-db-1", "release-web-1"), True), result.score["responses"]
    assert outcomes["declare-incident"] == outcomes["breach-assessment"] == "not_exercised"
    assert result.score["time_to_contain"]["hosts"] == ["web-1"]
    [rto] = result.score["rto"]
    assert rto["repository"] == "web-1-data" and rto["ok"] and rto["target_minutes"] == 30

    # The evidence: one exercise run, the runbook runs it triggered, all of it verifying.
    evidence = rt.settings.evidence.dir
    report = verify(evidence, rt.settings.evidence.trusted_keys)
    assert report.ok, report.message
    runs = {r.run: r.body for r in iter_records(evidence, kind="run_started")}
    exercise = runs[result.run_id]
    assert exercise["run_kind"] == "tabletop" and "164.308(a)(7)(ii)(D)" in exercise["hipaa"]
    assert exercise["trigger"] == {"kind": "cli", "who": "tester@lab"}
    triggered = sorted(b["run_kind"] for b in runs.values() if b["trigger"] == {"kind": "tabletop", "who": result.run_id})
    assert triggered == ["isolate-host", "release-host", "restore-test", "rotate-credentials"]
    [finished] = [r.body for r in iter_records(evidence, kind="run_finished", run=result.run_id)]
    assert finished["status"] == "exercised"

    # The report: each inject and each response with scenario and real times, stored and re-rendered alike.
    stored = Path(finished["detail"]["reports"]["md"]["path"])
    assert stored.parent == evidence / "exercises" / result.run_id
    text = stored.read_text()
    assert hashlib.sha256(text.encode()).hexdigest() == finished["detail"]["reports"]["md"]["sha256"]
    timeline = text.split("## Timeline", 1)[1].split("\n## ", 1)[0]
    for title in ("EDR alert on web-1", "backup-1 reports encrypted files", "web-1 held db-1's credentials",
                  "web-1 rebuilt and confirmed clean"):
        assert f": {title} |" in timeline
    for rid, status in (("isolate-web-1", "contained"), ("restore-web-1-data", "passed"), ("rotate-db-1", "succeeded"),
                        ("release-web-1", "released")):
        [row] = [line for line in timeline.splitlines() if f"response done: {rid}: {status} after" in line]
        assert row.startswith("| T+") and " UTC | +" in row
    again = cli("tabletop", "report", result.run_id[:8], config=config)
    assert again.returncode == 0 and again.stdout == text, again.stderr
    assert "same bytes as the report recorded" in again.stderr
    assert elapsed < 120, elapsed


def test_a_scenario_naming_a_production_host_is_refused_before_any_action(lab_copy):
    production = lab_copy(inventory=lambda t: t.replace("  web-1:\n    address: 10.77.0.11\n",
                                                        "  web-1:\n    address: 10.77.0.11\n    environment: production\n"))
    rt = Runtime.load(production)
    assert rt.inventory.host("web-1").is_production
    for flags in ((), ("--dry-run",), ("--facilitated",)):
        result = cli("tabletop", "run", "ransomware-ephi-host", "--speed", "600", *flags, config=production)
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr.strip().count("\n") == 0
        assert result.stderr.strip() == (
            "crashcart: error: tabletop/scenarios/ransomware-ephi-host.yaml: inject 1 'edr-alert': response 1 "
            f"'isolate-web-1': web-1 is production in {rt.settings.inventory}: tabletop exercises run against "
            "staging only; nothing was run")
    # Nothing ran: no record at all in this copy's evidence, no exercise directory.
    assert not list(iter_records(rt.settings.evidence.dir))
    assert not (rt.settings.state_dir / "tabletop").exists()


def test_vault_unavailable_on_a_rotation_is_the_expected_miss(lab_copy, tmp_path, vault_admin):
    config = lab_copy()
    rt = Runtime.load(config)
    scenario = tmp_path / "vault-down.yaml"
    scenario.write_text(yaml.safe_dump({
        "scenario": "vault-down", "version": 1, "title": "Vault down during a rotation",
        "narrative": "Vault is down for maintenance when db-1's credentials must be rotated.",
        "hipaa": ["164.308(a)(7)(ii)(D)", "164.308(a)(5)(ii)(D)"],
        "lessons": [{"id": "fail-safe", "text": "With Vault down a rotation is deferred, never applied without escrow."}],
        "injects": [{"id": "vault-maintenance", "minute": 0, "title": "Vault is down; rotate db-1", "responses": [
            {"id": "rotate-db-1", "runbook": "rotate-credentials", "target": "db-1", "allowed_minutes": 20,
             "lessons": ["fail-safe"], "fault": {"kind": "vault_unavailable", "expect": "missed", "status": "deferred"}}]}],
    }, sort_keys=False))
    inventory_before = rt.settings.inventory.read_bytes()
    version = vault_admin.secrets.kv.v2.read_secret_metadata(path="hosts/db-1", mount_point="secret")["data"]["current_version"]

    result = cli("tabletop", "run", str(scenario), "--speed", "600", config=config)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "faults handled as expected: 1/1" in result.stdout and "as expected" in result.stdout
    [score] = [r.body for r in iter_records(rt.settings.evidence.dir, kind="tabletop_score")]
    [rotate] = score["responses"]
    assert (rotate["outcome"], rotate["status"], rotate["fault"], rotate["as_expected"]) == (
        "missed", "deferred", "vault_unavailable", True)
    assert any("fault vault_unavailable: rotate-credentials db-1 ended deferred as expected" in line
               for line in score["revision_items"])
    # The fault lived in the exercise's copy only: the real Vault was never written, the inventory never edited.
    assert vault_admin.secrets.kv.v2.read_secret_metadata(path="hosts/db-1", mount_point="secret")["data"][
        "current_version"] == version
    assert rt.settings.inventory.read_bytes() == inventory_before
    assert list((rt.settings.state_dir / "tabletop").iterdir()) == []
