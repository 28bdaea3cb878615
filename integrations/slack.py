"""The one adapter to the Slack Web API (slack_sdk): Block Kit pieces within Slack's limits, bounded retries, typed errors."""

from __future__ import annotations

import json
import logging
import random
import socket
import time
import urllib.error
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slack_sdk import WebClient

from crashcart.errors import (
    CrashcartError,
    SlackAuthFailed,
    SlackError,
    SlackNotConfigured,
    SlackRateLimited,
    SlackRequestRejected,
    SlackUnavailable,
)
from crashcart.secrets import Secret, mask

log = logging.getLogger("crashcart.slack")

# Slack's documented limits (api.slack.com/reference/block-kit/blocks, chat.postMessage).
TEXT_MAX = 40000
BLOCKS_MAX = 50
SECTION_TEXT_MAX = 3000
FIELD_TEXT_MAX = 2000
SECTION_FIELDS_MAX = 10
HEADER_TEXT_MAX = 150
CONTEXT_ELEMENTS_MAX = 10
BUTTON_TEXT_MAX = 75
ACTION_ID_MAX = 255
BUTTON_VALUE_MAX = 2000

AUTH_ERRORS = frozenset({"invalid_auth", "not_authed", "account_inactive", "token_revoked", "token_expired",
                         "no_permission", "missing_scope", "not_allowed_token_type", "invalid_token"})
TRANSIENT_ERRORS = frozenset({"fatal_error", "internal_error", "service_unavailable", "request_timeout",
                              "ratelimited", "rate_limited"})
_SDK_LOG = logging.getLogger("crashcart.slack.sdk")
_SDK_LOG.setLevel(logging.CRITICAL)
MAX_RETRY_AFTER = 60.0  # a longer Retry-After is honoured only up to this, then the attempt counts as failed
MAX_BACKOFF = 8.0


# -- Block Kit pieces (pure) ------------------------------------------------------------------------
def clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, ending with an ellipsis when it was cut."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def escape(text: str) -> str:
    """Text safe inside mrkdwn: Slack's control characters escaped, so a host's output cannot @channel."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def plain(text: str, limit: int = SECTION_TEXT_MAX) -> dict:
    return {"type": "plain_text", "text": clip(text or "-", limit), "emoji": True}


def mrkdwn(text: str, limit: int = SECTION_TEXT_MAX) -> dict:
    return {"type": "mrkdwn", "text": clip(text or "-", limit)}


def header(text: str) -> dict:
    """A header block (plain text, at most 150 characters)."""
    return {"type": "header", "text": plain(text, HEADER_TEXT_MAX)}


def section(text: str | None = None, fields: list[tuple[str, str]] | tuple = ()) -> dict:
    """A section of mrkdwn text and/or label/value fields (at most 10; each already escaped by the caller)."""
    block: dict[str, Any] = {"type": "section"}
    if text:
        block["text"] = mrkdwn(text, SECTION_TEXT_MAX)
    if fields:
        block["fields"] = [mrkdwn(f"*{label}*\n{value}", FIELD_TEXT_MAX) for label, value in list(fields)[:SECTION_FIELDS_MAX]]
    if "text" not in block and "fields" not in block:
        block["text"] = mrkdwn("-")
    return block


def context(*texts: str) -> dict:
    """A context block: small grey mrkdwn lines (at most 10)."""
    return {"type": "context", "elements": [mrkdwn(t) for t in texts if t][:CONTEXT_ELEMENTS_MAX] or [mrkdwn("-")]}


def divider() -> dict:
    return {"type": "divider"}


def button(text: str, action_id: str, value: str, style: str | None = None) -> dict:
    """A button; its value is data for the app, so one that does not fit is an error, never cut."""
    if len(action_id) > ACTION_ID_MAX or len(value) > BUTTON_VALUE_MAX:
        raise ValueError(f"button {action_id[:40]!r}: action_id or value over Slack's limit")
    el = {"type": "button", "text": plain(text, BUTTON_TEXT_MAX), "action_id": action_id, "value": value}
    if style:
        el["style"] = style
    return el


def actions(*elements: dict, block_id: str | None = None) -> dict:
    block: dict[str, Any] = {"type": "actions", "elements": list(elements)}
    if block_id:
        block["block_id"] = block_id
    return block


@dataclass(frozen=True)
class SlackMessage:
    """One message: the fallback text (notifications, screen readers) and its Block Kit blocks."""

    channel: str
    text: str
    blocks: list[dict] = field(default_factory=list)

    def payload(self) -> dict:
        """The chat.postMessage arguments, within Slack's limits."""
        return {"channel": self.channel, "text": clip(self.text, TEXT_MAX), "blocks": list(self.blocks)[:BLOCKS_MAX]}


@dataclass(frozen=True)
class Delivery:
    """What Slack answered to a post or update, and how many requests it took."""

    channel: str
    ts: str
    attempts: int


# -- the client ---------------------------------------------------------------------------------------
def read_slack_secret(runtime, ref: str | None, setting: str) -> Secret:
    """The Slack bot token or signing secret named by a settings reference, read from Vault.

    Raises SlackNotConfigured (naming the reference, never a value) when it is unset or unreadable.
    """
    if not ref:
        raise SlackNotConfigured(f"slack.{setting} is not set: name it as a vault: reference in the settings")
    from integrations.vault import Vault

    try:
        return Vault.from_runtime(runtime).read_secret(ref)
    except CrashcartError as e:  # VaultError, or a malformed reference (InvalidInput)
        raise SlackNotConfigured(f"the Slack {setting.replace('_', ' ')} ({ref}) cannot be read: {mask(str(e))}") from e


class SlackClient:
    """Calls the Slack Web API with the bot token; every failure leaves as a SlackError subclass.

    Each request is bounded by `timeout`. Rate limits (429, honouring Retry-After), server errors,
    timeouts and refused connections are retried up to `retries` times with backoff; other refusals
    (bad token, invalid blocks) are not. A raised SlackError carries `attempts`.
    """

    def __init__(self, token: Secret, *, base_url: str, timeout: float, retries: int,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not isinstance(token, Secret):
            raise TypeError("the Slack token must be a Secret")
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.timeout = float(timeout)
        self.retries = int(retries)
        self._sleep = sleep
        # slack_sdk's own retry handlers are off: attempts, waits and their bound are decided here. Its
        # logger says ERROR for every failed attempt; failures leave here as typed errors instead, and
        # the notifier reports them once per run. Imported here: slack_sdk costs ~0.2 s, which a
        # containment run should not pay before its first step (deliveries run in the background).
        from slack_sdk import WebClient

        self._web = WebClient(token=token.reveal(), base_url=self.base_url, timeout=self.timeout, retry_handlers=[],
                              logger=_SDK_LOG)

    @classmethod
    def from_runtime(cls, runtime) -> "SlackClient":
        """The client for the settings' Slack, with the bot token read from Vault."""
        slack = runtime.settings.slack
        token = read_slack_secret(runtime, slack.token, "token")
        return cls(token, base_url=slack.base_url, timeout=slack.timeout, retries=slack.retries)

    def __repr__(self) -> str:
        return f"SlackClient({self.base_url})"

    @property
    def host(self) -> str:
        return urlsplit(self.base_url).netloc or self.base_url

    def web_client(self) -> WebClient:
        """The slack_sdk client (for the Bolt app, which needs one of its own kind)."""
        return self._web

    # -- methods ---------------------------------------------------------------------------------
    def post(self, message: SlackMessage, thread_ts: str | None = None,
             on_attempt: Callable[[int], None] | None = None) -> Delivery:
        """chat.postMessage, into `thread_ts`'s thread when given."""
        args = message.payload()
        if thread_ts:
            args["thread_ts"] = thread_ts
        data, attempts = self.call("chat.postMessage", args, on_attempt)
        return Delivery(str(data.get("channel") or message.channel), str(data.get("ts")), attempts)

    def update(self, channel: str, ts: str, text: str, blocks: list[dict]) -> Delivery:
        """chat.update of a message we posted (channel is the id Slack answered)."""
        data, attempts = self.call("chat.update", {"channel": channel, "ts": ts, "text": clip(text, TEXT_MAX),
                                                   "blocks": list(blocks)[:BLOCKS_MAX]})
        return Delivery(channel, str(data.get("ts") or ts), attempts)

    def post_ephemeral(self, channel: str, user: str, text: str, blocks: list[dict] | None = None) -> Delivery:
        """chat.postEphemeral: a message only `user` sees."""
        args: dict[str, Any] = {"channel": channel, "user": user, "text": clip(text, TEXT_MAX)}
        if blocks:
            args["blocks"] = blocks
        data, attempts = self.call("chat.postEphemeral", args)
        return Delivery(channel, str(data.get("message_ts") or ""), attempts)

    def auth_test(self) -> dict:
        """auth.test: who the token is (team, bot user)."""
        return self.call("auth.test", {})[0]

    # -- plumbing --------------------------------------------------------------------------------
    def call(self, method: str, args: dict, on_attempt: Callable[[int], None] | None = None) -> tuple[dict, int]:
        """One Web API method with bounded retries; returns (Slack's answer, attempts).

        `on_attempt(n)` is called before each request (so a caller can say how far it got).
        """
        attempts = 0
        while True:
            attempts += 1
            if on_attempt:
                on_attempt(attempts)
            try:
                return self._once(method, args), attempts
            except SlackUnavailable as e:
                if attempts > self.retries:
                    e.attempts = attempts
                    raise
                wait = self._wait(e, attempts)
                log.debug("Slack %s attempt %d failed (%s); retrying in %.1fs", method, attempts, e, wait)
                self._sleep(wait)
            except SlackError as e:
                e.attempts = attempts
                raise

    @staticmethod
    def _wait(error: SlackUnavailable, attempts: int) -> float:
        if isinstance(error, SlackRateLimited):
            return min(max(error.retry_after, 0.0), MAX_RETRY_AFTER)
        # Jitter keeps many runs that failed together from hammering Slack in step.
        return min(MAX_BACKOFF, 0.5 * 2 ** (attempts - 1)) * random.uniform(0.75, 1.0)

    def _once(self, method: str, args: dict) -> dict:
        """One request, with every slack_sdk/urllib failure translated here."""
        from slack_sdk.errors import SlackApiError, SlackClientError

        try:
            if method == "auth.test":
                response = self._web.api_call(method)
            else:
                response = self._web.api_call(method, json=args)
            return dict(response.data) if isinstance(response.data, dict) else {}
        except SlackApiError as e:
            raise self._translate(method, e.response) from e
        except (socket.timeout, TimeoutError) as e:
            raise SlackUnavailable(f"Slack ({self.host}) did not answer {method} within {self.timeout:g}s") from e
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, (socket.timeout, TimeoutError)):
                raise SlackUnavailable(f"Slack ({self.host}) did not answer {method} within {self.timeout:g}s") from e
            raise SlackUnavailable(f"Slack ({self.host}) is unreachable for {method}: {mask(str(reason))}") from e
        except json.JSONDecodeError as e:
            raise SlackUnavailable(f"Slack ({self.host}) answered {method} with something other than JSON") from e
        except (ConnectionError, OSError) as e:
            raise SlackUnavailable(f"Slack ({self.host}) connection failed for {method}: {type(e).__name__}") from e
        except SlackClientError as e:
            raise SlackError(f"slack_sdk could not call {method}: {mask(str(e))[:200]}") from e

    def _translate(self, method: str, response) -> SlackError:
        status = int(getattr(response, "status_code", 0) or 0)
        data = response.data if isinstance(getattr(response, "data", None), dict) else {}
        error = str(data.get("error") or f"HTTP {status}")
        headers = {str(k).lower(): v for k, v in (getattr(response, "headers", None) or {}).items()}
        if status == 429 or error in ("ratelimited", "rate_limited"):
            raw = headers.get("retry-after")
            raw = raw[0] if isinstance(raw, list) and raw else raw
            try:
                retry_after = float(raw) if raw is not None else 1.0
            except (TypeError, ValueError):
                retry_after = 1.0
            return SlackRateLimited(f"Slack rate-limited {method} (HTTP 429, Retry-After {retry_after:g}s)",
                                    retry_after=retry_after)
        if status >= 500:
            return SlackUnavailable(f"Slack ({self.host}) answered HTTP {status} to {method}")
        if error in AUTH_ERRORS:
            return SlackAuthFailed(f"Slack refused the bot token for {method} ({error}): check slack.token's value in Vault")
        if error in TRANSIENT_ERRORS:
            return SlackUnavailable(f"Slack ({self.host}) could not serve {method} ({error})")
        detail = "; ".join(str(d) for d in (data.get("errors") or []))[:300]
        return SlackRequestRejected(f"Slack refused {method}: {error}" + (f" ({mask(detail)})" if detail else ""))
