"""`crashcart check`: can crashcart reach and act on each host (read-only)."""

from __future__ import annotations

import concurrent.futures as cf
from dataclasses import asdict, dataclass

from crashcart.errors import AuthRefused, HostKeyMismatch, HostKeyUnknown, HostUnreachable, SSHError
from crashcart.inventory import Host
from crashcart.runtime import Runtime
from integrations.ssh import HostSession, script

_PROBE = (
    'echo "uid=$(id -u)"; '
    'if command -v firewall-cmd >/dev/null 2>&1; then echo fwcmd=yes; echo "fwstate=$(firewall-cmd --state 2>&1)"; '
    'else echo fwcmd=no; fi; '
    'if [ "$(id -u)" = 0 ]; then echo priv=root; '
    'elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then echo priv=sudo; else echo priv=none; fi'
)


@dataclass
class Readiness:
    """What `crashcart check` found on one host."""

    host: str
    reachable: bool = False
    host_key: str = "unchecked"
    firewall_cmd: bool = False
    firewalld_state: str | None = None
    privilege: str | None = None
    problem: str | None = None

    @property
    def ready(self) -> bool:
        return (self.reachable and self.host_key == "pinned" and self.firewall_cmd
                and self.firewalld_state == "running" and self.privilege in ("root", "sudo"))

    def as_dict(self) -> dict:
        return {**asdict(self), "ready": self.ready}


def parse_probe(text: str) -> dict[str, str]:
    """The key=value lines printed by the readiness probe."""
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def check_host(runtime: Runtime, host: Host) -> Readiness:
    report = Readiness(host.name)
    session = HostSession(host, runtime.settings.ssh)
    try:
        session.open()
        report.reachable, report.host_key = True, "pinned"
        facts = parse_probe(session.run(script(_PROBE), timeout=20, become=False).stdout)
    except HostKeyMismatch as e:
        report.reachable, report.host_key, report.problem = True, "MISMATCH", str(e)
        return report
    except HostKeyUnknown as e:
        report.reachable, report.host_key, report.problem = True, "unknown", str(e)
        return report
    except AuthRefused as e:
        report.reachable, report.host_key, report.problem = True, "pinned", str(e)
        return report
    except (HostUnreachable, SSHError) as e:
        report.problem = str(e)
        return report
    finally:
        session.close()
    report.firewall_cmd = facts.get("fwcmd") == "yes"
    report.firewalld_state = facts.get("fwstate", "").strip() or None
    report.privilege = facts.get("priv")
    if host.become == "none" and report.privilege == "sudo":
        report.privilege = "sudo (set become: sudo)"
    problems = []
    if not report.firewall_cmd:
        problems.append("firewall-cmd is not installed")
    elif report.firewalld_state != "running":
        problems.append("firewalld is not running")
    if report.privilege not in ("root", "sudo"):
        problems.append("crashcart needs root or passwordless sudo")
    report.problem = "; ".join(problems) or None
    return report


def check_hosts(runtime: Runtime, hosts: list[Host]) -> list[Readiness]:
    """Check every host in parallel; the order of the result follows `hosts`."""
    with cf.ThreadPoolExecutor(max_workers=min(16, max(1, len(hosts)))) as pool:
        return list(pool.map(lambda h: check_host(runtime, h), hosts))
