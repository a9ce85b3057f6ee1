"""What a version holds, as a dict (its typed manifest, then plain dicts) and text tables: funnel,
reasons, pose bins, reference NME.

Shared by `facecurate build`, `facecurate show` and the report.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.landmarks import YAW_BINS, nme_table, yaw_bins
from pipeline.store.faces import faces_schema, read_faces
from pipeline.store.layout import Store, resolve_version
from pipeline.store.manifest import Manifest


def reference_nme(faces: pa.Table) -> dict:
    """Per landmarker (primary and alternatives): AFLW2000-3D-protocol NME against reference labels,
    over the faces that carry them; also split by the faces' keep decision."""
    cols = ["ref_landmarks", "ref_pose", "landmarks", "landmarker", "alt_landmarks", "keep"]
    t = faces.select(cols).filter(pa.compute.is_valid(faces.column("ref_landmarks")))
    if t.num_rows == 0:
        return {}
    ref = np.asarray(t.column("ref_landmarks").to_pylist(), dtype=np.float32).reshape(-1, 68, 2)
    yaw = np.asarray(t.column("ref_pose").to_pylist(), dtype=np.float32)[:, 0]
    keep = np.asarray(t.column("keep").to_pylist(), dtype=bool)
    preds = _labels_by_name(t)
    from pipeline.landmarks import nme_pct

    out = {}
    for name, pred in preds.items():
        nme = nme_pct(pred.reshape(-1, 68, 2), ref)
        table = nme_table(nme, yaw)
        table["kept_mean"] = float(np.nanmean(nme[keep])) if keep.any() else None
        table["dropped_mean"] = float(np.nanmean(nme[~keep])) if (~keep).any() else None
        table["n_kept"], table["n_dropped"] = int(keep.sum()), int((~keep).sum())
        out[name] = table
    return out


def _labels_by_name(t: pa.Table) -> dict[str, np.ndarray]:
    """{'label': the faces' labels, each candidate's name: its points (NaN where a face lacks it)} as [N, 136].
    Versions before the verifier name the label by its landmarker (there the label was the primary's).
    Read as Arrow buffers, not Python lists: a version's summary reads every face's candidates."""
    names = set(t.column_names)
    label_name = "label" if "label_source" in names else t.column("landmarker")[0].as_py()
    preds = {label_name: _points(t.column("landmarks").combine_chunks(), t.num_rows)}
    alts = t.column("alt_landmarks").combine_chunks()
    entries = alts.flatten()
    if len(entries) == 0:
        return preds
    face_of = pc.list_parent_indices(alts).to_numpy()
    alt_names = np.asarray(entries.field("name").to_pylist(), dtype=object)
    alt_points = _points(entries.field("points"), len(entries))
    for name in dict.fromkeys(alt_names):  # first-seen order, as the faces list them
        rows = alt_names == name
        preds[name] = np.full((t.num_rows, 136), np.nan, np.float32)
        preds[name][face_of[rows]] = alt_points[rows]
    return preds


def _points(lists: pa.Array, n: int) -> np.ndarray:
    """A list<float> array of 136 values per row (x0, y0, x1, ...) -> [n, 136] float32."""
    return np.asarray(lists.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(n, 136)


def _mean_or_none(v: np.ndarray) -> float | None:
    return float(np.nanmean(v)) if len(v) and np.isfinite(v).any() else None


def label_quality(faces: pa.Table) -> dict:
    """Where faces carry references: how good the labels are and how well the verifier and the rules
    judge them, per kind of reference ('68': .mat 68 points, AFLW2000-3D protocol; 'aflw21': AFLW's 21
    points, the wild crops' protocol). Per yaw bin of the reference's pose: each candidate's and the
    label's NME, kept and dropped labels' NME, the share of good labels (NME <= 8%) kept; and the
    verifier's ROC-AUC for label NME > 5% and > 8%."""
    from pipeline.landmarks import nme_pct, roc_auc
    from pipeline.references import nme21_pct

    out = {}
    for kind, column in (("68", "ref_landmarks"), ("aflw21", "ref_points21")):
        if column not in faces.column_names:
            continue
        t = faces.filter(pa.compute.is_valid(faces.column(column)))
        if t.num_rows == 0:
            continue
        ref = np.asarray(t.column(column).to_pylist(), np.float32).reshape(t.num_rows, -1, 2)
        measure = (lambda p, r=ref: nme_pct(p, r)) if kind == "68" else (lambda p, r=ref: nme21_pct(p, r))
        yaw = np.asarray([(p or [np.nan])[0] for p in t.column("ref_pose").to_pylist()], np.float64)
        bins = yaw_bins(yaw)
        keep = np.asarray(t.column("keep").to_pylist(), bool)
        preds = _labels_by_name(t)
        label_name = next(iter(preds))
        nme = {name: measure(p.reshape(-1, 68, 2)) for name, p in preds.items()}
        label = nme[label_name]
        good = label <= 8.0

        masks = [bins == b for b in range(3)]
        block = {
            "faces": t.num_rows,
            "label": label_name,
            "nme_by_candidate": {name: {"bins": [_mean_or_none(v[m]) for m in masks], "mean": _mean_or_none(v)}
                                 for name, v in nme.items()},
            "kept_nme_by_bin": [_mean_or_none(label[m & keep]) for m in masks],
            "dropped_nme_by_bin": [_mean_or_none(label[m & ~keep]) for m in masks],
            "kept_share_by_bin": [float(keep[m].mean()) if m.any() else None for m in masks],
            "good_kept_share_by_bin": [float(keep[m & good].mean()) if (m & good).any() else None for m in masks],
            "kept_under_8_share": float(good[keep].mean()) if keep.any() else None,
        }
        if "verifier_nme_pct" in t.column_names:
            score = np.asarray(t.column("verifier_nme_pct").to_pylist(), np.float64)
            block["verifier_auc"] = {"over_5": roc_auc(score, label > 5), "over_8": roc_auc(score, label > 8)}
        out[kind] = block
    return out


def pose_bins(faces: pa.Table) -> dict:
    yaw = np.asarray(faces.column("yaw_deg").to_pylist(), dtype=np.float32)
    keep = np.asarray(faces.column("keep").to_pylist(), dtype=bool)
    bins = yaw_bins(yaw)
    return {label: {"faces": int((bins == b).sum()), "kept": int(((bins == b) & keep).sum())}
            for b, label in enumerate(YAW_BINS)}


# Summaries already computed in this process, by store, version and manifest: a committed version never
# changes, and a build's flow, its report and the command that ran it all summarise the new version.
_SUMMARIES: dict[tuple[str, int, str], dict] = {}
_SUMMARIES_KEPT = 4


def version_summary(store: Store, version: int | None = None) -> dict:
    version = resolve_version(store, version)
    manifest = Manifest.read(store, version)
    # The manifest is in the key: a version deleted and built again under the same number is another one.
    key = (f"{store.root}|{store.dataset}", version, json.dumps(manifest.to_dict(), sort_keys=True, default=str))
    if key not in _SUMMARIES:
        while len(_SUMMARIES) >= _SUMMARIES_KEPT:
            _SUMMARIES.pop(next(iter(_SUMMARIES)))
        _SUMMARIES[key] = _summarise(store, version, manifest)
    return copy.deepcopy(_SUMMARIES[key])


def _summarise(store: Store, version: int, manifest: Manifest) -> dict:
    wanted = ["keep", "yaw_deg", "ref_landmarks", "ref_pose", "landmarks", "landmarker", "alt_landmarks", "source",
              "ref_points21", "verifier_nme_pct", "label_source"]
    present = set(faces_schema(store, version).names)
    faces = read_faces(store, version, columns=[c for c in wanted if c in present])
    counts = manifest.counts
    return {
        "ref": f"{store.dataset}@v{version}",
        "manifest": manifest,
        "kept_fraction": counts.faces_kept / counts.faces if counts.faces else 0.0,
        "pose_bins": pose_bins(faces),
        "reference_nme": reference_nme(faces),
        "label_quality": label_quality(faces),
    }


def summary_json(summary: dict) -> str:
    """The summary as `facecurate show --json` prints it: its manifest as the file has it."""
    return json.dumps(summary, indent=2, default=lambda o: o.to_dict() if isinstance(o, Manifest) else str(o))


def format_summary(summary: dict) -> str:
    m: Manifest = summary["manifest"]
    c = m.counts
    lineage = "first version" if m.parent is None else f"parent v{m.parent}"
    if m.relabelled:
        lineage += f", re-labelled: {m.relabelled}"
    lines = [
        f"{summary['ref']}  ({lineage}, created {m.created_at})",
        f"  images: {c.images_seen} seen ({c.images_new} new this version), {c.images_decoded} decoded, "
        f"{c.images_quarantined} quarantined, {c.images_duplicate} duplicates",
        f"  faces: {c.faces} found in {c.images_with_faces} images ({c.images_without_faces} images with none); "
        f"kept {c.faces_kept} ({summary['kept_fraction']:.1%}), dropped {c.faces_dropped}",
    ]
    if m.round_folded:  # a trainer round's scores were folded into this version
        rounds = ", ".join(f"r{r}" for r in m.round_folded)
        lines.append(f"  trainer round {rounds} folded: {c.faces_relabelled} faces relabelled "
                     f"(their label_source says by what, relabel_reason why)")
    if c.quarantine_reasons:
        lines.append("  quarantine: " + ", ".join(f"{k} {v}" for k, v in sorted(c.quarantine_reasons.items())))
    if c.drop_reasons:
        lines.append("  dropped by: " + ", ".join(f"{k} {v}" for k, v in sorted(c.drop_reasons.items())))
    lines.append("  yaw bins (faces/kept): " + ", ".join(
        f"{k}: {v['faces']}/{v['kept']}" for k, v in summary["pose_bins"].items()))
    if summary["reference_nme"]:
        lines.append("  NME % vs reference labels (AFLW2000-3D protocol):")
        lines.append(f"    {'landmarker':<14}{'0-30':>7}{'30-60':>7}{'60-90':>7}{'balanced':>10}{'kept':>7}{'dropped':>9}  n")
        for name, t in summary["reference_nme"].items():
            b = t["bins"]
            fmt = lambda v: f"{v:.2f}" if v is not None and np.isfinite(v) else "-"  # noqa: E731
            lines.append(f"    {name:<14}{fmt(b[0]['mean']):>7}{fmt(b[1]['mean']):>7}{fmt(b[2]['mean']):>7}"
                         f"{fmt(t['balanced']):>10}{fmt(t['kept_mean']):>7}{fmt(t['dropped_mean']):>9}  {t['count']}")
    lines += format_label_quality(summary.get("label_quality") or {})
    return "\n".join(lines)


def format_label_quality(quality: dict) -> list[str]:
    fmt = lambda v, pct=False: "-" if v is None or not np.isfinite(v) else (f"{v:.1%}" if pct else f"{v:.2f}")  # noqa: E731
    lines = []
    for kind, q in quality.items():
        what = "68 points, AFLW2000-3D protocol" if kind == "68" else "AFLW's 21 points"
        lines.append(f"  labels vs references ({what}, {q['faces']} faces; yaw bins 0-30 / 30-60 / 60-90):")
        for name, t in q["nme_by_candidate"].items():
            lines.append(f"    NME {name:<18}" + "".join(f"{fmt(v):>7}" for v in t["bins"]) + f"  mean {fmt(t['mean'])}")
        lines.append("    kept label NME        " + "".join(f"{fmt(v):>7}" for v in q["kept_nme_by_bin"]))
        lines.append("    dropped label NME     " + "".join(f"{fmt(v):>7}" for v in q["dropped_nme_by_bin"]))
        lines.append("    good labels kept      " + "".join(f"{fmt(v, True):>7}" for v in q["good_kept_share_by_bin"])
                     + f"  (kept labels under 8%: {fmt(q['kept_under_8_share'], True)})")
        if "verifier_auc" in q:
            a = q["verifier_auc"]
            lines.append(f"    verifier ROC-AUC: label NME > 5% {fmt(a['over_5'])}, > 8% {fmt(a['over_8'])}")
    return lines
