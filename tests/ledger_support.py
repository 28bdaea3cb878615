"""Shared pieces for the evidence ledger tests: a stepping clock, signers and raw line editing."""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

from crashcart.errors import VaultUnavailable
from crashcart.evidence.ledger import GENESIS, canonical_json, ledger_files
from crashcart.evidence.signing import LocalEd25519Signer, TrustedKeys


class StepClock:
    """A clock that moves forward by `step` on every reading, from `start`."""

    def __init__(self, start: datetime, step: timedelta = timedelta(seconds=1)) -> None:
        self.now = start
        self.step = step

    def __call__(self) -> datetime:
        current = self.now
        self.now = self.now + self.step
        return current


class UnreachableVault:
    """A Vault transit signer whose server cannot be reached (what the real adapter raises then)."""

    kind = "vault-transit"
    key_id = "vault-transit:crashcart-evidence:v1"

    def __init__(self) -> None:
        self.calls = 0

    def sign(self, payload: bytes) -> str:
        self.calls += 1
        raise VaultUnavailable("Vault at https://vault.lab:8200 did not answer within 3s")


def local_signer(folder: Path) -> tuple[LocalEd25519Signer, TrustedKeys]:
    """A local Ed25519 signer in `folder` and the trusted keys that pin it."""
    signer, public = LocalEd25519Signer.generate(folder / "evidence-ed25519.pem")
    keys = TrustedKeys()
    keys.add(signer.key_id, signer.kind, public)
    return signer, keys


def read_files(directory: Path) -> list[tuple[str, list[bytes]]]:
    """The live ledger files as (name, lines without newlines)."""
    out = []
    for name in ledger_files(directory):
        data = (directory / name).read_bytes()
        assert data == b"" or data.endswith(b"\n"), f"{name} has a partial line"
        out.append((name, data.split(b"\n")[:-1]))
    return out


def write_files(directory: Path, files: list[tuple[str, list[bytes]]]) -> None:
    """Replace the live ledger files with `files` (names absent from it are removed)."""
    keep = {name for name, _ in files}
    for name in ledger_files(directory):
        if name not in keep:
            os.unlink(directory / name)
    for name, lines in files:
        (directory / name).write_bytes(b"".join(line + b"\n" for line in lines))


def line_hash(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def rechain(lines: list[bytes], start: int, renumber: bool = False) -> list[bytes]:
    """Fix prev links (and optionally seq numbers) of lines[start:], as an attacker without the key would."""
    out = list(lines[:start])
    for i in range(start, len(lines)):
        obj = json.loads(lines[i])
        obj["prev"] = line_hash(out[i - 1]) if i else GENESIS
        if renumber:
            obj["seq"] = i
        out.append(canonical_json(obj).encode())
    return out


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=timezone.utc)
