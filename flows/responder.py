"""The warm responder: a long-running process that runs isolate-host and release-host for the CLI at once.

Importing Prefect and creating a first flow run cost the CLI ~2 s before a host can be touched. The
responder pays that once at start; `crashcart isolate-host` then hands it the run over a Unix socket
(0600, root) and prints the same outcome. When no responder answers, the CLI runs the flow itself.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import socket
import socketserver
import struct
import threading
from pathlib import Path

from crashcart.errors import CrashcartError, InvalidInput
from crashcart.runtime import Runtime
from crashcart.secrets import mask

log = logging.getLogger("crashcart.responder")
FLOWS = ("isolate-host", "release-host")
MAX_REQUEST = 64 * 1024


def socket_path(runtime: Runtime) -> Path:
    return Path(runtime.settings.state_dir) / "responder.sock"


def _peer(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end, from the kernel (SO_PEERCRED), not from what it says."""
    pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid, uid


def _flow(name: str):
    from flows.isolate import isolate_host, release_host

    return {"isolate-host": isolate_host, "release-host": release_host}[name]


def _prewarm(runtime: Runtime, params: dict) -> None:
    """Open SSH to the targets and the probe host while the flow run is being created."""
    from integrations.ssh import prewarm

    try:
        hosts = runtime.inventory.select(params.get("hosts") or [], params.get("group"))
    except CrashcartError:
        return  # the flow refuses the request itself, with its own one-line error
    if runtime.inventory.probe_host:
        hosts.append(runtime.inventory.host(runtime.inventory.probe_host))
    prewarm(hosts, runtime.settings.ssh)


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        server: Responder = self.server  # type: ignore[assignment]
        pid, uid = _peer(self.connection)
        try:
            if uid != os.geteuid() and uid != 0:
                raise InvalidInput(f"uid {uid} may not use this responder")
            request = json.loads(self.rfile.readline(MAX_REQUEST))
            name, params = request.get("flow"), dict(request.get("params") or {})
            if name not in FLOWS:
                raise InvalidInput(f"the responder runs {', '.join(FLOWS)}, not {name!r}")
            mine = Path(server.runtime.settings.config_path).resolve()
            if Path(str(request.get("config") or mine)).resolve() != mine:
                # Another settings file (another inventory, ledger): the CLI runs it itself.
                self.wfile.write(json.dumps({"declined": f"this responder serves {mine}"}).encode() + b"\n")
                return
            # The trigger names the OS account the kernel vouches for, and what the CLI said of itself.
            user = pwd.getpwuid(uid).pw_name
            params["triggered_by"] = f"cli:{user}@{socket.gethostname()} (pid {pid} via the responder; " \
                                     f"{str(params.get('triggered_by') or 'unnamed')[:80]})"
            params["config"] = str(server.runtime.settings.config_path)
            _prewarm(server.runtime, params)
            reply = {"result": _flow(name)(**params)}
        except CrashcartError as e:
            reply = {"error": {"type": type(e).__name__, "message": mask(str(e)), "exit_code": e.exit_code}}
        except Exception as e:  # a bug must reach the operator as one line, and the responder stay up
            log.exception("responder request failed")
            reply = {"error": {"type": type(e).__name__, "message": mask(str(e)), "exit_code": 1}}
        self.wfile.write(json.dumps(reply).encode() + b"\n")


class Responder(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    # On stop, server_close() waits for the runs in progress: a containment is never cut off halfway.
    daemon_threads = False
    block_on_close = True

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        path = socket_path(runtime)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if path.exists():
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(str(path))
                raise InvalidInput(f"a responder already listens on {path}")
            except (ConnectionRefusedError, FileNotFoundError):
                path.unlink()
            finally:
                probe.close()
        old = os.umask(0o177)  # the socket is created 0600: only this user (root) may hand it a run
        try:
            super().__init__(str(path), _Handler)
        finally:
            os.umask(old)


def warm_up() -> None:
    """Import what the first flow run would (Prefect, the flows, fastapi's encoder for parameters)."""
    import fastapi.encoders  # noqa: F401  (Prefect serialises flow parameters with it)
    import flows.isolate  # noqa: F401
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.api_healthcheck()


def serve(runtime: Runtime, ready: threading.Event | None = None) -> None:
    """Listen until stopped (SIGTERM/Ctrl-C, then the runs in progress finish); one thread per request.

    Connections to the hosts are kept open between runs (with keepalives): an isolation then starts
    on a live session instead of spending a TCP, key exchange and authentication round on it.
    """
    import integrations.ssh as ssh

    warm_up()
    ssh.keep_warm = True
    hosts = list(runtime.inventory.hosts.values())
    ssh.prewarm(hosts, runtime.settings.ssh)
    server = Responder(runtime)
    log.info("crashcart responder listening on %s", socket_path(runtime))
    if ready:
        ready.set()
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        socket_path(runtime).unlink(missing_ok=True)


def request(path: Path, config: Path, flow: str, params: dict, timeout: float = 3600) -> dict | None:
    """Hand a run to the responder; None when none is listening for `config` (the caller then runs it itself)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(2)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError, socket.timeout):
        sock.close()
        return None
    with sock:
        sock.settimeout(timeout)
        sock.sendall(json.dumps({"flow": flow, "config": str(config), "params": params}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    reply = json.loads(data) if data else None
    return None if reply is None or "declined" in reply else reply
