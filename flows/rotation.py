"""Key rotation: LUKS keyslots and TLS certificates, proved on the host and escrowed in Vault."""

from __future__ import annotations

import concurrent.futures as cf
import time
from dataclasses import dataclass, replace
from datetime import datetime

from prefect import flow

from crashcart import validation as v
from crashcart.errors import (
    ConfirmationRefused,
    CrashcartError,
    InvalidInput,
    LuksError,
    TLSError,
    VaultCertificateUnknown,
    VaultError,
)
from crashcart.inventory import Host, Inventory, LuksVolume, TLSService
from crashcart.runtime import Runtime
from crashcart.secrets import Secret, SecretRef, generate_password
from flows.engine import HostRun
from flows.steps import CheckResult, CheckStatus, Outcome, Plan, Step, StepContext, StepStatus, register
from flows.steps import StepStatus as S
from integrations import luks, tls
from integrations.ssh import quote_command, script
from integrations.tls import CertificateFacts

PASSPHRASE_LENGTH = 48           # letters and digits: ~285 bits
LUKS_TIMEOUT = 300               # argon2id luksAddKey takes ~20 s on a 2-core host; be generous
KEY_DIR_TEMPLATE = "crashcart-luks.XXXXXXXX"
KEY_DIR_PARENT = "/run"          # tmpfs on real hosts: the current passphrase never reaches a disk
PREV, NEW = ".crashcart-prev", ".crashcart-new"
TLS_SERVICES = ("nginx",)
HANDSHAKE_TIMEOUT = 5.0
ROTATION_EVENTS = {"succeeded": "rotation", "failed": "rotation"}


def _slots(numbers) -> str:
    numbers = list(numbers)
    return ", ".join(map(str, numbers)) if numbers else "none"


def _confirm(chosen: list[Host], confirmed_production: bool) -> list[Host]:
    production = [h.name for h in chosen if h.is_production]
    if production and not confirmed_production:
        raise ConfirmationRefused(f"{', '.join(production)} {'is' if len(production) == 1 else 'are'} production: "
                                  "confirm at the prompt or pass --yes")
    return chosen


# == LUKS =========================================================================================
def luks_volumes(host: Host, device: str | None = None) -> list[LuksVolume]:
    """The host's LUKS volumes to rotate: all of them, or the one `device` names (refused if unknown)."""
    if device is None:
        return list(host.luks)
    device = v.remote_path(device)
    chosen = [vol for vol in host.luks if vol.device == device]
    if not chosen:
        known = ", ".join(vol.device for vol in host.luks) or "none"
        raise InvalidInput(f"{host.name} has no LUKS volume {device} in the inventory (known: {known})")
    return chosen


def luks_targets(inventory: Inventory, hosts: list[str] | None, group: str | None,
                 device: str | None) -> list[Host]:
    """Hosts whose LUKS passphrases to rotate; every name is checked before anything connects."""
    if device is not None:
        v.remote_path(device)  # a hostile path is refused before a host is even looked up
    chosen = inventory.select(hosts or [], group)
    if device is not None and len(chosen) != 1:
        raise InvalidInput("--device names a volume of one host: name exactly one host")
    without = [h.name for h in chosen if not h.luks and h.name in (hosts or [])]
    if without:
        raise InvalidInput(f"{', '.join(without)} {'lists' if len(without) == 1 else 'list'} no LUKS volume "
                           f"in {inventory.path or 'the inventory'}")
    targets = [h for h in chosen if h.luks]
    if not targets:
        raise InvalidInput(f"no host of group {group!r} lists a LUKS volume")
    for host in targets:
        luks_volumes(host, device)
    return targets


def _protected(volume: LuksVolume, header: luks.LuksHeader) -> set[int]:
    """Slots rotation never removes: listed in the inventory, or bound to a token (TPM2, FIDO2, ...)."""
    return set(volume.protected_slots) | {k.number for k in header.keyslots if header.token_types(k.number)}


def read_header(ctx: StepContext, device: str) -> luks.LuksHeader:
    """The device's keyslot inventory, read on the host."""
    result = ctx.run(luks.dump_command(device), timeout=60, check=False)
    if not result.ok:
        raise LuksError(luks.failure_reason(device, result.exit_code, result.stderr))
    return luks.parse_luks2_metadata(result.stdout)


def passphrase_opens(ctx: StepContext, device: str, passphrase: Secret, slot: int | None = None) -> int | None:
    """The keyslot the passphrase (on stdin) opens, None when it is refused; other failures raise LuksError."""
    result = ctx.run(luks.test_passphrase_command(device, slot), stdin=passphrase, timeout=LUKS_TIMEOUT, check=False)
    if result.exit_code == luks.EXIT_REFUSED:
        return None
    if not result.ok:
        raise LuksError(luks.failure_reason(device, result.exit_code, result.stderr))
    opened = luks.parse_unlocked_slot(result.stdout)
    if opened is None:
        raise LuksError(f"{device}: cryptsetup accepted the passphrase but did not say which keyslot it opened")
    return opened


def kill_slot(ctx: StepContext, device: str, slot: int, authorised_by: Secret) -> None:
    """Wipe a keyslot, authorised by a passphrase of another slot (on stdin)."""
    result = ctx.run(luks.kill_slot_command(device, slot), stdin=authorised_by, timeout=LUKS_TIMEOUT, check=False)
    if not result.ok:
        raise LuksError(f"wiping keyslot {slot} failed: {luks.failure_reason(device, result.exit_code, result.stderr)}")


def add_passphrase(ctx: StepContext, volume: LuksVolume, slot: int, current: Secret, new: Secret) -> None:
    """Add `new` in keyslot `slot`, authorised by `current` in a 0600 file that is removed whatever happens."""
    session = ctx.session()
    made = ctx.run(["mktemp", "-d", "-p", KEY_DIR_PARENT, KEY_DIR_TEMPLATE], timeout=10)  # mktemp -d: 0700
    key_dir = v.remote_path(made.stdout.strip())
    if not key_dir.startswith(f"{KEY_DIR_PARENT}/crashcart-luks."):
        raise LuksError(f"mktemp made an unexpected directory {key_dir!r}")
    key_file = f"{key_dir}/current"
    try:
        # write_file sends the passphrase on stdin into a file created 0600 (umask 077); keep it as evidence.
        ctx.commands.append(session.write_file(key_file, current, 0o600))
        result = ctx.run(luks.add_key_command(volume.device, slot, key_file, volume.pbkdf), stdin=new,
                         timeout=LUKS_TIMEOUT, check=False)
    finally:
        ctx.run(["rm", "-rf", "--", key_dir], timeout=30, check=False)
    if not result.ok:
        raise LuksError(f"adding keyslot {slot} failed: "
                        f"{luks.failure_reason(volume.device, result.exit_code, result.stderr)}")


@register("luks.read_keyslots", kind="check", read_only=True)
class ReadKeyslots(Step):
    """Record each LUKS volume's keyslots: which are active, their KDF, which are protected or token-bound."""

    def plan(self, ctx: StepContext) -> Plan:
        volumes = luks_volumes(ctx.host, ctx.params.get("device"))
        if not volumes:
            return Plan(f"{ctx.host.name} lists no LUKS volume", nothing_to_do=True)
        return Plan("read the keyslots of " + ", ".join(vol.device for vol in volumes),
                    [quote_command(luks.dump_command(vol.device)) for vol in volumes], data=volumes)

    def apply(self, ctx: StepContext, plan: Plan) -> CheckResult:
        headers = ctx.facts.setdefault("luks_headers", {})
        lines, detail = [], {}
        for volume in plan.data:
            header = read_header(ctx, volume.device)
            headers[volume.device] = header
            protected = sorted(_protected(volume, header))
            missing = [n for n in volume.protected_slots if n not in header.active]
            line = f"{volume.device}: keyslots {_slots(header.active)} active"
            if protected:
                line += f" ({_slots(protected)} protected)"
            if missing:  # a finding, not a reason to stop: rotation never needed those slots
                line += f"; protected slot {_slots(missing)} is NOT active (recovery key missing?)"
            lines.append(line)
            detail[volume.device] = {**header.as_dict(), "protected_slots": protected, "missing_protected": missing}
        return CheckResult(CheckStatus.PASSED, "; ".join(lines), {"volumes": detail})


@register("luks.rotate_passphrase")
class RotatePassphrase(Step):
    """New passphrase in a new keyslot -> proved -> escrowed in Vault (check-and-set) -> old keyslot wiped.

    At every failure at least one passphrase held in Vault still opens the volume, and the evidence
    names the keyslot and the Vault version that hold it.
    """

    def plan(self, ctx: StepContext) -> Plan:
        volumes = luks_volumes(ctx.host, ctx.params.get("device"))
        if not volumes:
            return Plan(f"{ctx.host.name} lists no LUKS volume", nothing_to_do=True)
        if ctx.host.is_production and any(vol.pbkdf == "pbkdf2-fast" for vol in volumes):
            raise LuksError(f"{ctx.host.name} is production: pbkdf2-fast is for lab and test images only "
                            "(remove `pbkdf` from its inventory entry)")
        headers = ctx.facts.get("luks_headers") or {}
        data, commands = [], []
        for volume in volumes:
            header = headers.get(volume.device)
            if header is None:
                raise LuksError(f"{volume.device}: keyslots not read (luks.read_keyslots must come first)")
            new_slot = header.free_slot(avoid=volume.protected_slots)
            if new_slot is None:
                raise LuksError(f"{volume.device}: all {luks.MAX_KEYSLOTS} keyslots are in use: no room for a new one")
            protected = sorted(_protected(volume, header))
            d = f"{KEY_DIR_PARENT}/{KEY_DIR_TEMPLATE}"
            commands += [
                f"read {volume.passphrase} and its Vault version (the current passphrase)",
                quote_command(luks.test_passphrase_command(volume.device)) + "  # current passphrase on stdin: which keyslot it opens",
                f"mktemp -d -p {KEY_DIR_PARENT} {KEY_DIR_TEMPLATE}  # 0700; current passphrase -> {d}/current (0600, through stdin)",
                quote_command(luks.add_key_command(volume.device, new_slot, f"{d}/current", volume.pbkdf))
                + f"  # new {PASSPHRASE_LENGTH}-character passphrase on stdin",
                f"rm -rf {d}",
                quote_command(luks.test_passphrase_command(volume.device, new_slot)) + "  # new passphrase on stdin",
                f"escrow the new passphrase in {volume.passphrase} (check-and-set on the version read); "
                f"if that fails, wipe keyslot {new_slot} again",
                f"cryptsetup luksKillSlot --key-file=- {volume.device} <keyslot of the current passphrase>  "
                f"# new passphrase on stdin; never a protected slot ({_slots(protected)}) or the last active one",
            ]
            data.append((volume, header, new_slot))
        summary = "; ".join(f"{vol.device}: new passphrase into keyslot {slot}, escrowed in {vol.passphrase}, "
                            f"then the old keyslot wiped ({'cryptsetup default KDF' if vol.pbkdf == 'default' else vol.pbkdf})"
                            for vol, _, slot in data)
        return Plan(summary, commands, data=data)

    def apply(self, ctx: StepContext, plan: Plan) -> Outcome:
        vault = ctx.services.get("vault")
        records, failures = [], []
        for volume, header, new_slot in plan.data:
            record = {"device": volume.device, "vault_ref": volume.passphrase, "new_slot": new_slot,
                      "pbkdf": volume.pbkdf, "keyslots_before": list(header.active), "status": "failed"}
            try:
                self._rotate(ctx, vault, volume, header, new_slot, record)
                record["status"] = "rotated"
            except CrashcartError as e:
                record["error"] = str(e)
                failures.append(f"{volume.device}: {e}")
            records.append(record)
        detail = {"volumes": records}
        if failures:
            return Outcome(StepStatus.FAILED, "; ".join(failures), detail)
        return Outcome(StepStatus.SUCCEEDED, "; ".join(
            f"{r['device']}: keyslot {r['old_slot']} replaced by {r['new_slot']}, passphrase escrowed as "
            f"Vault v{r['vault_version']}" for r in records), detail)

    def _rotate(self, ctx: StepContext, vault, volume: LuksVolume, header: luks.LuksHeader, new_slot: int,
                record: dict) -> None:
        device, ref = volume.device, SecretRef.parse(volume.passphrase)
        values, version = vault.read_kv(ref)  # the value and its version in one read: the CAS base
        if ref.key not in values:
            raise LuksError(f"{ref} has no key {ref.key!r} in Vault v{version}: nothing changed")
        current = values[ref.key]
        record.update(vault_version_before=version, working={"slot": None, "vault_version": version})
        old_slot = passphrase_opens(ctx, device, current)
        if old_slot is None:
            raise LuksError(f"the passphrase in {ref} (v{version}) opens no keyslot of {device}: nothing changed; "
                            "find the working passphrase before rotating")
        record.update(old_slot=old_slot, working={"slot": old_slot, "vault_version": version})
        if old_slot in _protected(volume, header):
            raise LuksError(f"the passphrase in {ref} opens protected keyslot {old_slot}: rotating it would leave "
                            "it in place; nothing changed")
        if old_slot == new_slot:
            raise LuksError(f"keyslot {new_slot} was free when read and is in use now: read again; nothing changed")

        new = generate_password(PASSPHRASE_LENGTH)
        try:
            add_passphrase(ctx, volume, new_slot, current, new)
        except CrashcartError as e:
            # A lost connection or a timeout leaves it open whether cryptsetup wrote the slot: look, and undo.
            self._clear_after_failed_add(ctx, device, new_slot, current, record)
            raise LuksError(f"{e}; keyslot {old_slot} (Vault v{version}) unchanged") from None
        try:
            proved = passphrase_opens(ctx, device, new, new_slot) == new_slot
        except CrashcartError as e:
            record["proof_error"] = str(e)
            proved = False
        if not proved:  # never escrow a passphrase that was not seen to open its slot
            self._undo(ctx, device, new_slot, current, record)
            raise LuksError(f"the new passphrase was not proved to open keyslot {new_slot}: slot wiped again; "
                            f"keyslot {old_slot} (Vault v{version}) unchanged")

        written = self._escrow(ctx, vault, ref, new, version, device, new_slot, old_slot, current, record)
        record.update(vault_version=written, working={"slot": new_slot, "vault_version": written},
                      also_working={"slot": old_slot, "vault_version": version})

        # Re-read before wiping: never the last active slot, never a protected one, and the new one must be there.
        now = read_header(ctx, device)
        if new_slot not in now.active or old_slot not in now.active or len(now.active) < 2 \
                or old_slot in _protected(volume, now):
            raise LuksError(f"keyslots changed under us ({_slots(now.active)} active): keyslot {old_slot} kept; "
                            f"keyslot {new_slot} holds the passphrase of Vault v{written}")
        try:
            kill_slot(ctx, device, old_slot, authorised_by=new)
        except LuksError as e:
            raise LuksError(f"{e}; keyslot {new_slot} holds the new passphrase (Vault v{written}), keyslot "
                            f"{old_slot} still opens with Vault v{version}") from None
        record.pop("also_working")
        record["keyslots_after"] = list(read_header(ctx, device).active)
        ctx.facts.setdefault("luks_rotated", {})[device] = {
            "old_slot": old_slot, "new_slot": new_slot, "vault_version": written, "previous": current,
            "active_before": list(header.active)}

    def _escrow(self, ctx, vault, ref: SecretRef, new: Secret, version: int, device: str, new_slot: int,
                old_slot: int, current: Secret, record: dict) -> int:
        """Write the new passphrase to Vault; on failure wipe the new keyslot unless the write may have landed."""
        try:
            return vault.write_secret(ref, new, cas=version)
        except VaultError as e:
            landed = self._landed(vault, ref, new)
            if landed is None:
                # The answer was lost and Vault cannot be asked: either passphrase may be the escrowed one.
                record["new_slot_kept"] = True
                raise LuksError(f"escrow in Vault failed ({e}) and could not be checked: keyslot {new_slot} (new "
                                f"passphrase, maybe Vault v{version + 1}) and keyslot {old_slot} (Vault v{version}) "
                                "both kept") from None
            if landed:
                return vault.secret_version(ref)
            self._undo(ctx, device, new_slot, current, record)
            raise LuksError(f"escrow in Vault failed ({e}): keyslot {new_slot} wiped again; keyslot {old_slot} "
                            f"still opens with the passphrase of Vault v{version}") from None

    def _clear_after_failed_add(self, ctx: StepContext, device: str, new_slot: int, current: Secret,
                                record: dict) -> None:
        try:
            present = new_slot in read_header(ctx, device).active
        except CrashcartError as e:
            record["new_slot_state"] = f"unknown: {e}"
            return
        record["new_slot_state"] = "present" if present else "absent"
        if present:
            self._undo(ctx, device, new_slot, current, record)

    @staticmethod
    def _landed(vault, ref: SecretRef, new: Secret) -> bool | None:
        try:
            return vault.read_secret(ref) == new
        except VaultError:
            return None

    @staticmethod
    def _undo(ctx: StepContext, device: str, new_slot: int, current: Secret, record: dict) -> None:
        try:
            kill_slot(ctx, device, new_slot, authorised_by=current)
            record["new_slot_removed"] = True
        except LuksError as e:
            record["new_slot_removed"] = False
            raise LuksError(f"{e}: keyslot {new_slot} holds a passphrase that is in no Vault version; wipe it by hand "
                            "(cryptsetup luksKillSlot) once the cause is fixed") from None


@register("luks.passphrase_works", kind="check")
class PassphraseWorks(Step):
    """The passphrase Vault holds now opens the volume (in the keyslot this run added)."""

    def plan(self, ctx: StepContext) -> Plan:
        volumes = luks_volumes(ctx.host, ctx.params.get("device"))
        rotated = ctx.facts.get("luks_rotated") or {}
        commands = [f"read {vol.passphrase} (latest version); "
                    + quote_command(luks.test_passphrase_command(vol.device, (rotated.get(vol.device) or {}).get("new_slot")))
                    + "  # passphrase on stdin" for vol in volumes]
        return Plan("the passphrase in Vault opens " + ", ".join(vol.device for vol in volumes), commands, data=volumes)

    def apply(self, ctx: StepContext, plan: Plan) -> CheckResult:
        vault = ctx.services.get("vault")
        rotated = ctx.facts.get("luks_rotated") or {}
        lines, detail, failed = [], {}, False
        for volume in plan.data:
            ref = SecretRef.parse(volume.passphrase)
            values, version = vault.read_kv(ref)
            slot = (rotated.get(volume.device) or {}).get("new_slot")
            opened = passphrase_opens(ctx, volume.device, values[ref.key], slot) if ref.key in values else None
            detail[volume.device] = {"vault_version": version, "slot": slot, "opened": opened}
            if opened is None:
                failed = True
                lines.append(f"the passphrase in {ref} (v{version}) does NOT open {volume.device}"
                             + (f" keyslot {slot}" if slot is not None else ""))
            else:
                lines.append(f"the passphrase in {ref} (v{version}) opens {volume.device} keyslot {opened}")
        return CheckResult(CheckStatus.FAILED if failed else CheckStatus.PASSED, "; ".join(lines), detail)


@register("luks.old_refused", kind="check")
class OldRefused(Step):
    """The replaced passphrase opens no keyslot any more, and the protected slots and slot count are as before."""

    def plan(self, ctx: StepContext) -> Plan:
        volumes = luks_volumes(ctx.host, ctx.params.get("device"))
        commands = []
        for vol in volumes:
            commands += [quote_command(luks.test_passphrase_command(vol.device)) + "  # previous passphrase on stdin: must be refused",
                         quote_command(luks.dump_command(vol.device))]
        return Plan("the previous passphrase is refused by every keyslot of " + ", ".join(vol.device for vol in volumes),
                    commands, data=volumes)

    def apply(self, ctx: StepContext, plan: Plan) -> CheckResult:
        rotated = ctx.facts.get("luks_rotated") or {}
        lines, detail, status = [], {}, CheckStatus.PASSED
        for volume in plan.data:
            done = rotated.get(volume.device)
            if done is None:
                status = CheckStatus.INCONCLUSIVE if status is CheckStatus.PASSED else status
                lines.append(f"{volume.device}: no passphrase was replaced in this run")
                continue
            opened = passphrase_opens(ctx, volume.device, done["previous"])
            header = read_header(ctx, volume.device)
            missing = [n for n in volume.protected_slots if n in done["active_before"] and n not in header.active]
            detail[volume.device] = {"previous_opens": opened, "active_after": list(header.active),
                                     "active_before": done["active_before"], "protected_missing": missing}
            if opened is not None:
                status = CheckStatus.FAILED
                lines.append(f"{volume.device}: the previous passphrase still opens keyslot {opened}")
            elif missing or len(header.active) != len(done["active_before"]):
                status = CheckStatus.FAILED
                lines.append(f"{volume.device}: keyslots {_slots(header.active)} active after, "
                             f"{_slots(done['active_before'])} before" + (f"; protected {_slots(missing)} gone" if missing else ""))
            else:
                lines.append(f"{volume.device}: the previous passphrase is refused; keyslots {_slots(header.active)} "
                             "active (as many as before, protected ones kept)")
        return CheckResult(status, "; ".join(lines), detail)


def decide_luks(host: Host, run: HostRun, dry_run: bool) -> tuple[str, str]:
    """succeeded | unchanged | failed (planned for a dry run whose keyslots could be read)."""
    keyslots, rotate = run.step("keyslots"), run.step("rotate")
    if keyslots is None or keyslots.status not in (S.SUCCEEDED, S.UNCHANGED):
        return "failed", keyslots.summary if keyslots else "keyslots not read"
    if dry_run:
        return "planned", "dry run: plan shown, nothing changed"
    if rotate is None or rotate.status is S.SKIPPED:
        return "failed", rotate.summary if rotate else "rotation not run"
    if rotate.status is S.UNCHANGED:
        return "unchanged", rotate.summary
    if rotate.status is S.SUCCEEDED:
        return "succeeded", rotate.summary + "; new passphrase works, old refused"
    return "failed", rotate.summary


# == TLS ==========================================================================================
def tls_services(host: Host, service: str | None = None) -> list[TLSService]:
    """The host's TLS services (of one kind when `service` is given)."""
    if service is not None and service not in TLS_SERVICES:
        raise InvalidInput(f"service {service!r} is not supported: crashcart rotates {', '.join(TLS_SERVICES)} certificates")
    return [s for s in host.tls if service is None or s.service == service]


def tls_targets(inventory: Inventory, hosts: list[str] | None, group: str | None, service: str | None) -> list[Host]:
    """Hosts with TLS services to rotate; every name is checked before anything connects."""
    chosen = inventory.select(hosts or [], group)
    without = [h.name for h in chosen if not tls_services(h, service) and h.name in (hosts or [])]
    if without:
        raise InvalidInput(f"{', '.join(without)} {'lists' if len(without) == 1 else 'list'} no "
                           f"{service or 'TLS'} service in {inventory.path or 'the inventory'}")
    targets = [h for h in chosen if tls_services(h, service)]
    if not targets:
        raise InvalidInput(f"no host of group {group!r} lists a {service or 'TLS'} service")
    return targets


def _threshold(value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < float(value) < 1:
        raise InvalidInput(f"only_if_lifetime_used_over {value!r} must be a fraction between 0 and 1 (e.g. 0.66)")
    return float(value)


@dataclass(frozen=True)
class ServedCertificate:
    """What one TLS service presents from the management address."""

    host: str
    name: str
    address: str
    port: int
    facts: CertificateFacts | None
    verified: bool
    problem: str | None = None

    def as_dict(self, now: datetime | None = None) -> dict:
        out = {"host": self.host, "name": self.name, "port": self.port, "verified": self.verified,
               "problem": self.problem, "certificate": self.facts.as_dict() if self.facts else None}
        if self.facts:
            out["lifetime_used"] = round(self.facts.lifetime_used(now), 4)
            out["days_left"] = round(self.facts.days_left(now), 2)
        return out


def read_served(host: Host, service: TLSService, ca_pem: str | None) -> ServedCertificate:
    """The certificate served, verified against the PKI CA; read unverified too, so an expired one is still seen."""
    name = service.names[0]
    problem = "the PKI CA is not available to verify against" if ca_pem is None else None
    if ca_pem is not None:
        try:
            facts = tls.served_certificate(host.address, service.port, name, ca_pem, HANDSHAKE_TIMEOUT)
            return ServedCertificate(host.name, name, host.address, service.port, facts, True)
        except TLSError as e:
            problem = str(e)
    try:
        facts = tls.served_certificate(host.address, service.port, name, None, HANDSHAKE_TIMEOUT)
    except TLSError as e:
        return ServedCertificate(host.name, name, host.address, service.port, None, False, str(e))
    return ServedCertificate(host.name, name, host.address, service.port, facts, False, problem)


def served_certificates(runtime: Runtime, hosts: list[Host], service: str | None = None) -> list[ServedCertificate]:
    """Every TLS service's served certificate, read in parallel from the management address (read-only)."""
    from integrations.vault import Vault

    unverified_because = None
    try:
        ca_pem = Vault.from_runtime(runtime).ca_pem()
    except VaultError as e:
        # Still worth showing what is served; each row then says it is unverified and why (and certs exits 16).
        ca_pem, unverified_because = None, f"not verified: no PKI CA from Vault ({e})"
    jobs = [(h, s) for h in hosts for s in tls_services(h, service)]
    if not jobs:
        return []
    with cf.ThreadPoolExecutor(max_workers=min(16, len(jobs))) as pool:
        rows = list(pool.map(lambda job: read_served(job[0], job[1], ca_pem), jobs))
    return [replace(r, problem=unverified_because) if unverified_because and r.facts else r for r in rows]


def _wait_served(host: Host, service: TLSService, fingerprint: str, ca_pem: str | None,
                 within: float) -> tuple[ServedCertificate, float]:
    """Handshake until the certificate with `fingerprint` is served (nginx reloads asynchronously) or time is up."""
    started = time.monotonic()
    while True:
        if ca_pem is None:
            try:
                facts = tls.served_certificate(host.address, service.port, service.names[0], None, HANDSHAKE_TIMEOUT)
                seen = ServedCertificate(host.name, service.names[0], host.address, service.port, facts, False)
            except TLSError as e:
                seen = ServedCertificate(host.name, service.names[0], host.address, service.port, None, False, str(e))
        else:
            seen = read_served(host, service, ca_pem)
        waited = time.monotonic() - started
        if (seen.facts and seen.facts.fingerprint_sha256 == fingerprint) or waited >= within:
            return seen, waited
        time.sleep(0.2)


def _pct(fraction: float) -> str:
    return f"{max(fraction, 0) * 100:.0f}%"


def _describe(seen: ServedCertificate) -> str:
    if seen.facts is None:
        return f"{seen.name}:{seen.port} unreachable: {seen.problem}"
    f = seen.facts
    text = (f"{seen.name}:{seen.port} serves {f.serial} until {f.not_after:%Y-%m-%d %H:%M}Z "
            f"({_pct(f.lifetime_used())} of its lifetime used, {f.days_left():.0f} days left)")
    return text if seen.verified else f"{text}; NOT verified: {seen.problem}"


def _files(service: TLSService) -> tuple[str, str]:
    return v.remote_path(service.cert_path), v.remote_path(service.key_path)


@register("tls.read_served", kind="check", read_only=True)
class ReadServed(Step):
    """Record the certificate each TLS service serves (real handshake from management) and the one installed."""

    def plan(self, ctx: StepContext) -> Plan:
        services = tls_services(ctx.host, ctx.params.get("service"))
        if not services:
            return Plan(f"{ctx.host.name} lists no TLS service", nothing_to_do=True)
        pki = ctx.inventory.vault.pki_mount
        commands = []
        for s in services:
            commands += [f"TLS handshake from management to {ctx.host.address}:{s.port} (SNI {s.names[0]}), "
                         f"verified against the {pki} CA", quote_command(["cat", s.cert_path])]
        return Plan("read the served and installed certificates", commands, data=services)

    def apply(self, ctx: StepContext, plan: Plan) -> CheckResult:
        threshold = ctx.params.get("only_if_lifetime_used_over")
        try:
            ca_pem = ctx.services.get("vault").ca_pem()
        except VaultError as e:
            return CheckResult(CheckStatus.FAILED, f"cannot get the PKI CA to verify against: {e}")
        state, due, lines, rows, unreachable = {}, [], [], [], []
        for service in plan.data:
            seen = read_served(ctx.host, service, ca_pem)
            installed = tls.parse_certificate(ctx.run(["cat", service.cert_path], timeout=15).stdout)
            state[service.cert_path] = {"served": seen, "installed": installed}
            lines.append(_describe(seen))
            if seen.facts is None:
                unreachable.append(seen.name)
            elif threshold is None or not seen.verified or seen.facts.lifetime_used() > threshold:
                due.append(service)
            rows.append({**seen.as_dict(), "installed": installed.as_dict(),
                         "due": service in due, "cert_path": service.cert_path})
        ctx.facts["tls_state"], ctx.facts["tls_due"] = state, due
        ctx.facts["certificate_fresh"] = not due and not unreachable
        detail = {"services": rows, "threshold": threshold}
        if unreachable:
            return CheckResult(CheckStatus.FAILED, "; ".join(lines), detail)
        return CheckResult(CheckStatus.PASSED, "; ".join(lines), detail)


@register("tls.rotate_certificate")
class RotateCertificate(Step):
    """Issue from the PKI, install key (0600) and certificate keeping the previous as .crashcart-prev, nginx -t, reload."""

    def plan(self, ctx: StepContext) -> Plan:
        due: list[TLSService] | None = ctx.facts.get("tls_due")
        if due is None:
            raise TLSError("served certificates not read (tls.read_served must come first)")
        if not due:
            return Plan("every certificate is fresh: nothing to do", nothing_to_do=True)
        vault_cfg = ctx.inventory.vault
        data, commands = [], []
        for service in due:
            cert, key = _files(service)
            state = ctx.facts["tls_state"][service.cert_path]
            seen = state["served"]
            # Keep the host's IP SAN if the current certificate carries it: clients may connect by address.
            had = set(state["installed"].ip_addresses) | set(seen.facts.ip_addresses if seen.facts else ())
            ip_sans = [ctx.host.address] if ctx.host.address in had else []
            config = v.remote_path(service.config_path)
            commands += [
                f"issue a certificate from {vault_cfg.pki_mount}/issue/{vault_cfg.pki_role}: CN {service.names[0]}"
                + (f", DNS {', '.join(service.names)}" if service.names else "") + (f", IP {', '.join(ip_sans)}" if ip_sans else ""),
                quote_command(["cp", "-p", cert, cert + PREV]) + "; " + quote_command(["cp", "-p", key, key + PREV]),
                f"write {key}{NEW} (0600, private key through stdin) and {cert}{NEW} (0644); mv -f both into place",
                quote_command(["nginx", "-t", "-q", "-c", config]),
                quote_command(["nginx", "-s", "reload", "-c", config]),
            ]
            data.append((service, ip_sans))
        names = ", ".join(s.names[0] for s, _ in data)
        return Plan(f"new certificate for {names} from {vault_cfg.pki_mount}, installed and nginx reloaded "
                    "(previous kept for rollback)", commands, data=data)

    def apply(self, ctx: StepContext, plan: Plan) -> Outcome:
        vault = ctx.services.get("vault")
        rotations = ctx.facts.setdefault("tls_rotation", {})
        done = []
        for service, ip_sans in plan.data:
            cert, key = _files(service)
            config = v.remote_path(service.config_path)
            entry = rotations[service.cert_path] = {"service": service, "issued": None, "previous": None,
                                                    "saved": False, "installed": False}
            # What is being replaced, read now (not at planning) so the rollback restores exactly this.
            entry["previous"] = tls.parse_certificate(ctx.run(["cat", cert], timeout=15).stdout)
            issued = vault.issue_certificate(service.names[0], alt_names=list(service.names), ip_sans=ip_sans)
            entry["issued"] = issued
            ctx.run(script('cp -p "$1" "$1$3" && cp -p "$2" "$2$3"', cert, key, PREV), timeout=30)
            entry["saved"] = True
            session = ctx.session()
            ctx.commands.append(session.write_file(key + NEW, issued.private_key, 0o600))
            ctx.commands.append(session.write_file(cert + NEW, f"{issued.certificate_pem.strip()}\n{issued.chain_pem.strip()}\n", 0o644))
            # Same owner and group as the files they replace (nginx may read them as another user).
            ctx.run(script('chown --reference="$1" "$1$3" && chown --reference="$2" "$2$3" '
                           '&& mv -f "$2$3" "$2" && mv -f "$1$3" "$1"', cert, key, NEW), timeout=30)
            entry["installed"] = True
            tested = ctx.run(["nginx", "-t", "-q", "-c", config], timeout=30, check=False)
            if not tested.ok:
                raise TLSError(f"nginx -t rejected the configuration with the new certificate: {_last_line(tested)}")
            reloaded = ctx.run(["nginx", "-s", "reload", "-c", config], timeout=30, check=False)
            if not reloaded.ok:
                raise TLSError(f"nginx reload (nginx -s reload) failed: {_last_line(reloaded)}")
            done.append({"cert_path": cert, "previous": entry["previous"].as_dict(),
                         "issued": {"serial": issued.serial, "fingerprint_sha256": issued.fingerprint_sha256,
                                    "not_after": issued.not_after.isoformat()}})
        return Outcome(StepStatus.SUCCEEDED, "; ".join(
            f"installed {d['issued']['serial']} (not after {d['issued']['not_after'][:10]}) in {d['cert_path']}, "
            "nginx -t passed, reloaded" for d in done), {"services": done})


def _last_line(result) -> str:
    text = (result.stderr or result.stdout or "").strip().splitlines()
    return text[-1][:300] if text else f"exit {result.exit_code}"


@register("tls.serves_issued", kind="check")
class ServesIssued(Step):
    """A real handshake from management gets the new certificate (serial, SHA-256, not_after), verified by the CA."""

    def plan(self, ctx: StepContext, within_seconds: float = 10.0) -> Plan:
        services = ctx.facts.get("tls_due") or tls_services(ctx.host, ctx.params.get("service"))
        return Plan(f"TLS handshake from management until the new certificate is served (up to {within_seconds:g}s)",
                    [f"TLS handshake to {ctx.host.address}:{s.port} (SNI {s.names[0]}), verified against the PKI CA"
                     for s in services], data=float(within_seconds))

    def apply(self, ctx: StepContext, plan: Plan) -> CheckResult:
        ca_pem = ctx.services.get("vault").ca_pem()
        lines, rows, ok = [], [], True
        for entry in (ctx.facts.get("tls_rotation") or {}).values():
            issued = entry["issued"]
            seen, waited = _wait_served(ctx.host, entry["service"], issued.fingerprint_sha256, ca_pem, plan.data)
            match = bool(seen.facts and seen.verified and seen.facts.fingerprint_sha256 == issued.fingerprint_sha256
                         and seen.facts.serial == issued.serial and seen.facts.not_after == issued.not_after)
            rows.append({**seen.as_dict(), "expected_serial": issued.serial, "waited": round(waited, 2), "match": match})
            if match:
                ctx.facts.setdefault("tls_proved", set()).add(entry["service"].cert_path)
                lines.append(f"{seen.name}:{seen.port} serves the new certificate {issued.serial} "
                             f"(sha256 {issued.fingerprint_sha256[:16]}..., not after {issued.not_after:%Y-%m-%d}) "
                             f"after {waited:.1f}s")
            else:
                ok = False
                got = seen.facts.serial if seen.facts else seen.problem
                lines.append(f"after {waited:.0f}s {seen.name}:{seen.port} serves {got}, not the new {issued.serial}"
                             + (f" ({seen.problem})" if seen.problem and seen.facts else ""))
        if not rows:
            return CheckResult(CheckStatus.INCONCLUSIVE, "no certificate was installed in this run")
        return CheckResult(CheckStatus.PASSED if ok else CheckStatus.FAILED, "; ".join(lines), {"services": rows})


@register("tls.restore_previous")
class RestorePrevious(Step):
    """Roll back: the .crashcart-prev files back in place, reload if the config passes nginx -t, old serial proved."""

    def plan(self, ctx: StepContext, within_seconds: float = 10.0) -> Plan:
        entries = list((ctx.facts.get("tls_rotation") or {}).values())
        commands = []
        for entry in entries:
            cert, key = _files(entry["service"])
            config = v.remote_path(entry["service"].config_path)
            commands += [f"mv -f {cert}{PREV} {cert}; mv -f {key}{PREV} {key}; rm -f {cert}{NEW} {key}{NEW}",
                         quote_command(["nginx", "-t", "-q", "-c", config]) + " && "
                         + quote_command(["nginx", "-s", "reload", "-c", config]),
                         f"TLS handshake until the previous certificate is served again (up to {within_seconds:g}s)",
                         "revoke the unused new certificate"]
        return Plan("restore the previous certificate and key", commands, data=(entries, float(within_seconds)))

    def apply(self, ctx: StepContext, plan: Plan) -> Outcome:
        entries, within = plan.data
        lines, rows, ok = [], [], True
        for entry in entries:
            service, previous, issued = entry["service"], entry["previous"], entry["issued"]
            cert, key = _files(service)
            row = {"cert_path": cert, "previous_serial": previous.serial if previous else None}
            if entry["saved"]:
                ctx.run(script('if [ -e "$1$3" ]; then mv -f "$1$3" "$1"; fi && if [ -e "$2$3" ]; then mv -f "$2$3" "$2"; fi '
                               '&& rm -f "$1$4" "$2$4"', cert, key, PREV, NEW), timeout=30)
                config = v.remote_path(service.config_path)
                tested = ctx.run(["nginx", "-t", "-q", "-c", config], timeout=30, check=False)
                if tested.ok:
                    ctx.run(["nginx", "-s", "reload", "-c", config], timeout=30)
                    note = "reloaded"
                else:
                    # The running nginx never loaded the broken configuration: leave it serving what it has.
                    note = f"not reloaded (nginx -t still fails: {_last_line(tested)})"
                seen, waited = _wait_served(ctx.host, service, previous.fingerprint_sha256, None, within)
                back = bool(seen.facts and seen.facts.fingerprint_sha256 == previous.fingerprint_sha256)
                ok = ok and back
                row.update(restored=True, reload=note, served=seen.as_dict(), back=back)
                lines.append(f"previous certificate {previous.serial} served again ({note})" if back else
                             f"previous certificate {previous.serial} NOT served after {waited:.0f}s: "
                             f"{seen.facts.serial if seen.facts else seen.problem} ({note})")
            else:
                lines.append("nothing was installed: nothing to restore")
            if issued is not None:
                row["revoked_unused"] = _revoke_quietly(ctx, issued.serial)
                lines.append(f"unused new certificate {issued.serial} "
                             + ("revoked" if row["revoked_unused"] else "NOT revoked (revoke it by hand)"))
            rows.append(row)
        return Outcome(StepStatus.SUCCEEDED if ok else StepStatus.FAILED, "; ".join(lines) or "nothing to restore",
                       {"services": rows})


def _revoke_quietly(ctx: StepContext, serial: str) -> bool:
    try:
        ctx.services.get("vault").revoke_certificate(serial)
        return True
    except VaultError:
        return False


@register("tls.revoke_previous")
class RevokePrevious(Step):
    """Revoke the replaced certificate in the PKI and remove its .crashcart-prev copies (no longer a rollback target)."""

    def plan(self, ctx: StepContext) -> Plan:
        due = ctx.facts.get("tls_due") or []
        if not due:
            return Plan("no certificate was replaced: nothing to revoke", nothing_to_do=True)
        pki = ctx.inventory.vault.pki_mount
        commands = []
        for service in due:
            cert, key = _files(service)
            installed = (ctx.facts.get("tls_state") or {}).get(service.cert_path, {}).get("installed")
            commands += [f"revoke {installed.serial if installed else 'the replaced certificate'} in {pki}",
                         quote_command(["rm", "-f", cert + PREV, key + PREV])]
        return Plan(f"revoke the replaced certificate(s) in {pki}", commands)

    def apply(self, ctx: StepContext, plan: Plan) -> Outcome:
        vault = ctx.services.get("vault")
        entries = list((ctx.facts.get("tls_rotation") or {}).values())
        unproved = [e["service"].cert_path for e in entries if e["service"].cert_path not in ctx.facts.get("tls_proved", set())]
        if unproved:
            # Revoking the old certificate while the new one is not proved served could cut every client off.
            raise TLSError(f"the new certificate in {', '.join(unproved)} was not proved served: the old one is not revoked")
        revoked, lines, rows = [], [], []
        for entry in entries:
            previous = entry["previous"]
            cert, key = _files(entry["service"])
            try:
                at = vault.revoke_certificate(previous.serial)
                revoked.append(previous.serial)
                rows.append({"serial": previous.serial, "revoked_at": at.isoformat()})
                lines.append(f"{previous.serial} revoked")
            except VaultCertificateUnknown:
                rows.append({"serial": previous.serial, "revoked_at": None, "note": "not issued by this PKI"})
                lines.append(f"{previous.serial} was not issued by {ctx.inventory.vault.pki_mount}: not revoked")
            ctx.run(["rm", "-f", cert + PREV, key + PREV], timeout=15)
        ctx.facts["tls_revoked"] = revoked
        return Outcome(StepStatus.SUCCEEDED, "; ".join(lines) or "nothing to revoke", {"revoked": rows})


@register("tls.serial_in_crl", kind="check")
class SerialInCRL(Step):
    """The revoked serials are on the PKI's CRL (rebuilt, signature checked against the CA)."""

    def plan(self, ctx: StepContext) -> Plan:
        return Plan(f"rebuild and read the CRL of {ctx.inventory.vault.pki_mount}; the revoked serials must be on it")

    def apply(self, ctx: StepContext, plan: Plan) -> CheckResult:
        serials = ctx.facts.get("tls_revoked") or []
        if not serials:
            return CheckResult(CheckStatus.PASSED, "nothing was revoked")
        crl = ctx.services.get("vault").crl_serials()
        missing = [s for s in serials if int(s.replace(":", ""), 16) not in crl]
        if missing:
            return CheckResult(CheckStatus.FAILED, f"not on the CRL: {', '.join(missing)}", {"missing": missing})
        return CheckResult(CheckStatus.PASSED, f"on the CRL: {', '.join(serials)}", {"serials": serials})


def decide_tls(host: Host, run: HostRun, dry_run: bool) -> tuple[str, str]:
    """succeeded | unchanged | failed (planned for a dry run whose served certificate could be read)."""
    served, rotate, revoke = run.step("served"), run.step("rotate"), run.step("revoke")
    if served is None or served.status is not S.SUCCEEDED:
        return "failed", served.summary if served else "served certificate not read"
    if dry_run:
        return "planned", "dry run: plan shown, nothing changed"
    if rotate.status is S.UNCHANGED:
        rows = served.detail.get("services", [])
        threshold = served.detail.get("threshold")
        used = ", ".join(f"certificate at {_pct(r['lifetime_used'])} of its lifetime" for r in rows if "lifetime_used" in r)
        return "unchanged", used + (f"; rotated only past {_pct(threshold)}" if threshold is not None else "")
    if rotate.status is not S.SUCCEEDED:
        return "failed", rotate.summary
    if revoke is None or revoke.status is not S.SUCCEEDED:
        return "failed", ("new certificate served, but revoking the old one failed: "
                          + (revoke.summary if revoke else "not run"))
    checks = [c["summary"] for c in rotate.verification if c["status"] == CheckStatus.PASSED.value]
    return "succeeded", "; ".join(checks + [revoke.summary + " and on the CRL"])


# == flows ========================================================================================
@flow(name="rotate-luks", persist_result=False, validate_parameters=True)
def rotate_luks(hosts: list[str] | None = None, group: str | None = None, device: str | None = None,
                dry_run: bool = False, confirmed_production: bool = False, triggered_by: str | None = None,
                reason: str = "routine key rotation", config: str | None = None) -> dict:
    """Rotate LUKS passphrases: new keyslot, proved, escrowed in Vault, old keyslot wiped; never a protected slot."""
    from flows.common import carry_out, runbook  # flows.common imports this module to register its steps

    runtime = Runtime.load(config)
    chosen = _confirm(luks_targets(runtime.inventory, hosts, group, device), confirmed_production)
    params = {"hosts": [h.name for h in chosen], "group": group, "device": device, "dry_run": dry_run,
              "reason": v.free_text(reason, "reason"), "operator": triggered_by}
    outcome = carry_out(runtime, runbook("rotate-luks"), chosen, params=params, kind="rotate-luks",
                        triggered_by=triggered_by, dry_run=dry_run, decide=decide_luks, event_kinds=ROTATION_EVENTS)
    return outcome.as_dict()


@flow(name="rotate-tls", persist_result=False, validate_parameters=True)
def rotate_tls(hosts: list[str] | None = None, group: str | None = None, service: str | None = None,
               only_if_lifetime_used_over: float | None = None, dry_run: bool = False,
               confirmed_production: bool = False, triggered_by: str | None = None,
               reason: str = "routine key rotation", config: str | None = None) -> dict:
    """Rotate TLS certificates from the PKI, proved by a handshake from management, the old one revoked.

    With `only_if_lifetime_used_over` (e.g. 0.66) a certificate is rotated only past that fraction of its
    lifetime; the others are recorded as unchanged.
    """
    from flows.common import carry_out, runbook  # flows.common imports this module to register its steps

    runtime = Runtime.load(config)
    threshold = _threshold(only_if_lifetime_used_over)
    chosen = _confirm(tls_targets(runtime.inventory, hosts, group, service), confirmed_production)
    params = {"hosts": [h.name for h in chosen], "group": group, "service": service, "dry_run": dry_run,
              "only_if_lifetime_used_over": threshold, "reason": v.free_text(reason, "reason"),
              "operator": triggered_by}
    outcome = carry_out(runtime, runbook("rotate-tls"), chosen, params=params, kind="rotate-tls",
                        triggered_by=triggered_by, dry_run=dry_run, decide=decide_tls, event_kinds=ROTATION_EVENTS)
    return outcome.as_dict()
