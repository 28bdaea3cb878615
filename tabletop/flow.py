"""The `tabletop` Prefect flow: an unfacilitated exercise of a shipped scenario, so exercises can be scheduled."""

from __future__ import annotations

from prefect import flow

from crashcart.runtime import Runtime
from tabletop.runner import ExerciseOptions, run_exercise
from tabletop.scenario import load_scenario


@flow(name="tabletop", persist_result=False, validate_parameters=True)
def tabletop(scenario: str, speed: float = 1.0, dry_run: bool = False, triggered_by: str | None = None,
             config: str | None = None) -> dict:
    """Run a tabletop scenario against staging and record it as an exercise of the plan (status exercised).

    Decisions are not exercised here (nobody is at a terminal); run `crashcart tabletop run
    --facilitated` for that. A production target refuses the exercise before anything runs.
    """
    runtime = Runtime.load(config)
    document = load_scenario(scenario)
    result = run_exercise(runtime, document, ExerciseOptions(speed=speed, dry_run=dry_run, triggered_by=triggered_by))
    return result.as_dict()
