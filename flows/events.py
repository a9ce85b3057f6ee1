"""The events facecurate emits, and how a trigger reads them back: one place for the grammar."""

from __future__ import annotations

LANDED = "facecurate.dataset.landed"
RESOURCE_PREFIX = "facecurate.dataset."


def landed_resource(dataset: str, version: int) -> dict[str, str]:
    ref = f"{dataset}@v{version}"
    return {"prefect.resource.id": f"{RESOURCE_PREFIX}{ref}", "prefect.resource.name": ref,
            "facecurate.dataset": dataset, "facecurate.version": str(version)}


def ref_from_resource_id(resource_id: str) -> str:
    """'facecurate.dataset.faces@v3' -> 'faces@v3' (what a trigger passes to the retrain flow)."""
    if not resource_id.startswith(RESOURCE_PREFIX):
        raise ValueError(f"not a facecurate dataset resource: {resource_id!r}")
    return resource_id[len(RESOURCE_PREFIX):]


def emit_landed(dataset: str, version: int, payload: dict) -> None:
    from prefect.events import emit_event

    emit_event(event=LANDED, resource=landed_resource(dataset, version), payload=payload)
