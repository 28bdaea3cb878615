"""Runbooks: reviewable YAML documents, validated step by step against the registered actions."""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from crashcart import hipaa
from crashcart.errors import InvalidRunbook

RUNBOOK_DIR = Path(__file__).resolve().parents[1] / "runbooks"


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class CheckSpec(_Doc):
    """A verification: a check run after its step, proving the step worked."""

    uses: str
    args: dict[str, Any] = Field(default_factory=dict, alias="with")
    description: str = ""


class RollbackSpec(_Doc):
    uses: str
    args: dict[str, Any] = Field(default_factory=dict, alias="with")
    description: str = ""


class StepSpec(_Doc):
    id: str
    kind: Literal["check", "action"]
    uses: str
    args: dict[str, Any] = Field(default_factory=dict, alias="with")
    description: str
    on_failure: Literal["abort", "continue", "rollback"] = "abort"
    unless: str | None = None  # a fact set by an earlier step (e.g. already_contained): then nothing to do
    verify: tuple[CheckSpec, ...] = ()
    rollback: RollbackSpec | None = None

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not value.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"step id {value!r} must be letters, digits, '-' and '_'")
        return value


class Runbook(_Doc):
    runbook: str
    version: int = Field(ge=1)
    title: str
    description: str
    hipaa: tuple[str, ...] = Field(min_length=1)
    final_states: tuple[str, ...] = ()
    steps: tuple[StepSpec, ...] = Field(min_length=1)
    path: str = ""
    sha256: str = ""

    @field_validator("hipaa")
    @classmethod
    def _hipaa(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for spec in value:
            hipaa.check_spec(spec)
        return value

    @property
    def name(self) -> str:
        return self.runbook

    def step(self, step_id: str) -> StepSpec:
        for s in self.steps:
            if s.id == step_id:
                return s
        raise KeyError(step_id)

    def identity(self) -> dict:
        """What the evidence records about the runbook: name, version and the hash of its bytes."""
        return {"name": self.runbook, "version": self.version, "sha256": self.sha256, "path": self.path,
                "hipaa": list(self.hipaa)}


def _bind(registry: Mapping[str, Any], where: str, uses: str, args: dict, want_kind: set[str]) -> None:
    """Check that `uses` names a registered step of the right kind and `args` fit its plan signature."""
    cls = registry.get(uses)
    if cls is None:
        kinds = " or ".join(sorted(want_kind))
        raise InvalidRunbook(f"{where}: unknown {kinds} {uses!r}")
    if cls.kind not in want_kind:
        raise InvalidRunbook(f"{where}: {uses!r} is a {cls.kind}, expected {' or '.join(sorted(want_kind))}")
    signature = inspect.signature(cls.plan)
    try:
        signature.bind(None, None, **args)  # (self, ctx, **args)
    except TypeError as e:
        raise InvalidRunbook(f"{where}: {uses}: {e}") from None


def load_runbook(name_or_path: str | Path, registry: Mapping[str, Any]) -> Runbook:
    """Read a runbook (a name from runbooks/ or a path) and validate every step. No side effects."""
    path = Path(name_or_path)
    if not path.suffix:
        path = RUNBOOK_DIR / f"{name_or_path}.yaml"
    shown = path.relative_to(RUNBOOK_DIR.parent) if path.is_absolute() and RUNBOOK_DIR.parent in path.parents else path
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InvalidRunbook(f"{shown}: runbook not found") from None
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise InvalidRunbook(f"{shown}: not valid YAML{f' at line {mark.line + 1}' if mark else ''}") from None
    if not isinstance(data, dict):
        raise InvalidRunbook(f"{shown}: expected a mapping with runbook, version, title, hipaa and steps")
    data = {**data, "path": str(shown), "sha256": hashlib.sha256(raw).hexdigest()}
    try:
        book = Runbook.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = list(first["loc"])
        if loc[:1] == ["steps"] and len(loc) > 1 and isinstance(loc[1], int):
            step = (data.get("steps") or [])[loc[1]]
            sid = step.get("id", "?") if isinstance(step, dict) else "?"
            where = f"step {loc[1] + 1} {sid!r}" + (f": {'.'.join(map(str, loc[2:]))}" if loc[2:] else "")
        else:
            where = ".".join(map(str, loc)) or "(top level)"
        raise InvalidRunbook(f"{shown}: {where}: {first['msg'].removeprefix('Value error, ')}") from None
    seen: set[str] = set()
    for n, step in enumerate(book.steps, 1):
        where = f"{shown}: step {n} {step.id!r}"
        if step.id in seen:
            raise InvalidRunbook(f"{where}: duplicate step id")
        seen.add(step.id)
        _bind(registry, where, step.uses, step.args, {step.kind})
        for check in step.verify:
            _bind(registry, f"{where} 'verify'", check.uses, check.args, {"check"})
        if step.rollback:
            _bind(registry, f"{where} 'rollback'", step.rollback.uses, step.rollback.args, {"action"})
        if step.on_failure == "rollback" and not step.rollback:
            raise InvalidRunbook(f"{where}: on_failure is rollback but the step has no rollback")
    return book
