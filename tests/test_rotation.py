"""rotate-luks and rotate-tls against the lab: db-1's real LUKS2 image, web-1's real nginx, OpenBao's KV and PKI.

Every test leaves the lab usable: db-1's passphrase is always the one escrowed in Vault, web-1 always
serves a valid certificate from the lab PKI.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from conftest import LAB_DIR
from crashcart.errors import InvalidInput, TLSError, VaultUnavailable
from crashcart.evidence.ledger import iter_records
from crashcart.runtime import Runtime
from crashcart.secrets import Secret
from integrations import luks, tls
from integrations.ssh import HostSession
from integrations.vault import Vault

pytestmark = pytest.mark.lab
ROOT = Path(__file__).resolve().parents[1]
DEVICE = "/srv/luks/ephi.img"
WEB, WEB_NAME = "10.77.0.11", "web-1.lab.crashcart.test"
WEB_TLS = LAB_DIR / "hosts" / "web-1" / "etc" / "nginx" / "tls"
NGINX_CONF = LAB_DIR / "hosts" / "web-1" / "etc" / "nginx" / "nginx.conf"


# -- fixtures and helpers --------------------------------------------------------------------------
def fast_luks(text: str, protected: list[int] | None = None) -> str:
    """The lab inventory with db-1's volume on pbkdf2-fast (as `lab up` now writes it: argon2id costs ~20 s here)."""
    data = yaml.safe_load(text)
    volume = data["hosts"]["db-1"]["luks"][0]
    volume["pbkdf"] = "pbkdf2-fast"
    if protected is not None:
        volume["protected_slots"] = protected
    return yaml.safe_dump(data, sort_keys=False)


@pytest.fixture
def config(lab_copy) -> Path:
    """The lab's settings with this test's own evidence and state directories."""
    return lab_copy(inventory=fast_luks)


@pytest.fixture
def rotation():
    import flows.rotation as module

    return module


@pytest.fixture
def db1(runtime):
    with HostSession(runtime.inventory.host("db-1"), runtime.settings.ssh) as session:
        yield session


def opens(session: HostSession, passphrase: str, slot: int | None = None) -> bool:
    """Whether the passphrase opens the image (any slot, or `slot`), asked on db-1 over SSH."""
    result = session.run(luks.test_passphrase_command(DEVICE, slot), stdin=Secret(passphrase), check=False, timeout=60)
    assert result.exit_code in (0, luks.EXIT_REFUSED), result.stderr
    return result.exit_code == 0


def active_slots(session: HostSession) -> tuple[int, ...]:
    return luks.parse_luks2_metadata(session.run(luks.dump_command(DEVICE)).stdout).active


def luks_secrets(vault_admin) -> tuple[dict, int]:
    data = vault_admin.secrets.kv.v2.read_secret_version(path="luks/db-1", mount_point="secret",
                                                         raise_on_deleted_version=True)["data"]
    return data["data"], data["metadata"]["version"]


def served(patience: float = 60) -> tls.CertificateFacts:
    """What web-1 serves to a real handshake from the management address, verified against the lab CA file.

    Unreachable is retried for a while: another suite sharing the lab may hold web-1 isolated between its
    isolate-host and release-host runs (a verification failure is not retried).
    """
    deadline = time.monotonic() + patience
    while True:
        try:
            return tls.served_certificate(WEB, 443, WEB_NAME, (LAB_DIR / "pki-ca.pem").read_text(), timeout=3)
        except TLSError as e:
            if "does not verify" in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(1)


@pytest.fixture
def web1_serving():
    """web-1 answers on 443 from here before the test starts."""
    return served()


@contextmanager
def host_held(host: str, ready=lambda: True):
    """Hold the host's crashcart lock while `ready()` is true, so no isolation (another suite's) starts meanwhile.

    For dry runs and read-only commands, which do not take the lock themselves.
    """
    from flows.common import host_lock

    deadline = time.monotonic() + 120
    while True:
        with host_lock(host, 60):
            if ready():
                yield
                return
        assert time.monotonic() < deadline, f"{host} never became ready"
        time.sleep(1)


def web1_answers() -> bool:
    try:
        served(patience=0)
        return True
    except TLSError:
        return False


def key_lines(pem: str) -> list[str]:
    """The base64 lines of a private key: any of them in an output would be a leak."""
    return [line for line in pem.splitlines() if line and not line.startswith("-----")]


def records(config: Path, run_id: str) -> list:
    return list(iter_records(Runtime.load(config).settings.evidence.dir, run=run_id))


def step_result(config: Path, run_id: str, step: str) -> dict:
    return next(r.body for r in records(config, run_id) if r.kind == "step_result" and r.body["step"] == step)


def assert_nowhere(secrets: list[str], *, config: Path, caplog, ps: list[str], result: dict) -> None:
    """None of the values appears in the evidence files, the logs, any process's arguments or the result."""
    evidence = b"".join(p.read_bytes() for p in Runtime.load(config).settings.evidence.dir.rglob("*") if p.is_file())
    assert evidence, "no evidence written"
    outputs = {"evidence": evidence.decode(errors="replace"), "logs": caplog.text, "ps": "\n".join(ps),
               "result": json.dumps(result)}
    for value in secrets:
        assert len(value) >= 16
        for where, text in outputs.items():
            assert value not in text, f"a secret appears in the {where}"


@contextmanager
def process_arguments():
    """Sample every process's command line (`ps -eo args`) from another thread while the block runs."""
    samples: list[str] = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            samples.append(subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join(5)
    assert len(samples) > 5, "ps was sampled too rarely to mean anything"


def cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CRASHCART_CONFIG": str(config), "PREFECT_API_URL": "http://127.0.0.1:4200/api"}
    return subprocess.run([str(ROOT / ".venv" / "bin" / "crashcart"), *args], capture_output=True, text=True,
                          env=env, timeout=120)


# -- LUKS ------------------------------------------------------------------------------------------
def test_rotate_luks_new_passphrase_from_vault_opens_old_refused_recovery_kept(rotation, config, db1, vault_admin,
                                                                                 caplog):
    before, version = luks_secrets(vault_admin)
    slots_before = active_slots(db1)
    assert opens(db1, before["passphrase"]) and 1 in slots_before
    caplog.set_level(logging.DEBUG)
    with process_arguments() as ps:
        result = rotation.rotate_luks(hosts=["db-1"], triggered_by="cli:tester@mgmt", config=str(config))
    assert result["status"] == "succeeded", result["summary"]
    after, new_version = luks_secrets(vault_admin)
    assert new_version == version + 1 and after["passphrase"] != before["passphrase"]
    assert after["recovery_passphrase"] == before["recovery_passphrase"]
    # From db-1 itself, independently of the flow: new works, old refused, recovery slot untouched.
    detail = step_result(config, result["run_id"], "rotate")["detail"]["volumes"][0]
    assert opens(db1, after["passphrase"], detail["new_slot"])
    assert not opens(db1, before["passphrase"])
    assert opens(db1, before["recovery_passphrase"], 1)
    slots_after = active_slots(db1)
    assert len(slots_after) == len(slots_before) and 1 in slots_after
    assert detail["old_slot"] not in slots_after
    assert detail["working"] == {"slot": detail["new_slot"], "vault_version": new_version}
    checks = {c["check"]: c["status"] for c in step_result(config, result["run_id"], "rotate")["verification"]}
    assert checks == {"luks.passphrase_works": "passed", "luks.old_refused": "passed"}
    assert_nowhere([before["passphrase"], after["passphrase"], before["recovery_passphrase"]],
                   config=config, caplog=caplog, ps=ps, result=result)
    commands = [c["command"] for r in records(config, result["run_id"]) for c in r.body.get("commands", [])]
    assert any("luksAddKey" in c for c in commands) and any("luksKillSlot" in c for c in commands)
    assert not list((LAB_DIR / "hosts" / "db-1" / "run").glob("crashcart-luks.*")), "the key directory was left behind"


def test_escrow_failure_wipes_the_new_slot_and_the_vault_passphrase_still_opens(rotation, config, db1, vault_admin,
                                                                                 monkeypatch):
    before, version = luks_secrets(vault_admin)
    slots_before = active_slots(db1)

    def escrow_fails(self, ref, value, *, cas):  # one call made to fail; everything else is the real lab
        raise VaultUnavailable("Vault at http://127.0.0.1:8200 did not answer within 3s (injected)")

    monkeypatch.setattr(Vault, "write_secret", escrow_fails)
    result = rotation.rotate_luks(hosts=["db-1"], triggered_by="cli:tester@mgmt", config=str(config))
    assert result["status"] == "failed"
    assert "escrow in Vault failed" in result["summary"] and "wiped again" in result["summary"], result["summary"]
    after, new_version = luks_secrets(vault_admin)
    assert (after, new_version) == (before, version)  # nothing escrowed, nothing lost
    assert opens(db1, before["passphrase"])
    assert active_slots(db1) == slots_before  # the new keyslot is gone again
    detail = step_result(config, result["run_id"], "rotate")["detail"]["volumes"][0]
    assert detail["new_slot_removed"] is True
    assert detail["working"] == {"slot": detail["old_slot"], "vault_version": version}


def test_a_passphrase_in_a_protected_slot_is_never_rotated(rotation, lab_copy, db1, vault_admin):
    before, version = luks_secrets(vault_admin)
    slots_before = active_slots(db1)
    config = lab_copy(inventory=lambda text: fast_luks(text, protected=list(slots_before)))
    result = rotation.rotate_luks(hosts=["db-1"], triggered_by="cli:tester@mgmt", config=str(config))
    assert result["status"] == "failed"
    assert "protected keyslot" in result["summary"] and "nothing changed" in result["summary"]
    assert active_slots(db1) == slots_before and luks_secrets(vault_admin) == (before, version)


def test_rotate_luks_dry_run_prints_the_plan_and_changes_nothing(config, db1, vault_admin):
    with host_held("db-1"):
        header_before = db1.run(luks.dump_command(DEVICE)).stdout
        secrets_before = luks_secrets(vault_admin)
        done = cli(config, "rotate-luks", "db-1", "--dry-run")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert "db-1: planned" in text and "luksAddKey" in text and "luksKillSlot" in text and "keyslots" in text
    assert db1.run(luks.dump_command(DEVICE)).stdout == header_before
    assert luks_secrets(vault_admin) == secrets_before


def test_bad_luks_input_is_refused_before_any_connection(rotation, config, monkeypatch):
    done = cli(config, "rotate-luks", "db-1", "--device", "/dev/sda;rm")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().count("\n") == 0 and "is not allowed" in done.stderr, done.stderr

    def no_connection(self):
        raise AssertionError("connected to a host with bad input")

    monkeypatch.setattr(HostSession, "open", no_connection)
    with pytest.raises(InvalidInput, match="no LUKS volume /dev/sdb"):
        rotation.rotate_luks(hosts=["db-1"], device="/dev/sdb", config=str(config))
    with pytest.raises(InvalidInput, match="lists no LUKS volume"):
        rotation.luks_targets(Runtime.load(config).inventory, ["web-1"], None, None)
    with pytest.raises(InvalidInput, match="not supported"):
        rotation.tls_targets(Runtime.load(config).inventory, ["web-1"], None, "apache")


# -- TLS -------------------------------------------------------------------------------------------
def test_rotate_tls_serves_the_new_certificate_and_revokes_the_old(rotation, config, runtime, vault_admin, caplog, web1_serving):
    old = served()
    old_key = (WEB_TLS / "web-1.key").read_text()
    caplog.set_level(logging.DEBUG)
    with process_arguments() as ps:
        result = rotation.rotate_tls(hosts=["web-1"], triggered_by="cli:tester@mgmt", config=str(config))
    assert result["status"] == "succeeded", result["summary"]
    issued = step_result(config, result["run_id"], "rotate")["detail"]["services"][0]["issued"]
    now = served()  # a real handshake from here, verified against the lab CA
    assert now.serial == issued["serial"] != old.serial
    assert now.fingerprint_sha256 == issued["fingerprint_sha256"]
    in_vault = vault_admin.secrets.pki.read_certificate(serial=issued["serial"])["data"]["certificate"]
    assert tls.parse_certificate(in_vault).fingerprint_sha256 == now.fingerprint_sha256
    assert old.serial_int in Vault.from_runtime(runtime).crl_serials()
    key = WEB_TLS / "web-1.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert not [p.name for p in WEB_TLS.iterdir() if "crashcart" in p.name]  # no .crashcart-prev/-new left
    assert_nowhere(key_lines(old_key) + key_lines(key.read_text()), config=config, caplog=caplog, ps=ps,
                   result=result)


def test_a_broken_nginx_configuration_rolls_back_to_the_old_certificate(rotation, config, web1_serving):
    old = served()
    files_before = {p.name: p.read_bytes() for p in WEB_TLS.iterdir()}
    original = NGINX_CONF.read_text()
    try:
        NGINX_CONF.write_text(original + "\nthis_directive_breaks_nginx_t on;\n")
        result = rotation.rotate_tls(hosts=["web-1"], triggered_by="cli:tester@mgmt", config=str(config))
    finally:
        NGINX_CONF.write_text(original)
    assert result["status"] == "failed"
    assert "nginx -t rejected" in result["summary"] and "rollback succeeded" in result["summary"], result["summary"]
    assert served().fingerprint_sha256 == old.fingerprint_sha256
    assert {p.name: p.read_bytes() for p in WEB_TLS.iterdir()} == files_before
    rollback = step_result(config, result["run_id"], "rotate")["rollback"]
    assert rollback["status"] == "succeeded" and rollback["detail"]["services"][0]["revoked_unused"] is True


def test_a_failed_proof_rolls_back_and_revokes_nothing_served(rotation, config, runtime, monkeypatch, web1_serving):
    """The verified handshake is made to fail (one call injected): the old certificate comes back and stays valid."""
    old = served()
    real = tls.served_certificate

    def unverifiable(address, port, server_name, ca_pem, timeout=5.0):
        if ca_pem is not None:
            raise TLSError(f"{server_name} at {address}:{port} served a certificate that does not verify (injected)")
        return real(address, port, server_name, ca_pem, timeout)

    monkeypatch.setattr(tls, "served_certificate", unverifiable)
    result = rotation.rotate_tls(hosts=["web-1"], triggered_by="cli:tester@mgmt", config=str(config))
    monkeypatch.undo()
    assert result["status"] == "failed"
    assert "verification failed" in result["summary"] and "rollback succeeded" in result["summary"], result["summary"]
    assert served().fingerprint_sha256 == old.fingerprint_sha256  # verified again, for real
    assert old.serial_int not in Vault.from_runtime(runtime).crl_serials()
    steps = {s["id"]: s["status"] for s in result["hosts"]["web-1"]["steps"]}
    assert steps == {"served": "succeeded", "rotate": "rolled_back", "revoke": "skipped"}


def test_scheduled_rotation_leaves_a_fresh_certificate_unchanged(rotation, config, web1_serving):
    before = served()
    result = rotation.rotate_tls(group="ephi", only_if_lifetime_used_over=0.66, config=str(config))
    assert result["status"] == "unchanged"
    assert re.search(r"certificate at \d+% of its lifetime; rotated only past 66%", result["hosts"]["web-1"]["summary"])
    assert served().serial == before.serial
    with pytest.raises(InvalidInput, match="between 0 and 1"):
        rotation.rotate_tls(group="ephi", only_if_lifetime_used_over=66, config=str(config))


def test_rotate_tls_dry_run_prints_the_plan_and_changes_nothing(config, web1_serving):
    with host_held("web-1", web1_answers):
        before = served()
        files_before = {p.name: p.read_bytes() for p in WEB_TLS.iterdir()}
        done = cli(config, "rotate-tls", "web-1", "--dry-run")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert "web-1: planned" in text and "nginx -t" in text and f"revoke {before.serial}" in text
    assert served().serial == before.serial
    assert {p.name: p.read_bytes() for p in WEB_TLS.iterdir()} == files_before


def test_certs_lists_the_served_certificate(config, web1_serving):
    with host_held("web-1", web1_answers):
        done = cli(config, "certs", "--json")
        now = served()
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    web = next(r for r in rows if r["host"] == "web-1")
    assert web["verified"] and web["certificate"]["serial"] == now.serial
    assert 0 <= web["lifetime_used"] < 1 and web["days_left"] > 0


# -- schedules ---------------------------------------------------------------------------------------
def test_the_rotation_deployments_load_and_fit_their_flows():
    from flows.deploy import load_deployments, load_flow

    specs = {s.name: s for s in load_deployments(ROOT / "deploy" / "prefect.yaml")}
    for name in ("rotate-tls", "rotate-luks", "rotate-credentials"):
        spec = specs[name]
        assert load_flow(spec).name == name and spec.work_pool == "crashcart" and spec.schedules
    assert specs["rotate-tls"].parameters["only_if_lifetime_used_over"] == 0.66
    assert specs["rotate-luks"].schedules[0].cron == "0 5 15 1 *"
