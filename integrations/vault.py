"""The one adapter to Vault/OpenBao: KV v2 secrets, PKI certificates and transit signing, with typed errors."""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterator, Sequence

import hvac
import hvac.exceptions as hvac_errors
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from crashcart.errors import (
    InvalidInput,
    VaultCertificateUnknown,
    VaultConflict,
    VaultError,
    VaultPermissionDenied,
    VaultSecretMissing,
    VaultUnavailable,
)
from crashcart.inventory import VaultConfig
from crashcart.secrets import Secret, SecretRef, mask

# The same shape SecretRef accepts for a path, so a plain path cannot smuggle in '..' or a leading '/'.
_PATH_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]*$")
_SERIAL_RE = re.compile(r"^[0-9a-f]+$")
# Health codes of a node that answers for the cluster: active, standby, DR secondary, performance standby.
_SERVING_HEALTH_CODES = (200, 429, 472, 473)


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate issued by the PKI mount, with its private key (masked) and parsed facts."""

    certificate_pem: str
    chain_pem: str
    private_key: Secret
    serial: str  # colon-separated lowercase hex, as Vault returns it
    not_after: datetime  # UTC
    fingerprint_sha256: str  # lowercase hex of the DER certificate's SHA-256, no separators

    @property
    def serial_int(self) -> int:
        """The serial as the integer X.509 and CRLs use."""
        return int(self.serial.replace(":", ""), 16)


class TransitSigner:
    """Signs evidence with one pinned version of a transit Ed25519 key; the private key never leaves Vault."""

    kind = "vault-transit"

    def __init__(self, vault: "Vault", key: str, version: int) -> None:
        self._vault = vault
        self.key = key
        self.version = version
        self.key_id = transit_key_id(key, version)

    def sign(self, payload: bytes) -> str:
        """Sign `payload`; returns the base64 of the raw 64-byte Ed25519 signature."""
        return self._vault._transit_sign(self.key, self.version, payload)

    def __repr__(self) -> str:
        return f"TransitSigner({self.key_id})"


def transit_key_id(key: str, version: int) -> str:
    """The key id evidence records carry for a transit key version: `vault-transit:<key>:v<version>`."""
    return f"vault-transit:{key}:v{version}"


class Vault:
    """A Vault/OpenBao client for one address and token; every failure leaves as a crashcart VaultError."""

    def __init__(self, config: VaultConfig, token: Secret, *, timeout: float = 5.0) -> None:
        if not isinstance(token, Secret):
            raise TypeError("the Vault token must be a Secret")
        if timeout <= 0:
            raise InvalidInput(f"Vault timeout must be positive, got {timeout!r}")
        self.config = config
        self.timeout = float(timeout)
        self._token = token
        self._hvac: hvac.Client | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_runtime(cls, runtime) -> "Vault":
        """The adapter for the inventory's Vault, with the runtime's token and timeout."""
        return cls(runtime.inventory.vault, runtime.vault_token(), timeout=runtime.settings.vault.timeout)

    def __repr__(self) -> str:
        return f"Vault({self.config.address})"

    @property
    def address(self) -> str:
        return self.config.address

    # -- plumbing ---------------------------------------------------------------------------------
    @property
    def _client(self) -> hvac.Client:
        # Created on first use so that building a plan (which may construct a Vault) touches nothing.
        with self._lock:
            if self._hvac is None:
                verify: bool | str = str(self.config.ca_file) if self.config.ca_file else True
                self._hvac = hvac.Client(url=self.config.address, token=self._token.reveal(),
                                         timeout=self.timeout, verify=verify)
            return self._hvac

    @contextmanager
    def _boundary(self, api_path: str, *, label: str | None = None) -> Iterator[None]:
        """Translate requests/hvac failures on `api_path` into crashcart errors (never with a secret in them)."""
        what = label or api_path
        try:
            yield
        except requests.exceptions.SSLError as e:
            # Not an outage: a wrong CA file or someone in the middle; retrying will not help.
            raise VaultError(f"TLS verification of Vault at {self.address} failed: check vault.ca_file "
                             "in the inventory") from e
        except requests.exceptions.Timeout as e:
            raise VaultUnavailable(f"Vault at {self.address} did not answer within {self.timeout:g}s "
                                   f"({what}): is it overloaded or hung?") from e
        except requests.exceptions.ConnectionError as e:
            raise VaultUnavailable(f"Vault at {self.address} is unreachable ({what}): is OpenBao running "
                                   "and listening there?") from e
        except requests.exceptions.RequestException as e:
            raise VaultError(f"Vault at {self.address} gave an answer that is not Vault's ({what}): "
                             "check vault.address in the inventory") from e
        except hvac_errors.VaultDown as e:
            if "sealed" in _messages(e).lower():
                raise VaultUnavailable(f"Vault at {self.address} is sealed: unseal it, then run again "
                                       "(nothing was changed)") from e
            raise VaultUnavailable(f"Vault at {self.address} is down ({what}): {_messages(e)}") from e
        except hvac_errors.VaultNotInitialized as e:
            raise VaultUnavailable(f"Vault at {self.address} is not initialised") from e
        except (hvac_errors.BadGateway, hvac_errors.RateLimitExceeded) as e:
            raise VaultUnavailable(f"Vault at {self.address} cannot serve {what} now: {_messages(e)}") from e
        except hvac_errors.InvalidPath as e:
            raise VaultSecretMissing(f"{what} does not exist in Vault at {self.address}") from e
        except (hvac_errors.Forbidden, hvac_errors.Unauthorized) as e:
            raise VaultPermissionDenied(f"permission denied on {api_path}: {self._why_denied()}") from e
        except hvac_errors.InvalidRequest as e:
            if "check-and-set" in _messages(e):
                raise VaultConflict(f"{what} was changed by another writer (check-and-set failed): "
                                    "re-read it and decide again") from e
            raise VaultError(f"Vault refused {what}: {_messages(e)}") from e
        except hvac_errors.VaultError as e:
            raise VaultError(f"Vault failed {what}: {_messages(e) or type(e).__name__}") from e

    def _why_denied(self) -> str:
        """Tell a dead token from a policy that lacks the path (Vault answers 403 for both)."""
        try:
            self._client.auth.token.lookup_self()
        except (hvac_errors.Forbidden, hvac_errors.Unauthorized):
            return ("Vault refused the token (invalid, expired or revoked): replace it "
                    "(CRASHCART_VAULT_TOKEN or vault.token_file)")
        except Exception:  # the probe only sharpens the message; the 403 itself is the error
            pass
        return "check the crashcart policy"

    # -- health -----------------------------------------------------------------------------------
    def health(self) -> dict:
        """Vault's /sys/health; raises VaultUnavailable when it is unreachable, sealed or not initialised."""
        with self._boundary("sys/health"):
            response = self._client.sys.read_health_status(method="GET")
        if isinstance(response, dict):
            status, code = response, 200
        else:  # hvac hands back the raw response for every non-200 health code
            code = response.status_code
            try:
                status = response.json()
            except ValueError:
                status = {}
        if not isinstance(status, dict):
            status = {}
        if status.get("initialized") is False:
            raise VaultUnavailable(f"Vault at {self.address} is not initialised")
        if status.get("sealed"):
            raise VaultUnavailable(f"Vault at {self.address} is sealed: unseal it, then run again "
                                   "(nothing was changed)")
        if code not in _SERVING_HEALTH_CODES:
            raise VaultUnavailable(f"Vault at {self.address} reports itself unhealthy (HTTP {code})")
        return status

    # -- KV v2 ------------------------------------------------------------------------------------
    def _location(self, ref_or_path: SecretRef | str) -> tuple[str, str, str]:
        """(mount, path, label) for a reference or a path under the inventory's KV mount."""
        if isinstance(ref_or_path, SecretRef):
            return ref_or_path.mount, ref_or_path.path, f"vault:{ref_or_path.mount}/{ref_or_path.path}"
        if not isinstance(ref_or_path, str):
            raise TypeError("a KV location is a SecretRef or a path string")
        if ref_or_path.startswith("vault:"):
            return self._location(SecretRef.parse(ref_or_path))
        path = ref_or_path.strip("/")
        if not _PATH_RE.match(path) or ".." in path.split("/"):
            raise InvalidInput(f"KV path {ref_or_path!r} is malformed: write it like hosts/web-1 "
                               f"(under the {self.config.kv_mount!r} mount), without '..'")
        return self.config.kv_mount, path, f"vault:{self.config.kv_mount}/{path}"

    @staticmethod
    def _ref(ref: SecretRef | str) -> SecretRef:
        if isinstance(ref, SecretRef):
            return ref
        if isinstance(ref, str):
            return SecretRef.parse(ref)
        raise TypeError("a secret reference is a SecretRef or text like vault:secret/hosts/web-1#root_password")

    def _read_raw(self, mount: str, path: str, label: str) -> tuple[dict[str, Any] | None, int]:
        """The plain data and version of a KV path: (None, 0) if it never existed, (None, N) if version N is deleted."""
        try:
            with self._boundary(f"{mount}/data/{path}", label=label):
                response = self._client.secrets.kv.v2.read_secret_version(
                    path=path, mount_point=mount, raise_on_deleted_version=False)
        except VaultSecretMissing:
            return None, 0
        data = response.get("data") or {}
        version = int((data.get("metadata") or {}).get("version") or 0)
        return data.get("data"), version

    def read_kv(self, path: SecretRef | str) -> tuple[dict[str, Secret], int]:
        """Every key of a KV v2 path (e.g. `hosts/web-1` under the KV mount) as Secrets, and the version read.

        Non-text values (numbers, lists) come back as their JSON text.
        """
        mount, kv_path, label = self._location(path)
        return self._read_values(mount, kv_path, label)

    def read_secret(self, ref: SecretRef | str) -> Secret:
        """The value of one key, e.g. `vault:secret/hosts/web-1#root_password`."""
        ref = self._ref(ref)
        values, version = self._read_values(ref.mount, ref.path, str(ref))
        if ref.key not in values:
            present = ", ".join(sorted(values)) or "none"
            raise VaultSecretMissing(f"{ref} does not exist: version {version} of vault:{ref.mount}/{ref.path} "
                                     f"has no key {ref.key!r} (keys: {present})")
        return values[ref.key]

    def _read_values(self, mount: str, path: str, label: str) -> tuple[dict[str, Secret], int]:
        data, version = self._read_raw(mount, path, label)
        if data is None:
            deleted = f" (its current version {version} is deleted)" if version else ""
            raise VaultSecretMissing(f"{label} does not exist in Vault at {self.address}{deleted}")
        return {key: _as_secret(value) for key, value in data.items()}, version

    def write_secret(self, ref: SecretRef | str, value: Secret, *, cas: int | None) -> int:
        """Set one key with check-and-set, keeping the other keys of the path; returns the new version.

        Args:
            cas: the version the caller based its decision on; 0 means the path must not exist yet,
                None means the version read here (still guarded against a writer in between).
        """
        ref = self._ref(ref)
        if not isinstance(value, Secret):
            raise TypeError("write_secret takes a Secret, never a plain value")
        if cas is not None and (isinstance(cas, bool) or not isinstance(cas, int) or cas < 0):
            raise InvalidInput(f"check-and-set version for {ref} must be a version number >= 0, got {cas!r}")
        label = f"vault:{ref.mount}/{ref.path}"
        current, version = self._read_raw(ref.mount, ref.path, label)
        if cas is not None and cas != version:
            # Refuse before writing: the caller decided on a version that is no longer current.
            raise VaultConflict(f"{label} is at version {version}, not {cas}: another writer changed it; "
                                "re-read it and decide again")
        merged = dict(current or {})
        merged[ref.key] = value.reveal()
        with self._boundary(f"{ref.mount}/data/{ref.path}", label=label):
            # cas=version makes Vault itself refuse if someone wrote between our read and this write.
            response = self._client.secrets.kv.v2.create_or_update_secret(
                path=ref.path, secret=merged, cas=version, mount_point=ref.mount)
        return int(response["data"]["version"])

    def secret_version(self, ref_or_path: SecretRef | str) -> int:
        """The current version of a KV path (a reference's key is ignored), from its metadata."""
        mount, path, label = self._location(ref_or_path)
        with self._boundary(f"{mount}/metadata/{path}", label=label):
            response = self._client.secrets.kv.v2.read_secret_metadata(path=path, mount_point=mount)
        return int(response["data"]["current_version"])

    # -- PKI --------------------------------------------------------------------------------------
    def issue_certificate(self, common_name: str, *, alt_names: Sequence[str] = (), ip_sans: Sequence[str] = (),
                          ttl: str | None = None) -> IssuedCertificate:
        """Issue a certificate and private key from the inventory's PKI mount and role."""
        names = _name_list("alt_names", alt_names)
        ips = _name_list("ip_sans", ip_sans)
        if not common_name or "," in common_name:
            raise InvalidInput(f"certificate common name {common_name!r} must be one non-empty name")
        params: dict[str, str] = {}
        if names:
            params["alt_names"] = ",".join(names)
        if ips:
            params["ip_sans"] = ",".join(ips)
        if ttl:
            params["ttl"] = ttl
        mount, role = self.config.pki_mount, self.config.pki_role
        label = f"a certificate for {common_name} from {mount}/issue/{role}"
        with self._boundary(f"{mount}/issue/{role}", label=label):
            data = self._client.secrets.pki.generate_certificate(
                role, common_name, extra_params=params, mount_point=mount)["data"]
        try:
            cert = x509.load_pem_x509_certificate(data["certificate"].encode())
            chain = data.get("ca_chain") or [data["issuing_ca"]]
            serial = data["serial_number"].lower()
        except (KeyError, TypeError, ValueError) as e:
            raise VaultError(f"Vault's answer for {mount}/issue/{role} is not a certificate") from e
        if cert.serial_number != int(serial.replace(":", ""), 16):
            raise VaultError(f"Vault reported serial {serial} for {common_name} but the certificate says otherwise")
        return IssuedCertificate(
            certificate_pem=data["certificate"],
            chain_pem="\n".join(pem.strip() for pem in chain),
            private_key=Secret(data["private_key"]),
            serial=serial,
            not_after=cert.not_valid_after_utc,
            fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(),
        )

    def revoke_certificate(self, serial: str) -> datetime:
        """Revoke a certificate by serial (any hex spelling); returns when Vault revoked it (idempotent)."""
        serial = normalise_serial(serial)
        mount = self.config.pki_mount
        try:
            with self._boundary(f"{mount}/revoke", label=f"revoking certificate {serial}"):
                data = self._client.secrets.pki.revoke_certificate(serial, mount_point=mount)["data"]
        except VaultError as e:
            cause = e.__cause__
            if isinstance(cause, hvac_errors.InvalidRequest) and "not found" in _messages(cause):
                raise VaultCertificateUnknown(
                    f"{mount} has no certificate with serial {serial}: nothing was revoked") from cause
            raise
        stamp = data.get("revocation_time_rfc3339")
        if stamp:
            return datetime.fromisoformat(stamp).astimezone(timezone.utc)
        return datetime.fromtimestamp(int(data["revocation_time"]), timezone.utc)

    def crl_serials(self) -> set[int]:
        """Serials on the PKI mount's CRL, after Vault rebuilt it; the CRL's signature is checked against the CA."""
        mount = self.config.pki_mount
        # Rebuild first: with auto_rebuild on, a fresh revocation reaches the CRL only at the next
        # periodic rebuild, and the crashcart policy cannot read config/crl to know which applies.
        with self._boundary(f"{mount}/crl/rotate", label=f"rebuilding the CRL of {mount}"):
            self._client.secrets.pki.rotate_crl(mount_point=mount)
        with self._boundary(f"{mount}/crl/pem", label=f"the CRL of {mount}"):
            pem = self._client.secrets.pki.read_crl(mount_point=mount)
        ca_pem = self.ca_pem()
        try:
            crl = x509.load_pem_x509_crl(pem.encode())
            ca = x509.load_pem_x509_certificate(ca_pem.encode())
        except ValueError as e:
            raise VaultError(f"the CRL or CA of {mount} at {self.address} does not parse") from e
        if not crl.is_signature_valid(ca.public_key()):
            raise VaultError(f"the CRL of {mount} at {self.address} is not signed by its CA: do not trust it")
        return {revoked.serial_number for revoked in crl}

    def ca_pem(self) -> str:
        """The PKI mount's CA certificate, as PEM."""
        mount = self.config.pki_mount
        with self._boundary(f"{mount}/ca/pem", label=f"the CA certificate of {mount}"):
            pem = self._client.secrets.pki.read_ca_certificate(mount_point=mount)
        if "BEGIN CERTIFICATE" not in pem:
            raise VaultUnavailable(f"{mount} at {self.address} has no CA certificate yet")
        return pem.strip()

    # -- transit ----------------------------------------------------------------------------------
    def _transit_key(self) -> dict[str, Any]:
        mount, key = self.config.transit_mount, self.config.transit_key
        with self._boundary(f"{mount}/keys/{key}", label=f"transit key {key}"):
            data = self._client.secrets.transit.read_key(key, mount_point=mount)["data"]
        if data.get("type") != "ed25519" or not data.get("supports_signing"):
            raise VaultError(f"transit key {key} is of type {data.get('type')!r}: evidence signing needs ed25519")
        return data

    def transit_signer(self) -> TransitSigner:
        """A signer pinned to the transit key's latest version (its key_id stays true if the key rotates)."""
        data = self._transit_key()
        return TransitSigner(self, self.config.transit_key, int(data["latest_version"]))

    def transit_public_keys(self) -> dict[str, str]:
        """Every version of the transit key: key_id -> base64 of the raw Ed25519 public key."""
        data = self._transit_key()
        versions = sorted(data.get("keys", {}).items(), key=lambda item: int(item[0]))
        return {transit_key_id(self.config.transit_key, int(v)): info["public_key"] for v, info in versions}

    def _transit_sign(self, key: str, version: int, payload: bytes) -> str:
        if not isinstance(payload, (bytes, bytearray)):
            raise TypeError("transit signing takes bytes")
        mount = self.config.transit_mount
        with self._boundary(f"{mount}/sign/{key}", label=f"signing with transit key {key} v{version}"):
            data = self._client.secrets.transit.sign_data(
                key, hash_input=base64.b64encode(bytes(payload)).decode(), key_version=version,
                mount_point=mount)["data"]
        prefix = f"vault:v{version}:"
        signature = data.get("signature") or ""
        if not signature.startswith(prefix):
            raise VaultError(f"transit key {key} signed with another version than v{version}")
        try:
            raw = base64.b64decode(signature[len(prefix):], validate=True)
        except binascii.Error as e:
            raise VaultError(f"transit key {key} returned a signature that is not base64") from e
        if len(raw) != 64:
            raise VaultError(f"transit key {key} returned a {len(raw)}-byte signature, not Ed25519's 64")
        return base64.b64encode(raw).decode()


def normalise_serial(serial: str) -> str:
    """A certificate serial in Vault's form (colon-separated lowercase hex) from any common spelling."""
    digits = (serial or "").strip().lower().replace(":", "").replace("-", "").replace(" ", "")
    if digits.startswith("0x"):
        digits = digits[2:]
    if not digits or not _SERIAL_RE.match(digits):
        raise InvalidInput(f"certificate serial {serial!r} is not hexadecimal (e.g. 6b:2a:e9:...)")
    if len(digits) % 2:
        digits = "0" + digits
    return ":".join(digits[i:i + 2] for i in range(0, len(digits), 2))


def _as_secret(value: Any) -> Secret:
    return Secret(value if isinstance(value, str) else json.dumps(value))


def _name_list(what: str, names: Sequence[str]) -> list[str]:
    if isinstance(names, str):
        raise TypeError(f"{what} is a sequence of names, not one string")
    out = [str(n).strip() for n in names]
    for name in out:
        # Vault splits these lists on commas: one would smuggle in an extra name.
        if not name or "," in name:
            raise InvalidInput(f"{what} entry {name!r} must be one non-empty name")
    return out


def _messages(e: hvac_errors.VaultError) -> str:
    """Vault's own error text, masked (it names paths and parameters, never values, but be sure)."""
    errors = e.errors if isinstance(e.errors, list) else ([e.errors] if e.errors else [])
    text = "; ".join(" ".join(str(m).replace("1 error occurred:", "").split()).lstrip("* ") for m in errors)
    if not text and e.args and e.args[0]:
        text = str(e.args[0])
    return mask(text)
