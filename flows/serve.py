"""Deployments of the three flows, served from one process against PREFECT_API_URL.

- `build-dataset`: on the catalog's cron schedule;
- `retrain`: triggered by `facecurate.dataset.landed` events of the catalog's dataset, with the
  event's resource (dataset@version) as its parameter;
- `report`: on demand (builds and rounds also write their report themselves).
"""

from __future__ import annotations

from prefect import serve
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
from prefect.schedules import Cron

from flows.build import build_dataset
from flows.events import LANDED, RESOURCE_PREFIX
from flows.report import report_version
from flows.retrain import retrain
from pipeline.catalog import Catalog

BUILD, RETRAIN, REPORT = "build-dataset", "retrain", "report"


def deployments(catalog: Catalog) -> list:
    path = str(catalog.path)
    schedules = [Cron(catalog.schedule.cron, timezone=catalog.schedule.timezone)] if catalog.schedule else []
    landed = DeploymentEventTrigger(
        name=f"{catalog.dataset} landed",
        expect={LANDED},
        match={"prefect.resource.id": f"{RESOURCE_PREFIX}{catalog.dataset}@*"},
        parameters={"catalog_path": path, "resource_id": "{{ event.resource.id }}"},
    )
    return [
        build_dataset.to_deployment(name=BUILD, schedules=schedules, parameters={"catalog_path": path}),
        retrain.to_deployment(name=RETRAIN, triggers=[landed], parameters={"catalog_path": path}),
        report_version.to_deployment(name=REPORT, parameters={"catalog_path": path}),
    ]


def serve_catalog(catalog: Catalog) -> None:
    """Block, serving the deployments (Ctrl-C stops; runs in flight finish or are marked crashed)."""
    serve(*deployments(catalog))
