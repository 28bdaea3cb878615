"""A local stand-in for the Slack Web API methods crashcart uses, checking what it receives as Slack does.

    python deploy/lab/slack_api.py --port 8765 --token-file LAB/slack/token --log LAB/slack/messages.jsonl

Serves POST /api/{chat.postMessage,chat.update,chat.postEphemeral,auth.test} (form or JSON bodies,
as slack_sdk sends them) with the bot token checked against --token-file; keeps every accepted
message (GET /_messages, and one JSON line each in --log); answers faults on demand through
POST /_control {"mode": "ok"|"500"|"429"|"hang", "retry_after": 1, "count": N, "hang_seconds": 20};
GET /_requests lists the API calls it saw (method, HTTP status, error; never a header); GET /health.
Standard library only: the lab starts it with the same interpreter as everything else.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

# Slack's documented limits (api.slack.com/reference/block-kit, chat.postMessage).
TEXT_MAX = 40000
BLOCKS_MAX = 50
SECTION_TEXT_MAX = 3000
SECTION_FIELDS_MAX = 10
FIELD_TEXT_MAX = 2000
HEADER_TEXT_MAX = 150
CONTEXT_ELEMENTS_MAX = 10
ACTIONS_ELEMENTS_MAX = 25
BUTTON_TEXT_MAX = 75
ACTION_ID_MAX = 255
BLOCK_ID_MAX = 255
BUTTON_VALUE_MAX = 2000
URL_MAX = 3000
MAX_BODY = 1 << 20

METHODS = ("chat.postMessage", "chat.update", "chat.postEphemeral", "auth.test")
CHANNEL_ID_RE = re.compile(r"^[CGD][A-Z0-9]{8,}$")
TEXT_TYPES = ("plain_text", "mrkdwn")


# -- validation (pure: also used by the unit tests on crashcart's message builders) -----------------
class Invalid(Exception):
    """A request Slack would refuse: `error` is Slack's error code, `detail` its explanation."""

    def __init__(self, error: str, detail: str = "") -> None:
        super().__init__(error)
        self.error = error
        self.detail = detail


def _text_object(obj, where: str, limit: int, *, plain_only: bool = False) -> None:
    if not isinstance(obj, dict) or obj.get("type") not in (("plain_text",) if plain_only else TEXT_TYPES):
        kinds = "plain_text" if plain_only else "plain_text or mrkdwn"
        raise Invalid("invalid_blocks", f"must be a {kinds} text object [json-pointer:{where}]")
    text = obj.get("text")
    if not isinstance(text, str) or not text:
        raise Invalid("invalid_blocks", f"must be a non-empty string [json-pointer:{where}/text]")
    if len(text) > limit:
        raise Invalid("invalid_blocks", f"must be less than {limit + 1} characters [json-pointer:{where}/text]")


def _button(el, where: str) -> None:
    _text_object(el.get("text"), f"{where}/text", BUTTON_TEXT_MAX, plain_only=True)
    action_id = el.get("action_id")
    if action_id is not None and (not isinstance(action_id, str) or len(action_id) > ACTION_ID_MAX):
        raise Invalid("invalid_blocks", f"must be less than {ACTION_ID_MAX + 1} characters [json-pointer:{where}/action_id]")
    value = el.get("value")
    if value is not None and (not isinstance(value, str) or len(value) > BUTTON_VALUE_MAX):
        raise Invalid("invalid_blocks", f"must be less than {BUTTON_VALUE_MAX + 1} characters [json-pointer:{where}/value]")
    url = el.get("url")
    if url is not None and (not isinstance(url, str) or len(url) > URL_MAX):
        raise Invalid("invalid_blocks", f"must be less than {URL_MAX + 1} characters [json-pointer:{where}/url]")
    if el.get("style") not in (None, "primary", "danger"):
        raise Invalid("invalid_blocks", f"must be primary or danger [json-pointer:{where}/style]")


def validate_blocks(blocks) -> None:
    """Raise Invalid as Slack would for blocks breaking the documented limits."""
    if not isinstance(blocks, list):
        raise Invalid("invalid_blocks_format", "blocks must be an array")
    if len(blocks) > BLOCKS_MAX:
        raise Invalid("invalid_blocks", f"no more than {BLOCKS_MAX} items allowed [json-pointer:/blocks]")
    action_ids: set[str] = set()
    for i, block in enumerate(blocks):
        where = f"/blocks/{i}"
        if not isinstance(block, dict):
            raise Invalid("invalid_blocks", f"must be an object [json-pointer:{where}]")
        kind = block.get("type")
        block_id = block.get("block_id")
        if block_id is not None and (not isinstance(block_id, str) or len(block_id) > BLOCK_ID_MAX):
            raise Invalid("invalid_blocks", f"must be less than {BLOCK_ID_MAX + 1} characters [json-pointer:{where}/block_id]")
        if kind == "section":
            if "text" not in block and "fields" not in block:
                raise Invalid("invalid_blocks", f"must provide text or fields [json-pointer:{where}]")
            if "text" in block:
                _text_object(block["text"], f"{where}/text", SECTION_TEXT_MAX)
            fields = block.get("fields", [])
            if not isinstance(fields, list) or len(fields) > SECTION_FIELDS_MAX:
                raise Invalid("invalid_blocks", f"no more than {SECTION_FIELDS_MAX} items allowed [json-pointer:{where}/fields]")
            for j, f in enumerate(fields):
                _text_object(f, f"{where}/fields/{j}", FIELD_TEXT_MAX)
            accessory = block.get("accessory")
            if accessory is not None:
                if not isinstance(accessory, dict) or accessory.get("type") != "button":
                    raise Invalid("invalid_blocks", f"unsupported accessory [json-pointer:{where}/accessory]")
                _button(accessory, f"{where}/accessory")
        elif kind == "header":
            _text_object(block.get("text"), f"{where}/text", HEADER_TEXT_MAX, plain_only=True)
        elif kind == "context":
            elements = block.get("elements")
            if not isinstance(elements, list) or not 1 <= len(elements) <= CONTEXT_ELEMENTS_MAX:
                raise Invalid("invalid_blocks", f"must have 1 to {CONTEXT_ELEMENTS_MAX} items [json-pointer:{where}/elements]")
            for j, el in enumerate(elements):
                _text_object(el, f"{where}/elements/{j}", SECTION_TEXT_MAX)
        elif kind == "actions":
            elements = block.get("elements")
            if not isinstance(elements, list) or not 1 <= len(elements) <= ACTIONS_ELEMENTS_MAX:
                raise Invalid("invalid_blocks", f"must have 1 to {ACTIONS_ELEMENTS_MAX} items [json-pointer:{where}/elements]")
            for j, el in enumerate(elements):
                if not isinstance(el, dict) or el.get("type") != "button":
                    raise Invalid("invalid_blocks", f"unsupported element [json-pointer:{where}/elements/{j}]")
                _button(el, f"{where}/elements/{j}")
                if el.get("action_id") in action_ids:
                    raise Invalid("invalid_blocks", f"action_id already exists [json-pointer:{where}/elements/{j}/action_id]")
                if el.get("action_id"):
                    action_ids.add(el["action_id"])
        elif kind == "divider":
            pass
        else:
            raise Invalid("invalid_blocks", f"unsupported type {kind!r} [json-pointer:{where}/type]")


def validate_message(method: str, args: dict) -> None:
    """Raise Invalid as Slack would for a chat.* request's arguments."""
    if not args.get("channel"):
        raise Invalid("channel_not_found", "channel is required")
    text = args.get("text")
    blocks = args.get("blocks")
    if text is not None and not isinstance(text, str):
        raise Invalid("invalid_arguments", "text must be a string")
    if text and len(text) > TEXT_MAX:
        raise Invalid("msg_too_long", f"text must be at most {TEXT_MAX} characters")
    if blocks is not None:
        validate_blocks(blocks)
    if not text and not blocks:
        raise Invalid("no_text", "text or blocks is required")
    if method == "chat.update" and not args.get("ts"):
        raise Invalid("message_not_found", "ts is required")
    if method == "chat.postEphemeral" and not args.get("user"):
        raise Invalid("user_not_found", "user is required")


def channel_id(channel: str) -> str:
    """The id Slack would answer for a channel given by name (stable), or the id itself."""
    if CHANNEL_ID_RE.match(channel):
        return channel
    return "C" + hashlib.sha256(channel.lstrip("#").encode()).hexdigest()[:10].upper()


# -- the server ---------------------------------------------------------------------------------------
class SlackStandIn:
    """The state behind the HTTP handler: accepted messages, the fault mode, the request log."""

    def __init__(self, token_file: Path, log: Path | None) -> None:
        self.token_file = token_file
        self.log = log
        self.lock = threading.Lock()
        self.messages: list[dict] = []
        self.requests: list[dict] = []
        self.fault = {"mode": "ok", "count": None, "retry_after": 1, "hang_seconds": 20}
        self._seq = 0
        if log and log.exists():  # keep ts values valid across restarts (threads refer to them)
            for line in log.read_text().splitlines():
                try:
                    self.messages.append(json.loads(line))
                except ValueError:
                    continue
            self._seq = len(self.messages)

    def token_ok(self, header: str | None) -> str | None:
        """None when the bearer token matches the token file, else Slack's error code."""
        if not header or not header.startswith("Bearer "):
            return "not_authed"
        try:
            expected = self.token_file.read_text().strip()
        except OSError:
            return "invalid_auth"
        import hmac

        return None if expected and hmac.compare_digest(header[7:].strip(), expected) else "invalid_auth"

    def take_fault(self) -> dict | None:
        with self.lock:
            fault = dict(self.fault)
            if fault["mode"] == "ok":
                return None
            if self.fault["count"] is not None:
                self.fault["count"] -= 1
                if self.fault["count"] <= 0:
                    self.fault.update(mode="ok", count=None)
            return fault

    def next_ts(self) -> str:
        with self.lock:
            self._seq += 1
            return f"{int(time.time())}.{self._seq:06d}"

    def keep(self, record: dict) -> None:
        with self.lock:
            self.messages.append(record)
            if self.log:
                with open(self.log, "a") as f:
                    f.write(json.dumps(record, sort_keys=True) + "\n")

    def find(self, channel: str, ts: str) -> dict | None:
        with self.lock:
            return next((m for m in self.messages if m["channel"] == channel and m["ts"] == ts
                         and m["method"] == "chat.postMessage"), None)

    def call(self, method: str, args: dict) -> dict:
        """Carry out one API method on already-authenticated arguments."""
        if method == "auth.test":
            return {"ok": True, "url": "https://crashcart-lab.slack.com/", "team": "crashcart lab", "user": "crashcart",
                    "team_id": "T0CRASHLAB", "user_id": "U0CRASHCART", "bot_id": "B0CRASHCART", "is_enterprise_install": False}
        validate_message(method, args)
        channel = str(args["channel"])
        if method == "chat.update":
            if not CHANNEL_ID_RE.match(channel):
                raise Invalid("channel_not_found", "chat.update takes a channel id, not a name")
            original = self.find(channel, str(args["ts"]))
            if original is None:
                raise Invalid("message_not_found", f"no message {args['ts']} in {channel}")
            record = {"method": method, "channel": channel, "ts": original["ts"], "thread_ts": original.get("thread_ts"),
                      "text": args.get("text"), "blocks": args.get("blocks"), "received": time.time()}
            self.keep(record)
            return {"ok": True, "channel": channel, "ts": original["ts"], "text": args.get("text") or "",
                    "message": {"text": args.get("text") or "", "blocks": args.get("blocks") or []}}
        cid = channel_id(channel)
        ts = self.next_ts()
        record = {"method": method, "channel": cid, "channel_name": channel, "ts": ts,
                  "thread_ts": args.get("thread_ts"), "user": args.get("user"), "text": args.get("text"),
                  "blocks": args.get("blocks"), "received": time.time()}
        self.keep(record)
        if method == "chat.postEphemeral":
            return {"ok": True, "message_ts": ts}
        return {"ok": True, "channel": cid, "ts": ts,
                "message": {"type": "message", "text": args.get("text") or "", "ts": ts, "bot_id": "B0CRASHCART",
                            "blocks": args.get("blocks") or [], **({"thread_ts": args["thread_ts"]} if args.get("thread_ts") else {})}}


def parse_body(content_type: str, raw: bytes) -> dict:
    """The arguments of a Web API call, from a JSON or form body (form `blocks` arrive as JSON text)."""
    if "application/json" in content_type:
        data = json.loads(raw.decode() or "{}")
        if not isinstance(data, dict):
            raise Invalid("invalid_json", "body must be a JSON object")
        return data
    args = {k: v[-1] for k, v in parse_qs(raw.decode(), keep_blank_values=True).items()}
    if "blocks" in args:
        try:
            args["blocks"] = json.loads(args["blocks"])
        except ValueError:
            raise Invalid("invalid_blocks_format", "blocks must be a JSON array") from None
    return args


def make_handler(state: SlackStandIn):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "crashcart-slack-standin"

        def log_message(self, fmt, *args):  # the request line only; never headers (they carry the token)
            sys.stderr.write("%s %s\n" % (self.log_date_time_string(), fmt % args))

        def _send(self, status: int, body, headers: dict | None = None, content_type: str = "application/json") -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", f"{content_type}; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (its timeout); nothing to tell it

        def _read(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                raise Invalid("request_too_large", f"body over {MAX_BODY} bytes")
            return self.rfile.read(length) if length else b""

        def do_GET(self):
            path = urlsplit(self.path).path
            if path == "/health":
                return self._send(200, {"ok": True})
            if path == "/_messages":
                with state.lock:
                    return self._send(200, list(state.messages))
            if path == "/_requests":
                with state.lock:
                    return self._send(200, list(state.requests))
            if path.startswith("/api/"):
                return self._api(path[5:], b"", "application/x-www-form-urlencoded")
            return self._send(404, {"ok": False, "error": "not_found"})

        def do_POST(self):
            path = urlsplit(self.path).path
            try:
                raw = self._read()
            except Invalid as e:
                return self._send(413, {"ok": False, "error": e.error})
            if path == "/_control":
                try:
                    control = json.loads(raw.decode() or "{}")
                    mode = str(control.get("mode", "ok"))
                    if mode not in ("ok", "500", "429", "hang"):
                        raise ValueError(mode)
                    count = control.get("count")
                    with state.lock:
                        state.fault = {"mode": mode, "count": int(count) if count is not None else None,
                                       "retry_after": max(0, int(control.get("retry_after", 1))),
                                       "hang_seconds": float(control.get("hang_seconds", 20))}
                        return self._send(200, {"ok": True, "fault": state.fault})
                except (ValueError, TypeError):
                    return self._send(400, {"ok": False, "error": "invalid_control"})
            if path.startswith("/api/"):
                return self._api(path[5:], raw, self.headers.get("Content-Type", ""))
            return self._send(404, {"ok": False, "error": "not_found"})

        def _api(self, method: str, raw: bytes, content_type: str) -> None:
            def seen(status: int, error: str | None) -> None:
                with state.lock:
                    state.requests.append({"method": method, "status": status, "error": error, "at": time.time()})

            if method not in METHODS:
                seen(404, "unknown_method")
                return self._send(404, {"ok": False, "error": "unknown_method"})
            fault = state.take_fault()
            if fault and fault["mode"] == "hang":
                seen(0, "hang")
                time.sleep(fault["hang_seconds"])
                return self._send(200, {"ok": False, "error": "fatal_error"})
            if fault and fault["mode"] == "500":
                seen(500, "internal_error")
                # Real Slack outages answer an HTML page, not JSON.
                return self._send(500, b"<html><body>Internal Server Error</body></html>", content_type="text/html")
            if fault and fault["mode"] == "429":
                seen(429, "ratelimited")
                return self._send(429, {"ok": False, "error": "ratelimited"},
                                  headers={"Retry-After": str(int(fault["retry_after"]))})
            problem = state.token_ok(self.headers.get("Authorization"))
            if problem:
                seen(200, problem)
                return self._send(200, {"ok": False, "error": problem})
            try:
                args = parse_body(content_type, raw)
                result = state.call(method, args)
            except Invalid as e:
                seen(200, e.error)
                body = {"ok": False, "error": e.error}
                if e.detail:
                    body["errors"] = [e.detail]
                    body["response_metadata"] = {"messages": [f"[ERROR] {e.detail}"]}
                return self._send(200, body)
            except (ValueError, UnicodeDecodeError):
                seen(200, "invalid_json")
                return self._send(200, {"ok": False, "error": "invalid_json"})
            seen(200, None)
            return self._send(200, result)

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--token-file", type=Path, required=True, help="the bot token requests must carry")
    parser.add_argument("--log", type=Path, default=None, help="append every accepted message here (JSON lines)")
    args = parser.parse_args(argv)
    state = SlackStandIn(args.token_file, args.log)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(state))
    server.daemon_threads = True
    print(f"slack stand-in on http://{args.host}:{server.server_address[1]}/api/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
