"""Credential rotation: new passwords and SSH keys escrowed in Vault, applied on the host, proved."""

from __future__ import annotations

from datetime import datetime, timezone

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from crashcart.errors import CrashcartError, VaultUnavailable
from crashcart.inventory import Account
from crashcart.secrets import Secret, SecretRef, generate_password
from crashcart import validation as v
from integrations.ssh import login_works, script
from flows.steps import Outcome, Plan, Step, StepContext, StepStatus, register


def new_ssh_key(comment: str) -> tuple[Secret, str]:
    """A new Ed25519 key pair: the private key (OpenSSH PEM, masked) and the authorized_keys line."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return Secret(private), f"{public} {comment}"


def parse_authorized_keys_file(sshd_t: str, user: str, home: str) -> str:
    """The first AuthorizedKeysFile of `sshd -T` output, expanded for `user` (%u, %h, %%, relative)."""
    for line in sshd_t.splitlines():
        key, _, value = line.partition(" ")
        if key.lower() == "authorizedkeysfile" and value.strip():
            path = value.split()[0].replace("%%", "\0").replace("%u", user).replace("%h", home).replace("\0", "%")
            return path if path.startswith("/") else f"{home.rstrip('/')}/{path}"
    return f"{home.rstrip('/')}/.ssh/authorized_keys"


def _accounts(ctx: StepContext, only: list[str] | None) -> list[Account]:
    accounts = [a for a in ctx.host.accounts if not only or a.user in only]
    if only:
        unknown = set(only) - {a.user for a in accounts}
        if unknown:
            raise CrashcartError(f"{ctx.host.name}: no account {sorted(unknown)} in the inventory to rotate")
    return accounts


@register("credentials.rotate")
class RotateCredentials(Step):
    """For each inventory account: new secret -> Vault (check-and-set) -> host -> new works, old refused."""

    def plan(self, ctx: StepContext, accounts: list[str] | None = None) -> Plan:
        chosen = _accounts(ctx, ctx.params.get("accounts") or accounts)
        if not chosen:
            return Plan(f"{ctx.host.name} lists no accounts to rotate", nothing_to_do=True)
        commands = []
        for a in chosen:
            if a.password:
                commands += [f"new 32-character password -> {a.password} (check-and-set)",
                             f"chpasswd  # {a.user}:<new> on stdin",
                             f"prove: SSH password login as {a.user} works with the new, is refused with the old"]
            if a.ssh_key:
                commands += [f"new Ed25519 key -> {a.ssh_key} (check-and-set)",
                             f"replace {a.user}'s authorized_keys with the new public key",
                             f"prove: SSH key login as {a.user} works with the new key, is refused with the old"]
        return Plan(f"rotate {', '.join(a.user for a in chosen)} on {ctx.host.name}", commands, data=chosen)

    def apply(self, ctx: StepContext, plan: Plan) -> Outcome:
        try:
            vault = ctx.services.get("vault")
            vault.health()
        except VaultUnavailable as e:
            return Outcome(StepStatus.DEFERRED, f"rotation deferred: {e}", {"reason": str(e)})
        results, failures = [], []
        for account in plan.data:
            for kind, ref in (("password", account.password), ("ssh_key", account.ssh_key)):
                if not ref:
                    continue
                try:
                    results.append(self._rotate(ctx, vault, account.user, kind, SecretRef.parse(ref)))
                except VaultUnavailable as e:
                    results.append({"user": account.user, "kind": kind, "vault_ref": ref, "status": "deferred", "error": str(e)})
                except CrashcartError as e:
                    failures.append(f"{account.user} {kind}: {e}")
                    results.append({"user": account.user, "kind": kind, "vault_ref": ref, "status": "failed", "error": str(e)})
        detail = {"accounts": results}
        if failures:
            return Outcome(StepStatus.FAILED, "; ".join(failures), detail)
        if any(r["status"] == "deferred" for r in results):
            return Outcome(StepStatus.DEFERRED, "Vault became unavailable during rotation: the rest is deferred", detail)
        return Outcome(StepStatus.SUCCEEDED, ", ".join(f"{r['user']} {r['kind']} rotated (Vault v{r['vault_version']}); "
                                                       "new works, old refused" for r in results), detail)

    def _rotate(self, ctx: StepContext, vault, user: str, kind: str, ref: SecretRef) -> dict:
        user = v.user_name(user)
        old = vault.read_secret(ref)
        version = vault.secret_version(ref)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        if kind == "password":
            new, public = generate_password(32), None
        else:
            new, public = new_ssh_key(f"{user}@{ctx.host.name} crashcart-{stamp}")
        # Escrow first: Vault keeps the previous version, so a failure below can be undone exactly.
        written = vault.write_secret(ref, new, cas=version)
        try:
            if kind == "password":
                ctx.run(["chpasswd"], stdin=Secret(f"{user}:{new.reveal()}\n"), timeout=30)
            else:
                self._install_key(ctx, user, public)
        except CrashcartError:
            vault.write_secret(ref, old, cas=written)
            raise
        login = dict(password=new) if kind == "password" else dict(key_text=new)
        old_login = dict(password=old) if kind == "password" else dict(key_text=old)
        new_works = login_works(ctx.host, ctx.settings.ssh, user, **login)
        old_refused = not login_works(ctx.host, ctx.settings.ssh, user, **old_login)
        if not (new_works and old_refused):
            raise CrashcartError(f"proof failed: new {'works' if new_works else 'does NOT work'}, "
                                 f"old {'refused' if old_refused else 'still ACCEPTED'}")
        return {"user": user, "kind": kind, "vault_ref": str(ref), "vault_version_before": version,
                "vault_version": written, "new_works": new_works, "old_refused": old_refused, "status": "rotated"}

    def _install_key(self, ctx: StepContext, user: str, public_line: str) -> None:
        home = ctx.run(["getent", "passwd", user], timeout=10).stdout.split(":")[5]
        sshd = ctx.run(["sshd", "-T", "-C", f"user={user},host=crashcart,addr=127.0.0.1"], timeout=10, check=False).stdout
        path = v.remote_path(parse_authorized_keys_file(sshd, user, home))
        owner = user if path.startswith(home.rstrip("/") + "/") else "root"
        # Replace the whole file atomically: the old key must stop working, not just gain a sibling.
        ctx.run(script('umask 077; mkdir -p "$(dirname "$1")"; cat > "$1.crashcart" && chown "$2" "$1.crashcart" '
                       '&& chmod 644 "$1.crashcart" && mv -f "$1.crashcart" "$1"', path, owner),
                stdin=public_line + "\n", timeout=30)
