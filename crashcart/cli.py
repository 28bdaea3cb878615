"""The `crashcart` command line: one clear line and a distinct exit code for every expected failure."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from crashcart.errors import CrashcartError

app = typer.Typer(
    name="crashcart",
    help="Contain, preserve, rotate and prove: incident-response and contingency runbooks for ePHI fleets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
lab_app = typer.Typer(help="Start, inspect and stop the staging lab of real hosts (as root).", no_args_is_help=True)
app.add_typer(lab_app, name="lab")
from crashcart.evidence.commands import evidence_app
app.add_typer(evidence_app, name="evidence")

out = Console()
err = Console(stderr=True)
_state: dict = {"config": None}


@app.callback()
def _options(
    config: Optional[Path] = typer.Option(None, "--config", "-c", envvar="CRASHCART_CONFIG",
                                          help="Settings file (default: ./crashcart.toml, /etc/crashcart, the lab's)."),
) -> None:
    _state["config"] = config


def runtime():
    """Settings and inventory, loaded once per command."""
    if "runtime" not in _state:
        from crashcart.runtime import Runtime

        _state["runtime"] = Runtime.load(_state["config"])
        prepare_prefect(_state["runtime"])
    return _state["runtime"]


@app.command()
def hosts(group: Optional[str] = typer.Option(None, "--group", "-g", help="Only hosts in this group or tag.")) -> None:
    """List the inventory as a table."""
    rt = runtime()
    chosen = rt.inventory.select(group=group) if group else list(rt.inventory.hosts.values())
    table = Table(title=f"{rt.inventory.path}")
    for col in ("host", "address", "env", "groups", "tags", "services", "accounts"):
        table.add_column(col)
    for h in chosen:
        table.add_row(
            h.name, f"{h.address}:{h.port}", h.environment, ",".join(h.groups), ",".join(h.tags),
            ",".join(f"{s.name}/{s.port}{'*' if s.management else ''}" for s in h.services),
            ",".join(a.user for a in h.accounts),
        )
    out.print(table)
    out.print("[dim]* reachable from the management networks during isolation: "
              + ", ".join(rt.inventory.management_networks) + "[/dim]")


@app.command()
def check(
    names: list[str] = typer.Argument(None, help="Hosts to check (default: every host)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Connect and report reachability, host key, firewalld and what crashcart needs."""
    from flows.readiness import check_hosts

    rt = runtime()
    chosen = rt.inventory.select(names) if names else list(rt.inventory.hosts.values())
    reports = check_hosts(rt, chosen)
    if as_json:
        out.print_json(json.dumps([r.as_dict() for r in reports]))
    else:
        table = Table()
        for col in ("host", "reachable", "host key", "firewalld", "firewall-cmd", "privilege", "problem"):
            table.add_column(col)
        for r in reports:
            mark = lambda ok: "[green]yes[/green]" if ok else "[red]no[/red]"  # noqa: E731
            table.add_row(r.host, mark(r.reachable), r.host_key, r.firewalld_state or "-", mark(r.firewall_cmd),
                          r.privilege or "-", r.problem or "")
        out.print(table)
    if not all(r.ready for r in reports):
        raise typer.Exit(8)


# -- flows ------------------------------------------------------------------------------------------
EXIT_BY_STATUS = {"contained": 0, "released": 0, "succeeded": 0, "passed": 0, "planned": 0, "unchanged": 0,
                  "exercised": 0, "applied_unverified": 9, "deferred": 9, "partial": 9,
                  "rolled_back": 5, "failed": 5, "cancelled": 5}


def prepare_prefect(rt) -> None:
    """Point Prefect at the configured API (never a temporary server) before it is imported."""
    import os

    if rt.settings.prefect_api_url and not os.environ.get("PREFECT_API_URL"):
        os.environ["PREFECT_API_URL"] = rt.settings.prefect_api_url
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "crashcart")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    if rt.settings.config_path:
        os.environ.setdefault("CRASHCART_CONFIG", str(rt.settings.config_path))
    from crashcart.secrets import install_log_masking

    install_log_masking()


def confirm_production(rt, names: list[str], group: Optional[str], yes: bool) -> bool:
    """Ask before touching production hosts; staging hosts go ahead without asking."""
    chosen = rt.inventory.select(names, group)
    production = [h.name for h in chosen if h.is_production]
    if not production or yes:
        return True
    if not sys.stdin.isatty():
        from crashcart.errors import ConfirmationRefused

        raise ConfirmationRefused(f"{', '.join(production)} is production and there is no terminal to confirm: pass --yes")
    return typer.confirm(f"{', '.join(production)} {'is' if len(production) == 1 else 'are'} PRODUCTION. Go ahead?",
                         default=False, abort=True)


def show_outcome(result: dict, dry_run: bool) -> None:
    """Print a run's outcome: one line per host, the plan in a dry run, and the evidence id."""
    colour = {"contained": "green", "released": "green", "succeeded": "green", "passed": "green",
              "planned": "cyan", "unchanged": "green"}.get(result["status"], "red")
    for host, r in result["hosts"].items():
        out.print(f"[bold]{host}[/bold]: [{colour if r['status'] == result['status'] else 'yellow'}]{r['status']}[/] - {r['summary']}",
                  highlight=False)
        for step in r["steps"]:
            if dry_run:
                out.print(f"  [cyan]{step['id']}[/cyan] ({step['status']}): {step['summary']}", highlight=False)
                for command in step["commands"]:
                    out.print(f"      $ {command}", markup=False, highlight=False)
                for check in step["verification"]:
                    out.print(f"      verify {check['check']}: {check['summary']}", markup=False, highlight=False)
            else:
                out.print(f"  {step['id']:<12} {step['status']:<12} {step['duration']:>6.2f}s  {step['summary']}",
                          markup=False, highlight=False)
    out.print(f"[{colour}]{result['runbook']}: {result['status']}[/] - evidence run {result['run_id']}"
              + (f", Prefect flow run {result['flow_run_id']}" if result.get("flow_run_id") else ""), highlight=False)


def run_flow(flow_fn, dry_run: bool = False, **params) -> None:
    rt = runtime()
    result = flow_fn(**params, dry_run=dry_run, config=str(rt.settings.config_path))
    show_outcome(result, dry_run)
    # Only now, with the result on screen, wait (bounded) for Slack deliveries still in flight.
    from crashcart.hooks import drain_all

    left = drain_all(timeout=2 * rt.settings.slack.timeout)
    if left:
        err.print(f"crashcart: {left} Slack notification(s) not delivered in time: recorded as failed; "
                  "`crashcart notify retry` resends them", markup=False, highlight=False)
    raise typer.Exit(EXIT_BY_STATUS.get(result["status"], 5))


def via_responder(flow: str, dry_run: bool, params: dict, yes: bool) -> None:
    """Hand the run to the warm responder when one listens (it exits with the outcome); else return.

    This path loads no settings models and no Prefect: the responder validates and runs. A production
    target it refuses for want of confirmation is asked about here, then sent again.
    """
    from crashcart.configfile import responder_socket
    from flows.responder import request

    from crashcart.configfile import find_config

    try:
        config = Path(_state["config"]) if _state["config"] else find_config(os.environ)
    except CrashcartError:
        return  # the full load that follows says what is wrong
    path = responder_socket(config)
    if path is None:
        return
    params = {**params, "dry_run": dry_run, "confirmed_production": yes or dry_run}
    reply = request(path, config, flow, params)
    if reply is None:
        return
    error = reply.get("error")
    if error and error.get("type") == "ConfirmationRefused" and not params["confirmed_production"] and sys.stdin.isatty():
        typer.confirm(f"{error['message'].split(':')[0].replace('production', 'PRODUCTION')}. Go ahead?",
                      default=False, abort=True)
        reply = request(path, config, flow, {**params, "confirmed_production": True}) or {}
        error = reply.get("error")
    if error:
        err.print(f"crashcart: error: {error['message']}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(int(error.get("exit_code") or 1))
    show_outcome(reply["result"], dry_run)
    raise typer.Exit(EXIT_BY_STATUS.get(reply["result"]["status"], 5))


@app.command("responder")
def responder() -> None:
    """Keep Prefect and the flows warm so isolate-host and release-host start at once (see flows/responder.py)."""
    import logging
    import signal

    from flows.responder import serve, socket_path

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # systemd's stop: no new runs, the ones in progress finish
    rt = runtime()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    out.print(f"crashcart responder: listening on {socket_path(rt)} (Ctrl-C stops it)", highlight=False)
    try:
        serve(rt)
    except KeyboardInterrupt:
        pass
    out.print("crashcart responder stopped", highlight=False)


def prewarm(rt, hosts) -> None:
    """Connect to the targets and the probe host while Prefect is imported (it takes over a second)."""
    import threading

    targets = list(hosts)
    if rt.inventory.probe_host:
        targets.append(rt.inventory.host(rt.inventory.probe_host))

    def start() -> None:
        from integrations.ssh import prewarm as connect

        connect(targets, rt.settings.ssh)

    threading.Thread(target=start, daemon=True, name="crashcart-prewarm").start()


def operator() -> str:
    import getpass
    import os
    import socket

    return f"cli:{os.environ.get('SUDO_USER') or getpass.getuser()}@{socket.gethostname()}"


@app.command("noop", hidden=True)
def noop() -> None:
    """Run a flow that does nothing (measures Prefect's fixed cost; see bench/prefect_bench.py)."""
    runtime()
    from prefect import flow

    @flow(name="crashcart-noop", persist_result=False)
    def nothing() -> str:
        return "ok"

    out.print(nothing())


@app.command("isolate-host")
def isolate_host(
    names: list[str] = typer.Argument(None, help="Hosts to isolate."),
    reason: str = typer.Option("isolated by crashcart", "--reason", "-r", help="Why (recorded in the evidence)."),
    incident: Optional[str] = typer.Option(None, "--incident", "-i", help="Incident id, e.g. INC-2041."),
    group: Optional[str] = typer.Option(None, "--group", "-g", help="Isolate every host of a group or tag."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan per host and change nothing."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask before isolating production hosts."),
    dead_man_seconds: Optional[int] = typer.Option(None, "--dead-man-seconds", help="Revert unless confirmed within this."),
    break_glass: bool = typer.Option(False, "--break-glass",
                                     help="Declared emergency: skip the Slack approval of production hosts (a review is owed)."),
) -> None:
    """Contain hosts: snapshot, quarantine, verify from outside, rotate credentials."""
    params = dict(hosts=names or [], reason=reason, incident=incident, group=group, triggered_by=operator(),
                  dead_man_seconds=dead_man_seconds, break_glass=break_glass)
    via_responder("isolate-host", dry_run, params, yes)
    rt = runtime()
    confirmed = confirm_production(rt, names or [], group, yes or dry_run)
    prewarm(rt, rt.inventory.select(names or [], group))
    from flows.isolate import isolate_host as flow_fn

    run_flow(flow_fn, dry_run, **params, confirmed_production=confirmed)


@app.command("release-host")
def release_host(
    names: list[str] = typer.Argument(None, help="Hosts to release."),
    reason: str = typer.Option(..., "--reason", "-r", help="Why the host may rejoin the network."),
    incident: Optional[str] = typer.Option(None, "--incident", "-i"),
    group: Optional[str] = typer.Option(None, "--group", "-g"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and change nothing."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask before releasing production hosts."),
) -> None:
    """Undo an isolation and prove the services are reachable again."""
    params = dict(hosts=names or [], reason=reason, incident=incident, group=group, triggered_by=operator())
    via_responder("release-host", dry_run, params, yes)
    rt = runtime()
    confirmed = confirm_production(rt, names or [], group, yes or dry_run)
    from flows.isolate import release_host as flow_fn

    run_flow(flow_fn, dry_run, **params, confirmed_production=confirmed)


@app.command("rotate-credentials")
def rotate_credentials(
    names: list[str] = typer.Argument(None, help="Hosts whose accounts to rotate."),
    group: Optional[str] = typer.Option(None, "--group", "-g"),
    account: list[str] = typer.Option(None, "--account", "-a", help="Only these accounts (default: all listed)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and change nothing."),
    yes: bool = typer.Option(False, "--yes", "-y"),
) -> None:
    """Rotate passwords and SSH keys of the inventory accounts, escrowed in Vault, proved."""
    rt = runtime()
    confirmed = confirm_production(rt, names or [], group, yes or dry_run)
    from flows.isolate import rotate_credentials as flow_fn

    run_flow(flow_fn, dry_run, hosts=names or [], group=group, accounts=account or [],
             confirmed_production=confirmed, triggered_by=operator())


@app.command("rotate-luks")
def rotate_luks(
    names: list[str] = typer.Argument(None, help="Hosts whose LUKS passphrases to rotate."),
    group: Optional[str] = typer.Option(None, "--group", "-g", help="Every host of a group or tag that lists LUKS volumes."),
    device: Optional[str] = typer.Option(None, "--device", help="Only this volume (its path in the inventory); one host."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and change nothing."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask before rotating on production hosts."),
) -> None:
    """Rotate LUKS passphrases: new keyslot proved and escrowed in Vault, then the old keyslot wiped."""
    rt = runtime()
    from flows.rotation import luks_targets, rotate_luks as flow_fn

    luks_targets(rt.inventory, names or [], group, device)  # a bad host or device is refused before anything runs
    confirmed = confirm_production(rt, names or [], group, yes or dry_run)
    run_flow(flow_fn, dry_run, hosts=names or [], group=group, device=device, confirmed_production=confirmed,
             triggered_by=operator())


@app.command("rotate-tls")
def rotate_tls(
    names: list[str] = typer.Argument(None, help="Hosts whose TLS certificates to rotate."),
    group: Optional[str] = typer.Option(None, "--group", "-g", help="Every host of a group or tag with TLS services."),
    service: Optional[str] = typer.Option(None, "--service", help="Only this kind of service (nginx)."),
    over: Optional[float] = typer.Option(None, "--only-if-lifetime-used-over",
                                         help="Rotate only certificates past this fraction of their lifetime (e.g. 0.66)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and change nothing."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask before rotating on production hosts."),
) -> None:
    """Rotate TLS certificates from the Vault PKI, proved by a handshake from here; the old one revoked."""
    rt = runtime()
    from flows.rotation import rotate_tls as flow_fn, tls_targets

    tls_targets(rt.inventory, names or [], group, service)  # a bad host or service is refused before anything runs
    confirmed = confirm_production(rt, names or [], group, yes or dry_run)
    run_flow(flow_fn, dry_run, hosts=names or [], group=group, service=service, only_if_lifetime_used_over=over,
             confirmed_production=confirmed, triggered_by=operator())


@app.command("certs")
def certs(
    group: Optional[str] = typer.Option(None, "--group", "-g", help="Only hosts in this group or tag."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Each TLS service's served certificate, read from here: serial, expiry, lifetime used (exit 16: unverified)."""
    rt = runtime()
    from flows.rotation import served_certificates

    chosen = rt.inventory.select(group=group) if group else list(rt.inventory.hosts.values())
    rows = served_certificates(rt, chosen)
    if as_json:
        out.print_json(json.dumps([r.as_dict() for r in rows]))
    else:
        table = Table()
        for col in ("host", "service", "serial", "not after (UTC)", "days left", "lifetime used", "problem"):
            table.add_column(col)
        for r in rows:
            f = r.facts
            table.add_row(r.host, f"{r.name}:{r.port}", f.serial if f else "-",
                          f"{f.not_after:%Y-%m-%d %H:%M}" if f else "-", f"{f.days_left():.1f}" if f else "-",
                          f"{max(f.lifetime_used(), 0):.0%}" if f else "-",
                          "" if r.verified else (r.problem or "not verified"))
        out.print(table)
    if any(not r.verified for r in rows):
        raise typer.Exit(16)


# -- contingency: restore tests, Prefect deployments and the worker that runs them ---------------------
@app.command("restore-test")
def restore_test(
    repo: list[str] = typer.Option(None, "--repo", help="Repository to test (repeatable; default: every repository)."),
    host: Optional[str] = typer.Option(None, "--host", help="Test the repositories that back up this host."),
    snapshot: str = typer.Option("latest", "--snapshot", help="latest, random, or a snapshot id."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Choose the snapshot, judge its age, show the plan; restore nothing."),
) -> None:
    """Restore a snapshot here, prove its bytes, measure RPO/RTO, read a rotating subset of the packs."""
    rt = runtime()
    from flows.restore import restore_targets, restore_test as flow_fn

    restore_targets(rt.inventory, repo or [], host, snapshot)  # bad input: one line and exit 2, before anything runs
    run_flow(flow_fn, dry_run, repos=repo or [], host=host, snapshot=snapshot, triggered_by=operator())


@app.command("deploy")
def deploy(
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="Deployments file (default: deploy/prefect.yaml)."),
) -> None:
    """Register the deployments and schedules of deploy/prefect.yaml with Prefect (idempotent)."""
    rt = runtime()
    from flows.deploy import DEPLOYMENTS_FILE, register_deployments

    done = register_deployments(rt, file or DEPLOYMENTS_FILE, say=lambda line: out.print(line, markup=False, highlight=False))
    out.print(f"{len(done)} deployment(s) registered with {rt.settings.prefect_api_url or 'the Prefect API'}; "
              "run `crashcart serve` to execute their runs", markup=False, highlight=False)


@app.command("serve")
def serve(
    pool: str = typer.Option("crashcart", "--pool", help="Work pool to take flow runs from."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="At most this many flow runs at once."),
) -> None:
    """Run the worker that executes deployment runs (schedules, UI, API, Slack) until stopped."""
    rt = runtime()
    from flows.deploy import serve as run_worker

    run_worker(rt, pool=pool, limit=limit, say=lambda line: out.print(line, markup=False, highlight=False))


# -- Slack: notifications and the Slack app --------------------------------------------------------
notify_app = typer.Typer(help="Slack notifications: delivery status, and resending the failed ones.", no_args_is_help=True)
slack_cli = typer.Typer(help="The crashcart Slack app: /crashcart isolate|status and approval buttons.", no_args_is_help=True)
app.add_typer(notify_app, name="notify")
app.add_typer(slack_cli, name="slack")


@notify_app.command("status")
def notify_status(
    limit: int = typer.Option(20, "--limit", "-n", min=1, help="How many of the most recent notifications."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List recent Slack notifications and their latest status (from the evidence ledger)."""
    rt = runtime()
    from flows.notify import latest_notifications

    rows = latest_notifications(rt.settings.evidence.dir)[-limit:]
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table()
    for col in ("id", "when (UTC)", "run", "event", "status", "attempts", "detail"):
        table.add_column(col)
    colour = {"delivered": "green", "failed": "red", "pending": "yellow"}
    for r in rows:
        table.add_row(r["id"][:12], (r.get("updated") or "")[:19].replace("T", " "), (r.get("run") or "-")[:8],
                      r.get("event") or "-", f"[{colour.get(r['status'], 'white')}]{r['status']}[/]",
                      str(r.get("attempts") if r.get("attempts") is not None else "-"),
                      r.get("error") or (f"ts {r['ts']}" if r.get("ts") else ""))
    out.print(table)


@notify_app.command("retry")
def notify_retry() -> None:
    """Resend every notification whose latest status is failed, and record each result."""
    rt = runtime()
    from flows.notify import resend_failed

    results = resend_failed(rt)
    if not results:
        out.print("nothing to resend: no notification is failed")
        return
    for r in results:
        line = f"{r['id'][:12]} {r.get('event')}: {r['status']}"
        out.print(line + (f" ({r['error']})" if r.get("error") else ""), markup=False, highlight=False)
    failed = [r for r in results if r["status"] != "delivered"]
    out.print(f"{len(results) - len(failed)} delivered, {len(failed)} still failed", highlight=False)
    if failed:
        raise typer.Exit(17)


@slack_cli.command("serve")
def slack_serve(
    port: int = typer.Option(3000, "--port", "-p", help="Port for Slack's requests (POST /slack/events)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (a reverse proxy terminates TLS)."),
) -> None:
    """Run the Slack app (slash command, approval buttons) until stopped; only signed requests are served."""
    rt = runtime()
    from crashcart.slack_app import serve as serve_slack

    serve_slack(rt, host, port, say=lambda line: out.print(line, markup=False, highlight=False))


# -- tabletop exercises: the plan tested against staging (164.308(a)(7)(ii)(D)) ---------------------
tabletop_app = typer.Typer(help="Tabletop exercises: scenarios replayed against staging with the real runbooks, "
                                "timed, scored and reported.", no_args_is_help=True)
app.add_typer(tabletop_app, name="tabletop")


@tabletop_app.command("list")
def tabletop_list() -> None:
    """The shipped scenarios (title, duration) and the exercises recorded in the evidence ledger."""
    from rich.markup import escape

    from tabletop.report import list_exercises
    from tabletop.scenario import shipped_scenarios

    table = Table(title="scenarios (tabletop/scenarios)")
    for col in ("scenario", "title", "duration", "injects", "responses"):
        table.add_column(col)
    for name, doc in shipped_scenarios():
        if isinstance(doc, CrashcartError):
            table.add_row(name, f"[red]invalid: {escape(str(doc))}[/red]", "-", "-", "-")
        else:
            table.add_row(name, escape(doc.title), f"{doc.duration_minutes:g} min", str(len(doc.injects)),
                          str(len(doc.responses())))
    out.print(table)
    rt = runtime()
    table = Table(title=f"exercises in {rt.settings.evidence.dir}")
    for col in ("run", "started (UTC)", "scenario", "mode", "speed", "status", "score"):
        table.add_column(col)
    for e in list_exercises(rt.settings.evidence.dir):
        table.add_row(e["run_id"], (e["started"] or "")[:19].replace("T", " "), e["scenario"] or "-", e["mode"] or "-",
                      f"x{e['speed']:g}" if e.get("speed") else "-", e["status"], escape(e["summary"]))
    out.print(table)


@tabletop_app.command("run")
def tabletop_run(
    scenario: str = typer.Argument(..., help="A shipped scenario's name (see `crashcart tabletop list`) or a YAML file."),
    speed: float = typer.Option(1.0, "--speed", help="Clock speed: scenario minute M comes M*60/speed real seconds "
                                                     "after the start (1 = real time)."),
    facilitated: bool = typer.Option(False, "--facilitated", help="Participants type each decision here, and who made it."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Runbooks show their plans only; nothing is changed."),
) -> None:
    """Replay a scenario's injects on a clock, run the expected runbooks against staging, score and report it."""
    from tabletop.scenario import load_scenario

    document = load_scenario(scenario)  # a malformed scenario: one line and exit 2, before anything else
    rt = runtime()
    from rich.markup import escape

    from tabletop.runner import ExerciseOptions, TerminalDecider, run_exercise

    def say(line: str) -> None:
        out.print(line, markup=False, highlight=False)

    decider = TerminalDecider(write=say) if facilitated else None
    result = run_exercise(rt, document, ExerciseOptions(speed, facilitated, dry_run, operator()), decider=decider, say=say)
    table = Table(title=f"{document.title}: {result.summary}")
    for col in ("response", "expected", "outcome", "scenario min", "allowed", "why"):
        table.add_column(col)
    colour = {"met": "green", "late": "yellow", "missed": "red"}
    for r in result.score["responses"]:
        fault = f" [fault {r['fault']}: {'as expected' if r['as_expected'] else 'NOT as expected'}]" if r["fault"] else ""
        table.add_row(escape(r["id"]), escape(r["what"] + fault), f"[{colour.get(r['outcome'], 'cyan')}]{r['outcome']}[/]",
                      "-" if r["minutes"] is None else f"{r['minutes']:.1f}", f"{r['allowed_minutes']:g}", escape(r["why"]))
    out.print(table)
    for line in result.score["revision_items"]:
        out.print(f"revision: {line}", markup=False, highlight=False)
    out.print(f"tabletop {result.scenario}: {result.status} - evidence run {result.run_id}; reports "
              + ", ".join(info["path"] for info in result.reports.values()), markup=False, highlight=False)
    from crashcart.hooks import drain_all

    drain_all(timeout=2 * rt.settings.slack.timeout)
    raise typer.Exit(EXIT_BY_STATUS.get(result.status, 5))


@tabletop_app.command("report")
def tabletop_report(
    run: str = typer.Argument(..., help="The exercise's evidence run id (or its first 8 characters or more)."),
    fmt: str = typer.Option("md", "--format", "-f", help="md or html."),
) -> None:
    """Render an exercise's after-action report again from the evidence ledger, to stdout."""
    import hashlib

    from crashcart.errors import InvalidInput
    from tabletop.report import FORMATS, rerender

    if fmt not in FORMATS:
        raise InvalidInput(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    rt = runtime()
    text, recorded = rerender(rt.settings.evidence.dir, run, fmt)
    sys.stdout.write(text)
    sys.stdout.flush()
    digest = hashlib.sha256(text.encode()).hexdigest()
    if recorded and recorded.get("sha256") == digest:
        err.print(f"crashcart: same bytes as the report recorded at {recorded['path']} (sha256 {digest})",
                  markup=False, highlight=False)
    elif recorded:
        err.print(f"crashcart: warning: differs from the report recorded at {recorded['path']} (sha256 "
                  f"{recorded.get('sha256')}): the templates changed since, or that file was altered",
                  markup=False, highlight=False)


@lab_app.command("up")
def lab_up(extra_hosts: Optional[int] = typer.Option(None, "--extra-hosts", help="Add node-1..node-N fleet hosts.")) -> None:
    """Start or repair the lab (idempotent) and print how long it took."""
    lab = _lab()
    seconds = lab.up(extra_hosts)
    out.print(f"lab up in {seconds:.1f}s: {len(lab.lab_hosts())} hosts, OpenBao, Prefect; "
              f"settings {lab.LAB_DIR / 'crashcart.toml'}")


@lab_app.command("down")
def lab_down() -> None:
    """Stop every lab process and remove the lab (nothing is left behind)."""
    _lab().down()
    out.print("lab down: nothing left behind")


@lab_app.command("status")
def lab_status() -> None:
    """Print what is running in the lab, as JSON; exit 7 when a part is down."""
    status = _lab().status()
    out.print_json(json.dumps(status))
    if not status.get("up"):
        raise typer.Exit(7)


def _lab():
    from crashcart.lab import load_lab

    return load_lab()


def main() -> None:
    """Console entry point: expected failures become one line on stderr and their exit code."""
    try:
        # Outside standalone mode click returns the code of typer.Exit instead of exiting with it.
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except CrashcartError as e:
        err.print(f"crashcart: error: {e}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except SystemExit as e:
        if isinstance(e.code, str):  # the lab scripts exit with a message
            err.print(f"crashcart: error: {e.code}", markup=False, highlight=False, soft_wrap=True)
            sys.exit(7)
        raise
    except typer.Abort:
        err.print("crashcart: aborted")
        sys.exit(3)
    except KeyboardInterrupt:
        err.print("crashcart: interrupted")
        sys.exit(130)
    except Exception as e:
        # Usage errors of Typer's (vendored) click arrive here in non-standalone mode.
        if type(e).__name__ == "Exit" and hasattr(e, "exit_code"):
            sys.exit(e.exit_code)
        if hasattr(e, "show") and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            sys.exit(e.exit_code)
        raise
