"""Print the markdown tables of docs/labels.md from a `facecurate verifier-train --json` report.

Usage: .venv/bin/python bench/labels_tables.py docs/labels.json
"""

from __future__ import annotations

import json
import sys


def _f(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _pct(v) -> str:
    return "-" if v is None else f"{v:.1%}"


def part(title: str, p: dict) -> None:
    print(f"\n#### {title}\n")
    print("| label | 0-30 | 30-60 | 60-90 | balanced | mean | share > 8% | ROC-AUC > 8% | ROC-AUC > 5% |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, t in [*p["candidates"].items(), ("**fused**", p["fused"])]:
        b = t["bins"]
        print(f"| {name} | {_f(b[0])} | {_f(b[1])} | {_f(b[2])} | {_f(t['balanced'])} | {_f(t['mean'])} | "
              f"{t['over_8_pct']:.1f}% | {t['auc_8']:.3f} | {t['auc_5']:.3f} |")
    if "head_auc_8" in p["fused"]:
        print(f"\nThe fused label's ROC-AUC is the label score's (pipeline/label_score.py); the head's own figure "
              f"for the fused label gives {p['fused']['head_auc_8']:.3f} (> 8%) and {p['fused']['head_auc_5']:.3f} (> 5%).")
    rule = p["rule"]
    bounds = ", ".join(f"{b:.2f}" for b in rule["max_by_yaw_bin"])
    print(f"\nRule `verifier_nme_pct` max by yaw bin [{bounds}]: keeps {_pct(rule['kept_share'])} of the faces; "
          f"{rule['kept_under_8_share']:.2%} of the kept labels are under 8% NME; kept labels "
          f"{_f(rule['kept_nme'])}% NME, dropped {_f(rule['dropped_nme'])}%.\n")
    print("| yaw bin | faces | kept | good labels kept | kept NME | dropped NME |")
    print("|---|---|---|---|---|---|")
    for label, b in zip(("0-30", "30-60", "60-90"), rule["per_yaw_bin"]):
        print(f"| {label} | {b['faces']} | {_pct(b['kept_share'])} | {_pct(b['good_kept_share'])} | "
              f"{_f(b['kept_nme'])} | {_f(b['dropped_nme'])} |")


def main() -> None:
    report = json.loads(open(sys.argv[1]).read())
    print(f"{report['faces']} training faces, {report['config']['folds']} folds, fusion tau {report['tau_pct']}%")
    if report.get("tau_tried"):
        print("\n| tau | fused balanced NME | mean | share > 8% | ROC-AUC > 8% / > 5% | rule keeps |\n|---|---|---|---|---|---|")
        for t, v in report["tau_tried"].items():
            auc = f"{v['auc_8']:.3f} / {v['auc_5']:.3f}" if "auc_8" in v else "-"
            kept = _pct(v["kept_share"]) if "kept_share" in v else "-"
            print(f"| {t} | {v['balanced']:.3f} | {v['mean']:.3f} | {v['over_8_pct']:.1f}% | {auc} | {kept} |")
    part("Training split, cross-fitted (AFLW's 21 points)", report["train_cross_fitted"])
    if "eval_68" in report:
        part(f"aflw2000-dev, evaluation only ({report['eval_68']['faces']} faces, 68 points)", report["eval_68"])
    print(f"\nShipped rule: {report['shipped_rule']}")


if __name__ == "__main__":
    main()
