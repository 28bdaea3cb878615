"""Inventory, settings and input validation: pure tests, no lab."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from crashcart import validation as v
from crashcart.errors import InvalidInput, InvalidInventory, UnknownHost
from crashcart.inventory import load_ansible_hosts, load_inventory
from crashcart.secrets import MASK, Secret, SecretRef, mask
from crashcart.settings import load_settings

FIXTURES = Path(__file__).parent / "fixtures" / "inventory"

GOOD = """\
management_networks: [10.77.0.1/32]
probe_host: peer-1
host_defaults: {identity_file: /k/id, environment: staging}
vault: {address: "http://127.0.0.1:8200"}
hosts:
  web-1:
    address: 10.77.0.11
    groups: [web]
    tags: [ephi]
    services: [{name: https, port: 443}]
    accounts: [{user: root, password: "vault:secret/hosts/web-1#root_password"}]
  db-1: {address: 10.77.0.12, environment: production, groups: [db], tags: [ephi]}
  peer-1: {address: 10.77.0.14}
"""


def write(tmp_path: Path, text: str, name: str = "inventory.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_a_good_inventory_loads(tmp_path):
    inv = load_inventory(write(tmp_path, GOOD))
    assert inv.host("web-1").address == "10.77.0.11"
    assert inv.host("db-1").is_production
    assert [h.name for h in inv.select(group="ephi")] == ["web-1", "db-1"]
    assert [h.name for h in inv.select(["peer-1"], group="web")] == ["peer-1", "web-1"]


@pytest.mark.parametrize("change, expected", [
    (("10.77.0.11", "10.77.0.999"), "hosts.web-1.address: address '10.77.0.999' is not an IP address"),
    (("management_networks: [10.77.0.1/32]", "management_networks: [10.77.0.1/16]"), "management_networks.0: network"),
    (("port: 443", "port: 70000"), "hosts.web-1.services.0.port"),
    (("probe_host: peer-1", "probe_host: nobody"), "probe_host: 'nobody' is not a host"),
    (("#root_password", ""), "hosts.web-1.accounts.0.password: secret reference"),
    (("environment: production", "environment: prod"), "hosts.db-1.environment"),
    (("  peer-1:", "  peer;1:"), "host name 'peer;1' is not allowed"),
    (("groups: [web]", "groups: [web, surprise: 1]"), "hosts.web-1.groups"),
])
def test_a_bad_inventory_names_file_key_and_problem(tmp_path, change, expected):
    path = write(tmp_path, GOOD.replace(*change))
    with pytest.raises(InvalidInventory) as e:
        load_inventory(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and expected in message
    assert "\n" not in message


def test_malformed_yaml_and_missing_file(tmp_path):
    with pytest.raises(InvalidInventory, match="not valid YAML at line 3"):
        load_inventory(write(tmp_path, "hosts:\n  - [unclosed\n"))
    with pytest.raises(InvalidInventory, match="inventory file not found"):
        load_inventory(tmp_path / "nope.yaml")


def test_unknown_host_and_group(tmp_path):
    inv = load_inventory(write(tmp_path, GOOD))
    with pytest.raises(UnknownHost, match="unknown host 'web-9'.*known: db-1, peer-1, web-1"):
        inv.host("web-9")
    with pytest.raises(UnknownHost, match="group 'nothing' has no hosts"):
        inv.select(group="nothing")
    with pytest.raises(InvalidInput, match="host name"):
        inv.host("web-1;touch /tmp/x")


def test_ansible_ini_inventory():
    hosts = load_ansible_hosts(FIXTURES / "hosts.ini")
    assert hosts["web-1"] == {"groups": ["web", "ephi"], "identity_file": "/etc/crashcart/id_ed25519",
                              "environment": "production", "address": "10.0.0.11", "user": "admin"}
    assert hosts["web-2"]["port"] == 2222 and hosts["web-2"]["environment"] == "staging"
    assert hosts["db-1"]["groups"] == ["db", "ephi"]


def test_ansible_yaml_inventory():
    hosts = load_ansible_hosts(FIXTURES / "hosts.yml")
    assert hosts["web-1"]["groups"] == ["web", "ephi"] and hosts["web-1"]["environment"] == "production"
    assert hosts["db-1"]["port"] == 2200
    assert hosts["test-1"]["environment"] == "staging" and hosts["test-1"]["groups"] == ["staging"]


def test_inventory_takes_hosts_from_ansible(tmp_path):
    (tmp_path / "hosts.ini").write_text((FIXTURES / "hosts.ini").read_text())
    path = write(tmp_path, """\
        management_networks: [10.0.0.1/32]
        ansible_inventory: hosts.ini
        vault: {address: "http://127.0.0.1:8200"}
        hosts:
          web-1: {services: [{name: https, port: 443}]}
        """)
    inv = load_inventory(path)
    assert set(inv.hosts) == {"web-1", "web-2", "db-1"}
    assert inv.host("web-1").services[0].port == 443 and inv.host("web-1").user == "admin"
    assert [h.name for h in inv.select(group="ephi")] == ["web-1", "web-2", "db-1"]


HOSTILE = ["web-1;touch /tmp/x", "-oProxyCommand=sh", "web-1 && id", "$(id)", "`id`", "web-1|nc", "../etc",
           "web 1", "web-1\n", "", "a" * 64, "web-1'", 'web-1"', "web-1>x", "*", "~root"]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_host_names_are_refused(name):
    with pytest.raises(InvalidInput):
        v.host_name(name)


@settings(max_examples=400)
@given(st.text(min_size=1, max_size=80))
def test_any_accepted_name_is_inert_in_a_shell(name):
    """Whatever passes the allowlist cannot start an option or carry a shell metacharacter."""
    try:
        accepted = v.host_name(name)
    except InvalidInput:
        return
    assert not accepted.startswith(("-", "."))
    assert not set(accepted) & set(" \t\n;&|$`'\"<>()*?[]{}~!#\\/=%,")


@settings(max_examples=200)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40))
def test_paths_and_zones_reject_everything_but_the_allowlist(text):
    for check in (v.zone_name, v.interface_name, v.user_name):
        try:
            value = check(text)
        except InvalidInput:
            continue
        assert value == text and not value.startswith("-")
    try:
        path = v.remote_path(text)
    except InvalidInput:
        return
    assert path.startswith("/") and ".." not in path.split("/") and " " not in path


def test_secrets_are_masked_everywhere():
    canary = Secret("canary-Zx81-do-not-leak")
    assert "canary" not in repr(canary) and "canary" not in str(canary) and f"{canary}" == MASK
    assert mask("stderr: bad password canary-Zx81-do-not-leak here") == f"stderr: bad password {MASK} here"
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(canary)
    ref = SecretRef.parse("vault:secret/hosts/web-1#root_password")
    assert (ref.mount, ref.path, ref.key) == ("secret", "hosts/web-1", "root_password")
    with pytest.raises(InvalidInput, match="vault:MOUNT/PATH#KEY"):
        SecretRef.parse("vault:secret/../x#k")


def test_settings_from_file_and_environment(tmp_path):
    config = write(tmp_path, """\
        inventory = "inventory.yaml"
        state_dir = "state"
        [ssh]
        known_hosts = "known_hosts"
        [evidence]
        dir = "evidence"
        local_signing_key = "key.pem"
        trusted_keys = "trusted.json"
        """, "crashcart.toml")
    s = load_settings(config, env={"CRASHCART_SSH__CONNECT_TIMEOUT": "2.5", "CRASHCART_LOCK_WAIT_SECONDS": "7"})
    assert s.inventory == tmp_path / "inventory.yaml" and s.ssh.known_hosts == tmp_path / "known_hosts"
    assert s.ssh.connect_timeout == 2.5 and s.lock_wait_seconds == 7
    with pytest.raises(InvalidInventory, match=r"crashcart.toml: ssh.connect_timeout: "):
        load_settings(config, env={"CRASHCART_SSH__CONNECT_TIMEOUT": "-1"})
    with pytest.raises(InvalidInventory, match="ssh.typo: Extra inputs"):
        load_settings(config, env={"CRASHCART_SSH__TYPO": "1"})
