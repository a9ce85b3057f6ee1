"""How far the detector's crops sit from the reference crops: the spread training augmentation must
cover (trainer/augment.py). On an AFLW2000-3D-layout folder: the `detector` protocol's roi (SCRFD box,
the teacher's refine pass) against the roi of the reference points, as centre offset / side and log
side ratio.

Usage: .venv/bin/python bench/roi_spread.py [--catalog catalog.yaml] [--data ../shared/data/aflw2000-dev]
"""

from __future__ import annotations

import argparse

import numpy as np

from flows.catalog import load_catalog
from pipeline.crops import roi_from_landmarks
from pipeline.labeling import Chain
from pipeline.settings import shared_root
from trainer.evaluate import load_eval_set, measurement_chain, prepare_faces


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--catalog", default="catalog.yaml")
    ap.add_argument("--data", default=str(shared_root() / "data" / "aflw2000-dev"))
    args = ap.parse_args()
    chain = Chain(measurement_chain(load_catalog(args.catalog).detectors, "auto", with_labels=False))
    data = load_eval_set(args.data)
    faces = prepare_faces("detector", data, chain, with_labels=False)  # the crops `evaluate` scores
    found = faces.index
    ref = np.stack([roi_from_landmarks(data.ref_points[i]) for i in found])
    det = faces.rois
    side = ref[:, 2] - ref[:, 0]
    offset = ((det[:, :2] + det[:, 2:]) - (ref[:, :2] + ref[:, 2:])) / 2 / side[:, None]
    log_scale = np.log((det[:, 2] - det[:, 0]) / side)
    print(f"{len(found)} of {len(data.names)} faces found")
    for title, v in (("centre x offset / side", offset[:, 0]), ("centre y offset / side", offset[:, 1]),
                     ("log side ratio", log_scale)):
        p5, p95 = np.percentile(v, [5, 95])
        print(f"{title:24s} mean {v.mean():+.4f}  std {v.std():.4f}  5% {p5:+.4f}  95% {p95:+.4f}  "
              f"max |.| {np.abs(v).max():.4f}")


if __name__ == "__main__":
    main()
