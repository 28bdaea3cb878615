"""Shared fixtures: the running staging lab (never skipped: a lab test fails when the lab is down)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAB_DIR = Path(os.environ.get("CRASHCART_LAB_DIR", "/var/lib/crashcart-lab"))


@pytest.fixture(scope="session")
def lab():
    """The lab module, after checking that every part of the lab is running."""
    from crashcart.lab import load_lab

    module = load_lab()
    status = module.status()
    if not status.get("up"):
        pytest.fail(f"the staging lab is not running ({json.dumps(status)}): start it with `crashcart lab up`")
    return module


@pytest.fixture(scope="session")
def lab_config(lab) -> Path:
    return LAB_DIR / "crashcart.toml"


@pytest.fixture(scope="session")
def runtime(lab_config):
    """Settings and inventory of the lab, as the CLI loads them."""
    from crashcart.runtime import Runtime

    return Runtime.load(lab_config)


@pytest.fixture(scope="session")
def vault_admin(lab):
    """An hvac client with the lab's root token, for test set-up and inspection only."""
    return lab.vault_client()


@pytest.fixture(scope="session", autouse=True)
def _prefect_api(request):
    """Every test that imports prefect talks to the lab's server, never a temporary one."""
    os.environ.setdefault("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    yield


def reach(namespace: str, address: str, port: int, timeout: float = 2) -> bool:
    """Whether a TCP connection from inside a lab host's network namespace succeeds (checked from outside crashcart)."""
    import subprocess

    probe = f"exec 3<>/dev/tcp/{address}/{int(port)}"
    return subprocess.run(["ip", "netns", "exec", namespace, "timeout", str(timeout), "bash", "-c", probe],
                          capture_output=True).returncode == 0


@pytest.fixture
def lab_copy(lab, tmp_path):
    """A settings file like the lab's, with its own evidence and state directories and an editable inventory.

    Call it with `inventory=lambda text: text.replace(...)` and/or `settings=lambda text: ...`.
    """
    def make(inventory=None, settings=None) -> Path:
        inv_text = (LAB_DIR / "inventory.yaml").read_text()
        (tmp_path / "inventory.yaml").write_text(inventory(inv_text) if inventory else inv_text)
        text = (LAB_DIR / "crashcart.toml").read_text()
        text = (text.replace('inventory = "inventory.yaml"', f'inventory = "{tmp_path}/inventory.yaml"')
                .replace('state_dir = "state"', f'state_dir = "{tmp_path}/state"')
                .replace('dir = "evidence"', f'dir = "{tmp_path}/evidence"')
                .replace('known_hosts = "known_hosts"', f'known_hosts = "{LAB_DIR}/known_hosts"')
                .replace('token_file = "vault/crashcart-token"', f'token_file = "{LAB_DIR}/vault/crashcart-token"')
                .replace('local_signing_key = "keys/', f'local_signing_key = "{LAB_DIR}/keys/')
                .replace('trusted_keys = "trusted-keys.json"', f'trusted_keys = "{LAB_DIR}/trusted-keys.json"'))
        config = tmp_path / "crashcart.toml"
        config.write_text(settings(text) if settings else text)
        return config

    return make
