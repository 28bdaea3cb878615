"""Settings: one TOML file plus CRASHCART_* environment variables, loaded and validated once."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from crashcart.errors import InvalidInventory

from crashcart.configfile import DEFAULT_PATHS, LAB_DIR, find_config  # noqa: F401  (re-exported)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SSHSettings(_Section):
    known_hosts: Path
    connect_timeout: float = Field(5.0, gt=0)
    banner_timeout: float = Field(5.0, gt=0)
    auth_timeout: float = Field(5.0, gt=0)
    command_timeout: float = Field(60.0, gt=0)


class VaultSettings(_Section):
    token_file: Path | None = None
    timeout: float = Field(5.0, gt=0)


class EvidenceSettings(_Section):
    dir: Path
    checkpoint_every: int = Field(1000, ge=1)
    local_signing_key: Path
    trusted_keys: Path


class SlackSettings(_Section):
    """Slack: `approvers` (Slack user ids) are the on-call group who may approve production isolations
    and use `/crashcart` at all; `require_approval` pauses production isolate-host runs until one of
    them clicks Approve (or `break_glass` is passed), for at most `approval_timeout` seconds."""

    base_url: str = "https://slack.com/api/"
    token: str | None = None
    signing_secret: str | None = None
    approvers: tuple[str, ...] = ()
    timeout: float = Field(5.0, gt=0)
    retries: int = Field(4, ge=0)
    require_approval: bool = False
    approval_timeout: int = Field(900, ge=5, le=86400)


class Settings(_Section):
    """Everything crashcart needs to know before it runs anything."""

    config_path: Path | None = None
    inventory: Path
    prefect_api_url: str | None = None
    timezone: str = "UTC"
    state_dir: Path
    lock_wait_seconds: float = Field(30.0, ge=0)
    use_responder: bool = True  # hand isolate/release to `crashcart responder` when one listens
    ssh: SSHSettings
    vault: VaultSettings = VaultSettings()
    evidence: EvidenceSettings
    slack: SlackSettings = SlackSettings()


def _env_overrides(env: Mapping[str, str]) -> dict:
    """CRASHCART_KEY and CRASHCART_SECTION__KEY map onto the settings tree."""
    tree: dict = {}
    for name, value in env.items():
        if not name.startswith("CRASHCART_") or name in ("CRASHCART_CONFIG", "CRASHCART_VAULT_TOKEN"):
            continue
        parts = name[len("CRASHCART_"):].lower().split("__")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_settings(path: Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read the settings file and environment once; relative paths are taken from the file's folder."""
    env = os.environ if env is None else env
    path = Path(path) if path else find_config(env)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidInventory(f"{path}: settings file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise InvalidInventory(f"{path}: not valid TOML ({e})") from None
    data = _merge(data, _env_overrides(env))
    data["config_path"] = str(path)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise InvalidInventory(f"{path}: {where}: {err['msg']}") from None
    return _absolute(settings, path.parent.resolve())


def _absolute(settings: Settings, base: Path) -> Settings:
    def fix(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else base / p

    return settings.model_copy(
        update={
            "inventory": fix(settings.inventory),
            "state_dir": fix(settings.state_dir),
            "ssh": settings.ssh.model_copy(update={"known_hosts": fix(settings.ssh.known_hosts)}),
            "vault": settings.vault.model_copy(update={"token_file": fix(settings.vault.token_file)}),
            "evidence": settings.evidence.model_copy(
                update={
                    "dir": fix(settings.evidence.dir),
                    "local_signing_key": fix(settings.evidence.local_signing_key),
                    "trusted_keys": fix(settings.evidence.trusted_keys),
                }
            ),
        }
    )
