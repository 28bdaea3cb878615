"""firewalld on a host: facts parsed from firewall-cmd output, and the quarantine's command plans."""

from __future__ import annotations

import re
import shlex
from dataclasses import asdict, dataclass, field

from crashcart import validation as v

QUARANTINE_ZONE = "ccquarantine"
QUARANTINE_POLICY = "ccquarantine-out"
DEADMAN_PIDFILE = "/run/crashcart-deadman.pid"


@dataclass(frozen=True)
class Zone:
    """One zone (or policy) block of `firewall-cmd --list-all-zones` / `--list-all-policies`."""

    name: str
    active: bool = False
    default: bool = False
    target: str = ""
    interfaces: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    services: tuple[str, ...] = ()
    ports: tuple[str, ...] = ()
    rich_rules: tuple[str, ...] = ()
    ingress_zones: tuple[str, ...] = ()
    egress_zones: tuple[str, ...] = ()


@dataclass(frozen=True)
class Socket:
    """A TCP socket from `ss -Htan`: state, local and peer address:port."""

    state: str
    local: str
    peer: str


@dataclass(frozen=True)
class FirewallState:
    """The host's firewall as read before (or after) a change."""

    running: bool
    default_zone: str
    zones: dict[str, Zone]
    policies: dict[str, Zone]
    permanent_zones: dict[str, Zone]
    permanent_policies: dict[str, Zone]
    interfaces: tuple[str, ...]
    listening: tuple[Socket, ...] = ()
    established: tuple[Socket, ...] = ()

    def zone_of(self, interface: str) -> str | None:
        """The zone an interface is bound to at runtime (None: unbound, so the default zone applies)."""
        for zone in self.zones.values():
            if interface in zone.interfaces:
                return zone.name
        return None

    def permanent_zone_of(self, interface: str) -> str | None:
        for zone in self.permanent_zones.values():
            if interface in zone.interfaces:
                return zone.name
        return None

    @property
    def quarantined(self) -> bool:
        """Every interface in the quarantine zone and the outbound-drop policy active."""
        zone = self.zones.get(QUARANTINE_ZONE)
        policy = self.policies.get(QUARANTINE_POLICY)
        return bool(self.interfaces and zone and policy
                    and all(i in zone.interfaces for i in self.interfaces)
                    and "HOST" in policy.ingress_zones and "ANY" in policy.egress_zones)

    @property
    def has_definitions(self) -> bool:
        """The quarantine zone and policy exist (loaded at runtime, hence also defined permanently)."""
        return QUARANTINE_ZONE in self.zones and QUARANTINE_POLICY in self.policies

    def as_dict(self) -> dict:
        return asdict(self)


_HEADER = re.compile(r"^(?P<name>[^\s(]+)(?:\s+\((?P<flags>[^)]*)\))?\s*$")


def parse_zones(text: str) -> dict[str, Zone]:
    """Parse `firewall-cmd [--permanent] --list-all-zones` or `--list-all-policies` output."""
    blocks: dict[str, dict] = {}
    current: dict | None = None
    key: str | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line.startswith((" ", "\t")):
            m = _HEADER.match(line)
            if not m:
                raise ValueError(f"unexpected firewall-cmd line: {line!r}")
            flags = {f.strip() for f in (m["flags"] or "").split(",")}
            current = {"name": m["name"], "active": "active" in flags, "default": "default" in flags}
            blocks[m["name"]] = current
            key = None
            continue
        if current is None:
            raise ValueError(f"firewall-cmd output starts with an indented line: {line!r}")
        if line.startswith("\t") or line.startswith("        "):  # continuation lines of rich rules
            if key == "rich rules":
                current.setdefault("rich_rules", []).append(line.strip())
            continue
        k, _, value = line.strip().partition(":")
        key = k.strip()
        value = value.strip()
        field_name = {"rich rules": "rich_rules", "ingress-zones": "ingress_zones", "egress-zones": "egress_zones"}.get(key, key)
        if field_name in ("interfaces", "sources", "services", "ports", "ingress_zones", "egress_zones"):
            current[field_name] = tuple(value.split())
        elif field_name == "target":
            current["target"] = value
        elif field_name == "rich_rules" and value:
            current.setdefault("rich_rules", []).append(value)
    return {name: Zone(**{**b, "rich_rules": tuple(b.get("rich_rules", ()))}) for name, b in blocks.items()}


def parse_sockets(text: str) -> tuple[tuple[Socket, ...], tuple[Socket, ...]]:
    """Split `ss -Htan` output into listening and established TCP sockets."""
    listening, established = [], []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 5:
            continue
        sock = Socket(parts[0], parts[3], parts[4])
        if parts[0] == "LISTEN":
            listening.append(sock)
        elif parts[0] == "ESTAB":
            established.append(sock)
    return tuple(listening), tuple(established)


def parse_links(text: str) -> tuple[str, ...]:
    """Interface names from `ip -o link show`, without loopback."""
    names = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) < 3:
            continue
        name = parts[1].strip().split("@")[0]
        if name != "lo":
            names.append(name)
    return tuple(names)


# The facts are read in one round trip: the commands run in parallel on the host, each into its own
# file, then print as marked sections. Each firewall-cmd costs ~0.2 s of Python start-up, so the
# running state is taken from the zone listing's exit status rather than asked for separately.
_RUNTIME = {
    # The configured default zone, read from the file rather than from a third firewall-cmd.
    "default": "sed -n 's/^DefaultZone=//p' /etc/firewalld/firewalld.conf",
    "zones": "firewall-cmd --list-all-zones",
    "policies": "firewall-cmd --list-all-policies",
    "links": "ip -o link show",
    "tcp": "ss -Htan",
}
_PERMANENT = {
    "pzones": "firewall-cmd --permanent --list-all-zones",
    "ppolicies": "firewall-cmd --permanent --list-all-policies",
}


def read_state_command(permanent: bool = False) -> list[str]:
    """One command that prints the runtime firewall (and optionally the permanent one) as sections."""
    sections = {**_RUNTIME, **(_PERMANENT if permanent else {})}
    body = (
        'd=$(mktemp -d) || exit 1; '
        + " ".join(f'({cmd} >"$d/{name}" 2>&1; echo $? >"$d/{name}.rc") &' for name, cmd in sections.items())
        + ' wait; for f in ' + " ".join(sections) + '; do echo "@@@ $f $(cat "$d/$f.rc")"; cat "$d/$f"; done; rm -rf "$d"'
    )
    return ["sh", "-c", body]


def parse_state(text: str) -> FirewallState:
    """Parse the sectioned output of read_state_command() into a FirewallState."""
    sections: dict[str, tuple[int, str]] = {}
    name, rc, lines = None, 0, []
    for line in text.splitlines():
        if line.startswith("@@@ "):
            if name:
                sections[name] = (rc, "\n".join(lines))
            _, name, rc_text = (line.split() + ["1"])[:3]
            rc, lines = int(rc_text) if rc_text.isdigit() else 1, []
        else:
            lines.append(line)
    if name:
        sections[name] = (rc, "\n".join(lines))
    missing = set(_RUNTIME) - set(sections)
    if missing:
        raise ValueError(f"firewall state output lacks {', '.join(sorted(missing))}")
    interfaces = parse_links(sections["links"][1])
    if sections["zones"][0] != 0:
        return FirewallState(False, "", {}, {}, {}, {}, interfaces)
    zones = parse_zones(sections["zones"][1])
    listening, established = parse_sockets(sections["tcp"][1])
    return FirewallState(
        running=True,
        default_zone=sections["default"][1].strip() or "public",  # firewalld's built-in default
        zones=zones,
        policies=parse_zones(sections["policies"][1]),
        permanent_zones=parse_zones(sections["pzones"][1]) if "pzones" in sections else {},
        permanent_policies=parse_zones(sections["ppolicies"][1]) if "ppolicies" in sections else {},
        interfaces=interfaces,
        listening=listening,
        established=established,
    )


# -- plans ------------------------------------------------------------------------------------
def management_rules(networks: tuple[str, ...] | list[str], ports: list[int]) -> list[str]:
    """Rich rules that let the management networks reach the given TCP ports, nothing else."""
    rules = []
    for net in networks:
        net = v.network(net)
        family = "ipv6" if ":" in net else "ipv4"
        for port in sorted(set(ports)):
            rules.append(f'rule family="{family}" source address="{net}" port port="{v.port(port)}" protocol="tcp" accept')
    return rules


Command = list[str]


@dataclass(frozen=True)
class QuarantinePlan:
    """Every firewall-cmd command of an isolation, built from the pre-state; nothing run yet.

    The quarantine zone (target DROP, with the management rules) and the outbound policy (target
    DROP, ingress HOST) are defined permanently once and stay inert until an interface is bound
    and the policy gets its egress zone: isolating is then two commands that run side by side.
    `lanes` run in parallel (each lane in order); `last` runs after every lane succeeded.
    """

    define: list[Command] = field(default_factory=list)       # permanent definitions, then reload
    lanes: list[list[Command]] = field(default_factory=list)  # runtime changes, lanes side by side
    last: list[Command] = field(default_factory=list)         # runtime: what must wait for the lanes
    revert: list[Command] = field(default_factory=list)       # runtime inverse (the dead man's switch runs it)
    persist: list[list[Command]] = field(default_factory=list)  # the same change with --permanent, as lanes
    rules: tuple[str, ...] = ()
    interfaces: dict[str, str | None] = field(default_factory=dict)   # interface -> zone before (None: default)
    again: list[list[Command]] = field(default_factory=list)  # after a reload: every change, whatever the pre-state said

    @property
    def apply(self) -> list[Command]:
        return [c for lane in self.lanes for c in lane] + self.last

    def script(self) -> str:
        """Apply at runtime; on COMMAND_FAILED, reload and apply everything again (see resynced)."""
        return resynced(lanes_script(self.lanes, self.last), then=self.reapply())

    def reapply(self) -> str:
        """After `firewall-cmd --reload` the runtime is the permanent configuration, not the pre-state:
        every rule, interface and the egress zone is (re)applied; what is already there is a warning."""
        return lanes_script(self.again)

    def commands(self) -> list[str]:
        return [shlex.join(c) for c in self.define + self.apply + [c for lane in self.persist for c in lane]]


def _permanent(commands: list[Command]) -> list[Command]:
    return [["firewall-cmd", "--permanent", *c[1:]] for c in commands]


def plan_quarantine(state: FirewallState, networks, ports: list[int]) -> QuarantinePlan:
    """The isolation of a host whose firewall is `state`: inbound only from management, no outbound."""
    zone, policy = QUARANTINE_ZONE, QUARANTINE_POLICY
    rules = management_rules(networks, ports)
    before = {i: state.zone_of(v.interface_name(i)) for i in state.interfaces}
    define: list[Command] = []
    if zone not in state.zones:
        define += [["firewall-cmd", "--permanent", f"--new-zone={zone}"],
                   ["firewall-cmd", "--permanent", f"--zone={zone}", "--set-target=DROP"]]
        if rules:
            define.append(["firewall-cmd", "--permanent", f"--zone={zone}", *[f"--add-rich-rule={r}" for r in rules]])
    if policy not in state.policies:
        define += [["firewall-cmd", "--permanent", f"--new-policy={policy}"],
                   ["firewall-cmd", "--permanent", f"--policy={policy}", "--set-target=DROP"],
                   ["firewall-cmd", "--permanent", f"--policy={policy}", "--add-ingress-zone=HOST"]]
    if define:
        define.append(["firewall-cmd", "--reload"])
    # After a reload the definitions are what the runtime holds; otherwise the runtime says.
    zone_now = state.zones.get(zone) or Zone(zone, rich_rules=tuple(rules))
    policy_now = state.policies.get(policy) or Zone(policy, ingress_zones=("HOST",))
    missing = [r for r in rules if r not in zone_now.rich_rules]
    stale = [r for r in zone_now.rich_rules if r not in rules]
    zone_lane: list[Command] = []
    if missing:
        zone_lane.append(["firewall-cmd", f"--zone={zone}", *[f"--add-rich-rule={r}" for r in missing]])
    if stale:  # a management network gone from the inventory must not keep SSH into a quarantined host
        zone_lane.append(["firewall-cmd", f"--zone={zone}", *[f"--remove-rich-rule={r}" for r in stale]])
    policy_lane: list[Command] = []
    if "HOST" not in policy_now.ingress_zones:
        policy_lane.append(["firewall-cmd", f"--policy={policy}", "--add-ingress-zone=HOST"])
    if "ANY" not in policy_now.egress_zones:
        policy_lane.append(["firewall-cmd", f"--policy={policy}", "--add-egress-zone=ANY"])
    moving = [i for i, z in before.items() if z != zone]
    move = [["firewall-cmd", f"--zone={zone}", *[f"--change-interface={i}" for i in moving]]] if moving else []
    # Interfaces move only once the management rules are in place; with the rules already there
    # (the usual case) the move runs beside the policy change.
    if zone_lane:
        lanes, last = [lane for lane in (zone_lane, policy_lane) if lane], move
    else:
        lanes, last = [lane for lane in (move, policy_lane) if lane], []
    revert: list[Command] = []
    for iface in moving:
        previous = before[iface]
        revert.append(["firewall-cmd", f"--zone={previous}", f"--change-interface={iface}"] if previous
                      else ["firewall-cmd", f"--zone={zone}", f"--remove-interface={iface}"])
    revert.append(["firewall-cmd", f"--policy={policy}", "--remove-egress-zone=ANY"])
    persist = [lane for lane in (_permanent(zone_lane + move), _permanent(policy_lane)) if lane]
    again = [([["firewall-cmd", f"--zone={zone}", *[f"--add-rich-rule={r}" for r in rules]]] if rules else [])
             + ([["firewall-cmd", f"--zone={zone}", *[f"--remove-rich-rule={r}" for r in stale]]] if stale else [])
             + ([["firewall-cmd", f"--zone={zone}", *[f"--change-interface={i}" for i in before]]] if before else []),
             [["firewall-cmd", f"--policy={policy}", "--add-ingress-zone=HOST"],
              ["firewall-cmd", f"--policy={policy}", "--add-egress-zone=ANY"]]]
    return QuarantinePlan(define, lanes, last, revert, persist, tuple(rules), before, again)


def plan_release(current: FirewallState, before: dict[str, str | None]) -> list[Command]:
    """Commands that undo a quarantine at runtime and permanently, back to the recorded zones.

    The zone and policy definitions stay: without interfaces and an egress zone they are inert.
    """
    zone, policy = QUARANTINE_ZONE, QUARANTINE_POLICY
    commands: list[Command] = []
    for prefix, zones, policies in ((["firewall-cmd"], current.zones, current.policies),
                                    (["firewall-cmd", "--permanent"], current.permanent_zones,
                                     current.permanent_policies)):
        quarantine = zones.get(zone, Zone(zone))
        for iface in current.interfaces:
            if iface in quarantine.interfaces:
                previous = before.get(iface)
                commands.append([*prefix, f"--zone={v.zone_name(previous)}", f"--change-interface={iface}"] if previous
                                else [*prefix, f"--zone={zone}", f"--remove-interface={iface}"])
        if "ANY" in policies.get(policy, Zone(policy)).egress_zones:
            commands.append([*prefix, f"--policy={policy}", "--remove-egress-zone=ANY"])
    return commands


def lanes_script(lanes: list[list[Command]], last: list[Command] = ()) -> str:
    """Lanes side by side (each in order), then `last` only if every lane succeeded.

    Each firewall-cmd spends ~0.2 s starting Python, so independent changes go in at the same
    time. Changes to one object stay in one lane: firewall-cmd updates a policy by reading and
    writing back its settings, and two writers at once lose one update.
    """
    lanes = [lane for lane in lanes if lane]
    if not last and len(lanes) <= 1:
        return script_of(lanes[0] if lanes else [])
    body = " ".join(f"( {script_of(lane)} ) & p{i}=$!;" for i, lane in enumerate(lanes))
    body += " rc=0; " + " ".join(f"wait $p{i} || rc=$?;" for i in range(len(lanes)))
    body += ' if [ "$rc" != 0 ]; then exit "$rc"; fi'  # a lane's own exit code (13: see resynced)
    return body + (f"; {script_of(list(last))}" if last else "")


RESYNCED = "crashcart: firewalld was out of step with nftables (COMMAND_FAILED): reloaded from the permanent configuration"


def resynced(script: str, then: str = "") -> str:
    """`script`; if firewalld fails it with COMMAND_FAILED (13), reload, then run `then` (if any).

    firewalld deletes its nftables rules by the handles it remembers: when the ruleset was changed
    behind its back (`nft` by hand, an intruder with root), a runtime change fails with exit 13 and
    stays failing. A reload rebuilds every rule from the permanent configuration.
    """
    return f'( {script} ); rc=$?; if [ "$rc" = 13 ]; then echo "{RESYNCED}" >&2; {reload_then(then)}; else exit "$rc"; fi'


def reload_then(then: str = "") -> str:
    """`firewall-cmd --reload` (runtime := permanent configuration), then `then` if it succeeded."""
    return "firewall-cmd --reload >/dev/null" + (f" && {{ {then}; }}" if then else "")


def script_of(commands: list[list[str]], *, stop_on_error: bool = True) -> str:
    """One shell script running the commands in order (each quoted); used for one round trip."""
    joiner = " && " if stop_on_error else "; "
    return joiner.join(shlex.join(c) for c in commands) or "true"


def deadman_start_command(revert: list[list[str]], seconds: int, then: str = "") -> list[str]:
    """Arm the dead man's switch: unless cancelled within `seconds`, the host reverts by itself.

    It runs detached (setsid) so it survives the SSH session and a lost management connection. A
    switch left by an earlier run is cancelled first, so only one can ever fire. `then` (a script)
    runs in the same round trip once the switch is armed, and only then.
    """
    revert_script = script_of(revert, stop_on_error=False)
    body = (f'echo $$ > {DEADMAN_PIDFILE}; sleep {int(seconds)}; '
            f'{revert_script}; echo "crashcart dead man switch fired at $(date -u +%FT%TZ)" >> /var/log/crashcart-deadman.log; '
            f'rm -f {DEADMAN_PIDFILE}')
    # Detach stdio too: otherwise the SSH channel stays open until the switch ends.
    arm = (_CANCEL + '; setsid -f sh -c "$1" </dev/null >/dev/null 2>&1; ok=0; '
           f'for i in $(seq 1 100); do [ -s {DEADMAN_PIDFILE} ] && {{ ok=1; break; }}; sleep 0.01; done; '
           '[ "$ok" = 1 ] || { echo "dead man switch did not start" >&2; exit 1; }')
    return ["sh", "-c", arm + (f"; {then}" if then else ""), "sh", body]


# pkill -g: the switch is a session (and process group) leader, so its sleep dies with it.
_CANCEL = (f'if [ -s {DEADMAN_PIDFILE} ]; then g=$(cat {DEADMAN_PIDFILE}); rm -f {DEADMAN_PIDFILE}; '
           'pkill -TERM -g "$g" 2>/dev/null; n=0; while pgrep -g "$g" >/dev/null 2>&1 && [ $n -lt 40 ]; do '
           'sleep 0.05; n=$((n+1)); done; if pgrep -g "$g" >/dev/null 2>&1; then echo "still running" >&2; exit 1; fi; '
           'r=cancelled; else r=absent; fi')


def deadman_cancel_command() -> list[str]:
    """Cancel the dead man's switch and make sure it is gone; prints `cancelled` or `absent`."""
    return ["sh", "-c", _CANCEL + '; echo "$r"']
