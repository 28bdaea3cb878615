"""LUKS2 keyslots: facts parsed from cryptsetup's JSON metadata, and the argument list of every cryptsetup call.

Nothing here runs a command: steps run these argument lists over SSH (so each is kept for the evidence)
and hand the output to the parsers. Passphrases never appear in an argument list: they travel on stdin
(`--key-file=-`) or in a 0600 file whose path is given.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal

from crashcart import validation as v
from crashcart.errors import LuksError

MAX_KEYSLOTS = 32  # LUKS2 keyslots are numbered 0..31
EXIT_REFUSED = 2   # cryptsetup's "no permission or bad passphrase": the passphrase opens no (such) keyslot
EXIT_NO_DEVICE = 4

Pbkdf = Literal["default", "pbkdf2-fast"]
_PRIORITY = {0: "ignore", 1: "normal", 2: "prefer"}
_UNLOCKED_RE = re.compile(r"^Key slot (\d+) unlocked\.$", re.MULTILINE)


@dataclass(frozen=True)
class Keyslot:
    """One keyslot of a LUKS2 header."""

    number: int
    type: str           # "luks2" for a passphrase/key slot, "reencrypt" while re-encrypting
    kdf: str            # argon2id, argon2i or pbkdf2
    priority: str       # ignore | normal | prefer
    unlocks_volume: bool  # bound to the digest of a data segment (an unbound slot holds no volume key)


@dataclass(frozen=True)
class Token:
    """A LUKS2 token (TPM2, FIDO2, PKCS#11, clevis, ...) and the keyslots it unlocks."""

    number: int
    type: str
    keyslots: tuple[int, ...]


@dataclass(frozen=True)
class LuksHeader:
    """The keyslot inventory of one LUKS2 device, as `cryptsetup luksDump --dump-json-metadata` shows it."""

    keyslots: tuple[Keyslot, ...]
    tokens: tuple[Token, ...] = ()

    @property
    def active(self) -> tuple[int, ...]:
        """The keyslots that can open the volume, in order."""
        return tuple(k.number for k in self.keyslots if k.type == "luks2" and k.unlocks_volume)

    def slot(self, number: int) -> Keyslot | None:
        return next((k for k in self.keyslots if k.number == number), None)

    def token_types(self, number: int) -> tuple[str, ...]:
        """The types of the tokens bound to a keyslot (a TPM- or FIDO2-enrolled slot is not a passphrase)."""
        return tuple(t.type for t in self.tokens if number in t.keyslots)

    def free_slot(self, avoid: tuple[int, ...] = ()) -> int | None:
        """The lowest keyslot number in use by nothing (and not in `avoid`), or None when all 32 are taken."""
        used = {k.number for k in self.keyslots} | set(avoid)
        return next((n for n in range(MAX_KEYSLOTS) if n not in used), None)

    def as_dict(self) -> dict:
        """For the evidence: slot numbers, KDFs and token bindings (no salts, digests or key material)."""
        return {
            "active": list(self.active),
            "keyslots": {str(k.number): {"type": k.type, "kdf": k.kdf, "priority": k.priority,
                                         "unlocks_volume": k.unlocks_volume} for k in self.keyslots},
            "tokens": [{"id": t.number, "type": t.type, "keyslots": list(t.keyslots)} for t in self.tokens],
        }


# -- parsers -------------------------------------------------------------------------------------
def _number(value: object, what: str) -> int:
    try:
        number = int(str(value))
    except ValueError:
        raise LuksError(f"LUKS2 metadata: {what} {value!r} is not a number") from None
    if not 0 <= number < MAX_KEYSLOTS * 4:  # tokens may be numbered past 31; nothing sane goes further
        raise LuksError(f"LUKS2 metadata: {what} {number} is out of range")
    return number


def parse_luks2_metadata(text: str) -> LuksHeader:
    """`cryptsetup luksDump --dump-json-metadata DEVICE` output -> LuksHeader.

    Raises LuksError when the text is not LUKS2 JSON metadata (a LUKS1 device prints nothing on stdout).
    """
    try:
        data = json.loads(text)
    except (TypeError, ValueError):
        raise LuksError("cryptsetup printed no LUKS2 JSON metadata (is the device LUKS1, or not LUKS?)") from None
    if not isinstance(data, dict) or not isinstance(data.get("keyslots"), dict) \
            or not isinstance(data.get("digests"), dict):
        raise LuksError("LUKS2 metadata without 'keyslots' and 'digests' objects: not a LUKS2 header")
    unlocking: set[int] = set()
    for digest in data["digests"].values():
        if isinstance(digest, dict) and digest.get("segments"):
            unlocking |= {_number(n, "digest keyslot") for n in digest.get("keyslots") or []}
    slots = []
    for key, slot in sorted(data["keyslots"].items(), key=lambda item: _number(item[0], "keyslot")):
        number = _number(key, "keyslot")
        if number >= MAX_KEYSLOTS or not isinstance(slot, dict):
            raise LuksError(f"LUKS2 metadata: keyslot {key!r} is malformed")
        kdf = slot.get("kdf") if isinstance(slot.get("kdf"), dict) else {}
        slots.append(Keyslot(number, str(slot.get("type", "")), str(kdf.get("type", "")),
                             _PRIORITY.get(slot.get("priority", 1), "normal"), number in unlocking))
    tokens = []
    for key, token in sorted((data.get("tokens") or {}).items(), key=lambda item: _number(item[0], "token")):
        if not isinstance(token, dict):
            raise LuksError(f"LUKS2 metadata: token {key!r} is malformed")
        tokens.append(Token(_number(key, "token"), str(token.get("type", "")),
                            tuple(sorted(_number(n, "token keyslot") for n in token.get("keyslots") or []))))
    return LuksHeader(tuple(slots), tuple(tokens))


def parse_unlocked_slot(stdout: str) -> int | None:
    """The keyslot `cryptsetup -v open --test-passphrase` says it unlocked ("Key slot 2 unlocked.")."""
    found = _UNLOCKED_RE.findall(stdout or "")
    return int(found[-1]) if found else None


def failure_reason(device: str, exit_code: int, stderr: str) -> str:
    """One line saying why a cryptsetup call on `device` failed, in the operator's words."""
    text = (stderr or "").strip()
    if exit_code == EXIT_REFUSED:
        return f"{device}: no keyslot accepts this passphrase"
    if exit_code == EXIT_NO_DEVICE or "does not exist" in text:
        return f"{device} does not exist on the host (or cannot be opened)"
    if "Dump operation is not supported" in text:
        return f"{device} is not LUKS2 (LUKS1?): crashcart rotates LUKS2 keyslots only (see cryptsetup convert)"
    if "is not a valid LUKS device" in text:
        return f"{device} is not a LUKS device"
    if "No space" in text or "All key slots full" in text or "not enough" in text.lower():
        return f"{device}: no room for another keyslot ({text.splitlines()[-1]})"
    last = text.splitlines()[-1] if text else "no message"
    return f"{device}: cryptsetup exited {exit_code}: {last[:300]}"


# -- commands ------------------------------------------------------------------------------------
def _slot(number: int) -> str:
    if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number < MAX_KEYSLOTS:
        raise LuksError(f"keyslot {number!r} is not a LUKS2 keyslot number (0..{MAX_KEYSLOTS - 1})")
    return str(number)


def pbkdf_arguments(pbkdf: Pbkdf) -> list[str]:
    """cryptsetup options for the key derivation of a new keyslot (none: cryptsetup's argon2id default)."""
    if pbkdf == "default":
        return []
    if pbkdf == "pbkdf2-fast":
        return ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
    raise LuksError(f"unknown pbkdf choice {pbkdf!r}: use default or pbkdf2-fast")


def dump_command(device: str) -> list[str]:
    """Read the keyslot inventory (no passphrase needed)."""
    return ["cryptsetup", "luksDump", "--dump-json-metadata", v.remote_path(device)]


def test_passphrase_command(device: str, slot: int | None = None) -> list[str]:
    """Check the passphrase on stdin against one keyslot (or all), activating nothing.

    `-v` makes cryptsetup name the slot it unlocked. External token plugins (systemd-tpm2, fido2) are
    disabled so that a TPM-enrolled slot cannot answer for the passphrase being tested.
    """
    argv = ["cryptsetup", "-v", "open", "--test-passphrase", "--disable-external-tokens", "--key-file=-"]
    if slot is not None:
        argv += ["--key-slot", _slot(slot)]
    return argv + [v.remote_path(device)]


def add_key_command(device: str, slot: int, current_key_file: str, pbkdf: Pbkdf = "default") -> list[str]:
    """Add the new passphrase (on stdin) to keyslot `slot`, authorised by the current one in a 0600 file.

    `--key-slot` names the new slot on every cryptsetup 2.x (2.6 warns that `--new-key-slot` is the new
    spelling; older releases know only this one).
    """
    return ["cryptsetup", "luksAddKey", *pbkdf_arguments(pbkdf), "--key-file", v.remote_path(current_key_file),
            "--key-slot", _slot(slot), v.remote_path(device), "-"]


def kill_slot_command(device: str, slot: int) -> list[str]:
    """Wipe keyslot `slot`, authorised by a passphrase of another slot on stdin.

    With a key file cryptsetup 2.6 wipes even the last keyslot without asking: the caller must re-read
    the header and refuse that itself.
    """
    return ["cryptsetup", "luksKillSlot", "--key-file=-", v.remote_path(device), _slot(slot)]
