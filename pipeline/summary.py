"""What a version holds, as plain dicts and text tables: funnel, reasons, pose bins, reference NME.

Shared by `facecurate build`, `facecurate show` and the report.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline import shards
from pipeline.landmarks import nme_table, yaw_bins

YAW_BINS = ("0-30", "30-60", "60-90")


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
    preds = {t.column("landmarker")[0].as_py(): np.asarray(t.column("landmarks").to_pylist(), np.float32)}
    for i, alts in enumerate(t.column("alt_landmarks").to_pylist()):
        for alt in alts or []:
            preds.setdefault(alt["name"], np.full((t.num_rows, 136), np.nan, np.float32))[i] = alt["points"]
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


def pose_bins(faces: pa.Table) -> dict:
    yaw = np.asarray(faces.column("yaw_deg").to_pylist(), dtype=np.float32)
    keep = np.asarray(faces.column("keep").to_pylist(), dtype=bool)
    bins = yaw_bins(yaw)
    return {label: {"faces": int((bins == b).sum()), "kept": int(((bins == b) & keep).sum())}
            for b, label in enumerate(YAW_BINS)}


def version_summary(store: shards.Store, version: int | None = None) -> dict:
    version = shards.resolve_version(store, version)
    manifest = shards.read_manifest(store, version)
    faces = shards.read_faces(store, version, columns=[
        "keep", "yaw_deg", "ref_landmarks", "ref_pose", "landmarks", "landmarker", "alt_landmarks", "source"])
    counts = manifest["counts"]
    return {
        "ref": f"{store.dataset}@v{version}",
        "manifest": manifest,
        "kept_fraction": counts["faces_kept"] / counts["faces"] if counts["faces"] else 0.0,
        "pose_bins": pose_bins(faces),
        "reference_nme": reference_nme(faces),
    }


def format_summary(summary: dict) -> str:
    m, c = summary["manifest"], summary["manifest"]["counts"]
    lineage = "first version" if m.get("parent") is None else f"parent v{m['parent']}"
    if m.get("relabelled"):
        lineage += f", re-labelled: {m['relabelled']}"
    lines = [
        f"{summary['ref']}  ({lineage}, created {m['created_at']})",
        f"  images: {c['images_seen']} seen ({c.get('images_new', 0)} new this version), {c['images_decoded']} decoded, "
        f"{c['images_quarantined']} quarantined, {c['images_duplicate']} duplicates",
        f"  faces: {c['faces']} found in {c['images_with_faces']} images ({c['images_without_faces']} images with none); "
        f"kept {c['faces_kept']} ({summary['kept_fraction']:.1%}), dropped {c['faces_dropped']}",
    ]
    if c["quarantine_reasons"]:
        lines.append("  quarantine: " + ", ".join(f"{k} {v}" for k, v in sorted(c["quarantine_reasons"].items())))
    if c["drop_reasons"]:
        lines.append("  dropped by: " + ", ".join(f"{k} {v}" for k, v in sorted(c["drop_reasons"].items())))
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
    return "\n".join(lines)
