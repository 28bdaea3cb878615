"""`crashcart evidence` as a user types it: verify (and its exit codes), close-orphans, list, show, report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from crashcart.evidence.ledger import Ledger, ledger_files
from crashcart.evidence.recorder import RunRecorder, Trigger
from crashcart.evidence.signing import LocalEd25519Signer
from crashcart.evidence.verify import EXIT_CODES, Status
from test_report import Sample, write_sample_ledger

ROOT = Path(__file__).resolve().parents[1]
CRASHCART = str(ROOT / ".venv" / "bin" / "crashcart")
LAB_DIR = Path(os.environ.get("CRASHCART_LAB_DIR", "/var/lib/crashcart-lab"))
INVENTORY = "management_networks: [10.0.0.1/32]\nhosts: {}\nvault:\n  address: http://127.0.0.1:8200\n"


def cli(*args: str, config: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CRASHCART_CONFIG"}
    env.update(COLUMNS="200", CRASHCART_CONFIG=str(config))
    return subprocess.run([CRASHCART, *args], capture_output=True, text=True, env=env, timeout=timeout)


def settings(folder: Path, evidence: Path, sample: Sample) -> Path:
    """A settings file of its own for `evidence`, signing with the sample's key (no lab needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "inventory.yaml").write_text(INVENTORY)
    config = folder / "crashcart.toml"
    config.write_text(
        'inventory = "inventory.yaml"\nstate_dir = "state"\n\n[ssh]\nknown_hosts = "known_hosts"\n\n'
        f'[evidence]\ndir = "{evidence}"\nlocal_signing_key = "{sample.key_path}"\ntrusted_keys = "{sample.keys_path}"\n')
    return config


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Sample:
    return write_sample_ledger(tmp_path_factory.mktemp("ledger"))


@pytest.fixture(scope="module")
def config(sample) -> Path:
    return settings(sample.folder / "settings", sample.evidence, sample)


@pytest.fixture
def copy(sample, tmp_path):
    """A copy of the sample ledger with its own settings: returns (settings file, the copy's folder)."""
    evidence = tmp_path / "evidence"
    shutil.copytree(sample.evidence, evidence)
    return settings(tmp_path, evidence, sample), evidence


def one_line_error(result: subprocess.CompletedProcess, code: int, text: str) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("crashcart: error: ") and text in lines[0], result.stderr


def last_file(evidence: Path) -> Path:
    return evidence / ledger_files(evidence)[-1]


# -- verify ------------------------------------------------------------------------------------------


def test_verify_an_intact_ledger_counts_records_checkpoints_signers_and_warns_of_the_open_run(config, sample):
    before = {p.name: p.read_bytes() for p in sample.evidence.iterdir() if p.is_file()}
    result = cli("evidence", "verify", config=config)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("INTACT: ")
    assert any(line.startswith("records verified: ") for line in lines)
    assert any(line.startswith("checkpoints verified: 13, the last at seq") for line in lines)
    [signers] = [line for line in lines if line.startswith("signers seen: ")]
    assert "local-ed25519:" in signers and "13 checkpoints" in signers and "NOT PINNED" not in signers
    [warning] = [line for line in lines if line.startswith("warning: ")]
    assert sample.runs["killed"] in warning and "is gone: `crashcart evidence close-orphans`" in warning
    # verify writes nothing, not even the closing record of the orphan it reports.
    assert {p.name: p.read_bytes() for p in sample.evidence.iterdir() if p.is_file()} == before


def test_verify_since_counts_only_the_records_from_then(config):
    result = cli("evidence", "verify", "--since", "2026-10-01", config=config)
    assert result.returncode == 0, result.stderr
    assert "since 2026-10-01" in result.stdout


def test_verify_names_the_tampered_record_and_exits_22(copy):
    config, evidence = copy
    path = evidence / "evidence-2026-10.jsonl"  # INC-2041's containment, in the middle of the chain
    lines = path.read_bytes().split(b"\n")
    target = next(i for i, line in enumerate(lines) if b'"kind":"run_finished"' in line and b"contained" in line)
    at = lines[target].index(b"isolated")
    data = bytearray(path.read_bytes())
    data[sum(len(line) + 1 for line in lines[:target]) + at] ^= 0x01  # one bit of one byte: "isolated" -> "hsolated"
    path.write_bytes(bytes(data))
    seq = json.loads(lines[target])["seq"]
    result = cli("evidence", "verify", config=config)
    assert result.returncode == EXIT_CODES[Status.TAMPERED] == 22
    assert result.stdout.splitlines()[0].startswith(f"TAMPERED at seq {seq}: ")


def test_verify_reports_a_truncated_ledger_and_exits_21(copy):
    config, evidence = copy
    path = last_file(evidence)
    lines = path.read_bytes().split(b"\n")[:-1]
    path.write_bytes(b"".join(line + b"\n" for line in lines[:-2]))  # the last two records removed
    last = json.loads(lines[-3])["seq"]
    result = cli("evidence", "verify", config=config)
    assert result.returncode == EXIT_CODES[Status.TRUNCATED] == 21
    assert result.stdout.splitlines()[0].startswith(f"TRUNCATED after seq {last}: HEAD says")


def test_verify_reports_a_torn_tail_without_repairing_it_and_exits_20(copy):
    config, evidence = copy
    path = last_file(evidence)
    torn = path.read_bytes() + b'{"body":{"host":"web-1","sta'
    path.write_bytes(torn)
    result = cli("evidence", "verify", config=config)
    assert result.returncode == EXIT_CODES[Status.TORN_TAIL] == 20
    assert result.stdout.splitlines()[0].startswith("TORN_TAIL after seq ")
    assert path.read_bytes() == torn  # the next append moves it to torn/, verify does not


def test_verify_does_not_call_a_run_still_in_progress_an_orphan(copy, sample):
    config, evidence = copy
    ledger = Ledger(evidence, signer=LocalEd25519Signer(sample.key_path))
    running = RunRecorder(ledger, kind="restore-test", runbook=None, params={}, hosts=[{"name": "web-1-data"}],
                          trigger=Trigger("schedule", "deployment restore-test"), hipaa=[]).start()  # this process
    result = cli("evidence", "verify", config=config)
    assert result.returncode == 0, result.stdout
    [note] = [line for line in result.stdout.splitlines() if running.run_id in line]
    assert note.startswith("note: ") and f"its process {os.getpid()} is still running" in note
    closed = cli("evidence", "close-orphans", config=config)
    assert running.run_id not in closed.stdout and sample.runs["killed"] in closed.stdout


def test_bad_dates_are_one_line_and_exit_2(config):
    one_line_error(cli("evidence", "verify", "--since", "yesterday-ish", config=config), 2,
                   "--since 'yesterday-ish' is not a date")
    one_line_error(cli("evidence", "list", "--until", "31/10/2026", config=config), 2, "--until '31/10/2026' is not a date")
    one_line_error(cli("evidence", "report", "--format", "md", "--since", "2026-11-01", "--until", "2026-10-01",
                       config=config), 2, "the period is empty")


def test_close_orphans_closes_the_killed_run_as_crashed(copy, sample):
    config, _ = copy
    result = cli("evidence", "close-orphans", config=config)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"closed run {sample.runs['killed']} as crashed"
    verified = cli("evidence", "verify", config=config)
    assert verified.returncode == 0 and "warning" not in verified.stdout, verified.stdout
    runs = json.loads(cli("evidence", "list", "--json", config=config).stdout)
    assert {r["run_id"]: r["status"] for r in runs}[sample.runs["killed"]] == "crashed"
    again = cli("evidence", "close-orphans", config=config)
    assert again.returncode == 0 and again.stdout.startswith("nothing to close")


# -- list and show -----------------------------------------------------------------------------------


def test_list_shows_one_row_per_run(config, sample):
    result = cli("evidence", "list", config=config)
    assert result.returncode == 0, result.stderr
    for run_id in sample.runs.values():
        assert run_id[:8] in result.stdout
    for text in ("restore-test", "isolate-host (dry run)", "rolled_back", "open", "exercised", "tabletop:ab12cd34"):
        assert text in result.stdout


def test_list_json_filters_by_period(config, sample):
    result = cli("evidence", "list", "--json", "--since", "2026-10-01", "--until", "2026-10-31", config=config)
    assert result.returncode == 0, result.stderr
    runs = json.loads(result.stdout)
    assert {r["run_id"] for r in runs} == {sample.runs[n] for n in (
        "approval_owed", "isolate_db", "release_db", "restore_breach", "approval_reviewed", "isolate_web")}
    isolate = next(r for r in runs if r["run_id"] == sample.runs["isolate_db"])
    assert isolate["status"] == "contained" and isolate["hosts"] == ["db-1"] and isolate["trigger"] == "cli:alice@jump-1"
    assert isolate["runbook"] == "isolate-host" and isolate["incident"] == "INC-2041" and isolate["duration"] >= 0


def test_list_kind_shows_one_row_per_record(config, sample):
    result = cli("evidence", "list", "--kind", "approval", "--json", config=config)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["run"] for r in rows] == [sample.runs["approval_owed"], sample.runs["approval_reviewed"]]
    assert all(r["status"] == "break_glass" and r["body"]["review_owed"] for r in rows)
    table = cli("evidence", "list", "--kind", "custody", config=config)
    assert "volatile-db-1.txt (14924 bytes)" in table.stdout
    none = cli("evidence", "list", "--kind", "custdy", config=config)
    assert none.returncode == 0 and "kinds recorded: " in none.stdout and "custody" in none.stdout


def test_show_tells_the_story_of_a_run(config, sample):
    result = cli("evidence", "show", sample.runs["isolate_web"][:8], config=config)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for text in (sample.runs["isolate_web"], "isolate-host v1", "runbooks/isolate-host.yaml", "trigger   cli:alice@jump-1",
                 "164.308(a)(6)(ii) Response and reporting", "incident  INC-2042",
                 "web-1 quarantine (action lab.quarantine)  rolled_back", "$ do-quarantine web-1  -> exit 0 on web-1",
                 "verify probe.outbound_blocked: failed - web-1 still reaches peer-1:22",
                 "rollback firewalld.revert_quarantine: succeeded - reverted", "checkpoint seq "):
        assert text in out, text
    assert "signed by local-ed25519:" in out


def test_show_json_and_custody(config, sample):
    result = cli("evidence", "show", sample.runs["isolate_db"], "--json", config=config)
    assert result.returncode == 0, result.stderr
    story = json.loads(result.stdout)
    assert story["run"]["status"] == "contained"
    assert story["custody"][0]["sha256_destination"] == "9" * 64
    assert story["notifications"] == [{"id": "n1", "first_ts": story["notifications"][0]["first_ts"], "records": 2,
                                       "status": "delivered", "event": "contained", "channel": "#ir",
                                       "ts": story["notifications"][0]["ts"]}]
    assert story["checkpoint"]["count"] > story["run"]["last_seq"]


def test_show_an_unknown_run_is_one_line_and_exit_2(config):
    one_line_error(cli("evidence", "show", "deadbeef", config=config), 2, "no run 'deadbeef'")


# -- report ------------------------------------------------------------------------------------------


def test_report_in_three_formats(config, sample, tmp_path):
    page = tmp_path / "report.html"
    html = cli("evidence", "report", "--format", "html", "--until", "2026-11-30", "--output", str(page), config=config)
    assert html.returncode == 0, html.stderr
    assert html.stdout.startswith(f"wrote {page}: html report of 14 run(s), 5 gap(s), ledger INTACT")
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and "INC-2042" in text and "review owed" in text

    md = cli("evidence", "report", "--format", "md", "--until", "2026-11-30", config=config)
    assert md.returncode == 0, md.stderr
    assert md.stdout.startswith("# HIPAA Security Rule evidence report") and "## Gaps" in md.stdout
    assert "no successful restore test in the 92 days before 2026-12-01" in md.stdout

    data = json.loads(cli("evidence", "report", "--format", "json", "--since", "2026-10-01", "--until", "2026-11-30",
                          config=config).stdout)
    assert data["since"] == "2026-10-01T00:00:00.000000Z" and data["until"] == "2026-12-01T00:00:00.000000Z"
    assert sorted(g["kind"] for g in data["gaps"]) == ["cadence", "failed", "failed", "open_run", "review_owed"]
    assert [f["rto_ok"] for f in data["restore_tests"]] == [False, True]


def test_report_format_is_checked(config):
    one_line_error(cli("evidence", "report", "--format", "pdf", config=config), 2, "--format 'pdf' must be one of html, md, json")
    one_line_error(cli("evidence", "report", config=config), 2, "--format is required")


def test_report_of_a_tampered_ledger_says_so_and_exits_with_verifys_code(copy, tmp_path):
    config, evidence = copy
    path = evidence / "evidence-2026-10.jsonl"
    assert b"carol (CISO)" in path.read_bytes()
    path.write_bytes(path.read_bytes().replace(b"carol (CISO)", b"carol (CFO) "))
    out = tmp_path / "tampered.md"
    result = cli("evidence", "report", "--format", "md", "--output", str(out), config=config)
    assert result.returncode == 22
    assert "the evidence ledger does not verify: TAMPERED at seq" in result.stderr
    text = out.read_text()
    assert "**TAMPERED at seq" in text and "the evidence ledger does not verify" in text


# -- the lab's own ledger ---------------------------------------------------------------------------


@pytest.mark.lab
def test_the_labs_real_runs_verify_and_report(lab_copy):
    """A consistent copy of the lab's ledger (up to the record HEAD names) verifies and reports every run."""
    # A fresh lab's ledger may still be empty (most tests write to their own): record one real run first.
    planned = cli("isolate-host", "web-1", "--dry-run", "--reason", "evidence test", config=LAB_DIR / "crashcart.toml")
    assert planned.returncode == 0, planned.stdout + planned.stderr
    config = lab_copy()
    evidence = config.parent / "evidence"
    evidence.mkdir()
    head = (LAB_DIR / "evidence" / "HEAD").read_bytes()  # first: every record it names is then in the files
    last = json.loads(head)["seq"]
    started = 0
    for name in ledger_files(LAB_DIR / "evidence"):
        keep = []
        for line in (LAB_DIR / "evidence" / name).read_bytes().split(b"\n"):
            if line and json.loads(line)["seq"] <= last:
                keep.append(line + b"\n")
                started += b'"kind":"run_started"' in line
        (evidence / name).write_bytes(b"".join(keep))
    (evidence / "HEAD").write_bytes(head)
    verified = cli("evidence", "verify", config=config)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.startswith(f"INTACT: {last + 1} records")
    report = json.loads(cli("evidence", "report", "--format", "json", config=config).stdout)
    assert report["integrity"]["status"] == "INTACT" and len(report["runs"]) == started
    assert all(s["pinned"] for s in report["integrity"]["signers"])


def test_review_records_what_a_break_glass_approval_owes(copy, sample, tmp_path):
    copy, _ = copy
    owed = sample.runs["approval_owed"]
    result = cli("evidence", "review", owed, "--reviewer", "ciso", "--outcome", "justified: live ransomware", config=copy)
    assert result.returncode == 0, result.stderr
    report = tmp_path / "r.json"
    assert cli("evidence", "report", "--format", "json", "--output", str(report), config=copy).returncode == 0
    assert "review_owed" not in [g["kind"] for g in json.loads(report.read_text())["gaps"]]
    one_line_error(cli("evidence", "review", sample.runs["isolate_web"], "--reviewer", "x", "--outcome", "y",
                       config=copy), 2, "has no break-glass approval that owes a review")
