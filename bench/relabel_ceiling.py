"""How far could relabelling from the chain's own candidates go? A ceiling for issue 22's relabel aims.

For the wild crops of a built version (their AFLW-21 references ride along, never read by the chain),
among the faces ranked worst (by the build's verifier figure, and by the truth itself) it reports the
share whose label a replacement would move closer to the references, and the mean change (points of
NME), for: the oracle (the candidate closest to the references: no rule can beat it), the candidate
the verifier predicts best, and each candidate always. If even the oracle moves fewer than 70% of
them closer, no rule choosing among these candidates meets the aim; a proposal must be better than
every candidate the chain has.

Usage: .venv/bin/python bench/relabel_ceiling.py --root out/datasets --dataset wild@v1 [--share 0.03] [--json out.json]
"""

from __future__ import annotations

import argparse

import numpy as np
from common import emit, header

from pipeline.references import nme21_pct
from pipeline.store.faces import read_faces
from pipeline.store.layout import Store, parse_ref


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default="out/datasets")
    parser.add_argument("--dataset", default="wild@v1")
    parser.add_argument("--share", type=float, default=0.03)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    name, version = parse_ref(args.dataset)
    rows = read_faces(Store(args.root, name), version, columns=[
        "landmarks", "alt_landmarks", "candidate_nme_pred", "verifier_nme_pct", "ref_points21"]).to_pylist()
    rows = [r for r in rows if r["ref_points21"] is not None]
    ref = np.array([np.reshape(r["ref_points21"], (21, 2)) for r in rows])
    label_nme = nme21_pct(np.array([np.reshape(r["landmarks"], (68, 2)) for r in rows]), ref)
    names = [a["name"] for a in rows[0]["alt_landmarks"]]
    candidates = np.array([[np.reshape(a["points"], (68, 2)) for a in r["alt_landmarks"]] for r in rows])
    cand_nme = np.stack([nme21_pct(candidates[:, k], ref) for k in range(len(names))], axis=1)
    predicted = np.array([r["candidate_nme_pred"] for r in rows])
    verifier = np.array([r["verifier_nme_pct"] for r in rows])

    n = len(rows)
    top = max(1, int(args.share * n))
    proposals = {"oracle (closest candidate)": cand_nme.min(axis=1),
                 "the verifier's best candidate": cand_nme[np.arange(n), predicted.argmin(axis=1)],
                 **{f"always {m}": cand_nme[:, k] for k, m in enumerate(names)}}
    result = {**header(), "dataset": args.dataset, "faces": n, "share": args.share, "ranked": top}
    for ranking, score in (("verifier", verifier), ("truth", label_nme)):
        worst = np.argsort(-score)[:top]
        result[f"by_{ranking}_label_nme"] = float(label_nme[worst].mean())
        for proposal, nme in proposals.items():
            key = f"by_{ranking}: {proposal}"
            result[f"{key}: closer"] = float((nme[worst] < label_nme[worst]).mean())
            result[f"{key}: mean change"] = float((nme[worst] - label_nme[worst]).mean())
    emit(result, args.json)


if __name__ == "__main__":
    main()
