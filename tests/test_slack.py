"""Slack against the lab: notifications never block containment, the outbox, approvals by button, the Slack app.

Each test points a copied settings file at its own Slack stand-in (deploy/lab/slack_api.py on a free
port), so faults can be injected without touching the lab's instance.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import hmac
import json
import logging
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from urllib.parse import urlencode

import pytest
import yaml
from conftest import reach

from crashcart.errors import (
    SlackAuthFailed,
    SlackRateLimited,
    SlackUnavailable,
    UnknownHost,
)
from crashcart.evidence.ledger import iter_records
from crashcart.hooks import drain_all
from crashcart.runtime import Runtime
from crashcart.secrets import Secret

pytestmark = pytest.mark.lab
ROOT = Path(__file__).resolve().parents[1]
WEB = "10.77.0.11"
APPROVER = "U0LABONCALL"


# -- fixtures -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slack_secrets(lab) -> dict:
    data = lab.vault_client().secrets.kv.v2.read_secret_version(path="crashcart/slack", mount_point="secret",
                                                                raise_on_deleted_version=True)["data"]["data"]
    return {"bot_token": data["bot_token"], "signing_secret": data["signing_secret"]}


class StandIn:
    """Our own instance of the Slack stand-in, with the lab's bot token."""

    def __init__(self, folder: Path, token: str) -> None:
        self.folder = folder
        (folder / "token").write_text(token + "\n")
        (folder / "token").chmod(0o600)
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "deploy" / "lab" / "slack_api.py"), "--port", "0",
             "--token-file", str(folder / "token"), "--log", str(folder / "messages.jsonl")],
            stdout=subprocess.PIPE, stderr=open(folder / "server.log", "w"), text=True)
        self.url = self.proc.stdout.readline().split(" on ", 1)[1].strip().removesuffix("/api/")
        self.api = self.url + "/api/"

    def control(self, **fault) -> None:
        req = urllib.request.Request(f"{self.url}/_control", data=json.dumps(fault).encode(), method="POST")
        urllib.request.urlopen(req, timeout=5).read()

    def messages(self) -> list[dict]:
        with urllib.request.urlopen(f"{self.url}/_messages", timeout=5) as resp:
            return json.loads(resp.read())

    def requests(self) -> list[dict]:
        with urllib.request.urlopen(f"{self.url}/_requests", timeout=5) as resp:
            return json.loads(resp.read())

    def everything_received(self) -> str:
        return json.dumps(self.messages()) + (self.folder / "messages.jsonl").read_text() + \
            (self.folder / "server.log").read_text()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)
        (self.folder / "token").unlink(missing_ok=True)  # a copy of the lab's bot token


@pytest.fixture(scope="module")
def standin(tmp_path_factory, slack_secrets):
    server = StandIn(tmp_path_factory.mktemp("slack-standin"), slack_secrets["bot_token"])
    yield server
    server.stop()


@pytest.fixture
def slack_config(lab_copy, standin):
    """A lab settings copy whose Slack is our stand-in (timeout 1 s, 1 retry), optionally web-1 in production."""

    def make(*, production: bool = False, require_approval: bool = False,
             token: str = "vault:secret/crashcart/slack#bot_token") -> Path:
        def inventory(text: str) -> str:
            if not production:
                return text
            doc = yaml.safe_load(text)
            doc["hosts"]["web-1"]["environment"] = "production"
            return yaml.safe_dump(doc, sort_keys=False)

        def settings(text: str) -> str:
            head = text.split("[slack]")[0]
            return head + (f'[slack]\nbase_url = "{standin.api}"\ntoken = "{token}"\n'
                           'signing_secret = "vault:secret/crashcart/slack#signing_secret"\n'
                           f'approvers = ["{APPROVER}"]\ntimeout = 1\nretries = 1\n'
                           f'require_approval = {str(require_approval).lower()}\napproval_timeout = 120\n')

        return lab_copy(inventory=inventory, settings=settings)

    standin.control(mode="ok")
    yield make
    standin.control(mode="ok")


@pytest.fixture
def flows():
    import flows.isolate as module

    return module


def timed(fn, **kwargs) -> tuple[dict, float]:
    started = time.monotonic()
    result = fn(**kwargs)
    return result, time.monotonic() - started


def notifications(config: Path) -> list[dict]:
    from flows.notify import latest_notifications

    return latest_notifications(Runtime.load(config).settings.evidence.dir)


def records(config: Path, **filters) -> list:
    return list(iter_records(Runtime.load(config).settings.evidence.dir, **filters))


def host_passwords(lab) -> set[str]:
    """Every recent version of web-1's root password (isolation rotates it)."""
    client = lab.vault_client()
    meta = client.secrets.kv.v2.read_secret_metadata(path="hosts/web-1", mount_point="secret")["data"]
    found = set()
    for version in range(max(1, meta["current_version"] - 8), meta["current_version"] + 1):
        try:
            data = client.secrets.kv.v2.read_secret_version(path="hosts/web-1", mount_point="secret", version=version,
                                                            raise_on_deleted_version=True)["data"]["data"]
        except Exception:
            continue
        if data.get("root_password"):
            found.add(data["root_password"])
    return found


def assert_no_secret(secrets: set[str], *texts: str) -> None:
    for secret in secrets:
        assert len(secret) >= 8
        for text in texts:
            assert secret not in text


def everything_written(config: Path) -> str:
    rt = Runtime.load(config)
    parts = []
    for folder in (rt.settings.evidence.dir, rt.settings.state_dir):
        for path in Path(folder).rglob("*"):
            if path.is_file() and not path.name.endswith((".tar.gz", ".gz")):
                parts.append(path.read_bytes().decode("utf-8", "replace"))
    return "\n".join(parts)


# -- the Slack app ------------------------------------------------------------------------------------
def sign(secret: str, body: str, ts: int | None = None) -> dict:
    """Headers exactly as Slack signs a request: v0=HMAC-SHA256(secret, "v0:{timestamp}:{body}")."""
    ts = int(time.time()) if ts is None else ts
    digest = hmac.new(secret.encode(), f"v0:{ts}:{body}".encode(), hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": str(ts), "X-Slack-Signature": f"v0={digest}"}


def post(url: str, body: str, headers: dict) -> tuple[int, str]:
    req = urllib.request.Request(url, data=body.encode(), method="POST",
                                 headers={"Content-Type": "application/x-www-form-urlencoded", **headers})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def slash(url: str, secret: str, text: str, user: str = APPROVER) -> tuple[int, str]:
    body = urlencode({"token": "legacy", "team_id": "T0CRASHLAB", "channel_id": "C0INCIDENT", "user_id": user,
                      "command": "/crashcart", "text": text, "response_url": "https://hooks.slack.invalid/r",
                      "trigger_id": "1.2.3"})
    status, answer = post(url, body, sign(secret, body))
    return status, (json.loads(answer).get("text", "") if status == 200 and answer.strip() else answer)


def click(url: str, secret: str, message: dict, action_id: str, user: str = APPROVER, **sign_kw) -> int:
    value = next(el["value"] for b in message["blocks"] if b["type"] == "actions" for el in b["elements"]
                 if el["action_id"] == action_id)
    payload = {"type": "block_actions", "user": {"id": user, "username": user.lower()}, "api_app_id": "A0CRASH",
               "token": "legacy", "team": {"id": "T0CRASHLAB"}, "trigger_id": "1.2.3",
               "container": {"type": "message", "message_ts": message["ts"], "channel_id": message["channel"]},
               "channel": {"id": message["channel"]}, "message": {"ts": message["ts"], "blocks": message["blocks"],
                                                                  "text": message["text"]},
               "response_url": "https://hooks.slack.invalid/a",
               "actions": [{"type": "button", "action_id": action_id, "block_id": "crashcart_approval",
                            "value": value, "action_ts": str(time.time())}]}
    body = urlencode({"payload": json.dumps(payload)})
    return post(url, body, sign(secret, body, **sign_kw))[0]


@contextmanager
def slack_app(config: Path, start_isolation=None):
    from crashcart.slack_app import create_app, make_server

    rt = Runtime.load(config)
    app, commands = create_app(rt, start_isolation=start_isolation)
    server = make_server(rt, "127.0.0.1", 0, app=app)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/slack/events"
    finally:
        server.shutdown()
        server.server_close()


def wait_for(what: str, test, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = test()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout:g}s")


def approval_message(standin: StandIn, after: float) -> dict:
    return wait_for("the approval request in Slack", lambda: next(
        (m for m in standin.messages() if m["received"] >= after and m["method"] == "chat.postMessage"
         and any(b["type"] == "actions" for b in m.get("blocks") or [])), None))


# -- tests: the client against the stand-in -------------------------------------------------------------
def test_client_retries_rate_limits_and_server_errors_then_gives_up_bounded(standin, slack_secrets):
    from integrations.slack import SlackClient, SlackMessage

    client = SlackClient(Secret(slack_secrets["bot_token"]), base_url=standin.api, timeout=1, retries=2)
    message = SlackMessage("#incident-response", "client test")
    standin.control(mode="429", retry_after=1, count=2)
    started = time.monotonic()
    assert client.post(message).attempts == 3
    assert 2 <= time.monotonic() - started < 4  # Retry-After honoured
    once = SlackClient(Secret(slack_secrets["bot_token"]), base_url=standin.api, timeout=1, retries=1)
    standin.control(mode="500")
    with pytest.raises(SlackUnavailable) as e:
        once.post(message)
    assert e.value.attempts == 2 and "HTTP 500" in str(e.value)
    standin.control(mode="hang", hang_seconds=20)
    started = time.monotonic()
    with pytest.raises(SlackUnavailable, match="did not answer"):
        once.post(message)
    assert time.monotonic() - started < 4  # 2 x 1 s timeout + backoff, not the 20 s hang
    standin.control(mode="429", retry_after=30)
    with pytest.raises(SlackRateLimited):
        SlackClient(Secret(slack_secrets["bot_token"]), base_url=standin.api, timeout=1, retries=0).post(message)
    standin.control(mode="ok")
    bad = SlackClient(Secret("xoxb-not-the-token-000"), base_url=standin.api, timeout=1, retries=2)
    with pytest.raises(SlackAuthFailed) as e:
        bad.post(message)
    assert e.value.attempts == 1  # a refused token is not retried


def test_a_hung_hook_does_not_hold_the_process_at_exit():
    script = ("import time\nfrom crashcart.hooks import Hooks, Event, drain_all\n"
              "h = Hooks(); h.register('slow', lambda e: time.sleep(60), ordered=True)\n"
              "h.emit(Event('run_started', 'r', 'b'))\nprint(drain_all(0.3))\n")
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=20, cwd=ROOT)
    assert out.stdout.strip() == "1" and time.monotonic() - started < 5


# -- tests: containment with Slack healthy, failing, rate-limiting, hanging -----------------------------
def test_containment_never_waits_for_slack_and_notify_retry_delivers_later(flows, slack_config, standin,
                                                                           slack_secrets, lab, caplog):
    from flows.notify import resend_failed

    caplog.set_level(logging.INFO)
    config = slack_config()
    run = {"hosts": ["web-1"], "reason": "slack fault drill", "config": str(config)}
    isolated = False
    try:
        ok, usual = timed(flows.isolate_host, **run)
        isolated = ok["status"] == "contained"
        assert isolated, ok["summary"]
        assert drain_all(10) == 0

        standin.control(mode="500")
        failing, _ = timed(flows.release_host, **run)
        isolated = failing["status"] != "released"
        assert not isolated, failing["summary"]
        drain_all(10)

        standin.control(mode="hang", hang_seconds=20)
        hung, took = timed(flows.isolate_host, **run)
        returned_at = time.time()
        isolated = hung["status"] == "contained"
        assert isolated, hung["summary"]
        # Not blocked: about as long as with Slack healthy (same test run), far below the 20 s hang...
        assert took <= usual + 5, f"isolate took {took:.1f}s with Slack hung, {usual:.1f}s with Slack up"

        standin.control(mode="429", retry_after=1)
        limited, _ = timed(flows.release_host, **run)
        isolated = limited["status"] != "released"
        assert not isolated, limited["summary"]
        assert drain_all(20) == 0  # every delivery settled while Slack still misbehaves
    finally:
        standin.control(mode="ok")
        if isolated:
            flows.release_host(hosts=["web-1"], reason="test cleanup", config=str(config))

    by_run: dict[str, list[dict]] = {}
    for n in notifications(config):
        by_run.setdefault(n["run"], []).append(n)
    assert {n["status"] for n in by_run[ok["run_id"]]} == {"delivered"}
    assert [n["event"] for n in by_run[ok["run_id"]]] == ["run_started", "contained", "run_finished"]
    # ...and the run returned before its own last message had even failed: nothing waited for Slack.
    settled = [r for r in records(config, kind="notification", run=hung["run_id"])
               if r.body.get("event") == "run_finished" and r.body.get("status") == "failed"]
    assert settled and datetime.fromisoformat(settled[0].ts.replace("Z", "+00:00")).timestamp() > returned_at
    for result, cause in ((failing, "HTTP 500"), (hung, "did not answer"), (limited, "rate-limited")):
        notes = by_run[result["run_id"]]
        assert {n["status"] for n in notes} == {"failed"}, notes
        assert cause in notes[0]["error"] and notes[0]["attempts"] == 2
    # one warning line per run whose Slack failed, never a traceback
    warnings = [r for r in caplog.records if r.name == "crashcart.notify" and r.levelno == logging.WARNING]
    assert len(warnings) == 3

    failed_before = [n for n in notifications(config) if n["status"] == "failed"]
    results = resend_failed(Runtime.load(config))
    assert [r["status"] for r in results] == ["delivered"] * len(failed_before)
    assert not [n for n in notifications(config) if n["status"] != "delivered"]
    assert not list((Runtime.load(config).settings.state_dir / "outbox").iterdir())
    # the resent messages arrived, threaded under each run's first message
    delivered = [m for m in standin.messages() if m["text"] == "isolate-host started on web-1"]
    assert len(delivered) == 2
    hung_thread = [n["ts"] for n in notifications(config) if n["run"] == hung["run_id"]]
    assert len(hung_thread) == 3

    secrets = {slack_secrets["bot_token"], slack_secrets["signing_secret"]} | host_passwords(lab)
    assert_no_secret(secrets, standin.everything_received(), everything_written(config), caplog.text)


def test_no_slack_token_in_vault_is_reported_and_the_run_goes_on(flows, slack_config, standin, caplog):
    caplog.set_level(logging.INFO)
    config = slack_config(token="vault:secret/crashcart/slack#no_such_key")
    before = len(standin.requests())
    result = flows.release_host(hosts=["web-1"], reason="nothing to release", config=str(config))
    assert result["status"] == "unchanged", result["summary"]
    assert drain_all(10) == 0
    notes = notifications(config)
    assert [n["event"] for n in notes] == ["run_started", "run_finished"]
    assert {n["status"] for n in notes} == {"failed"}
    assert "vault:secret/crashcart/slack#no_such_key" in notes[0]["error"] and "no key 'no_such_key'" in notes[0]["error"]
    warnings = [r for r in caplog.records if r.name == "crashcart.notify" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert len(standin.requests()) == before  # nothing was sent without a token


def test_a_process_exiting_mid_delivery_records_it_failed_and_notify_retry_resends_it(slack_config, standin):
    config = slack_config()
    standin.control(mode="hang", hang_seconds=20)
    script = f"""
import time
from crashcart.runtime import Runtime
from crashcart.evidence.recorder import RunRecorder, Trigger
from crashcart.hooks import Event, drain_all
from flows.common import make_hooks, open_ledger
rt = Runtime.load({str(config)!r})
recorder = RunRecorder(open_ledger(rt), kind="exit-test", runbook=None, params={{}}, hosts=[], trigger=Trigger("cli", "t"),
                       hipaa=[], incident="INC-EXIT-1")
with recorder:
    hooks = make_hooks(rt, recorder)
    for kind in ("run_started", "contained", "run_finished"):
        hooks.emit(Event(kind, recorder.run_id, "exit-test", "contained", "exit test", ("web-1",), "INC-EXIT-1",
                         {{"host": "web-1"}}))
    recorder.finish("succeeded", "done")
print(drain_all(0.5), flush=True)
"""
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - started < 8  # the 20 s hang did not hold the process
    # The one in flight and the two queued behind it on the run's ordered worker: all recorded failed.
    notes = notifications(config)
    assert [(n["event"], n["status"], n["error"]) for n in notes] == [
        (kind, "failed", "process exited before delivery") for kind in ("run_started", "contained", "run_finished")]
    assert notes[0]["attempts"] >= 1 and notes[1]["attempts"] == notes[2]["attempts"] == 0
    standin.control(mode="ok")
    cli = subprocess.run([str(ROOT / ".venv" / "bin" / "crashcart"), "-c", str(config), "notify", "retry"],
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert "3 delivered, 0 still failed" in cli.stdout
    assert [n["status"] for n in notifications(config)] == ["delivered"] * 3
    sent = [m for m in standin.messages() if "INC-EXIT-1" in json.dumps(m)]
    assert sent[0]["thread_ts"] is None and [m["thread_ts"] for m in sent[1:]] == [sent[0]["ts"]] * 2
    status = subprocess.run([str(ROOT / ".venv" / "bin" / "crashcart"), "-c", str(config), "notify", "status", "--json"],
                            capture_output=True, text=True, timeout=60)
    assert json.loads(status.stdout)[0]["status"] == "delivered"


# -- tests: approvals -----------------------------------------------------------------------------------
def test_an_approval_by_button_resumes_the_paused_production_run(flows, slack_config, standin, slack_secrets, lab):
    config = slack_config(production=True, require_approval=True)
    secret = slack_secrets["signing_secret"]
    asked_at = time.time()
    with slack_app(config) as url, cf.ThreadPoolExecutor(1) as pool:
        future = pool.submit(flows.isolate_host, hosts=["web-1"], reason="approval drill", confirmed_production=True,
                             triggered_by="slack:U0REQUESTER", config=str(config))
        try:
            message = approval_message(standin, asked_at)
            gate = records(config, kind="approval_requested")[-1].run
            # Nothing is applied while waiting, and forged or stale clicks do not resume the run.
            assert not records(config, kind="step_intent")
            assert click(url, secret, message, "crashcart_approve", ts=int(time.time()) - 600) == 401
            forged = click(url, "not-the-signing-secret", message, "crashcart_approve")
            assert forged == 401
            # Someone outside the on-call group: an ephemeral refusal, recorded, and the run still waits.
            assert click(url, secret, message, "crashcart_approve", user="U0INTRUDER") == 200
            wait_for("the ephemeral refusal", lambda: [m for m in standin.messages()
                                                       if m["method"] == "chat.postEphemeral" and m["user"] == "U0INTRUDER"])
            refused = wait_for("the recorded refusal", lambda: records(config, kind="approval_refused", run=gate))
            assert refused[0].body["user"] == "U0INTRUDER"
            assert not future.done()
            assert click(url, secret, message, "crashcart_approve") == 200
            result = future.result(timeout=90)
        except BaseException:
            # Never leave the flow thread paused: deny it so the pool can close.
            click(url, secret, approval_message(standin, asked_at), "crashcart_deny")
            raise
    try:
        assert result["status"] == "contained", result["summary"]
        approval = records(config, kind="approval", run=gate)[0].body
        assert approval["decision"] == "approved" and approval["approver"] == APPROVER and approval["at"]
        started = records(config, kind="run_started", run=result["run_id"])[0].body
        assert started["params"]["approval"] == {"decision": "approved", "approver": APPROVER, "approval_run": gate,
                                                 "review_owed": False}
        updated = wait_for("the approval message update", lambda: [m for m in standin.messages()
                                                                   if m["method"] == "chat.update" and m["ts"] == message["ts"]])
        assert "Approved* by <@U0LABONCALL>" in json.dumps(updated[-1]["blocks"])
        assert not [b for b in updated[-1]["blocks"] if b["type"] == "actions"]
    finally:
        released = flows.release_host(hosts=["web-1"], reason="approval drill over", confirmed_production=True,
                                      config=str(config))
    assert released["status"] == "released", released["summary"]
    assert_no_secret({slack_secrets["bot_token"], secret} | host_passwords(lab), standin.everything_received())


def test_a_deny_ends_the_run_failed_with_nothing_applied(flows, slack_config, standin, slack_secrets):
    config = slack_config(production=True, require_approval=True)
    asked_at = time.time()
    with slack_app(config) as url, cf.ThreadPoolExecutor(1) as pool:
        future = pool.submit(flows.isolate_host, hosts=["web-1"], reason="deny drill", confirmed_production=True,
                             config=str(config))
        message = approval_message(standin, asked_at)
        assert click(url, slack_secrets["signing_secret"], message, "crashcart_deny") == 200
        result = future.result(timeout=60)
    assert result["status"] == "failed"
    assert result["summary"] == f"denied by {APPROVER}: nothing applied"
    assert not records(config, kind="step_intent")  # not a single step was even planned to run
    assert reach("peer-1", WEB, 443)
    approval = records(config, kind="approval")[0].body
    assert approval["decision"] == "denied" and approval["approver"] == APPROVER
    assert records(config, kind="run_finished", run=result["run_id"])[0].body["status"] == "failed"


def test_break_glass_skips_approval_and_records_a_review_is_owed(slack_config, standin):
    # A full isolation costs ~15 s; the gate's decision is what is under test, so run the gate in a flow.
    from prefect import flow

    from flows.notify import request_approval

    config = slack_config(production=True, require_approval=True)
    rt = Runtime.load(config)

    @flow(name="crashcart-test-break-glass", persist_result=False)
    def gate():
        return request_approval(rt, rt.inventory.select(["web-1"]), runbook_name="isolate-host",
                                params={"reason": "ransomware spreading"}, incident=None, triggered_by="cli:t@mgmt",
                                break_glass=True)

    approval = gate()
    assert approval.allows and approval.review_owed
    body = records(config, kind="approval", run=approval.run_id)[0].body
    assert body["decision"] == "break_glass" and body["review_owed"] is True and body["approver"] is None
    assert drain_all(10) == 0
    assert "Break glass: isolate-host on production web-1" in json.dumps(standin.messages()[-1])


# -- tests: the slash command ---------------------------------------------------------------------------
@pytest.fixture
def throwaway_deployment():
    """A deployment of isolate-host that no worker serves: runs the Slack app starts stay scheduled."""
    from prefect.client.orchestration import get_client

    from flows.isolate import isolate_host

    name = f"slack-test-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(isolate_host)
        deployment_id = client.create_deployment(flow_id=flow_id, name=name, entrypoint="flows/isolate.py:isolate_host")
    yield f"isolate-host/{name}", deployment_id
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        for run in client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))):
            client.delete_flow_run(run.id)
        client.delete_deployment(deployment_id)


def cli_error(config: Path, *args: str) -> str:
    out = subprocess.run([str(ROOT / ".venv" / "bin" / "crashcart"), "-c", str(config), "isolate-host", *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    return " ".join(out.stderr.split())


def test_slash_command_starts_isolate_host_and_refuses_bad_input_like_the_cli(slack_config, slack_secrets,
                                                                                throwaway_deployment):
    from prefect.client.orchestration import get_client

    from crashcart.slack_app import start_deployment_run

    config = slack_config()
    secret = slack_secrets["signing_secret"]
    name, deployment_id = throwaway_deployment
    with slack_app(config, start_isolation=start_deployment_run(name)) as url:
        status, text = slash(url, secret, "isolate web-1;rm -rf / now")
        assert status == 200 and text == cli_error(config, "web-1;rm", "--reason", "-rf / now")
        with pytest.raises(UnknownHost) as unknown:
            Runtime.load(config).inventory.select(["web-9"])
        assert slash(url, secret, "isolate web-9 beaconing")[1] == f"crashcart: error: {unknown.value}"
        assert slash(url, secret, "isolate web-1")[1].startswith("crashcart: error: usage: /crashcart isolate HOST REASON")
        status, text = slash(url, secret, "isolate web-1 beaconing to a known C2", user="U0INTRUDER")
        assert text.startswith("crashcart: error: <@U0INTRUDER> may not use /crashcart isolate")
        assert records(config, kind="slack_refused")[-1].body["user"] == "U0INTRUDER"
        with get_client(sync_client=True) as client:
            from prefect.client.schemas.filters import (
                DeploymentFilter,
                DeploymentFilterId,
            )

            only = DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
            assert client.read_flow_runs(deployment_filter=only) == []  # nothing was started by bad requests

            started = time.monotonic()
            status, text = slash(url, secret, "isolate web-1 beaconing to a known C2")
            assert status == 200 and time.monotonic() - started < 3
            assert text.startswith("started flow run ")
            runs = client.read_flow_runs(deployment_filter=only)
        assert [str(r.id) for r in runs] == [text.split()[3].rstrip(":")]
        assert runs[0].parameters == {"hosts": ["web-1"], "reason": "beaconing to a known C2",
                                      "triggered_by": f"slack:{APPROVER}", "confirmed_production": False}
        assert slash(url, secret, "status")[1] == "no runs recorded yet"
        from crashcart.evidence.recorder import RunRecorder, Trigger
        from flows.common import open_ledger

        with RunRecorder(open_ledger(Runtime.load(config)), kind="isolate-host", runbook=None, params={},
                         hosts=[{"name": "web-1"}], trigger=Trigger("cli", "t"), hipaa=[]) as recorder:
            recorder.finish("contained", "recorded for the status test")
        status, text = slash(url, secret, "status")
        assert status == 200 and text.startswith("Last runs (evidence ledger):")
        assert f"`{recorder.run_id[:8]}`" in text and "isolate-host web-1: *contained*" in text
        # Unsigned, forged and stale requests never reach a handler.
        body = urlencode({"command": "/crashcart", "text": "status", "user_id": APPROVER})
        assert post(url, body, {})[0] == 401
        assert post(url, body, sign("forged-secret", body))[0] == 401
        assert post(url, body, sign(secret, body, ts=int(time.time()) - 301))[0] == 401
        assert post(url, body, {"X-Slack-Request-Timestamp": "soon", "X-Slack-Signature": "v0=00"})[0] == 401
