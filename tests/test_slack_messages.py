"""Slack message builders (pure) and the Slack stand-in's validation against Slack's documented limits."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from crashcart.hooks import Event
from flows.notify import (
    APPROVE_ACTION,
    DENY_ACTION,
    BUILDERS,
    MessageContext,
    approval_decided,
    approval_value,
    build_message,
    mention,
    parse_approval_value,
    prefect_ui_base,
)
from crashcart.errors import InvalidInput
from integrations.slack import SlackMessage, button

ROOT = Path(__file__).resolve().parents[1]
RUN = "6ebbb036-8cd4-4e89-a741-eda6d1541af3"
FLOW_RUN = "a936d36a-2ce4-4ad4-a637-cff9d47db4d3"


def _standin_module():
    spec = importlib.util.spec_from_file_location("slack_standin", ROOT / "deploy" / "lab" / "slack_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


standin = _standin_module()
CTX = MessageContext("#incident-response", prefect_ui_base("http://127.0.0.1:4200/api"), FLOW_RUN,
                     ({"check": "probe.peer_blocked", "status": "passed", "summary": "peer-1 cannot reach web-1 on [22, 443]"},
                      {"check": "probe.management_ssh", "status": "failed", "summary": "management SSH refused"}),
                     ("U0LABONCALL",))


def accepted(message: SlackMessage) -> dict:
    """The payload, after the stand-in (Slack's rules) accepted it."""
    payload = message.payload()
    standin.validate_message("chat.postMessage", payload)
    return payload


def every_text(payload: dict) -> str:
    return json.dumps(payload)


EVENTS = [
    Event("run_started", RUN, "isolate-host", "started", "Isolate a host: web-1", ("web-1",), "INC-7",
          {"params": {"reason": "EDR alert", "hosts": ["web-1"]}, "trigger": {"kind": "slack", "who": "U0LABONCALL"},
           "dry_run": False}),
    Event("contained", RUN, "isolate-host", "contained", "isolated and verified from outside", ("web-1",), None,
          {"host": "web-1"}),
    Event("containment_failed", RUN, "isolate-host", "rolled_back", "verification failed; rollback succeeded",
          ("web-1",), None, {"host": "web-1"}),
    Event("containment_unverified", RUN, "isolate-host", "applied_unverified", "probe inconclusive", ("web-1",),
          None, {"host": "web-1"}),
    Event("released", RUN, "release-host", "released", "services reachable again", ("web-1",), None, {"host": "web-1"}),
    Event("release_failed", RUN, "release-host", "failed", "zone restore failed", ("web-1",), None, {"host": "web-1"}),
    Event("rotation", RUN, "rotate-credentials", "deferred", "Vault down: rotation deferred", ("db-1",), None,
          {"host": "db-1"}),
    Event("restore_test", RUN, "restore-test", "failed", "content mismatch", ("web-1-data",), None,
          {"repository": "web-1-data", "reasons": ["patients.csv differs"], "measures": {"rto_seconds": 12.5, "files": 40}}),
    Event("tabletop_inject", RUN, "tabletop", "exercised", "The EDR flags web-1 beaconing to 203.0.113.9",
          (), "TT-1", {"scenario": "ransomware", "prompt": "Contain it?"}),
    Event("run_finished", RUN, "isolate-host", "contained", "web-1: contained", ("web-1",), None,
          {"hosts": {"web-1": "contained"}}),
    Event("approval_requested", RUN, "isolate-host", "pending", "approval needed", ("web-1",), "INC-7",
          {"flow_run_id": FLOW_RUN, "reason": "EDR alert", "requested_by": "slack:U0ALICE", "approvers": ["U0LABONCALL"],
           "timeout": 900}),
    Event("approval_requested", RUN, "isolate-host", "break_glass", "break glass", ("web-1",), None,
          {"flow_run_id": FLOW_RUN, "reason": "ransomware spreading", "requested_by": "cli:alice@mgmt"}),
    Event("approval_requested", RUN, "isolate-host", "denied", "denied by U0LABONCALL", ("web-1",), None,
          {"approver": "U0LABONCALL"}),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: f"{e.kind}-{e.status}")
def test_every_announced_event_builds_a_message_slack_accepts(event):
    payload = accepted(build_message(event, CTX))
    assert payload["channel"] == "#incident-response"
    assert payload["text"]
    text = every_text(payload)
    assert RUN in text  # every message names its evidence run


def test_every_kind_the_notifier_announces_has_a_builder():
    from flows.notify import NOTIFIED_KINDS

    assert set(BUILDERS) == set(NOTIFIED_KINDS)


def test_outcome_message_carries_verification_prefect_link_and_evidence_id():
    payload = accepted(build_message(EVENTS[1], CTX))
    text = every_text(payload)
    assert "peer-1 cannot reach web-1 on [22, 443]" in text and ":x: management SSH refused" in text
    assert f"http://127.0.0.1:4200/runs/flow-run/{FLOW_RUN}" in text
    assert f"Evidence run `{RUN}`" in text


def test_prefect_ui_base_is_the_api_url_without_api():
    assert prefect_ui_base("http://127.0.0.1:4200/api") == "http://127.0.0.1:4200"
    assert prefect_ui_base("https://prefect.example/api/") == "https://prefect.example"
    assert prefect_ui_base(None) is None


def test_hostile_text_is_escaped_and_cannot_mention_everyone():
    event = Event("contained", RUN, "isolate-host", "contained", "<!channel> <@U123> & <http://evil|click>",
                  ("web-1",), None, {"host": "web-1"})
    text = every_text(accepted(build_message(event, CTX)))
    assert "<!channel>" not in text and "<http://evil" not in text
    assert "&lt;!channel&gt;" in text and "&amp;" in text


def test_oversized_content_is_cut_to_slacks_limits():
    huge = "x" * 50000
    event = Event("run_started", RUN, "isolate-host", "started", huge, tuple(f"node-{i}" for i in range(300)), "INC-1",
                  {"params": {"reason": huge}, "trigger": {"kind": "cli", "who": huge}})
    payload = accepted(build_message(event, CTX))
    assert len(payload["text"]) <= standin.TEXT_MAX
    assert len(payload["blocks"][0]["text"]["text"]) <= standin.HEADER_TEXT_MAX
    many = Event("contained", RUN, "isolate-host", "contained", "ok", ("web-1",), None, {"host": "web-1"})
    ctx = MessageContext("#c", None, None, tuple({"status": "passed", "summary": "y" * 500} for _ in range(40)))
    accepted(build_message(many, ctx))
    finished = Event("run_finished", RUN, "isolate-host", "contained", huge, (), None,
                     {"hosts": {f"node-{i}": "contained" for i in range(200)}})
    accepted(build_message(finished, CTX))


def test_approval_request_has_buttons_whose_value_leads_back_to_the_run():
    payload = accepted(build_message(EVENTS[10], CTX))
    buttons = [el for b in payload["blocks"] if b["type"] == "actions" for el in b["elements"]]
    assert [b["action_id"] for b in buttons] == [APPROVE_ACTION, DENY_ACTION]
    assert {parse_approval_value(b["value"]) for b in buttons} == {(FLOW_RUN, RUN)}
    assert "<@U0LABONCALL>" in every_text(payload) and "<@U0ALICE>" in every_text(payload)


def test_a_decided_approval_loses_its_buttons_and_names_the_approver():
    blocks = accepted(build_message(EVENTS[10], CTX))["blocks"]
    text, decided = approval_decided(blocks, "approved", "U0LABONCALL", "2026-11-23 10:00:00Z")
    standin.validate_message("chat.update", {"channel": "C0123456789", "ts": "1.000001", "text": text, "blocks": decided})
    assert not [b for b in decided if b["type"] == "actions"]
    assert "Approved* by <@U0LABONCALL>" in json.dumps(decided)
    _, denied = approval_decided(blocks, "denied", "U0LABONCALL", "now")
    assert "nothing is applied" in json.dumps(denied)


@pytest.mark.parametrize("value", ["", "{}", "not json", '{"flow_run": "x", "run": "y"}',
                                   json.dumps({"flow_run": FLOW_RUN, "run": "../../etc/passwd"})])
def test_a_forged_button_value_is_refused(value):
    with pytest.raises(InvalidInput):
        parse_approval_value(value)


def test_button_values_are_data_and_never_cut():
    assert parse_approval_value(approval_value(FLOW_RUN, RUN)) == (FLOW_RUN, RUN)
    with pytest.raises(ValueError):
        button("Approve", APPROVE_ACTION, "v" * 2001)


def test_mentions_only_for_slack_user_ids():
    assert mention("slack:U0LABONCALL") == "<@U0LABONCALL>"
    assert mention("U0LABONCALL") == "<@U0LABONCALL>"
    assert mention("cli:alice@mgmt") == "cli:alice@mgmt"
    assert mention("slack:<!here>") == "slack:&lt;!here&gt;"


# -- the stand-in's validation, as Slack documents it ---------------------------------------------------
def section(n: int) -> dict:
    return {"type": "section", "text": {"type": "mrkdwn", "text": "s" * n}}


def btn(text="ok", action_id="a", value="v") -> dict:
    return {"type": "actions", "elements": [{"type": "button", "text": {"type": "plain_text", "text": text},
                                             "action_id": action_id, "value": value}]}


@pytest.mark.parametrize("args, error", [
    ({"text": "hi"}, "channel_not_found"),
    ({"channel": "#c"}, "no_text"),
    ({"channel": "#c", "text": "t" * 40001}, "msg_too_long"),
    ({"channel": "#c", "text": "t", "blocks": [section(1)] * 51}, "invalid_blocks"),
    ({"channel": "#c", "text": "t", "blocks": [section(3001)]}, "invalid_blocks"),
    ({"channel": "#c", "text": "t", "blocks": [{"type": "header", "text": {"type": "plain_text", "text": "h" * 151}}]}, "invalid_blocks"),
    ({"channel": "#c", "text": "t", "blocks": [{"type": "header", "text": {"type": "mrkdwn", "text": "h"}}]}, "invalid_blocks"),
    ({"channel": "#c", "text": "t", "blocks": [btn(text="b" * 76)]}, "invalid_blocks"),
    ({"channel": "#c", "text": "t", "blocks": [btn(action_id="a" * 256)]}, "invalid_blocks"),
    ({"channel": "#c", "text": "t", "blocks": [btn(value="v" * 2001)]}, "invalid_blocks"),
    ({"channel": "#c", "text": "t", "blocks": [{"type": "video"}]}, "invalid_blocks"),
    ({"channel": "#c", "text": "t", "blocks": "not a list"}, "invalid_blocks_format"),
])
def test_the_stand_in_refuses_what_slack_refuses(args, error):
    with pytest.raises(standin.Invalid) as e:
        standin.validate_message("chat.postMessage", args)
    assert e.value.error == error


def test_the_stand_in_accepts_messages_at_the_limits():
    standin.validate_message("chat.postMessage", {"channel": "#c", "text": "t" * 40000, "blocks": [section(3000)] * 49 + [
        btn(text="b" * 75, action_id="a" * 255, value="v" * 2000)]})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """An instance of the stand-in on a free port, with its own token."""
    folder = tmp_path_factory.mktemp("slack")
    (folder / "token").write_text("xoxb-unit-test-token\n")
    proc = subprocess.Popen([sys.executable, str(ROOT / "deploy" / "lab" / "slack_api.py"), "--port", "0",
                             "--token-file", str(folder / "token"), "--log", str(folder / "messages.jsonl")],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    url = line.split(" on ", 1)[1].strip().removesuffix("/api/")
    yield url, folder
    proc.terminate()
    proc.wait(5)


def call(url: str, method: str, body: bytes, content_type: str, token: str | None = "xoxb-unit-test-token"):
    headers = {"Content-Type": content_type}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(f"{url}/api/{method}", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw), dict(e.headers)
        except ValueError:
            return e.code, raw.decode(), dict(e.headers)


def test_the_stand_in_checks_the_token_and_speaks_json_and_form(server):
    url, folder = server
    ok_json = json.dumps({"channel": "#c", "text": "hello", "blocks": [section(5)]}).encode()
    assert call(url, "chat.postMessage", ok_json, "application/json", token="xoxb-wrong")[1] == {"ok": False, "error": "invalid_auth"}
    assert call(url, "chat.postMessage", ok_json, "application/json", token=None)[1]["error"] == "not_authed"
    status, answer, _ = call(url, "chat.postMessage", ok_json, "application/json")
    assert status == 200 and answer["ok"] and answer["channel"].startswith("C") and answer["ts"]
    from urllib.parse import urlencode

    form = urlencode({"channel": answer["channel"], "text": "threaded", "thread_ts": answer["ts"],
                      "blocks": json.dumps([section(3001)])}).encode()
    assert call(url, "chat.postMessage", form, "application/x-www-form-urlencoded")[1]["error"] == "invalid_blocks"
    # chat.update takes the channel id Slack answered, not the name
    update = {"channel": "#c", "ts": answer["ts"], "text": "edited"}
    assert call(url, "chat.update", json.dumps(update).encode(), "application/json")[1]["error"] == "channel_not_found"
    update["channel"] = answer["channel"]
    assert call(url, "chat.update", json.dumps(update).encode(), "application/json")[1]["ok"]
    assert call(url, "chat.delete", b"{}", "application/json")[1]["error"] == "unknown_method"
    with urllib.request.urlopen(f"{url}/_messages") as resp:
        kept = json.loads(resp.read())
    assert [m["text"] for m in kept] == ["hello", "edited"]
    log = (folder / "messages.jsonl").read_text()
    assert "xoxb-unit-test-token" not in log and len(log.splitlines()) == 2


def test_the_stand_in_injects_faults_on_demand_then_recovers(server):
    url, _ = server
    body = json.dumps({"channel": "#c", "text": "x"}).encode()

    def control(**kw):
        req = urllib.request.Request(f"{url}/_control", data=json.dumps(kw).encode(), method="POST")
        urllib.request.urlopen(req, timeout=5).read()

    control(mode="429", retry_after=7, count=1)
    status, answer, headers = call(url, "chat.postMessage", body, "application/json")
    assert status == 429 and headers.get("Retry-After") == "7"
    assert call(url, "chat.postMessage", body, "application/json")[0] == 200  # count=1: back to ok
    control(mode="500", count=2)
    assert [call(url, "chat.postMessage", body, "application/json")[0] for _ in range(3)] == [500, 500, 200]
    control(mode="hang", hang_seconds=3, count=1)
    started = time.monotonic()
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        urllib.request.urlopen(urllib.request.Request(f"{url}/api/chat.postMessage", data=body, method="POST",
                                                      headers={"Content-Type": "application/json"}), timeout=0.5)
    assert time.monotonic() - started < 2
    assert call(url, "chat.postMessage", body, "application/json")[0] == 200
