"""Would the round's own drop make the kept labels better? Cross-fitted, on the wild crops.

Reads the per-face records `bench/relabel_rules.py --npz` keeps: for each wild crop, its label's
AFLW-21 NME (the references are never read by the trainer), its yaw bin, its cross-fitting fold and
the scores a student trained without that fold gives its label (cycle error, residual, self-critic),
with the verifier's figure for the label. The faces the catalog's rules keep are re-derived from that
figure and the catalog's `verifier_nme_pct` bounds per yaw bin (the figure is re-judged on the stored
crop, so a few faces near a bound may differ from the build's decision).

For each score, fold and share: the kept labels' mean NME per yaw bin after dropping that share of
each bin's kept faces the score ranks worst (`trainer.rescore.worst_by_yaw_bin`, the rule a round
applies), against before. A share is chosen on fold 0 and checked on fold 1.

Usage: .venv/bin/python bench/round_drop.py --npz out/probe2/relabel.npz --catalog docs/catalogs/wild-only.yaml [--json F]
"""

from __future__ import annotations

import argparse

import numpy as np
from common import emit, header

from pipeline.catalog import load_catalog
from pipeline.landmarks import roc_auc
from trainer.rescore import worst_by_yaw_bin

SHARES_PCT = (1.0, 2.0, 3.0, 5.0, 10.0)
YAW_OF_BIN = np.array([15.0, 45.0, 75.0])  # a yaw inside each bin, for the rule's own binning


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--npz", required=True)
    ap.add_argument("--catalog", default="docs/catalogs/wild-only.yaml")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    data = np.load(args.npz)
    nme, bins, fold = data["nme_label"], data["bin"].astype(int), data["fold"].astype(int)
    rule = next(r for r in load_catalog(args.catalog).rules.drop if r.feature == "verifier_nme_pct")
    keep = (bins >= 0) & (data["pred_label"] <= np.asarray(rule.max_by_yaw_bin)[bins])
    yaw = YAW_OF_BIN[bins]
    result = {**header(), "npz": args.npz, "faces": int(len(nme)), "kept": int(keep.sum())}
    for name, bad_high in (("cycle", data["cycle"]), ("residual", data["residual"]), ("critic", -data["critic"])):
        # How well the score ranks the kept labels' errors within each bin (both folds together).
        result[f"{name}_kept_auc_over_5pct_by_bin"] = [roc_auc(bad_high[keep & (bins == b)], nme[keep & (bins == b)] > 5.0)
                                                        for b in range(3)]
        for k in (0, 1):
            mine = keep & (fold == k)
            before = [float(nme[mine & (bins == b)].mean()) for b in range(3)]
            result[f"fold{k}_kept_nme_by_bin"] = before
            for pct in SHARES_PCT:
                dropped = worst_by_yaw_bin(np.where(fold == k, bad_high, np.nan), mine, yaw, pct)
                after = [float(nme[mine & ~dropped & (bins == b)].mean()) for b in range(3)]
                key = f"{name}_fold{k}_drop{pct:g}"
                result[f"{key}_change_by_bin"] = [a - b for a, b in zip(after, before)]
                result[f"{key}_dropped"] = int(dropped.sum())
                result[f"{key}_dropped_mean_nme"] = float(nme[dropped].mean())
                result[f"{key}_falls_in_every_bin"] = all(a < b for a, b in zip(after, before))
    emit(result, args.json)


if __name__ == "__main__":
    main()
