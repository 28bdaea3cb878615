"""Slack side of runs: notifications through an outbox recorded in the evidence, threads per incident, approvals."""

from __future__ import annotations

import atexit
import fcntl
import json
import logging
import math
import os
import re
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from hashlib import sha256
from pathlib import Path
from typing import Callable, Iterator

from crashcart.errors import ConfirmationRefused, CrashcartError, InvalidInput, SlackError, StateFileError
from crashcart.evidence.ledger import canonical_json, iter_records
from crashcart.evidence.recorder import RunRecorder, utcnow
from crashcart.hooks import Event, Hooks
from crashcart.inventory import Host
from crashcart.runtime import Runtime
from crashcart.secrets import mask
from integrations.slack import (
    Delivery,
    SlackClient,
    SlackMessage,
    actions,
    button,
    clip,
    context,
    escape,
    header,
    section,
)

log = logging.getLogger("crashcart.notify")

NOTIFIED_KINDS = frozenset({
    "run_started", "contained", "containment_failed", "containment_unverified", "released", "release_failed",
    "rotation", "restore_test", "tabletop_inject", "run_finished", "approval_requested",
})
HOST_OUTCOME_KINDS = frozenset({"contained", "containment_failed", "containment_unverified", "released",
                                "release_failed", "rotation"})
APPROVE_ACTION = "crashcart_approve"
DENY_ACTION = "crashcart_deny"
THREADS_FILE = "slack-threads.json"
OUTBOX_DIR = "outbox"
EXITED = "process exited before delivery"

_SLACK_USER_RE = re.compile(r"^[UW][A-Z0-9]{2,32}$")
_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

CHECK_ICONS = {"passed": ":white_check_mark:", "failed": ":x:", "inconclusive": ":grey_question:"}
STATUS_ICONS = {
    "started": ":rotating_light:", "contained": ":lock:", "released": ":unlock:", "succeeded": ":white_check_mark:",
    "passed": ":white_check_mark:", "unchanged": ":white_check_mark:", "exercised": ":performing_arts:",
    "applied_unverified": ":warning:", "deferred": ":hourglass:", "partial": ":warning:",
    "rolled_back": ":leftwards_arrow_with_hook:", "failed": ":x:", "cancelled": ":no_entry_sign:",
    "pending": ":raised_hand:", "approved": ":white_check_mark:", "denied": ":no_entry:",
    "timed_out": ":hourglass:", "break_glass": ":fire:",
}


# == message builders (pure: data in, Block Kit out; no I/O) ==========================================
@dataclass(frozen=True)
class MessageContext:
    """What a builder needs besides the event, gathered beforehand (the builders do no I/O)."""

    channel: str
    prefect_ui: str | None = None
    flow_run_id: str | None = None
    checks: tuple[dict, ...] = ()
    approvers: tuple[str, ...] = ()


def prefect_ui_base(api_url: str | None) -> str | None:
    """The Prefect UI's base URL from the API URL (http://host:4200/api -> http://host:4200)."""
    if not api_url:
        return None
    return api_url.rstrip("/").removesuffix("/api") or None


def prefect_run_url(ui_base: str | None, flow_run_id: str | None) -> str | None:
    if not ui_base or not flow_run_id or not _UUID_RE.match(str(flow_run_id)):
        return None
    return f"{ui_base}/runs/flow-run/{flow_run_id}"


def mention(who: str | None) -> str:
    """A Slack mention for `slack:U123` or `U123`; anything else (cli:alice@mgmt) as escaped text."""
    if not who:
        return "unknown"
    kind, sep, rest = who.partition(":")
    user = rest if sep and kind == "slack" else who
    if _SLACK_USER_RE.match(user):
        return f"<@{user}>"
    return escape(who)


def _icon(status: str) -> str:
    return STATUS_ICONS.get(status, ":information_source:")


def _footer(event: Event, ctx: MessageContext) -> dict:
    parts = [f"Evidence run `{escape(event.run_id)}`"]
    url = prefect_run_url(ctx.prefect_ui, ctx.flow_run_id)
    if url:
        parts.append(f"<{url}|Prefect flow run>")
    if event.incident:
        parts.append(f"Incident *{escape(event.incident)}*")
    return context(" \u00b7 ".join(parts))


def _hosts(event: Event) -> str:
    return ", ".join(event.hosts) or "-"


def _verification(checks: tuple[dict, ...]) -> str | None:
    if not checks:
        return None
    lines = [f"{CHECK_ICONS.get(str(c.get('status')), ':grey_question:')} {escape(str(c.get('summary') or c.get('check')))}"
             for c in checks]
    return clip("*Verification from outside*\n" + "\n".join(lines), 3000)


def _run_started(event: Event, ctx: MessageContext) -> SlackMessage:
    params = event.data.get("params") or {}
    trigger = event.data.get("trigger") or {}
    who = f"{trigger.get('kind')}:{trigger.get('who')}" if trigger else None
    fields = [("Hosts", escape(_hosts(event)))]
    if params.get("reason"):
        fields.append(("Reason", escape(str(params["reason"]))))
    if who:
        fields.append(("Triggered by", mention(who)))
    if event.incident:
        fields.append(("Incident", escape(event.incident)))
    if params.get("approval"):
        approval = params["approval"]
        fields.append(("Approval", f"{escape(str(approval.get('decision')))} {mention(approval.get('approver'))}"
                       if approval.get("approver") else escape(str(approval.get("decision")))))
    title = f"{event.runbook} started: {_hosts(event)}"
    return SlackMessage(ctx.channel, escape(f"{event.runbook} started on {_hosts(event)}"),
                        [header(f"\U0001F6A8 {title}"), section(escape(event.summary), fields), _footer(event, ctx)])


def _host_outcome(event: Event, ctx: MessageContext) -> SlackMessage:
    host = str(event.data.get("host") or _hosts(event))
    status = event.status
    titles = {
        "contained": f"{host} contained",
        "containment_failed": f"{host}: containment {status.replace('_', ' ')}",
        "containment_unverified": f"{host}: quarantine applied, not verified",
        "released": f"{host} released",
        "release_failed": f"{host}: release failed",
        "rotation": f"{host}: credential rotation {status}",
    }
    title = titles.get(event.kind, f"{host}: {event.kind} {status}")
    blocks = [section(f"{_icon(status)} *{escape(title)}*\n{escape(event.summary)}")]
    checks = _verification(ctx.checks)
    if checks:
        blocks.append(section(checks))
    blocks.append(_footer(event, ctx))
    return SlackMessage(ctx.channel, escape(f"{title}: {event.summary}"), blocks)


def _restore_test(event: Event, ctx: MessageContext) -> SlackMessage:
    repo = str(event.data.get("repository") or _hosts(event))
    title = f"Restore test {repo}: {event.status}"
    blocks = [section(f"{_icon(event.status)} *{escape(title)}*\n{escape(event.summary)}")]
    reasons = [str(r) for r in (event.data.get("reasons") or [])][:10]
    if reasons:
        blocks.append(section(clip("*Why*\n" + "\n".join(f"\u2022 {escape(r)}" for r in reasons), 3000)))
    measures = event.data.get("measures") or {}
    fields = [(escape(str(k)), escape(str(v))) for k, v in measures.items()
              if isinstance(v, (str, int, float, bool))][:10]
    if fields:
        blocks.append(section(None, fields))
    blocks.append(_footer(event, ctx))
    return SlackMessage(ctx.channel, escape(f"{title}: {event.summary}"), blocks)


def _tabletop_inject(event: Event, ctx: MessageContext) -> SlackMessage:
    scenario = event.data.get("scenario")
    title = f"Tabletop inject: {event.data.get('title') or event.summary}"
    text = escape(event.summary)
    if event.data.get("prompt"):
        text += f"\n*What do you do?* {escape(str(event.data['prompt']))}"
    blocks = [header(f"\U0001F3AD {title}"), section(text),
              context("Exercise only: nothing real is affected" + (f" \u00b7 scenario *{escape(str(scenario))}*" if scenario else "")),
              _footer(event, ctx)]
    return SlackMessage(ctx.channel, escape(f"[exercise] {title}"), blocks)


def _run_finished(event: Event, ctx: MessageContext) -> SlackMessage:
    per_host = event.data.get("hosts") or event.data.get("repositories") or {}
    fields = [(escape(str(name)), f"{_icon(str(status))} {escape(str(status))}") for name, status in per_host.items()][:10]
    title = f"{event.runbook} finished: {event.status}"
    blocks = [section(f"{_icon(event.status)} *{escape(title)}*\n{escape(event.summary)}"), ]
    if fields:
        blocks.append(section(None, fields))
    blocks.append(_footer(event, ctx))
    return SlackMessage(ctx.channel, escape(f"{title}: {event.summary}"), blocks)


def approval_value(flow_run_id: str, run_id: str) -> str:
    """The approval buttons' value: which paused flow run to resume and which evidence run it belongs to."""
    return json.dumps({"flow_run": str(flow_run_id), "run": str(run_id)}, separators=(",", ":"))


def parse_approval_value(value: str) -> tuple[str, str]:
    """(flow run id, evidence run id) from a button value; InvalidInput unless both are UUIDs."""
    try:
        data = json.loads(value)
        flow_run, run = str(data["flow_run"]), str(data["run"])
    except (ValueError, TypeError, KeyError):
        raise InvalidInput("the approval button's value is not one crashcart made") from None
    if not (_UUID_RE.match(flow_run) and _UUID_RE.match(run)):
        raise InvalidInput("the approval button's value is not one crashcart made")
    return flow_run, run


def _approval(event: Event, ctx: MessageContext) -> SlackMessage:
    data = event.data
    hosts = _hosts(event)
    who = mention(data.get("requested_by"))
    reason = escape(str(data.get("reason") or "-"))
    if event.status == "pending":
        minutes = max(1, int(data.get("timeout") or 0) // 60)
        approvers = ", ".join(mention(a) for a in (data.get("approvers") or ctx.approvers)) or "nobody (slack.approvers is empty)"
        value = approval_value(str(data.get("flow_run_id") or ""), event.run_id)
        blocks = [
            header(f"\u270B Approval needed: {event.runbook} on production {hosts}"),
            section(f"{who} asks to run *{escape(event.runbook)}* on production *{escape(hosts)}*.\n*Reason:* {reason}"),
            actions(button("Approve", APPROVE_ACTION, value, "primary"), button("Deny", DENY_ACTION, value, "danger"),
                    block_id="crashcart_approval"),
            context(f"Only {approvers} may decide \u00b7 nothing is applied until then \u00b7 expires in {minutes} min"),
            _footer(event, ctx),
        ]
        return SlackMessage(ctx.channel, escape(f"Approval needed: {event.runbook} on production {hosts}"), blocks)
    if event.status == "break_glass":
        blocks = [
            header(f"\U0001F525 Break glass: {event.runbook} on production {hosts} without approval"),
            section(f"{who} declared an emergency and skipped approval.\n*Reason:* {reason}\n"
                    "*A review of this run is owed.*"),
            _footer(event, ctx),
        ]
        return SlackMessage(ctx.channel, escape(f"Break glass: {event.runbook} on production {hosts}; review owed"), blocks)
    approver = mention(data.get("approver"))
    lines = {"approved": f"Approved by {approver}: {escape(event.runbook)} on {escape(hosts)} goes ahead",
             "denied": f"Denied by {approver}: nothing was applied to {escape(hosts)}",
             "timed_out": f"No decision in time: nothing was applied to {escape(hosts)}"}
    line = lines.get(event.status, escape(event.summary))
    return SlackMessage(ctx.channel, re.sub(r"<@([A-Z0-9]+)>", r"\1", line),
                        [section(f"{_icon(event.status)} {line}"), _footer(event, ctx)])


BUILDERS: dict[str, Callable[[Event, MessageContext], SlackMessage]] = {
    "run_started": _run_started,
    "run_finished": _run_finished,
    "restore_test": _restore_test,
    "tabletop_inject": _tabletop_inject,
    "approval_requested": _approval,
    **{kind: _host_outcome for kind in HOST_OUTCOME_KINDS},
}


def build_message(event: Event, ctx: MessageContext) -> SlackMessage:
    """The Slack message announcing `event` (pure; raises KeyError for a kind that is not announced)."""
    return BUILDERS[event.kind](event, ctx)


def approval_decided(blocks: list[dict], decision: str, user: str, at: str) -> tuple[str, list[dict]]:
    """The approval message once decided: its buttons replaced by who decided what, and when (pure)."""
    kept = [b for b in blocks if isinstance(b, dict) and b.get("type") != "actions"][:48]
    who = mention(user)
    line = {"approved": f"{STATUS_ICONS['approved']} *Approved* by {who} at {escape(at)}",
            "denied": f"{STATUS_ICONS['denied']} *Denied* by {who} at {escape(at)}: nothing is applied"}[decision]
    insert_at = max(0, len(kept) - 1) if kept and kept[-1].get("type") == "context" else len(kept)
    kept.insert(insert_at, section(line))
    return escape(f"{decision.capitalize()} by {user}"), kept


# == outbox and threads (state_dir; shared by processes) ==============================================
@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


class ThreadStore:
    """Which Slack message starts each incident's (or run's) thread: state_dir/slack-threads.json."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / THREADS_FILE
        self._lock = Path(state_dir) / ".slack-threads.lock"

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError:
            raise StateFileError(f"{self.path}: not valid JSON; move it aside (threads start afresh)") from None
        return data if isinstance(data, dict) else {}

    def get(self, key: str) -> dict | None:
        """The root message of `key`'s thread: {"channel", "channel_id", "ts"}, or None."""
        with _file_lock(self._lock):
            root = self._read().get(key)
        return root if isinstance(root, dict) and root.get("ts") else None

    def remember(self, key: str, channel: str, channel_id: str, ts: str) -> dict:
        """Keep the first message of a thread; a root another process kept first wins."""
        with _file_lock(self._lock):
            data = self._read()
            if not isinstance(data.get(key), dict):
                data[key] = {"channel": channel, "channel_id": channel_id, "ts": ts, "at": utcnow()}
                _write_private(self.path, json.dumps(data, indent=1, sort_keys=True))
            return data[key]


class Outbox:
    """Notification payloads awaiting (re)delivery: state_dir/outbox/<id>.json, 0600, never a secret in them."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir) / OUTBOX_DIR

    def _path(self, nid: str) -> Path:
        if not _ID_RE.match(nid or ""):
            raise InvalidInput(f"notification id {nid!r} is malformed")
        return self.dir / f"{nid}.json"

    def put(self, doc: dict) -> None:
        _write_private(self._path(doc["id"]), json.dumps(doc, sort_keys=True))

    def get(self, nid: str) -> dict | None:
        try:
            return json.loads(self._path(nid).read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            raise StateFileError(f"{self._path(nid)}: not valid JSON") from None

    def remove(self, nid: str) -> None:
        self._path(nid).unlink(missing_ok=True)


def masked(payload: dict) -> dict:
    """The payload with every known secret value masked (a second line of defence after the builders)."""
    text = json.dumps(payload)
    clean = mask(text)
    return payload if clean == text else json.loads(clean)


def payload_digest(payload: dict) -> str:
    return sha256(canonical_json(payload).encode()).hexdigest()


_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


def _thread_lock(key: str) -> threading.Lock:
    with _thread_locks_guard:
        return _thread_locks.setdefault(key, threading.Lock())


def deliver(client: SlackClient, doc: dict, threads: ThreadStore,
            on_attempt: Callable[[int], None] | None = None) -> tuple[Delivery, str | None]:
    """Post one outbox notification, into its incident's thread once that has begun.

    Returns (delivery, thread_ts); raises SlackError (with `attempts`) when it could not be delivered.
    """
    message = SlackMessage(doc["channel"], doc["message"]["text"], doc["message"]["blocks"])
    key = doc["thread_key"]
    # One delivery per thread at a time, so that the first message's ts is known before any reply.
    with _thread_lock(key):
        root = threads.get(key)
        thread_ts = root["ts"] if root and root.get("channel") == doc["channel"] else None
        delivery = client.post(message, thread_ts=thread_ts, on_attempt=on_attempt)
        if thread_ts is None:
            threads.remember(key, doc["channel"], delivery.channel, delivery.ts)
    return delivery, thread_ts


# == notifications still in flight at exit ===========================================================
_unsettled: dict[str, Callable[[str], None]] = {}
_waiting: set["Notifier"] = set()  # notifiers with events queued that their worker has not started yet
_unsettled_lock = threading.Lock()
_exit_hook = False


def _install_exit_hook() -> None:
    global _exit_hook
    if not _exit_hook:
        atexit.register(settle_abandoned)
        _exit_hook = True


def _track(nid: str, fail: Callable[[str], None]) -> None:
    with _unsettled_lock:
        _unsettled[nid] = fail
        _install_exit_hook()


def _settle(nid: str) -> bool:
    """Claim the right to write a notification's final record (exactly one writer wins)."""
    with _unsettled_lock:
        return _unsettled.pop(nid, None) is not None


def settle_abandoned(reason: str = EXITED) -> int:
    """Record every notification of this process still in flight as failed (`crashcart notify retry` resends it).

    Runs at exit; returns how many were recorded.
    """
    with _unsettled_lock:
        items = list(_unsettled.items())
        _unsettled.clear()
        notifiers = list(_waiting)
        _waiting.clear()
    count = 0
    for nid, fail in items:
        try:
            fail(reason)
            count += 1
        except Exception as e:  # at exit there is nobody left to raise to
            log.error("could not record Slack notification %s as failed: %s", nid, mask(str(e)))
    for notifier in notifiers:
        count += notifier.abandon(reason)
    return count


# == the notifier of one run ==========================================================================
class Notifier:
    """Announces one run's events in Slack: outbox file, pending record, delivery, delivered/failed record.

    Runs on the run's ordered hook worker, so messages keep the order of the events; Slack being
    down, slow or misconfigured costs one warning line and failed records, never the run's time.
    """

    def __init__(self, runtime: Runtime, recorder: RunRecorder) -> None:
        self.runtime = runtime
        self.recorder = recorder
        self.channel = runtime.inventory.slack.channel
        self.outbox = Outbox(runtime.settings.state_dir)
        self.threads = ThreadStore(runtime.settings.state_dir)
        self._client: SlackClient | None = None
        self._warned = False
        self._queue_lock = threading.Lock()
        self._queued: list[Event] = []

    @staticmethod
    def wanted(event: Event) -> bool:
        # A dry run changes nothing; the channel hears about changes.
        return event.kind in NOTIFIED_KINDS and not (
            event.data.get("dry_run") and event.kind in ("run_started", "run_finished"))

    def queued(self, event: Event) -> None:
        """Hooks call this in the run's thread as an event is queued (memory only, no I/O)."""
        if self.wanted(event):
            with _unsettled_lock:
                with self._queue_lock:
                    self._queued.append(event)
                _waiting.add(self)
                _install_exit_hook()

    def _take(self, event: Event) -> bool:
        """Claim a queued event for delivery; False when exit already recorded it as undelivered."""
        with _unsettled_lock:
            with self._queue_lock:
                for i, e in enumerate(self._queued):
                    if e is event:
                        del self._queued[i]
                        if not self._queued:
                            _waiting.discard(self)
                        return True
        return False

    def handle(self, event: Event) -> None:
        """The hook: announce the event if it is one Slack hears about."""
        if not self.wanted(event) or not self._take(event):
            return
        message = build_message(event, self._context(event))
        self.send(event.kind, event.incident or event.run_id, message)

    def abandon(self, reason: str) -> int:
        """Record the events still queued (never started) as failed notifications, resendable from the outbox."""
        with self._queue_lock:
            events, self._queued = self._queued, []
        for event in events:
            try:
                doc = self._open(event.kind, event.incident or event.run_id, build_message(event, self._context(event)))
                self._failed(doc, 0, reason)
            except Exception as e:  # at exit there is nobody left to raise to
                log.error("could not record the Slack notification of %s as failed: %s", event.kind, mask(str(e)))
        return len(events)

    def _open(self, kind: str, thread_key: str, message: SlackMessage) -> dict:
        """Keep the payload in the outbox and record the notification as pending; returns the outbox doc."""
        payload = masked(message.payload())
        nid = uuid.uuid4().hex
        doc = {"id": nid, "run": self.recorder.run_id, "event": kind, "thread_key": thread_key,
               "channel": payload["channel"], "message": {"text": payload["text"], "blocks": payload["blocks"]},
               "created": utcnow()}
        self.outbox.put(doc)
        self.recorder.event("notification", {"id": nid, "status": "pending", "event": kind, "channel": doc["channel"],
                                             "payload_sha256": payload_digest(payload), "thread": thread_key})
        return doc

    def send(self, kind: str, thread_key: str, message: SlackMessage) -> str:
        """Record, keep and deliver one message; returns the notification id."""
        doc = self._open(kind, thread_key, message)
        nid = doc["id"]
        progress = {"attempts": 0}
        _track(nid, lambda reason: self._failed(doc, progress["attempts"], reason))
        try:
            delivery, thread_ts = deliver(self._slack(), doc, self.threads,
                                          on_attempt=lambda n: progress.__setitem__("attempts", n))
        except SlackError as e:
            if _settle(nid):
                self._failed(doc, getattr(e, "attempts", progress["attempts"]), str(e))
                self._warn(kind, str(e))
            return nid
        except Exception as e:  # a bug here must still close the record it opened
            if _settle(nid):
                self._failed(doc, progress["attempts"], mask(f"{type(e).__name__}: {e}"))
            raise
        if _settle(nid):
            self.outbox.remove(nid)
            self.recorder.event("notification", {"id": nid, "status": "delivered", "event": kind,
                                                 "channel": doc["channel"], "attempts": delivery.attempts,
                                                 "ts": delivery.ts, "thread_ts": thread_ts})
        return nid

    def _failed(self, doc: dict, attempts: int, error: str) -> None:
        self.recorder.event("notification", {"id": doc["id"], "status": "failed", "event": doc["event"],
                                             "channel": doc["channel"], "attempts": attempts, "error": mask(error)})

    def _warn(self, kind: str, error: str) -> None:
        if self._warned:
            log.info("Slack notification (%s) not delivered either: %s", kind, mask(error))
            return
        self._warned = True
        log.warning("Slack notification (%s) not delivered: %s; recorded as failed, `crashcart notify retry` "
                    "resends it (the run goes on)", kind, mask(error))

    def _slack(self) -> SlackClient:
        if self._client is None:
            self._client = SlackClient.from_runtime(self.runtime)
        return self._client

    def _context(self, event: Event) -> MessageContext:
        slack = self.runtime.settings.slack
        return MessageContext(self.channel, prefect_ui_base(self.runtime.settings.prefect_api_url),
                              self.recorder.flow_run_id or event.data.get("flow_run_id"),
                              self._checks(event), tuple(slack.approvers))

    def _checks(self, event: Event) -> tuple[dict, ...]:
        """The verification of the host an outcome event is about, read back from this run's evidence."""
        host = event.data.get("host")
        if event.kind not in HOST_OUTCOME_KINDS or not host:
            return ()
        since = datetime.fromtimestamp(self.recorder.started - 5, timezone.utc)
        checks: list[dict] = []
        try:
            for rec in iter_records(self.runtime.settings.evidence.dir, since=since, kind="step_result",
                                    run=event.run_id):
                if rec.body.get("host") == host:
                    checks += [c for c in rec.body.get("verification") or [] if isinstance(c, dict)]
        except CrashcartError as e:  # the message goes out without the details rather than not at all
            log.info("could not read the verification of %s for Slack: %s", host, e)
        return tuple(checks)


def register_notifications(hooks: Hooks, runtime: Runtime, recorder: RunRecorder) -> None:
    """Hang the Slack notifier on a run's hooks (flows.common.make_hooks calls this for every run).

    Nothing is registered when the settings name no Slack token: Slack is then not in use.
    """
    if not runtime.settings.slack.token:
        return
    notifier = Notifier(runtime, recorder)
    hooks.register("slack", notifier.handle, ordered=True, kinds=NOTIFIED_KINDS, on_queued=notifier.queued)


# == status and resending (crashcart notify) ==========================================================
def latest_notifications(evidence_dir: Path) -> list[dict]:
    """Every notification in the ledger with its latest status, oldest first."""
    entries: dict[str, dict] = {}
    for rec in iter_records(evidence_dir, kind="notification"):
        body = rec.body
        nid = str(body.get("id"))
        entry = entries.setdefault(nid, {"id": nid, "run": rec.run, "event": body.get("event"),
                                         "channel": body.get("channel"), "created": rec.ts})
        entry.update(status=body.get("status"), updated=rec.ts, attempts=body.get("attempts"),
                     error=body.get("error"), ts=body.get("ts"))
    return list(entries.values())


def resend_failed(runtime: Runtime, ledger=None) -> list[dict]:
    """Resend every notification whose latest status is failed and record each result in its run.

    Returns the records written (plus one line per payload missing from the outbox).
    """
    failed = [n for n in latest_notifications(runtime.settings.evidence.dir) if n["status"] == "failed"]
    if not failed:
        return []
    if ledger is None:
        from flows.common import open_ledger

        ledger = open_ledger(runtime)
    client = SlackClient.from_runtime(runtime)
    outbox, threads = Outbox(runtime.settings.state_dir), ThreadStore(runtime.settings.state_dir)
    results = []
    for n in failed:
        doc = outbox.get(n["id"])
        if doc is None:
            results.append({"id": n["id"], "status": "missing", "event": n["event"],
                            "error": f"payload not in {outbox.dir}: cannot resend"})
            continue
        try:
            delivery, thread_ts = deliver(client, doc, threads)
        except SlackError as e:
            body = {"id": doc["id"], "status": "failed", "event": doc["event"], "channel": doc["channel"],
                    "attempts": getattr(e, "attempts", 1), "error": mask(str(e)), "resent": True}
        else:
            body = {"id": doc["id"], "status": "delivered", "event": doc["event"], "channel": doc["channel"],
                    "attempts": delivery.attempts, "ts": delivery.ts, "thread_ts": thread_ts, "resent": True}
        ledger.append("notification", body, run=doc["run"])
        if body["status"] == "delivered":
            outbox.remove(doc["id"])
        results.append(body)
    return results


# == approvals of production runs =====================================================================
_approval_decision: type | None = None


def _approval_decision_type() -> type:
    """ApprovalDecision, made on first use: importing Prefect fixes its settings (PREFECT_API_URL) for the
    process, so this module (imported by every run's hooks and by unit tests) does not import it."""
    global _approval_decision
    if _approval_decision is None:
        from prefect.input import RunInput

        class ApprovalDecision(RunInput):
            """What resumes a paused production run: the decision and the Slack user who made it."""

            approved: bool
            approver: str
            comment: str = ""

        _approval_decision = ApprovalDecision
    return _approval_decision


def __getattr__(name: str):
    if name == "ApprovalDecision":  # `from flows.notify import ApprovalDecision` works as for a plain class
        return _approval_decision_type()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class Approval:
    """The outcome of an approval gate; `run_id` is its evidence run."""

    decision: str  # approved | denied | timed_out | break_glass
    approver: str | None
    run_id: str
    at: str
    review_owed: bool = False

    @property
    def allows(self) -> bool:
        return self.decision in ("approved", "break_glass")

    def summary(self) -> str:
        return {"approved": f"approved by {self.approver}", "denied": f"denied by {self.approver}",
                "timed_out": "no approval decision in time",
                "break_glass": "break glass: approval skipped, review owed"}[self.decision]

    def as_params(self) -> dict:
        """What the containment run records about its approval (in its parameters)."""
        return {"decision": self.decision, "approver": self.approver, "approval_run": self.run_id,
                "review_owed": self.review_owed}


def approval_required(runtime: Runtime, hosts: list[Host], dry_run: bool) -> bool:
    """Whether a run on `hosts` must wait for an approver: production targets with slack.require_approval on."""
    return runtime.settings.slack.require_approval and not dry_run and any(h.is_production for h in hosts)


def request_approval(runtime: Runtime, hosts: list[Host], *, runbook_name: str, params: dict,
                     incident: str | None, triggered_by: str | None, break_glass: bool) -> Approval:
    """Hold a production run until an approver decides in Slack (or skip that, recorded, with break glass).

    Runs inside the flow before anything is applied. The gate is its own evidence run (kind
    `approval`): approval_requested, then approval {approver, decision, at} (or review_owed for
    break glass); refusals of users outside slack.approvers are recorded too. The flow pauses with
    Prefect's pause_flow_run(wait_for_input=ApprovalDecision); the Slack app resumes it.
    """
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run

    from flows.common import current_flow_run_id, make_hooks, open_ledger, runbook, trigger_of

    slack = runtime.settings.slack
    book = runbook(runbook_name)
    trigger = trigger_of(triggered_by)
    production = [h.name for h in hosts if h.is_production]
    names = tuple(h.name for h in hosts)
    flow_run_id = current_flow_run_id()
    recorder = RunRecorder(
        open_ledger(runtime), kind="approval", runbook=book.identity(), params=params,
        hosts=[{"name": h.name, "environment": h.environment, "address": h.address} for h in hosts],
        trigger=trigger, hipaa=list(book.hipaa), flow_run_id=flow_run_id, incident=incident,
    )
    requested_by = f"{trigger.kind}:{trigger.who}"
    with recorder:
        hooks = make_hooks(runtime, recorder)
        base = {"flow_run_id": flow_run_id, "reason": params.get("reason"), "requested_by": requested_by}
        try:
            if break_glass:
                at = utcnow()
                recorder.event("approval", {"decision": "break_glass", "approver": None, "requested_by": requested_by,
                                            "hosts": production, "review_owed": True, "at": at})
                hooks.emit(Event("approval_requested", recorder.run_id, book.name, "break_glass",
                                 f"break glass on {', '.join(production)}", names, incident, base))
                recorder.finish("succeeded", "break glass: approval skipped during a declared emergency; review owed")
                return Approval("break_glass", None, recorder.run_id, at, review_owed=True)
            if not slack.approvers:
                raise ConfirmationRefused("slack.require_approval is on but slack.approvers is empty: nobody could "
                                          "approve; add the on-call group's Slack user ids, or pass --break-glass")
            if not flow_run_id:
                raise ConfirmationRefused("approval is required for production hosts, but this is not a Prefect "
                                          "flow run that can wait for it")
            recorder.event("approval_requested", {"hosts": production, "approvers": list(slack.approvers),
                                                  "flow_run_id": flow_run_id, "timeout": slack.approval_timeout,
                                                  "requested_by": requested_by, "at": utcnow()})
            hooks.emit(Event("approval_requested", recorder.run_id, book.name, "pending",
                             f"approval needed for {', '.join(production)}", names, incident,
                             {**base, "approvers": list(slack.approvers), "timeout": slack.approval_timeout}))
            decision = None
            deadline = time.monotonic() + slack.approval_timeout
            for attempt in range(1, 100):
                remaining = math.ceil(deadline - time.monotonic())
                if remaining <= 0:
                    break
                try:
                    # poll_interval 1: the run goes on about a second after the click, not ten.
                    answer = pause_flow_run(wait_for_input=_approval_decision_type(), timeout=remaining, poll_interval=1,
                                            key=f"approval-{recorder.run_id}-{attempt}")
                except FlowPauseTimeout:
                    break
                if answer.approver in slack.approvers:
                    decision = answer
                    break
                # Someone resumed the run (the Prefect UI or API) as a user who may not decide: record, wait on.
                recorder.event("approval_refused", {"user": clip(str(answer.approver), 64), "via": "prefect",
                                                    "reason": "not in slack.approvers", "at": utcnow()})
            at = utcnow()
            if decision is None:
                outcome = Approval("timed_out", None, recorder.run_id, at)
            else:
                outcome = Approval("approved" if decision.approved else "denied", decision.approver, recorder.run_id, at)
            recorder.event("approval", {"decision": outcome.decision, "approver": outcome.approver, "at": at,
                                        "comment": clip(decision.comment, 500) if decision else "",
                                        "hosts": production})
            hooks.emit(Event("approval_requested", recorder.run_id, book.name, outcome.decision, outcome.summary(),
                             names, incident, {**base, "approver": outcome.approver}))
            recorder.finish("succeeded" if outcome.allows else "failed", outcome.summary())
            return outcome
        finally:
            hooks.close()
