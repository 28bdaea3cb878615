"""Locate and load the staging lab's control script (deploy/lab/lab.py) from a checkout."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from crashcart.errors import LabError

LAB_SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "lab" / "lab.py"


def load_lab():
    """The lab module (up, down, status, vault_stop, vault_start, ...)."""
    if "crashcart_lab" in sys.modules:
        return sys.modules["crashcart_lab"]
    if not LAB_SCRIPT.exists():
        raise LabError(f"the lab scripts are not at {LAB_SCRIPT}: run crashcart from a checkout of the repository")
    spec = importlib.util.spec_from_file_location("crashcart_lab", LAB_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module
