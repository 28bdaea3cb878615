"""Forensic collection in order of volatility (RFC 3227), copied off the host with a chain of custody."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from pathlib import Path

from crashcart.errors import CrashcartError
from crashcart.evidence.recorder import utcnow
from crashcart import validation as v
from integrations.ssh import script
from flows.steps import Outcome, Plan, Step, StepContext, StepStatus, register

# Most volatile first: processes, network connections, routes and neighbours, logged-in users.
VOLATILE = [
    ("processes", "ps -eo pid,ppid,user,lstart,stat,args --forest"),
    ("connections", "ss -tanpe; ss -uanp"),
    ("routes", "ip route show table all; ip -6 route show"),
    ("neighbours", "ip neigh show"),
    ("users", "who -a; w -h"),
    ("last-logins", "last -n 50 -F 2>/dev/null || true"),
]
WORKDIR = "/var/tmp/crashcart"


def artifact_dir(ctx: StepContext) -> Path:
    path = Path(ctx.settings.evidence.dir) / "artifacts" / ctx.run_id / ctx.host.name
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _custody(ctx: StepContext, name: str, local: Path, source_hash: str, method: str, tools: str, how: str) -> dict:
    """Record the chain of custody of an artifact now on this machine; a hash mismatch fails the step."""
    os.chmod(local, 0o600)
    dest_hash = sha256_file(local)
    custody = {
        "host": ctx.host.name, "artifact": name, "stored_at": str(local), "bytes": local.stat().st_size,
        "sha256_source": source_hash, "sha256_destination": dest_hash, "match": source_hash == dest_hash,
        "collected_at": utcnow(), "collected_by": ctx.params.get("operator", "crashcart"),
        "collected_from": f"{socket.gethostname()} (management) over {how} as {ctx.host.user}",
        "method": method, "tools": tools,
    }
    if ctx.recorder:
        ctx.recorder.event("custody", custody)
    if not custody["match"]:
        raise CrashcartError(f"{name}: sha256 at the source {source_hash[:12]} differs from the copy {dest_hash[:12]}")
    return custody


def _collect(ctx: StepContext, remote: str, name: str, method: str, tools: str) -> dict:
    """Hash at the source, copy over SFTP, hash at the destination, remove the copy on the host."""
    source_hash = ctx.run(["sha256sum", remote], timeout=120).stdout.split()[0]
    local = artifact_dir(ctx) / name
    ctx.session().get_file(remote, local)
    ctx.run(["rm", "-f", remote], timeout=30, check=False)
    return _custody(ctx, name, local, source_hash, method, tools, "SSH/SFTP")


@register("forensics.capture_volatile")
class CaptureVolatile(Step):
    """Processes, connections, routes, neighbours and users, captured before the network is cut."""

    def plan(self, ctx: StepContext) -> Plan:
        return Plan("capture volatile state (RFC 3227 order) and copy it off the host",
                    [cmd for _, cmd in VOLATILE] + [f"sha256sum < {WORKDIR}/<run>/volatile.txt; cat it; rm it"])

    def apply(self, ctx: StepContext, plan: Plan) -> Outcome:
        remote_dir = f"{WORKDIR}/{v.identifier(ctx.run_id)}"
        remote = f"{remote_dir}/volatile-{ctx.host.name}.txt"
        # One round trip before the cut: capture to a file, print its sha256, then the file itself.
        body = ('umask 077; mkdir -p "$1"; { echo "# crashcart volatile capture of $(hostname) at $(date -u +%FT%T.%NZ)"; '
                + " ".join(f'echo "## {name}: {cmd}"; {{ {cmd}; }} 2>&1;' for name, cmd in VOLATILE)
                + ' } > "$2" && sha256sum < "$2" && cat "$2" && rm -f "$2"')
        started = time.monotonic()
        raw = ctx.run(script(body, remote_dir, remote), timeout=60).stdout_bytes
        first, _, content = raw.partition(b"\n")
        name = f"volatile-{ctx.host.name}.txt"
        local = artifact_dir(ctx) / name
        local.write_bytes(content)
        custody = _custody(ctx, name, local, first.split()[0].decode(), "shell commands, most volatile first",
                           "procps ps, iproute2 ss/ip, util-linux who/last", "SSH")
        return Outcome(StepStatus.SUCCEEDED, f"volatile state captured ({custody['bytes']} bytes, sha256 {custody['sha256_source'][:12]}, "
                       f"{time.monotonic() - started:.2f}s)", {"custody": custody})


@register("forensics.triage_archive")
class TriageArchive(Step):
    """A tar archive of the triage paths (logs, /etc) and a hash listing of the ePHI directories."""

    def plan(self, ctx: StepContext) -> Plan:
        paths = [v.remote_path(p) for p in ctx.host.triage_paths]
        ephi = [v.remote_path(p) for p in ctx.host.ephi_paths]
        return Plan(f"archive {', '.join(paths) or 'nothing'}; hash every file under {', '.join(ephi) or 'no ePHI path'}",
                    [f"tar -czf {WORKDIR}/<run>/triage.tar.gz {' '.join(paths)}",
                     f"find {' '.join(ephi)} -type f -exec sha256sum {{}} +" if ephi else "(no ePHI paths)",
                     "sha256sum, sftp get, sha256 again, rm"], data=(paths, ephi))

    def apply(self, ctx: StepContext, plan: Plan) -> Outcome:
        paths, ephi = plan.data
        remote_dir = f"{WORKDIR}/{v.identifier(ctx.run_id)}"
        archive = f"{remote_dir}/triage-{ctx.host.name}.tar.gz"
        listing = f"{remote_dir}/ephi-sha256-{ctx.host.name}.txt"
        custody = []
        ctx.run(script('umask 077; mkdir -p "$1"', remote_dir), timeout=10)
        if paths:
            # tar exits 1 when a file changed while read (logs do): the archive is still complete.
            result = ctx.run(["tar", "--warning=no-file-changed", "--ignore-failed-read", "-czf", archive, "--", *paths],
                             timeout=600, check=False)
            if result.exit_code not in (0, 1):
                result.check()
            custody.append(_collect(ctx, archive, f"triage-{ctx.host.name}.tar.gz", "tar czf of the triage paths",
                                    "GNU tar, gzip"))
        if ephi:
            ctx.run(script('umask 077; out=$1; shift; find "$@" -type f -exec sha256sum {} + > "$out"', listing, *ephi),
                    timeout=600)
            custody.append(_collect(ctx, listing, f"ephi-sha256-{ctx.host.name}.txt",
                                    "find -type f -exec sha256sum", "findutils, coreutils sha256sum"))
        ctx.run(["rm", "-rf", "--", remote_dir], timeout=30, check=False)
        total = sum(c["bytes"] for c in custody)
        return Outcome(StepStatus.SUCCEEDED, f"{len(custody)} artifact(s), {total} bytes, hashes match at both ends",
                       {"custody": custody})
