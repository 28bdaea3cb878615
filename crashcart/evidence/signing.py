"""Checkpoint signers (Vault transit or a local Ed25519 key) and the pinned keys that verify them."""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Iterator, Mapping, Protocol, runtime_checkable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from crashcart.errors import EvidenceError

VAULT_TRANSIT = "vault-transit"
LOCAL_ED25519 = "local-ed25519"
SIGNER_KINDS = (VAULT_TRANSIT, LOCAL_ED25519)


@runtime_checkable
class Signer(Protocol):
    """Signs checkpoint payloads with Ed25519.

    `kind` is "vault-transit" or "local-ed25519"; `key_id` names the key in the trusted-keys file;
    `sign` returns the base64 of the raw 64-byte Ed25519 signature over `payload`. A signer whose
    backend is unreachable raises `crashcart.errors.IntegrationError` (the ledger then falls back).
    """

    kind: str
    key_id: str

    def sign(self, payload: bytes) -> str: ...


def local_key_id(public_key: bytes) -> str:
    """The key id of a local Ed25519 key: its kind and the first 16 hex digits of SHA-256 of the raw key."""
    return f"{LOCAL_ED25519}:{sha256(public_key).hexdigest()[:16]}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalEd25519Signer:
    """Signs with an Ed25519 private key kept in a PEM (PKCS#8) file of mode 0600."""

    kind = LOCAL_ED25519

    def __init__(self, key_path: str | os.PathLike[str], key_id: str | None = None) -> None:
        path = Path(key_path)
        try:
            mode = os.stat(path).st_mode
            data = path.read_bytes()
        except FileNotFoundError:
            raise EvidenceError(f"{path}: evidence signing key not found (create it with LocalEd25519Signer.generate)") from None
        except OSError as e:
            raise EvidenceError(f"{path}: cannot read the evidence signing key ({e.strerror})") from None
        if mode & 0o077:
            # Like ssh: a private key others can read is no longer a proof of who signed.
            raise EvidenceError(f"{path}: evidence signing key has mode {mode & 0o777:04o}; it must be 0600")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, binascii.Error):
            raise EvidenceError(f"{path}: not an unencrypted PEM private key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise EvidenceError(f"{path}: the evidence signing key must be Ed25519")
        self._key = key
        self.path = path
        self.public_key_raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.key_id = key_id or local_key_id(self.public_key_raw)

    @property
    def public_key(self) -> str:
        """The raw 32-byte public key, base64 (the form kept in the trusted-keys file)."""
        return base64.b64encode(self.public_key_raw).decode("ascii")

    def sign(self, payload: bytes) -> str:
        """Base64 of the raw Ed25519 signature over `payload`."""
        return base64.b64encode(self._key.sign(payload)).decode("ascii")

    @classmethod
    def generate(cls, key_path: str | os.PathLike[str]) -> tuple["LocalEd25519Signer", str]:
        """Create the key file (0600) if it is absent, and return the signer and its base64 public key.

        An existing key is loaded, never replaced: replacing it would orphan the pinned public key.
        """
        path = Path(key_path)
        if not path.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            pem = Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                pass  # another process created it first; load theirs
            except OSError as e:
                raise EvidenceError(f"{path}: cannot create the evidence signing key ({e.strerror})") from None
            else:
                try:
                    os.fchmod(fd, 0o600)
                    os.write(fd, pem)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                _fsync_dir(path.parent)
        signer = cls(path)
        return signer, signer.public_key

    def __repr__(self) -> str:
        return f"LocalEd25519Signer(key_id={self.key_id!r})"


def decode_signature(signature: str) -> bytes | None:
    """The 64 raw bytes of a base64 Ed25519 signature, or None when it is not one."""
    if not isinstance(signature, str):
        return None
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == 64 else None


@dataclass(frozen=True)
class TrustedKey:
    """One pinned public key: its id, the kind of signer that holds it and the raw 32-byte key."""

    key_id: str
    kind: str
    public_key: bytes
    _verifier: Ed25519PublicKey = field(repr=False, compare=False)

    @classmethod
    def make(cls, key_id: str, kind: str, public_key: str | bytes) -> "TrustedKey":
        """Validate and build a pinned key; `public_key` is raw bytes or their base64."""
        if not isinstance(key_id, str) or not key_id:
            raise EvidenceError("a trusted key needs a non-empty key id")
        if kind not in SIGNER_KINDS:
            raise EvidenceError(f"trusted key {key_id!r}: kind {kind!r} is not one of {', '.join(SIGNER_KINDS)}")
        if isinstance(public_key, str):
            try:
                raw = base64.b64decode(public_key, validate=True)
            except (binascii.Error, ValueError):
                raise EvidenceError(f"trusted key {key_id!r}: public_key is not base64") from None
        else:
            raw = bytes(public_key)
        if len(raw) != 32:
            raise EvidenceError(f"trusted key {key_id!r}: public_key must be 32 raw bytes, got {len(raw)}")
        return cls(key_id, kind, raw, Ed25519PublicKey.from_public_bytes(raw))

    def verifies(self, payload: bytes, signature: bytes) -> bool:
        """True when `signature` (raw 64 bytes) is this key's Ed25519 signature over `payload`."""
        try:
            self._verifier.verify(signature, payload)
        except InvalidSignature:
            return False
        return True


class TrustedKeys:
    """The pinned public keys checkpoints may be signed with: {key_id: {"kind", "public_key"}}."""

    def __init__(self, keys: Mapping[str, TrustedKey] | None = None) -> None:
        self._keys: dict[str, TrustedKey] = dict(keys or {})

    @classmethod
    def from_dict(cls, data: object, where: str = "trusted keys") -> "TrustedKeys":
        """Build from the JSON document form; raises EvidenceError naming the bad entry."""
        if not isinstance(data, dict):
            raise EvidenceError(f"{where}: expected a JSON object of key_id -> {{kind, public_key}}")
        keys = {}
        for key_id, entry in data.items():
            if not isinstance(entry, dict) or set(entry) != {"kind", "public_key"}:
                raise EvidenceError(f"{where}: key {key_id!r} must have exactly 'kind' and 'public_key'")
            try:
                keys[key_id] = TrustedKey.make(key_id, entry["kind"], entry["public_key"])
            except EvidenceError as e:
                raise EvidenceError(f"{where}: {e}") from None
        return cls(keys)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "TrustedKeys":
        """Read the trusted-keys JSON file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise EvidenceError(f"{path}: trusted-keys file not found") from None
        except OSError as e:
            raise EvidenceError(f"{path}: cannot read the trusted-keys file ({e.strerror})") from None
        try:
            data = json.loads(text)
        except ValueError as e:
            raise EvidenceError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict[str, dict[str, str]]:
        """The JSON document form."""
        return {
            k.key_id: {"kind": k.kind, "public_key": base64.b64encode(k.public_key).decode("ascii")}
            for k in sorted(self._keys.values(), key=lambda k: k.key_id)
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the file atomically (temporary file, fsync, rename, fsync of the folder), mode 0600."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        data = (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except OSError as e:
            raise EvidenceError(f"{path}: cannot write the trusted-keys file ({e.strerror})") from None

    def add(self, key_id: str, kind: str, public_key: str | bytes) -> None:
        """Pin a key. Pinning the same key again is a no-op; a different key under a pinned id is refused."""
        key = TrustedKey.make(key_id, kind, public_key)
        old = self._keys.get(key_id)
        if old is not None and (old.kind, old.public_key) != (key.kind, key.public_key):
            raise EvidenceError(f"trusted key {key_id!r} is already pinned to a different key; remove it first on purpose")
        self._keys[key_id] = key

    def get(self, key_id: str) -> TrustedKey | None:
        """The pinned key with this id, if any."""
        return self._keys.get(key_id)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def __iter__(self) -> Iterator[TrustedKey]:
        return iter(self._keys.values())

    def __len__(self) -> int:
        return len(self._keys)


def pin_key(path: str | os.PathLike[str], key_id: str, kind: str, public_key: str | bytes) -> TrustedKeys:
    """Add one key to the trusted-keys file (created if absent) and return the result."""
    path = Path(path)
    keys = TrustedKeys.load(path) if path.exists() else TrustedKeys()
    keys.add(key_id, kind, public_key)
    keys.save(path)
    return keys
