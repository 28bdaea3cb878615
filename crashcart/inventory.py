"""The inventory: hosts, management networks, Vault, restic repositories and Slack, validated once."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from crashcart import validation as v
from crashcart.errors import InvalidInput, InvalidInventory, UnknownHost
from crashcart.secrets import SecretRef

HostName = Annotated[str, AfterValidator(v.host_name)]
GroupName = Annotated[str, AfterValidator(v.group_name)]
UserName = Annotated[str, AfterValidator(v.user_name)]
Address = Annotated[str, AfterValidator(v.ip_address)]
Network = Annotated[str, AfterValidator(v.network)]
RemotePath = Annotated[str, AfterValidator(v.remote_path)]
DnsName = Annotated[str, AfterValidator(v.dns_name)]
Ident = Annotated[str, AfterValidator(v.identifier)]
Port = Annotated[int, AfterValidator(v.port)]


def _secret_ref(value: str) -> str:
    SecretRef.parse(value)
    return value


SecretRefText = Annotated[str, AfterValidator(_secret_ref)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Service(_Model):
    """A TCP service on a host; `management` services stay reachable from management during isolation."""

    name: Annotated[str, AfterValidator(v.service_name)]
    port: Port
    management: bool = False


class Account(_Model):
    """An account whose credentials crashcart rotates after an incident."""

    user: UserName
    password: SecretRefText | None = None
    ssh_key: SecretRefText | None = None

    @model_validator(mode="after")
    def _something(self) -> "Account":
        if not self.password and not self.ssh_key:
            raise ValueError("an account needs a password or ssh_key reference to rotate")
        return self


class LuksVolume(_Model):
    device: RemotePath
    passphrase: SecretRefText
    protected_slots: tuple[int, ...] = ()
    # Key derivation for the keyslots crashcart adds: cryptsetup's defaults (argon2id) everywhere real;
    # "pbkdf2-fast" (1000 iterations) only for lab and test images, where argon2id costs ~20 s per add.
    pbkdf: Literal["default", "pbkdf2-fast"] = "default"


class TLSService(_Model):
    service: Literal["nginx"] = "nginx"
    names: tuple[DnsName, ...]
    port: Port = 443
    cert_path: RemotePath
    key_path: RemotePath
    config_path: RemotePath = "/etc/nginx/nginx.conf"


class Host(_Model):
    name: HostName
    address: Address
    port: Port = 22
    user: UserName = "root"
    identity_file: Path
    environment: Literal["production", "staging"]
    groups: tuple[GroupName, ...] = ()
    tags: tuple[GroupName, ...] = ()
    become: Literal["none", "sudo"] = "none"
    services: tuple[Service, ...] = ()
    accounts: tuple[Account, ...] = ()
    ephi_paths: tuple[RemotePath, ...] = ()
    triage_paths: tuple[RemotePath, ...] = ("/var/log",)
    luks: tuple[LuksVolume, ...] = ()
    tls: tuple[TLSService, ...] = ()

    @property
    def is_production(self) -> bool:
        return self.environment == "production"


class VaultConfig(_Model):
    address: str
    kv_mount: Ident = "secret"
    pki_mount: Ident = "pki"
    pki_role: Ident = "crashcart"
    transit_mount: Ident = "transit"
    transit_key: Ident = "crashcart-evidence"
    ca_file: Path | None = None


class AppCheck(_Model):
    """A file in a restored snapshot that must parse as the declared kind."""

    path: str
    kind: Literal["csv", "json", "nonempty"]

    @field_validator("path")
    @classmethod
    def _relative(cls, value: str) -> str:
        if value.startswith("/") or ".." in value.split("/") or not value:
            raise ValueError(f"app check path {value!r} must be relative to the backed-up path, without '..'")
        return value


class ResticRepo(_Model):
    name: Ident
    url: str
    password: SecretRefText
    source_host: HostName | None = None
    source_path: RemotePath | None = None
    rpo_hours: float = Field(26.0, gt=0)
    rto_minutes: float = Field(60.0, gt=0)
    check_subsets: int = Field(10, ge=1, le=1000)
    sample_files: int = Field(5, ge=0)
    sftp_identity_file: Path | None = None
    app_checks: tuple[AppCheck, ...] = ()

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value or value.startswith("-") or any(c.isspace() for c in value):
            raise ValueError(f"repository url {value!r} must not be empty, start with '-' or contain spaces")
        return value


class SlackConfig(_Model):
    channel: str = "#incident-response"


class Inventory(_Model):
    path: Path | None = None
    management_networks: tuple[Network, ...] = Field(min_length=1)
    probe_host: HostName | None = None
    hosts: dict[HostName, Host]
    vault: VaultConfig
    restic_repositories: dict[Ident, ResticRepo] = {}
    slack: SlackConfig = SlackConfig()

    @model_validator(mode="after")
    def _references(self) -> "Inventory":
        for name, host in self.hosts.items():
            if host.name != name:
                raise ValueError(f"hosts.{name}: name {host.name!r} differs from its key")
        if self.probe_host and self.probe_host not in self.hosts:
            raise ValueError(f"probe_host: {self.probe_host!r} is not a host in the inventory")
        for name, repo in self.restic_repositories.items():
            if repo.name != name:
                raise ValueError(f"restic_repositories.{name}: name differs from its key")
            if repo.source_host and repo.source_host not in self.hosts:
                raise ValueError(f"restic_repositories.{name}.source_host: unknown host {repo.source_host!r}")
        return self

    def host(self, name: str) -> Host:
        """The host called `name`; a hostile or unknown name raises before anything is done."""
        v.host_name(name)
        try:
            return self.hosts[name]
        except KeyError:
            known = ", ".join(sorted(self.hosts)) or "none"
            raise UnknownHost(f"unknown host {name!r}: not in {self.path or 'the inventory'} (known: {known})") from None

    def select(self, names: list[str] | tuple[str, ...] = (), group: str | None = None) -> list[Host]:
        """Hosts by name and/or group (a group matches `groups` and `tags`), in a stable order."""
        chosen = [self.host(n) for n in names]
        if group is not None:
            v.group_name(group)
            members = [h for h in self.hosts.values() if group in h.groups or group in h.tags]
            if not members:
                raise UnknownHost(f"group {group!r} has no hosts in {self.path or 'the inventory'}")
            chosen += members
        if not chosen:
            raise InvalidInput("name at least one host or --group")
        seen: dict[str, Host] = {}
        for h in chosen:
            seen.setdefault(h.name, h)
        return list(seen.values())

    def repo(self, name: str) -> ResticRepo:
        v.identifier(name)
        try:
            return self.restic_repositories[name]
        except KeyError:
            known = ", ".join(sorted(self.restic_repositories)) or "none"
            raise InvalidInput(f"unknown restic repository {name!r} (known: {known})") from None


def _first_error(path: Path, e: ValidationError) -> InvalidInventory:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    return InvalidInventory(f"{path}: {where}: {msg}")


def load_inventory(path: Path) -> Inventory:
    """Read and validate inventory.yaml (hosts may also come from an Ansible inventory it names)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise InvalidInventory(f"{path}: inventory file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "?"
        raise InvalidInventory(f"{path}: not valid YAML at {where}") from None
    if not isinstance(data, dict):
        raise InvalidInventory(f"{path}: (top level): expected a mapping of keys")
    data = dict(data)
    hosts = dict(data.get("hosts") or {})
    ansible = data.pop("ansible_inventory", None)
    defaults = data.pop("host_defaults", {}) or {}
    if ansible:
        ansible_path = (path.parent / ansible["path"]) if isinstance(ansible, dict) else path.parent / str(ansible)
        for name, fields in load_ansible_hosts(ansible_path).items():
            hosts[name] = {**fields, **(hosts.get(name) or {})}
    for name, fields in hosts.items():
        if not isinstance(fields, dict):
            raise InvalidInventory(f"{path}: hosts.{name}: expected a mapping")
        merged = {**defaults, **fields}
        merged.setdefault("name", name)
        if "identity_file" in merged and not Path(str(merged["identity_file"])).is_absolute():
            merged["identity_file"] = str(path.parent / str(merged["identity_file"]))
        hosts[name] = merged
    data["hosts"] = hosts
    for name, repo in (data.get("restic_repositories") or {}).items():
        if isinstance(repo, dict):
            repo.setdefault("name", name)
    data["path"] = str(path)
    try:
        return Inventory.model_validate(data)
    except ValidationError as e:
        raise _first_error(path, e) from None


_ANSIBLE_KEYS = {
    "ansible_host": "address",
    "ansible_port": "port",
    "ansible_user": "user",
    "ansible_ssh_private_key_file": "identity_file",
}


def _from_ansible_vars(vars_: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in vars_.items():
        if key in _ANSIBLE_KEYS:
            out[_ANSIBLE_KEYS[key]] = int(value) if key == "ansible_port" else value
        elif key.startswith("crashcart_"):
            out[key.removeprefix("crashcart_")] = value
    return out


def load_ansible_hosts(path: Path) -> dict[str, dict[str, Any]]:
    """Hosts from an Ansible inventory in INI or YAML form: address, port, user, key and groups."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise InvalidInventory(f"{path}: Ansible inventory not found") from None
    if Path(path).suffix in (".yml", ".yaml"):
        return _ansible_yaml(path, yaml.safe_load(text) or {})
    return _ansible_ini(path, text)


def _ansible_yaml(path: Path, data: dict) -> dict[str, dict[str, Any]]:
    hosts: dict[str, dict[str, Any]] = {}

    def walk(group: str, node: dict, inherited: dict, ancestors: list[str]) -> None:
        node = node or {}
        group_vars = {**inherited, **(node.get("vars") or {})}
        lineage = [group, *ancestors]
        for name, hvars in (node.get("hosts") or {}).items():
            entry = hosts.setdefault(name, {"groups": []})
            entry.update(_from_ansible_vars({**group_vars, **(hvars or {})}))
            for g in lineage:
                if g not in ("all", "ungrouped") and g not in entry["groups"]:
                    entry["groups"].append(g)
        for child, sub in (node.get("children") or {}).items():
            walk(child, sub, group_vars, lineage)

    if not isinstance(data, dict):
        raise InvalidInventory(f"{path}: expected an Ansible YAML inventory (a mapping of groups)")
    for group, node in data.items():
        walk(group, node, {}, [])
    return hosts


def _ansible_ini(path: Path, text: str) -> dict[str, dict[str, Any]]:
    hosts: dict[str, dict[str, Any]] = {}
    group_vars: dict[str, dict[str, Any]] = {}
    children: dict[str, list[str]] = {}
    members: dict[str, list[str]] = {}
    section, kind = "ungrouped", "hosts"
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith(";") else ""
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            name = line[1:-1]
            section, _, kind = name.partition(":")
            kind = kind or "hosts"
            if kind not in ("hosts", "vars", "children"):
                raise InvalidInventory(f"{path}: line {lineno}: unknown section kind {kind!r}")
            continue
        if kind == "vars":
            key, _, value = line.partition("=")
            group_vars.setdefault(section, {})[key.strip()] = value.strip()
        elif kind == "children":
            children.setdefault(section, []).append(line)
        else:
            parts = shlex.split(line)
            name, pairs = parts[0], parts[1:]
            vars_ = {}
            for pair in pairs:
                key, sep, value = pair.partition("=")
                if not sep:
                    raise InvalidInventory(f"{path}: line {lineno}: expected key=value, got {pair!r}")
                vars_[key] = value
            entry = hosts.setdefault(name, {"groups": [], "_vars": {}})
            entry["_vars"].update(vars_)
            members.setdefault(section, []).append(name)

    def groups_of(group: str, seen: set[str]) -> list[str]:
        return [g for parent, kids in children.items() if group in kids and parent not in seen
                for g in [parent, *groups_of(parent, seen | {parent})]]

    for group, names in members.items():
        for name in names:
            entry = hosts[name]
            for g in [group, *groups_of(group, {group})]:
                if g not in ("all", "ungrouped") and g not in entry["groups"]:
                    entry["groups"].append(g)
    out = {}
    for name, entry in hosts.items():
        merged: dict[str, Any] = dict(group_vars.get("all", {}))
        for g in entry["groups"]:
            merged.update(group_vars.get(g, {}))
        merged.update(entry["_vars"])
        out[name] = {"groups": entry["groups"], **_from_ansible_vars(merged)}
    return out
