"""The crashcart Slack app (Bolt, HTTP mode, signed requests only): /crashcart isolate|status and approval buttons."""

from __future__ import annotations

import logging
import re
import time
from datetime import datetime, timezone
from socketserver import ThreadingMixIn
from typing import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server as make_wsgi_server

from slack_bolt import App
from slack_bolt.adapter.wsgi import SlackRequestHandler

from crashcart import validation as v
from crashcart.errors import ConfirmationRefused, CrashcartError, DeploymentError, InvalidInput, SlackError, SlackUserRefused
from crashcart.evidence.ledger import iter_records
from crashcart.evidence.recorder import utcnow
from crashcart.runtime import Runtime
from crashcart.secrets import mask
from flows.notify import APPROVE_ACTION, DENY_ACTION, approval_decided, parse_approval_value
from integrations.slack import SlackClient, clip, read_slack_secret

log = logging.getLogger("crashcart.slack_app")

ISOLATE_DEPLOYMENT = "isolate-host/isolate-host"
EVENTS_PATH = "/slack/events"
MAX_BODY = 1 << 20
STATUS_RUNS = 5
USAGE = ("usage: `/crashcart isolate HOST REASON...` (start isolate-host on HOST) \u00b7 "
         "`/crashcart status` (the last runs and how they ended)")

StartRun = Callable[..., str]


def start_deployment_run(deployment: str = ISOLATE_DEPLOYMENT) -> StartRun:
    """A starter of Prefect deployment runs: returns the flow run id at once (timeout=0), never waits."""

    def start(**parameters) -> str:
        from prefect.deployments import run_deployment
        from prefect.exceptions import ObjectNotFound, PrefectException

        try:
            run = run_deployment(deployment, parameters=parameters, timeout=0, as_subflow=False)
        except ObjectNotFound as e:
            raise DeploymentError(f"deployment {deployment} is not registered: run `crashcart deploy`") from e
        except (PrefectException, OSError) as e:
            raise DeploymentError(f"cannot start deployment {deployment}: {mask(str(e))[:200]}") from e
        return str(run.id)

    return start


class SlackCommands:
    """What the app does for each request, independent of Bolt (so its decisions are plain calls)."""

    def __init__(self, runtime: Runtime, client: SlackClient, start_isolation: StartRun) -> None:
        self.runtime = runtime
        self.client = client
        self.start_isolation = start_isolation
        self._ledger = None

    @property
    def approvers(self) -> tuple[str, ...]:
        return tuple(self.runtime.settings.slack.approvers)

    def ledger(self):
        if self._ledger is None:
            from flows.common import open_ledger

            self._ledger = open_ledger(self.runtime)
        return self._ledger

    def _refuse(self, user: str, what: str, run: str | None = None, **detail) -> None:
        """Record a refused user (who tried what) in the evidence, then raise SlackUserRefused."""
        self.ledger().append("approval_refused" if run else "slack_refused",
                             {"user": clip(user, 64), "attempted": what, "reason": "not in slack.approvers",
                              "via": "slack", "at": utcnow(), **detail}, run=run)
        raise SlackUserRefused(f"<@{user}> may not {what}: only the on-call group in slack.approvers may")

    # -- /crashcart ------------------------------------------------------------------------------
    def command(self, user: str, text: str) -> str:
        """The ephemeral answer to `/crashcart TEXT` from `user` (errors become the CLI's one line)."""
        try:
            return self._command(user, text)
        except CrashcartError as e:
            return f"crashcart: error: {mask(str(e))}"

    def _command(self, user: str, text: str) -> str:
        words = (text or "").split()
        sub = words[0].lower() if words else "help"
        if sub not in ("isolate", "status"):
            return USAGE
        if user not in self.approvers:
            self._refuse(user or "unknown", f"use /crashcart {sub}")
        if sub == "status":
            return self.status()
        if len(words) < 3:
            raise InvalidInput("usage: /crashcart isolate HOST REASON... (a reason is required)")
        # The same validation, and so the same one-line errors, as `crashcart isolate-host HOST -r REASON`.
        chosen = self.runtime.inventory.select([words[1]])
        reason = v.free_text(" ".join(words[2:]), "reason")
        production = [h.name for h in chosen if h.is_production]
        if production and not self.runtime.settings.slack.require_approval:
            raise ConfirmationRefused(f"{', '.join(production)} is production: isolate it from the CLI "
                                      f"(crashcart isolate-host {production[0]}), where it is confirmed at the "
                                      "prompt, or turn on slack.require_approval so an approver confirms it here")
        flow_run_id = self.start_isolation(hosts=[h.name for h in chosen], reason=reason,
                                           triggered_by=f"slack:{user}", confirmed_production=bool(production))
        tail = " (waits for an approver first)" if production else ""
        return (f"started flow run {flow_run_id}: isolate-host on {chosen[0].name}{tail}; "
                f"updates follow in {self.runtime.inventory.slack.channel}")

    def status(self) -> str:
        """The last few runs from the evidence ledger with their final status."""
        runs: dict[str, dict] = {}
        for rec in iter_records(self.runtime.settings.evidence.dir):
            if rec.kind == "run_started" and rec.run:
                hosts = ", ".join(str(h.get("name")) for h in rec.body.get("hosts") or [] if isinstance(h, dict))
                runs[rec.run] = {"kind": rec.body.get("run_kind"), "hosts": hosts, "started": rec.ts,
                                 "status": "running"}
            elif rec.kind == "run_finished" and rec.run in runs:
                runs[rec.run]["status"] = rec.body.get("status")
        if not runs:
            return "no runs recorded yet"
        lines = [f"\u2022 `{rid[:8]}` {r['started'][:16].replace('T', ' ')}Z {r['kind']} {r['hosts'] or '-'}: *{r['status']}*"
                 for rid, r in list(runs.items())[-STATUS_RUNS:]]
        return "Last runs (evidence ledger):\n" + "\n".join(reversed(lines))

    # -- approval buttons ------------------------------------------------------------------------
    def decide(self, body: dict, action: dict) -> str:
        """Handle an Approve/Deny click: resume the paused flow run with the decision; returns what happened."""
        user = str((body.get("user") or {}).get("id") or "")
        channel = str((body.get("channel") or {}).get("id") or (body.get("container") or {}).get("channel_id") or "")
        message = body.get("message") or {}
        ts = str(message.get("ts") or (body.get("container") or {}).get("message_ts") or "")
        approved = action.get("action_id") == APPROVE_ACTION
        try:
            flow_run_id, run_id = parse_approval_value(str(action.get("value") or ""))
        except InvalidInput as e:
            log.warning("ignored an approval click from %s: %s", clip(user, 64), e)
            return "ignored"
        if user not in self.approvers:
            try:
                self._refuse(user or "unknown", "approve or deny production runs", run=run_id,
                             decision=("approved" if approved else "denied"), flow_run_id=flow_run_id)
            except SlackUserRefused as e:
                self._ephemeral(channel, user, f"crashcart: {e}")
            return "refused"
        from prefect.exceptions import FlowPauseTimeout, NotPausedError, ObjectNotFound
        from prefect.flow_runs import resume_flow_run

        # The request reaches Slack just before the run pauses: a click in between finds the run still
        # running, so a running run is given a few seconds to reach its pause before the click counts as stale.
        deadline = time.monotonic() + PAUSE_GRACE_SECONDS
        while True:
            try:
                resume_flow_run(flow_run_id, run_input={"approved": approved, "approver": user, "comment": ""})
                break
            except NotPausedError as e:
                if time.monotonic() < deadline and _still_running(flow_run_id):
                    time.sleep(0.25)
                    continue
                error = e
            except (FlowPauseTimeout, ObjectNotFound, RuntimeError) as e:
                error = e
            log.info("approval click for flow run %s not applied: %s", flow_run_id, type(error).__name__)
            self._ephemeral(channel, user, "crashcart: this run is no longer waiting for a decision "
                                           "(already decided, expired or finished)")
            return "stale"
        decision = "approved" if approved else "denied"
        if channel and ts:
            text, blocks = approval_decided(message.get("blocks") or [], decision, user,
                                            datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ"))
            try:
                self.client.update(channel, ts, text, blocks)
            except SlackError as e:  # the decision stands; only the message is stale
                log.warning("could not update the approval message: %s", e)
        return decision

    def _ephemeral(self, channel: str, user: str, text: str) -> None:
        if not channel or not user:
            return
        try:
            self.client.post_ephemeral(channel, user, text)
        except SlackError as e:
            log.warning("could not send an ephemeral answer: %s", e)


def create_app(runtime: Runtime, *, client: SlackClient | None = None,
               start_isolation: StartRun | None = None) -> tuple[App, SlackCommands]:
    """The Bolt app with its handlers; the bot token and signing secret come from Vault via the settings."""
    slack = runtime.settings.slack
    signing_secret = read_slack_secret(runtime, slack.signing_secret, "signing_secret")
    if client is None:
        token = read_slack_secret(runtime, slack.token, "token")
        client = SlackClient(token, base_url=slack.base_url, timeout=slack.timeout, retries=slack.retries)
    commands = SlackCommands(runtime, client, start_isolation or start_deployment_run())
    # Bolt takes the bot token from our client (pointed at settings.slack.base_url), not a second copy.
    app = App(signing_secret=signing_secret.reveal(), client=client.web_client(),
              token_verification_enabled=False, request_verification_enabled=True,
              logger=logging.getLogger("crashcart.slack_app.bolt"))

    @app.command("/crashcart")
    def on_command(ack, body):
        ack(response_type="ephemeral", text=commands.command(str(body.get("user_id") or ""), str(body.get("text") or "")))

    @app.action(re.compile(f"^({APPROVE_ACTION}|{DENY_ACTION})$"))
    def on_decision(ack, body, action):
        ack()  # within Slack's 3 s; resuming the run and updating the message follow
        commands.decide(body, action)

    return app, commands


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Handler(WSGIRequestHandler):
    def log_message(self, fmt, *args):  # the request line only, into logging (never headers or bodies)
        log.info("%s %s", self.address_string(), fmt % args)


def wsgi_app(app: App):
    """Bolt behind a small WSGI front: /health, and signed POSTs to /slack/events only."""
    bolt = SlackRequestHandler(app, path=EVENTS_PATH)

    def application(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/health" and environ.get("REQUEST_METHOD") == "GET":
            start_response("200 OK", [("Content-Type", "application/json")])
            return [b'{"ok": true}']
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY:
            start_response("413 Payload Too Large", [("Content-Type", "text/plain")])
            return [b"request too large"]
        # Bolt would turn a non-numeric timestamp into a 500; anything unsigned is simply refused.
        if path == EVENTS_PATH and (not environ.get("HTTP_X_SLACK_REQUEST_TIMESTAMP", "").isdigit()
                                    or not environ.get("HTTP_X_SLACK_SIGNATURE")):
            start_response("401 Unauthorized", [("Content-Type", "application/json")])
            return [b'{"error": "invalid request"}']
        return bolt(environ, start_response)

    return application


def make_server(runtime: Runtime, host: str = "127.0.0.1", port: int = 3000, app: App | None = None) -> WSGIServer:
    """The HTTP server of the Slack app (threaded), bound and ready for serve_forever()."""
    if app is None:
        app, _ = create_app(runtime)
    return make_wsgi_server(host, port, wsgi_app(app), server_class=_Server, handler_class=_Handler)


def serve(runtime: Runtime, host: str = "127.0.0.1", port: int = 3000, say: Callable[[str], None] = print) -> None:
    """Run the Slack app until interrupted (`crashcart slack serve`)."""
    server = make_server(runtime, host, port)
    say(f"crashcart Slack app on http://{host}:{server.server_address[1]}{EVENTS_PATH} "
        f"(approvers: {', '.join(runtime.settings.slack.approvers) or 'none'})")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


PAUSE_GRACE_SECONDS = 10.0


def _still_running(flow_run_id: str) -> bool:
    """Whether the flow run is running (so about to pause), read from the Prefect API."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state
    except Exception:  # unknown is not running: the click is then reported stale
        return False
    return bool(state and state.is_running())
