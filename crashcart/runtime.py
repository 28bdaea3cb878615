"""The loaded configuration of one crashcart process: settings and inventory, read once and passed in."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from crashcart.errors import VaultError
from crashcart.inventory import Inventory, load_inventory
from crashcart.secrets import Secret
from crashcart.settings import Settings, load_settings


@dataclass(frozen=True)
class Runtime:
    """Settings plus inventory; the one object flows and commands receive."""

    settings: Settings
    inventory: Inventory

    @classmethod
    def load(cls, config: Path | None = None) -> "Runtime":
        settings = load_settings(config)
        return cls(settings, load_inventory(settings.inventory))

    def vault_token(self) -> Secret:
        """The Vault token: $CRASHCART_VAULT_TOKEN, else the settings' token file."""
        token = os.environ.get("CRASHCART_VAULT_TOKEN")
        if token:
            return Secret(token.strip())
        path = self.settings.vault.token_file
        if path is None:
            raise VaultError("no Vault token: set CRASHCART_VAULT_TOKEN or vault.token_file in the settings")
        try:
            return Secret(Path(path).read_text().strip())
        except OSError as e:
            raise VaultError(f"Vault token file {path} cannot be read ({e.strerror})") from None
