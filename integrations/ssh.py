"""SSH to inventory hosts: pinned host keys, bounded waits, argv-only commands, typed errors."""

from __future__ import annotations

import concurrent.futures as cf
import math
import select
import shlex
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import fabric
import paramiko

from crashcart.errors import (
    AuthRefused,
    CommandFailed,
    CommandTimedOut,
    HostKeyMismatch,
    HostKeyUnknown,
    HostUnreachable,
    SSHError,
)
from crashcart.inventory import Host
from crashcart.secrets import Secret, mask
from crashcart.settings import SSHSettings

Stdin = bytes | str | Secret | None


@dataclass(frozen=True)
class CommandResult:
    """What one remote command did; `command` is the quoted, masked text that was sent."""

    host: str
    command: str
    exit_code: int
    stdout: str
    stderr: str
    started: float
    duration: float
    stdout_bytes: bytes = field(default=b"", repr=False)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def check(self) -> "CommandResult":
        """Raise CommandFailed (exit code and last stderr line) unless the command exited 0."""
        if self.exit_code != 0:
            last = self.stderr.strip().splitlines()[-1:] or self.stdout.strip().splitlines()[-1:] or [""]
            raise CommandFailed(
                f"{self.host}: `{self.command}` exited {self.exit_code}: {last[0][:300]}".rstrip(": "),
                exit_code=self.exit_code,
                stderr=self.stderr,
            )
        return self


def quote_command(argv: Sequence[str]) -> str:
    """Quote an argument list into one command line; nothing is ever pasted unquoted."""
    if isinstance(argv, (str, bytes)) or not argv:
        raise TypeError("a remote command is a non-empty list of arguments")
    return shlex.join(str(a) for a in argv)


def script(body: str, *args: str) -> list[str]:
    """`sh -c BODY sh ARGS...`: a fixed script whose inputs arrive as quoted positional arguments."""
    return ["sh", "-c", body, "sh", *args]


def _stdin_bytes(stdin: Stdin) -> bytes | None:
    if stdin is None:
        return None
    if isinstance(stdin, Secret):
        return stdin.reveal().encode()
    return stdin.encode() if isinstance(stdin, str) else stdin


class HostSession:
    """One authenticated SSH connection to a host; safe to share between threads."""

    def __init__(self, host: Host, settings: SSHSettings, *, user: str | None = None,
                 password: Secret | None = None, key_text: Secret | None = None) -> None:
        self.host = host
        self.settings = settings
        self.user = user or host.user
        self._password = password
        self._key_text = key_text
        self._lock = threading.Lock()
        self._conn: fabric.Connection | None = None

    # -- connection -------------------------------------------------------------------------
    def _connect_kwargs(self) -> dict:
        kwargs: dict = {
            "look_for_keys": False,
            "allow_agent": False,
            "banner_timeout": self.settings.banner_timeout,
            "auth_timeout": self.settings.auth_timeout,
            "channel_timeout": self.settings.connect_timeout,
        }
        if self._password is not None:
            kwargs["password"] = self._password.reveal()
        elif self._key_text is not None:
            kwargs["pkey"] = _load_private_key(self._key_text)
        else:
            kwargs["key_filename"] = str(self.host.identity_file)
        return kwargs

    def open(self) -> "HostSession":
        """Connect and authenticate; the host key is checked against the pin before auth."""
        with self._lock:
            if self._conn is not None and self._conn.is_connected:
                return self
            conn = fabric.Connection(
                host=self.host.address,
                port=self.host.port,
                user=self.user,
                config=fabric.Config(overrides={"load_ssh_configs": False}),
                connect_timeout=max(1, math.ceil(self.settings.connect_timeout)),
                connect_kwargs=self._connect_kwargs(),
            )
            # Fabric installs AutoAddPolicy; replace it before open() so an unknown key is refused.
            conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
            known = Path(self.settings.known_hosts)
            if not known.exists():
                raise HostKeyUnknown(f"{self.host.name}: pinned known_hosts file {known} does not exist")
            conn.client.load_host_keys(str(known))
            try:
                conn.open()
            except paramiko.BadHostKeyException:
                conn.close()
                raise HostKeyMismatch(
                    f"{self.host.name} ({self.host.address}:{self.host.port}) presented a host key that does not "
                    f"match the pin in {known}: possible man-in-the-middle; refused before authentication"
                ) from None
            except paramiko.AuthenticationException:
                conn.close()
                raise AuthRefused(f"{self.host.name}: authentication as {self.user!r} was refused") from None
            except paramiko.SSHException as e:
                conn.close()
                text = str(e)
                if "known_hosts" in text:
                    raise HostKeyUnknown(
                        f"{self.host.name} ({self.host.address}:{self.host.port}) has no pinned host key in {known}: "
                        "add its key after checking its fingerprint out of band"
                    ) from None
                if "banner" in text.lower():
                    raise HostUnreachable(f"{self.host.name}: no SSH banner within {self.settings.banner_timeout:g}s") from None
                raise SSHError(f"{self.host.name}: SSH failed: {mask(text)}") from None
            except (socket.timeout, TimeoutError):
                conn.close()
                raise HostUnreachable(
                    f"{self.host.name} ({self.host.address}:{self.host.port}) did not answer within "
                    f"{self.settings.connect_timeout:g}s"
                ) from None
            except OSError as e:
                conn.close()
                raise HostUnreachable(f"{self.host.name} ({self.host.address}:{self.host.port}) unreachable: {e.strerror or e}") from None
            self._conn = conn
            return self

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    @property
    def connected(self) -> bool:
        transport = self._conn.client.get_transport() if self._conn is not None else None
        return bool(transport and transport.is_active())

    def __enter__(self) -> "HostSession":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def _transport(self) -> paramiko.Transport:
        self.open()
        transport = self._conn.client.get_transport() if self._conn else None
        if transport is None or not transport.is_active():
            self.close()
            self.open()
            transport = self._conn.client.get_transport()
        return transport

    # -- commands ---------------------------------------------------------------------------
    def argv(self, argv: Sequence[str], become: bool = True) -> list[str]:
        """The argument list as it will run, with `sudo -n` where the host needs it."""
        argv = [str(a) for a in argv]
        if become and self.host.become == "sudo" and self.user != "root":
            return ["sudo", "-n", "--", *argv]
        return argv

    def run(self, argv: Sequence[str], *, timeout: float | None = None, stdin: Stdin = None,
            check: bool = True, become: bool = True) -> CommandResult:
        """Run one command (an argument list) and wait for it.

        Raises CommandTimedOut past `timeout`, and CommandFailed on a non-zero exit when `check`.
        stdin (for passphrases) is written to the command and closed; it is never on the command line.
        """
        command = quote_command(self.argv(argv, become))
        shown = mask(command)
        timeout = timeout or self.settings.command_timeout
        data = _stdin_bytes(stdin)
        started = time.time()
        deadline = time.monotonic() + timeout
        try:
            chan = self._transport().open_session(timeout=self.settings.connect_timeout)
            chan.exec_command(command)
            if data:
                chan.sendall(data)
            chan.shutdown_write()
            out, err = bytearray(), bytearray()
            while True:
                busy = False
                while chan.recv_ready():
                    out += chan.recv(65536)
                    busy = True
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                    busy = True
                if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                    if chan.closed or chan.eof_received:
                        break
                if time.monotonic() > deadline:
                    chan.close()
                    raise CommandTimedOut(f"{self.host.name}: command timed out after {timeout:g}s: {shown}")
                if not busy:
                    # Data on stdout and the channel closing wake select at once; the timeout only
                    # bounds how late stderr (which does not wake it) is drained.
                    select.select([chan], [], [], 0.05)
            exit_code = chan.recv_exit_status()
            chan.close()
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise SSHError(f"{self.host.name}: connection lost while running {shown}: {mask(str(e))}") from None
        result = CommandResult(
            host=self.host.name,
            command=shown,
            exit_code=exit_code,
            stdout=mask(out.decode(errors="replace")),
            stderr=mask(err.decode(errors="replace")),
            started=started,
            duration=time.time() - started,
            stdout_bytes=bytes(out),
        )
        return result.check() if check else result

    def write_file(self, path: str, data: bytes | Secret, mode: int = 0o600) -> CommandResult:
        """Write `data` to `path` through stdin, created with `mode` from the start (umask 077)."""
        return self.run(
            script('umask 077 && cat > "$1" && chmod "$2" "$1"', path, format(mode, "o")),
            stdin=data,
        )

    def get_file(self, remote_path: str, local_path: Path) -> None:
        """Copy a file off the host over SFTP."""
        self.open()
        try:
            # A fresh SFTP channel each time: Fabric's cached one is dead once closed.
            with self._conn.client.open_sftp() as sftp:
                sftp.get(remote_path, str(local_path))
        except (OSError, paramiko.SSHException) as e:
            raise SSHError(f"{self.host.name}: could not copy {remote_path}: {mask(str(e))}") from None


def _load_private_key(text: Secret) -> paramiko.PKey:
    import io

    for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return cls.from_private_key(io.StringIO(text.reveal()))
        except paramiko.SSHException:
            continue
    raise AuthRefused("the private key from Vault is not an Ed25519, ECDSA or RSA key")


def login_works(host: Host, settings: SSHSettings, user: str, *, password: Secret | None = None,
                key_text: Secret | None = None) -> bool:
    """Whether `user` can log in to `host` with this password or private key (a real SSH login)."""
    session = HostSession(host, settings, user=user, password=password, key_text=key_text)
    try:
        session.open()
        session.run(["true"], timeout=10)
        return True
    except AuthRefused:
        return False
    finally:
        session.close()


_warm: dict[tuple, "cf.Future[HostSession]"] = {}
_warm_lock = threading.Lock()


def _warm_key(host: Host, settings: SSHSettings) -> tuple:
    return (host.name, host.address, host.port, host.user, str(host.identity_file), str(settings.known_hosts))


def prewarm(hosts: list[Host], settings: SSHSettings) -> None:
    """Start connecting to `hosts` in the background; the next SessionPool in this process takes them.

    The CLI calls this before it imports Prefect (over a second), so connecting costs no wall time.
    A failed connection is simply not used: the run connects again and reports the error itself.
    """
    def connect(host: Host) -> HostSession:
        return HostSession(host, settings).open()

    pool = cf.ThreadPoolExecutor(max_workers=max(1, min(16, len(hosts))), thread_name_prefix="crashcart-prewarm")
    with _warm_lock:
        for host in hosts:
            _warm.setdefault(_warm_key(host, settings), pool.submit(connect, host))
    pool.shutdown(wait=False)


# A long-running process (the responder) keeps its connections between runs: set by that process only.
keep_warm = False


def park(session: HostSession) -> None:
    """Keep an open session for the next run in this process (with SSH keepalives, so it stays open)."""
    future: cf.Future = cf.Future()
    future.set_result(session)
    transport = session._conn.client.get_transport() if session._conn else None
    if transport is not None:
        transport.set_keepalive(30)
    with _warm_lock:
        old = _warm.get(_warm_key(session.host, session.settings))
        _warm[_warm_key(session.host, session.settings)] = future
    if old is not None and old.done() and old.exception() is None and old.result() is not session:
        old.result().close()


def _take_warm(host: Host, settings: SSHSettings) -> HostSession | None:
    with _warm_lock:
        future = _warm.pop(_warm_key(host, settings), None)
    if future is None:
        return None
    try:
        return future.result(timeout=settings.connect_timeout + settings.banner_timeout + settings.auth_timeout)
    except Exception:
        return None


class SessionPool:
    """One open session per host for the length of a run, so commands reuse the connection."""

    def __init__(self, settings: SSHSettings) -> None:
        self.settings = settings
        self._sessions: dict[str, HostSession] = {}
        self._lock = threading.Lock()

    def get(self, host: Host) -> HostSession:
        with self._lock:
            session = self._sessions.get(host.name)
            if session is None:
                session = _take_warm(host, self.settings) or HostSession(host, self.settings)
                self._sessions[host.name] = session
        return session.open()

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            if keep_warm and session.connected:
                park(session)
            else:
                session.close()

    def __enter__(self) -> "SessionPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
