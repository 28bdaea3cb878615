"""The SSH layer against the lab's real sshd: pinned keys, timeouts, exit codes, quoting."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from crashcart.errors import CommandFailed, CommandTimedOut, HostKeyMismatch, HostKeyUnknown, HostUnreachable
from crashcart.secrets import Secret
from integrations.ssh import HostSession, SessionPool

pytestmark = pytest.mark.lab
LAB = Path("/var/lib/crashcart-lab")


def test_every_lab_host_answers_as_itself(runtime):
    with SessionPool(runtime.settings.ssh) as pool:
        for host in runtime.inventory.hosts.values():
            assert pool.get(host).run(["hostname"]).stdout.strip() == host.name


def test_a_host_key_mismatch_is_refused_before_authentication(runtime, tmp_path):
    web, db = runtime.inventory.host("web-1"), runtime.inventory.host("db-1")
    db_key = (LAB / "known_hosts").read_text().splitlines()
    forged = [line.replace(db.address, web.address) for line in db_key if line.startswith(db.address + " ")]
    known = tmp_path / "known_hosts"
    known.write_text("\n".join(forged) + "\n")
    # A key file that does not exist: reaching authentication would fail differently.
    host = web.model_copy(update={"identity_file": tmp_path / "no-such-key"})
    settings = runtime.settings.ssh.model_copy(update={"known_hosts": known})
    with pytest.raises(HostKeyMismatch, match="possible man-in-the-middle; refused before authentication"):
        HostSession(host, settings).open()


def test_an_unknown_host_key_is_refused(runtime, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text("")
    settings = runtime.settings.ssh.model_copy(update={"known_hosts": known})
    with pytest.raises(HostKeyUnknown, match="no pinned host key"):
        HostSession(runtime.inventory.host("web-1"), settings).open()


def test_an_unreachable_host_fails_within_its_timeout(runtime):
    ghost = runtime.inventory.host("web-1").model_copy(update={"name": "ghost", "address": "10.77.0.250"})
    settings = runtime.settings.ssh.model_copy(update={"connect_timeout": 2.0})
    started = time.monotonic()
    with pytest.raises(HostUnreachable, match="ghost"):
        HostSession(ghost, settings).open()
    assert time.monotonic() - started < 2.0 + 1.5


def test_a_non_zero_exit_is_reported_with_its_stderr(runtime):
    with HostSession(runtime.inventory.host("db-1"), runtime.settings.ssh) as s:
        with pytest.raises(CommandFailed) as e:
            s.run(["sh", "-c", "echo partial; echo 'disk on fire' >&2; exit 3"])
        assert e.value.remote_exit_code == 3 and "disk on fire" in e.value.stderr
        assert "exited 3: disk on fire" in str(e.value)
        result = s.run(["sh", "-c", "exit 4"], check=False)
        assert result.exit_code == 4 and not result.ok


def test_a_command_past_its_timeout_is_stopped(runtime):
    with HostSession(runtime.inventory.host("db-1"), runtime.settings.ssh) as s:
        started = time.monotonic()
        with pytest.raises(CommandTimedOut, match="timed out after 1s"):
            s.run(["sleep", "20"], timeout=1)
        assert time.monotonic() - started < 3
        assert s.run(["true"]).ok  # the connection is still usable


def test_arguments_are_quoted_and_secrets_travel_on_stdin(runtime):
    marker = LAB / "hosts" / "db-1" / "tmp" / "crashcart-pwned"
    marker.unlink(missing_ok=True)
    with HostSession(runtime.inventory.host("db-1"), runtime.settings.ssh) as s:
        out = s.run(["echo", "a; touch /tmp/crashcart-pwned", "$(id)"]).stdout
        assert out == "a; touch /tmp/crashcart-pwned $(id)\n"
        assert not marker.exists()
        secret = Secret("stdin-canary-42x")
        result = s.run(["cat"], stdin=secret)
        assert result.stdout == "********" and "stdin-canary" not in result.command
        assert result.stdout_bytes == b"stdin-canary-42x"
