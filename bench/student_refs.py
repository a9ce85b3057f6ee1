"""Students (or the teacher) against the AFLW-21 references of a version's wild crops: the training
split's own check of a training setting, with references the trainer never reads.

Each model sees every face's stored crop with the map drawn from the face's label (as in training);
its 68 points go back to the image and are measured at AFLW's 21 points per yaw bin (the teacher's yaw).
Usage: .venv/bin/python bench/student_refs.py --dataset wild@v1 teacher out/checkpoints/p4/step-0000080.pt
"""

from __future__ import annotations

import argparse

import cv2
import numpy as np
import pyarrow.compute as pc

from pipeline.crops import apply_affine, invert_affine
from pipeline.landmarks import yaw_bins
from pipeline.references import nme21_pct
from pipeline.store.faces import read_faces
from pipeline.store.layout import Store, parse_ref, resolve_version
from trainer.checkpoint import load_predictor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="'teacher' or checkpoint paths")
    ap.add_argument("--dataset", default="wild@v1")
    ap.add_argument("--root", default="out/datasets")
    args = ap.parse_args()

    name, version = parse_ref(args.dataset)
    store = Store(args.root, name)
    faces = read_faces(store, resolve_version(store, version),
                       columns=["crop", "crop_affine", "landmarks", "ref_points21", "yaw_deg"])
    faces = faces.filter(pc.is_valid(faces.column("ref_points21")))
    n = faces.num_rows
    label = np.asarray(faces.column("landmarks").to_pylist(), np.float32).reshape(n, 68, 2)
    affine = np.asarray(faces.column("crop_affine").to_pylist(), np.float32).reshape(n, 6)
    ref = np.asarray(faces.column("ref_points21").to_pylist(), np.float64).reshape(n, 21, 2)
    bins = yaw_bins(faces.column("yaw_deg").to_numpy(zero_copy_only=False))
    crops = np.stack([cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
                      for b in faces.column("crop").to_pylist()])
    back = np.stack([invert_affine(a) for a in affine])

    def row(title: str, points: np.ndarray) -> None:
        nme = nme21_pct(points, ref)
        cells = " | ".join(f"{np.nanmean(nme[bins == b]):.2f}" for b in range(3))
        print(f"| {title} | {cells} | {np.nanmean(nme):.3f} |", flush=True)

    print(f"{args.dataset}: {n} faces with AFLW-21 references\n\n| model | 0-30 | 30-60 | 60-90 | mean |\n|---|---|---|---|---|")
    row("label", label)
    for spec in args.models:
        model = load_predictor(spec, device="cpu")
        points = model.points(model.params(crops, apply_affine(label, affine)))
        row(spec, apply_affine(points, back))


if __name__ == "__main__":
    main()
