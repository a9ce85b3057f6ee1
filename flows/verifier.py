"""Train the label verifier for a catalog (the verifier-train command): build its dataset in this process
(`build_in_process`), then hand the version to trainer/verifier.py; building data is the flows' job, the
trainer only reads the versions they built."""

from __future__ import annotations

from flows.inprocess import build_in_process
from pipeline.catalog import store_for_ref
from pipeline.mobilenet import fused_for_inference, load_teacher_mobilenet
from pipeline.store.layout import resolve_version
from trainer.verifier import VerifierTrainConfig, train_verifier


def train_verifier_for_catalog(catalog, out_path, cfg: VerifierTrainConfig, *, dataset_ref: str | None = None,
                               tau: float | None = None) -> dict:
    """The reproducible command: build the catalog's dataset in this process (candidates and references;
    nothing when it is up to date), then `train_verifier` on its latest (or the given) version."""
    teacher = next((s for s in catalog.detectors.landmarkers if s.name == "tddfa_mb05"), None)
    if teacher is None:
        raise ValueError("the verifier reads tddfa_mb05's features: the catalog's chain needs that landmarker")
    if dataset_ref is None:
        build_in_process(catalog)
    store, version = store_for_ref(catalog, dataset_ref)

    version = resolve_version(store, version)
    net = fused_for_inference(load_teacher_mobilenet(teacher.weights, weights_sha256=teacher.sha256))
    return train_verifier(store, version, net, out_path, cfg, tau)
