"""Containment steps: read the firewall, quarantine with a dead man's switch, prove it from outside, release."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from crashcart.errors import CrashcartError, SSHError
from crashcart.inventory import Host
from integrations import firewalld as fw
from integrations.ssh import HostSession, script
from flows.steps import CheckResult, CheckStatus, Outcome, Plan, Step, StepContext, StepStatus, register

# A TCP connect on the lab's (or a data centre's) LAN answers in milliseconds; silence this long means dropped.
PROBE_TIMEOUT = 1.5


# -- facts -------------------------------------------------------------------------------------
def read_state(ctx: StepContext, *, permanent: bool = False) -> tuple[fw.FirewallState, str]:
    result = ctx.run(fw.read_state_command(permanent), timeout=30)
    return fw.parse_state(result.stdout), result.stdout


def probe_ports_command(address: str, ports: list[int], timeout: float = PROBE_TIMEOUT) -> list[str]:
    """On a probing host: try a TCP connection to each port at once, print `PORT open|closed`."""
    body = ('ip=$1; t=$2; shift 2; for p in "$@"; do '
            '( if timeout "$t" bash -c "exec 3<>/dev/tcp/$ip/$p" 2>/dev/null; then echo "$p open"; '
            'else echo "$p closed"; fi ) & done; wait')
    return script(body, address, str(timeout), *[str(p) for p in ports])


def parse_probe(text: str) -> dict[int, bool]:
    """`PORT open|closed` lines -> {port: reachable}."""
    out = {}
    for line in text.split("\n"):
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit():
            out[int(parts[0])] = parts[1] == "open"
    return out


def probe_host(ctx: StepContext) -> Host | None:
    name = ctx.inventory.probe_host
    if not name or name == ctx.host.name:
        return None
    return ctx.inventory.host(name)


def service_ports(host: Host) -> list[int]:
    """Every port a peer must not reach after isolation: the declared services and SSH."""
    return sorted({s.port for s in host.services} | {host.port})


def management_ports(host: Host) -> list[int]:
    return sorted({s.port for s in host.services if s.management} | {host.port})


def isolation_record_path(ctx: StepContext) -> Path:
    return Path(ctx.settings.state_dir) / "isolations" / f"{ctx.host.name}.json"


# -- steps -------------------------------------------------------------------------------------
@register("firewalld.read_state", kind="check", read_only=True)
class ReadState(Step):
    """Record the firewall zones, interfaces, rules and sockets, and what a peer can reach now."""

    def plan(self, ctx: StepContext, baseline_probe: bool = True) -> Plan:
        commands = [" ".join(fw.read_state_command()[:2]) + " '<read zones, policies, links, sockets in parallel>'"]
        peer = probe_host(ctx) if baseline_probe else None
        if peer:
            commands.append(f"on {peer.name}: " + " ".join(probe_ports_command(ctx.host.address, service_ports(ctx.host))[3:]))
        return Plan("read firewalld state and sockets" + (f"; baseline reachability from {peer.name}" if peer else ""),
                    commands, data=peer)

    def apply(self, ctx: StepContext, plan: Plan) -> CheckResult:
        import concurrent.futures as cf

        peer: Host | None = plan.data
        with cf.ThreadPoolExecutor(2) as pool:
            baseline = pool.submit(
                lambda: parse_probe(ctx.run(probe_ports_command(ctx.host.address, service_ports(ctx.host)),
                                            host=peer, timeout=15).stdout)) if peer else None
            state, raw = read_state(ctx)
            reach = baseline.result() if baseline else {}
        if not state.running:
            return CheckResult(CheckStatus.FAILED, "firewalld is not running on the host: start it (systemctl start firewalld)")
        ctx.facts.setdefault("pre_state", state)
        ctx.facts["pre_state_sha256"] = hashlib.sha256(raw.encode()).hexdigest()
        ctx.facts["baseline"] = reach
        ctx.facts["already_contained"] = state.quarantined
        summary = (f"{len(state.interfaces)} interface(s) {', '.join(f'{i}->{state.zone_of(i) or state.default_zone}' for i in state.interfaces)}; "
                   f"{len(state.listening)} listening, {len(state.established)} established TCP sockets")
        if state.quarantined:
            summary = "already quarantined; " + summary
        return CheckResult(CheckStatus.PASSED, summary, {
            "state": state.as_dict(), "raw_sha256": ctx.facts["pre_state_sha256"],
            "baseline_from_peer": {str(k): v for k, v in reach.items()}, "peer": peer.name if peer else None,
        })


@register("firewalld.quarantine")
class Quarantine(Step):
    """Move every interface into the quarantine zone and drop outbound traffic, at runtime, armed."""

    def plan(self, ctx: StepContext, dead_man_seconds: int = 30) -> Plan:
        state: fw.FirewallState | None = ctx.facts.get("pre_state")
        if state is None:
            raise CrashcartError("no pre-state: the runbook must read the firewall before quarantining")
        if state.quarantined:
            return Plan("already quarantined: nothing to do", nothing_to_do=True)
        seconds = int(ctx.params.get("dead_man_seconds") or dead_man_seconds)
        networks = ctx.params.get("management_networks") or ctx.inventory.management_networks
        plan = fw.plan_quarantine(state, networks, management_ports(ctx.host))
        commands = [*map(" ".join, plan.define), f"arm dead man's switch: revert unless cancelled within {seconds}s",
                    *(" ".join(c) for c in plan.apply)]
        return Plan(f"quarantine {', '.join(plan.interfaces)}: inbound only {', '.join(plan.rules) or 'nothing'}; "
                    f"outbound dropped; reverts by itself after {seconds}s unless confirmed",
                    commands, data={"plan": plan, "seconds": seconds, "networks": list(networks)})

    def apply(self, ctx: StepContext, plan: Plan) -> Outcome:
        q: fw.QuarantinePlan = plan.data["plan"]
        path = isolation_record_path(ctx)
        path.parent.mkdir(parents=True, exist_ok=True)
        # What release needs, kept off the (untrusted) host: interfaces' zones before and our rules.
        path.write_text(json.dumps({"host": ctx.host.name, "run_id": ctx.run_id, "before": q.interfaces,
                                    "rules": list(q.rules), "pre_state_sha256": ctx.facts.get("pre_state_sha256")}))
        if q.define:
            ctx.run(["sh", "-c", fw.script_of(q.define)], timeout=60)
        # One round trip: arm the switch, and only once it is armed, apply.
        armed_at = time.time()
        result = ctx.run(fw.deadman_start_command(q.revert, plan.data["seconds"], then=q.script()), timeout=30)
        ctx.facts["quarantine"] = {"plan": q, "armed_at": armed_at, "seconds": plan.data["seconds"],
                                   "applied_at": time.time()}
        resync = fw.RESYNCED in result.stderr
        return Outcome(StepStatus.SUCCEEDED, f"quarantine applied at runtime; dead man's switch armed for {plan.data['seconds']}s"
                       + ("; firewalld was out of step with nftables and was reloaded first" if resync else ""),
                       {"interfaces_before": q.interfaces, "rules": list(q.rules), "applied_at": time.time(),
                        "dead_man_seconds": plan.data["seconds"], "management_networks": plan.data["networks"],
                        "firewalld_reloaded": resync})

    def repair(self, ctx: StepContext, plan: Plan, verification: list[dict]) -> str | None:
        """Traffic still passes although firewalld reports the quarantine: reload it, apply again.

        firewalld's view and the kernel's rules part when nftables is changed behind its back (an
        intruder with root, a hand-run `nft`). Only while management SSH works: when it is lost the
        dead man's switch reverts instead. The switch stays armed throughout.
        """
        checks = {v["check"]: v["status"] for v in verification}
        if checks.get("probe.management_ssh") != CheckStatus.PASSED.value or ctx.facts.get("management_lost"):
            return None
        q: fw.QuarantinePlan = plan.data["plan"]
        ctx.run(["sh", "-c", fw.reload_then(q.reapply())], timeout=30)
        return ("traffic still passed although firewalld reported the quarantine (nftables changed behind its back?): "
                "firewalld reloaded and the quarantine applied again")


class _PeerProbe(Step):
    """From the probe host, try a TCP connection to each of the host's service ports (and SSH)."""

    expect_open = False

    def plan(self, ctx: StepContext) -> Plan:
        peer = probe_host(ctx)
        ports = service_ports(ctx.host)
        must = "connect" if self.expect_open else "fail"
        return Plan(f"from {peer.name if peer else '(no probe host)'}: TCP {ports} on {ctx.host.address} must {must}",
                    [f"on {peer.name}: tcp connect {ctx.host.address}:{p} (timeout {PROBE_TIMEOUT}s)" for p in ports] if peer else [],
                    data=(peer, ports))

    def probe(self, ctx: StepContext, plan: Plan) -> CheckResult | tuple[Host, list[int], dict[int, bool]]:
        """(peer, ports, {port: reachable}), or an inconclusive result when no probe host can tell."""
        peer, ports = plan.data
        if peer is None:
            return CheckResult(CheckStatus.INCONCLUSIVE, "no probe host in the inventory (probe_host): cannot prove it from outside")
        try:
            return peer, ports, parse_probe(ctx.run(probe_ports_command(ctx.host.address, ports), host=peer, timeout=20).stdout)
        except SSHError as e:
            return CheckResult(CheckStatus.INCONCLUSIVE, f"probe host {peer.name} unavailable: {e}")


@register("probe.peer_blocked", kind="check")
class PeerBlocked(_PeerProbe):
    """From the probe host, the host's services (and SSH) can no longer be reached."""

    def apply(self, ctx: StepContext, plan: Plan) -> CheckResult:
        probed = self.probe(ctx, plan)
        if isinstance(probed, CheckResult):
            return probed
        peer, ports, reach = probed
        open_ports = [p for p in ports if reach.get(p, True)]
        detail = {"peer": peer.name, "reachable": {str(p): reach.get(p) for p in ports},
                  "baseline": {str(k): v for k, v in ctx.facts.get("baseline", {}).items()}}
        if open_ports:
            return CheckResult(CheckStatus.FAILED, f"{peer.name} still reaches {ctx.host.name} on {open_ports}", detail)
        return CheckResult(CheckStatus.PASSED, f"{peer.name} cannot reach {ctx.host.name} on {ports}", detail)


@register("probe.peer_reachable", kind="check")
class PeerReachable(_PeerProbe):
    """From the probe host, the services reachable before isolation are reachable again."""

    expect_open = True

    def apply(self, ctx: StepContext, plan: Plan) -> CheckResult:
        probed = self.probe(ctx, plan)
        if isinstance(probed, CheckResult):
            return probed
        peer, ports, reach = probed
        closed = [p for p in ports if not reach.get(p)]
        detail = {"peer": peer.name, "reachable": {str(p): reach.get(p) for p in ports}}
        if closed:
            return CheckResult(CheckStatus.FAILED, f"{peer.name} still cannot reach {ctx.host.name} on {closed}", detail)
        return CheckResult(CheckStatus.PASSED, f"{peer.name} reaches {ctx.host.name} on {ports} again", detail)


@register("probe.management_ssh", kind="check")
class ManagementSSH(Step):
    """A new SSH connection from the management address still works (not the one already open)."""

    def plan(self, ctx: StepContext) -> Plan:
        return Plan(f"new SSH connection from management to {ctx.host.address}:{ctx.host.port}",
                    [f"ssh {ctx.host.user}@{ctx.host.address} true (fresh connection, {ctx.settings.ssh.connect_timeout:g}s timeout)"])

    def apply(self, ctx: StepContext, plan: Plan) -> CheckResult:
        started = time.monotonic()
        try:
            with HostSession(ctx.host, ctx.settings.ssh) as fresh:
                fresh.run(["true"], timeout=10)
        except SSHError as e:
            ctx.facts["management_lost"] = True
            return CheckResult(CheckStatus.FAILED, f"management lost SSH to {ctx.host.name}: {e}")
        return CheckResult(CheckStatus.PASSED, f"management SSH works ({time.monotonic() - started:.2f}s to connect)")


@register("probe.outbound_blocked", kind="check")
class OutboundBlocked(Step):
    """From the host, a connection to the probe host fails (no command-and-control, no exfiltration)."""

    def plan(self, ctx: StepContext) -> Plan:
        peer = probe_host(ctx)
        return Plan(f"from {ctx.host.name}: TCP to {peer.address if peer else '?'}:{peer.port if peer else '?'} must fail",
                    [" ".join(probe_ports_command(peer.address, [peer.port])[3:])] if peer else [], data=peer)

    def apply(self, ctx: StepContext, plan: Plan) -> CheckResult:
        peer = plan.data
        if peer is None:
            return CheckResult(CheckStatus.INCONCLUSIVE, "no probe host to aim an outbound probe at")
        reach = parse_probe(ctx.run(probe_ports_command(peer.address, [peer.port]), timeout=15).stdout)
        if reach.get(peer.port, True):
            return CheckResult(CheckStatus.FAILED, f"{ctx.host.name} still reaches {peer.name}:{peer.port}")
        return CheckResult(CheckStatus.PASSED, f"{ctx.host.name} cannot reach {peer.name}:{peer.port}")


@register("firewalld.revert_quarantine")
class RevertQuarantine(Step):
    """Undo a runtime quarantine: at once if management still has SSH, else by the dead man's switch."""

    def plan(self, ctx: StepContext, grace_seconds: int = 20) -> Plan:
        q = ctx.facts.get("quarantine")
        if not q:
            return Plan("nothing was applied", nothing_to_do=True)
        if ctx.facts.get("management_lost"):
            deadline = q["armed_at"] + q["seconds"]
            return Plan(f"management lost: wait for the dead man's switch (fires {q['seconds']}s after arming), "
                        "then confirm from a new connection", [], data=("deadman", deadline + grace_seconds))
        return Plan("revert the runtime quarantine now", [" ".join(c) for c in q["plan"].revert] + ["cancel dead man's switch"],
                    data=("now", None))

    def apply(self, ctx: StepContext, plan: Plan) -> Outcome:
        how, deadline = plan.data
        q = ctx.facts["quarantine"]
        if how == "now":
            ctx.run(["sh", "-c", fw.script_of(q["plan"].revert, stop_on_error=False)], timeout=30, check=False)
            ctx.run(fw.deadman_cancel_command(), timeout=10, check=False)
            reverted_by = "crashcart"
        else:
            reverted_by = "dead man's switch"
        # Confirm from a fresh connection, waiting for the switch if it has to fire first.
        last_error = ""
        while True:
            try:
                with HostSession(ctx.host, ctx.settings.ssh) as fresh:
                    state = fw.parse_state(fresh.run(fw.read_state_command(), timeout=30).stdout)
                if not any(state.zone_of(i) == fw.QUARANTINE_ZONE for i in state.interfaces):
                    elapsed = time.time() - q["armed_at"]
                    return Outcome(StepStatus.SUCCEEDED, f"reverted by the {reverted_by} {elapsed:.1f}s after arming",
                                   {"reverted_by": reverted_by, "seconds_after_arming": round(elapsed, 2),
                                    "interfaces": {i: state.zone_of(i) for i in state.interfaces}})
                last_error = "interfaces still in the quarantine zone"
            except SSHError as e:
                last_error = str(e)
            if time.time() > deadline:
                return Outcome(StepStatus.FAILED, f"host did not revert within the bound: {last_error}")
            time.sleep(1)


@register("firewalld.persist")
class Persist(Step):
    """Write the verified quarantine with --permanent (never --runtime-to-permanent), then disarm."""

    def plan(self, ctx: StepContext) -> Plan:
        q = ctx.facts.get("quarantine")
        if not q:
            if ctx.facts.get("already_contained"):
                return Plan("already quarantined: nothing to do", nothing_to_do=True)
            state = ctx.facts.get("pre_state")
            if state is None:
                raise CrashcartError("no quarantine plan to persist")
            preview = fw.plan_quarantine(state, ctx.inventory.management_networks, management_ports(ctx.host))
            return Plan("write the quarantine permanently and cancel the dead man's switch",
                        [" ".join(c) for lane in preview.persist for c in lane] + ["cancel dead man's switch"])
        return Plan("write the quarantine permanently and cancel the dead man's switch",
                    [" ".join(c) for lane in q["plan"].persist for c in lane] + ["cancel dead man's switch"], data=q["plan"])

    def apply(self, ctx: StepContext, plan: Plan) -> Outcome:
        ctx.run(["sh", "-c", fw.lanes_script(plan.data.persist)], timeout=60)
        cancelled = ctx.run(fw.deadman_cancel_command(), timeout=10).stdout.strip()
        return Outcome(StepStatus.SUCCEEDED, f"quarantine written permanently; dead man's switch {cancelled}",
                       {"dead_man_switch": cancelled})


@register("firewalld.release")
class Release(Step):
    """Restore the recorded pre-isolation zones and remove the quarantine rules and policy."""

    def plan(self, ctx: StepContext) -> Plan:
        path = isolation_record_path(ctx)
        record = json.loads(path.read_text()) if path.exists() else {"before": {}}
        state, raw = read_state(ctx, permanent=True)
        ctx.facts["release_from"] = record
        commands = fw.plan_release(state, record["before"])
        if not commands:
            return Plan(f"{ctx.host.name} is not quarantined: nothing to do", nothing_to_do=True)
        return Plan(f"restore zones {record['before'] or '(default zone)'} and remove the quarantine",
                    [" ".join(c) for c in commands], data={"commands": commands, "record": record})

    def apply(self, ctx: StepContext, plan: Plan) -> Outcome:
        # The permanent configuration first: should the runtime change fail with firewalld out of step
        # with nftables, a reload from it is then the release.
        permanent = [c for c in plan.data["commands"] if "--permanent" in c]
        runtime = [c for c in plan.data["commands"] if "--permanent" not in c]
        result = ctx.run(["sh", "-c", fw.script_of(permanent) + " && " + fw.resynced(fw.script_of(runtime))], timeout=60)
        ctx.run(fw.deadman_cancel_command(), timeout=10, check=False)
        isolation_record_path(ctx).unlink(missing_ok=True)
        resync = fw.RESYNCED in result.stderr
        return Outcome(StepStatus.SUCCEEDED, "quarantine removed; interfaces back in their recorded zones"
                       + ("; firewalld was out of step with nftables and was reloaded" if resync else ""),
                       {"restored": plan.data["record"]["before"], "isolation_run": plan.data["record"].get("run_id"),
                        "firewalld_reloaded": resync})
