"""Where the settings file is, and a quick read of it that needs no validation library (CLI fast path)."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Mapping

from crashcart.errors import InvalidInventory

LAB_DIR = Path("/var/lib/crashcart-lab")
DEFAULT_PATHS = (Path("crashcart.toml"), Path("/etc/crashcart/crashcart.toml"), LAB_DIR / "crashcart.toml")


def find_config(env: Mapping[str, str]) -> Path:
    """The settings file: $CRASHCART_CONFIG, else ./crashcart.toml, /etc/crashcart, the lab's."""
    if env.get("CRASHCART_CONFIG"):
        return Path(env["CRASHCART_CONFIG"])
    for candidate in DEFAULT_PATHS:
        if candidate.exists():
            return candidate
    raise InvalidInventory(
        "no settings file: set CRASHCART_CONFIG, create ./crashcart.toml, or start the lab with `crashcart lab up`"
    )


def responder_socket(config: Path | None, env: Mapping[str, str] | None = None) -> Path | None:
    """The warm responder's socket as the settings place it, or None when it is not to be used.

    Read with tomllib only: whatever is wrong with the file is reported by the full load that
    follows when no responder answers.
    """
    env = os.environ if env is None else env
    try:
        path = Path(config) if config else find_config(env)
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError, InvalidInventory):
        return None
    use = str(env.get("CRASHCART_USE_RESPONDER", data.get("use_responder", True))).lower()
    if use in ("false", "0", "no"):
        return None
    state = Path(env.get("CRASHCART_STATE_DIR") or data.get("state_dir") or "state")
    return (state if state.is_absolute() else path.parent.resolve() / state) / "responder.sock"
