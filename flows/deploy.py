"""`distill serve` and `distill deploy`: the flows as Prefect deployments with the cron
schedules from the config's `schedules` section."""

from __future__ import annotations

import os
from pathlib import Path

from .config import load_config

# deployment name -> (flow entrypoint, schedules field): the same flows for every task
ENTRYPOINTS = {
    "distill": ("flows/flows.py:distill_flow", "run"),
    "label": ("flows/flows.py:label_flow", "label"),
    "students": ("flows/flows.py:students_flow", "students"),
    "train-teacher": ("flows/flows.py:train_teacher_flow", None),
}
REPO = Path(__file__).resolve().parent.parent


def _flow_objects() -> dict:
    from . import flows

    return {
        "distill": flows.distill_flow,
        "label": flows.label_flow,
        "students": flows.students_flow,
        "train-teacher": flows.train_teacher_flow,
    }


def deployments(config_path: str, overrides: list[str] | None = None) -> list:
    """The config's flows as RunnerDeployments named <name>-<flow>, with their cron schedules."""
    cfg = load_config(config_path, overrides)
    fns = _flow_objects()
    return [
        fns[name].to_deployment(
            name=f"{cfg.name}-{name}",
            parameters=_params(os.path.abspath(config_path), overrides),
            **_schedule_kwargs(cfg, field),
        )
        for name, (_, field) in ENTRYPOINTS.items()
    ]


def _schedule_kwargs(cfg, field: str | None) -> dict:
    cron = getattr(cfg.schedules, field) if field else None
    if not cron:
        return {}
    from prefect.schedules import Cron

    return {"schedule": Cron(cron, timezone=cfg.schedules.timezone)}


def _params(config_path: str, overrides: list[str] | None) -> dict:
    return {"config": str(config_path), "overrides": list(overrides or [])}


def serve(config_path: str, overrides: list[str] | None = None) -> None:
    """Serve every flow in this process (Ctrl-C stops); schedules fire against a real server."""
    from prefect import serve as prefect_serve

    prefect_serve(*deployments(config_path, overrides))


def ensure_pool(pool: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))


def deploy(
    config_path: str, overrides: list[str] | None = None, *, pool: str, source: str | None = None
) -> list[tuple[str, str]]:
    """Register one deployment per flow on `pool`; workers run them from `source`."""
    from prefect import flow as prefect_flow

    cfg = load_config(config_path, overrides)
    # the checkout the workers run from: --source, else the current directory if it is a
    # distillery checkout (an installed package's parent is site-packages), else this one
    cwd = Path.cwd()
    src = Path(source or (cwd if (cwd / ENTRYPOINTS["label"][0].split(":")[0]).exists() else REPO)).resolve()
    rel = os.path.relpath(Path(config_path).resolve(), src)
    ensure_pool(pool)
    out = []
    for name, (entry, field) in ENTRYPOINTS.items():
        f = prefect_flow.from_source(source=str(src), entrypoint=entry)
        dep_id = f.deploy(
            name=f"{cfg.name}-{name}",
            work_pool_name=pool,
            parameters=_params(rel, overrides),
            build=False,
            push=False,
            print_next_steps=False,
            **_schedule_kwargs(cfg, field),
        )
        out.append((f"{f.name}/{cfg.name}-{name}", str(dep_id)))
    return out
