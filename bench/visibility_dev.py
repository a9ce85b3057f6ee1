"""Held-out check of the verifier's marked-point chances: aflw2000-dev's own AFLW-21 marks.

The verifier head learns from the wild crops which of AFLW's 21 points the annotators marked
(pipeline/verifier.py). aflw2000-dev's .mat files carry AFLW's 21 points too (`pt2d`, -1 = not
marked), and the verifier never trained on those faces: this prints the ROC-AUC of the shipped
verifier's chances against those marks, beside a prior that knows only each point's marked share
on the wild crops (what pose-blind point identity alone gives).

Usage: .venv/bin/python bench/visibility_dev.py [docs/catalogs/dev-only.yaml]  (after building it)
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import scipy.io

from pipeline.catalog import load_catalog, store_for_ref
from pipeline.crops import apply_affine
from pipeline.landmarks import roc_auc, yaw_bins
from pipeline.mobilenet import fused_for_inference, load_teacher_mobilenet
from pipeline.references import load_aflw21
from pipeline.settings import shared_root
from pipeline.store.faces import read_faces
from pipeline.store.layout import resolve_version
from pipeline.verifier import Verifier, VerifierInputs


def main(catalog_path: str = "docs/catalogs/dev-only.yaml") -> None:
    catalog = load_catalog(catalog_path)
    store, version = store_for_ref(catalog, None)
    version = resolve_version(store, version)
    rows = [r for r in read_faces(store, version, columns=["uri", "crop", "crop_affine", "alt_landmarks",
                                                                  "pose", "ref_landmarks", "ref_pose"]).to_pylist()
            if r["ref_landmarks"] is not None]  # the face the reference belongs to
    teacher = next(s for s in catalog.detectors.landmarkers if s.name == "tddfa_mb05")
    verifier = Verifier.load(fused_for_inference(load_teacher_mobilenet(teacher.weights, weights_sha256=teacher.sha256)))
    if verifier.head.vis is None:
        sys.exit("the shipped verifier's head has no marked-point output")
    inputs, marked, yaw = [], [], []
    for r in rows:
        affine = np.asarray(r["crop_affine"], np.float64)
        crop = cv2.cvtColor(cv2.imdecode(np.frombuffer(r["crop"], np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        cands = [(a["name"], apply_affine(np.asarray(a["points"], np.float32).reshape(68, 2), affine))
                 for a in r["alt_landmarks"]]
        inputs.append(VerifierInputs.of(crop, cands[0][1][None], cands, np.asarray(r["pose"], np.float32)))
        pt2d = scipy.io.loadmat(str(Path(r["uri"].removeprefix("file://")).with_suffix(".mat")))["pt2d"]
        marked.append((pt2d >= 0).all(0))
        yaw.append(r["ref_pose"][0])
    marked, yaw = np.stack(marked), np.asarray(yaw)
    chances = verifier.visibility(inputs)
    wild = load_aflw21(str(shared_root() / "data" / "aflw-wild-crops-refs.npz"))
    prior = np.mean([np.isfinite(p).all(-1) for p, _ in wild.values()], 0)  # [21] marked share on the wild crops
    bins = yaw_bins(yaw)
    print(f"{catalog.dataset}@v{version}: {len(rows)} faces, {marked.mean():.1%} of points marked")
    print("| faces | ROC-AUC, verifier's chances | ROC-AUC, per-point prior |")
    print("|---|---|---|")
    for name, sel in [("all", np.ones(len(rows), bool)), ("0-30", bins == 0), ("30-60", bins == 1),
                      ("60-90", bins == 2)]:
        m = marked[sel].ravel()
        if m.all() or not m.any():
            print(f"| {name} ({sel.sum()}) | - | - |")
            continue
        print(f"| {name} ({sel.sum()}) | {roc_auc(chances[sel].ravel(), m):.3f} | "
              f"{roc_auc(np.broadcast_to(prior, marked[sel].shape).ravel(), m):.3f} |")


if __name__ == "__main__":
    main(*sys.argv[1:])
