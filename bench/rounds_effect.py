"""What each round did to a version's labels, against the wild crops' AFLW-21 references: per version
of a lineage, the faces it relabelled, the share of those that moved closer to their references and the
mean change, and the kept labels' NME per yaw bin (the references are never read by the trainer). Bins
by the face's own yaw estimate (`yaw_deg`, what the rules and the round's drop bin by) and, as `show`
does, by the reference's pose (`ref_pose`).

Usage: .venv/bin/python bench/rounds_effect.py --root out/datasets --dataset wild --versions 1 2 3 [--json F]
"""

from __future__ import annotations

import argparse

import numpy as np
import pyarrow.compute as pc
from common import emit, header

from pipeline.landmarks import yaw_bins
from pipeline.references import nme21_pct
from pipeline.store.faces import read_faces
from pipeline.store.layout import Store

COLUMNS = ["face_id", "landmarks", "ref_points21", "yaw_deg", "ref_pose", "keep", "relabel_round"]


def _version(store: Store, version: int) -> dict:
    faces = read_faces(store, version, columns=COLUMNS)
    faces = faces.filter(pc.is_valid(faces.column("ref_points21")))
    n = faces.num_rows
    nme = nme21_pct(np.asarray(faces.column("landmarks").to_pylist(), np.float32).reshape(n, 68, 2),
                    np.asarray(faces.column("ref_points21").to_pylist(), np.float64).reshape(n, 21, 2))
    return {"ids": faces.column("face_id").to_pylist(), "nme": nme,
            "keep": faces.column("keep").to_numpy(zero_copy_only=False),
            "bins": yaw_bins(faces.column("yaw_deg").to_numpy(zero_copy_only=False)),
            "ref_bins": yaw_bins(np.asarray([(p or [np.nan])[0] for p in faces.column("ref_pose").to_pylist()], np.float64)),
            "round": faces.column("relabel_round").to_pylist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="out/datasets")
    ap.add_argument("--dataset", default="wild")
    ap.add_argument("--versions", type=int, nargs="+", required=True)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    store = Store(args.root, args.dataset)
    out, previous = [], None
    for version in args.versions:
        v = _version(store, version)
        row = {"version": version, "faces": len(v["ids"]), "kept": int(v["keep"].sum()),
               "label_nme": [round(float(v["nme"][v["bins"] == b].mean()), 3) for b in range(3)],
               "kept_label_nme": [round(float(v["nme"][(v["bins"] == b) & v["keep"]].mean()), 3) for b in range(3)],
               "kept_label_nme_by_ref_pose": [round(float(v["nme"][(v["ref_bins"] == b) & v["keep"]].mean()), 4)
                                              for b in range(3)],
               "label_nme_mean": round(float(v["nme"].mean()), 3)}
        if previous is not None:
            before = dict(zip(previous["ids"], previous["nme"]))
            changed = [i for i, f in enumerate(v["ids"]) if abs(v["nme"][i] - before.get(f, v["nme"][i])) > 1e-6]
            delta = np.array([v["nme"][i] - before[v["ids"][i]] for i in changed])
            row.update({"relabelled": len(changed), "relabelled_share": round(len(changed) / len(v["ids"]), 4),
                        "moved_closer_share": round(float((delta < 0).mean()), 3) if changed else None,
                        "mean_change_pct": round(float(delta.mean()), 3) if changed else None})
        out.append(row)
        previous = v
    emit({**header(), "dataset": args.dataset, "versions": out}, args.json)


if __name__ == "__main__":
    main()
