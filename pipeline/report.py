"""A dataset version -> one self-contained HTML page: funnel, feature distributions, NME vs
references, trainer rounds, and galleries of crops with their 68 points. No JS library, no network.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pipeline.crops import apply_affine
from pipeline.landmarks import YAW_BINS, ced_curve, nme_pct, yaw_bins
from pipeline.store.faces import faces_schema, read_faces, read_side_table
from pipeline.store.files import read_table_file
from pipeline.store.layout import Store, resolve_version
from pipeline.store.manifest import Counts, Manifest
from pipeline.store.schema import FEATURE_COLUMNS
from pipeline.summary import version_summary

GALLERY_SIZE = 12
_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 16px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}.grid{display:flex;flex-wrap:wrap;gap:8px}
.card{width:150px;font-size:11px;word-break:break-all}.card img{width:150px;height:150px;cursor:zoom-in}
.hist{display:inline-block;margin:4px 12px 12px 0}.muted{color:#777}.kept{color:#1a7f37}.dropped{color:#c62828}
#lightbox{display:none;position:fixed;inset:0;background:rgba(0,0,0,.85);align-items:center;justify-content:center}
#lightbox.open{display:flex}#lightbox img{width:480px;height:480px;image-rendering:pixelated}
#lightbox p{color:#fff;max-width:480px}
"""
_JS = """
document.addEventListener('click', e => {
  const img = e.target.closest('img.face');
  const box = document.getElementById('lightbox');
  if (img) { box.querySelector('img').src = img.src; box.querySelector('p').textContent = img.dataset.caption;
             box.classList.add('open'); }
  else if (e.target.closest('#lightbox')) { box.classList.remove('open'); }
});
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def _fmt(v, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _table(header: list[str], rows: list[list], left: int = 1, id_: str = "") -> str:
    head = "".join(f"<th class='{'l' if i < left else ''}'>{esc(h)}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"<td class='{'l' if i < left else ''}'>{esc(_fmt(c))}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    id_attr = f" id='{esc(id_)}'" if id_ else ""
    return f"<table{id_attr}><tr>{head}</tr>{body}</table>"


def _histogram_svg(name: str, kept: np.ndarray, dropped: np.ndarray, bins: int = 24) -> str:
    values = np.concatenate([kept, dropped])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return ""
    lo, hi = np.percentile(values, [0.5, 99.5])
    hi = hi if hi > lo else lo + 1
    edges = np.linspace(lo, hi, bins + 1)
    hk = np.histogram(np.clip(kept[np.isfinite(kept)], lo, hi), edges)[0]
    hd = np.histogram(np.clip(dropped[np.isfinite(dropped)], lo, hi), edges)[0]
    top = max(int(hk.max(initial=0)), int(hd.max(initial=0)), 1)
    w, h = 240, 90
    bw = w / bins
    bars = []
    for i in range(bins):
        for count, color, dx in ((hk[i], "#1a7f37", 0), (hd[i], "#c62828", bw / 2)):
            bh = count / top * (h - 14)
            bars.append(f"<rect x='{i * bw + dx:.1f}' y='{h - 14 - bh:.1f}' width='{bw / 2:.1f}' height='{bh:.1f}' "
                        f"fill='{color}'><title>{count}</title></rect>")
    return (f"<div class='hist'><div><b>{esc(name)}</b></div><svg width='{w}' height='{h}'>{''.join(bars)}"
            f"<text x='0' y='{h - 2}' font-size='10'>{lo:.3g}</text>"
            f"<text x='{w}' y='{h - 2}' font-size='10' text-anchor='end'>{hi:.3g}</text></svg></div>")


def _ced_svg(curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
    w, h, pad = 360, 220, 30
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    lines = []
    for (name, (x, y)), color in zip(curves.items(), colors):
        pts = " ".join(f"{pad + xi / 10 * (w - pad):.1f},{h - pad - yi * (h - 2 * pad):.1f}" for xi, yi in zip(x, y))
        lines.append(f"<polyline fill='none' stroke='{color}' stroke-width='2' points='{pts}'/>")
        lines.append(f"<text x='{w - 110}' y='{h - pad - 60 + 14 * (len(lines) // 2)}' fill='{color}' "
                     f"font-size='11'>{esc(name)}</text>")
    axes = (f"<line x1='{pad}' y1='{h - pad}' x2='{w}' y2='{h - pad}' stroke='#999'/>"
            f"<line x1='{pad}' y1='0' x2='{pad}' y2='{h - pad}' stroke='#999'/>"
            f"<text x='{pad}' y='{h - 10}' font-size='10'>0</text><text x='{w - 20}' y='{h - 10}' font-size='10'>10% NME</text>"
            f"<text x='2' y='{pad + 4}' font-size='10'>1.0</text><text x='2' y='{h - pad}' font-size='10'>0</text>")
    return f"<svg width='{w}' height='{h}' id='ced'>{axes}{''.join(lines)}</svg>"


def _face_thumb(row: dict) -> str:
    crop = cv2.imdecode(np.frombuffer(row["crop"], np.uint8), cv2.IMREAD_COLOR)
    crop = cv2.resize(crop, (240, 240), interpolation=cv2.INTER_LINEAR)
    points = apply_affine(np.asarray(row["landmarks"], np.float32).reshape(68, 2), np.asarray(row["crop_affine"])) * 2
    color = (55, 127, 26) if row["keep"] else (40, 40, 198)
    for x, y in points:
        cv2.circle(crop, (int(round(x)), int(round(y))), 2, color, -1, lineType=cv2.LINE_AA)
    ok, jpg = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 85])
    return "data:image/jpeg;base64," + base64.b64encode(jpg.tobytes()).decode()


def display_name(uri) -> str:
    """What a person calls the file: a tar member's whole name (which may hold '/'), else the file name."""
    uri = str(uri)
    return uri.split("#", 1)[1] if "#" in uri else uri.rsplit("/", 1)[-1]


def _script_json(value) -> str:
    """JSON for a <script> element: entities are not decoded there, so '<' is written as \\u003c
    (valid JSON) and no string from the data can close the element."""
    return json.dumps(value).replace("<", "\\u003c")


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and np.isnan(value)) and value != ""


def _gallery(title: str, rows: pd.DataFrame, anchor: str) -> str:
    cards = []
    for _, r in rows.iterrows():
        state = "kept" if r["keep"] else "dropped"
        caption = (f"{r['face_id'][:12]}… {display_name(r['uri'])} | {state} | weight {r['weight']:.2f}"
                   + (f" | {r['reject_reason']}" if _present(r["reject_reason"]) else "")
                   + (f" | score {r['score']:.2f}" if "score" in r and pd.notna(r.get("score")) else ""))
        cards.append(
            f"<div class='card'><img class='face' loading='lazy' alt='{esc(r['face_id'])}' src='{_face_thumb(r)}' "
            f"data-caption='{esc(caption)}'><div><span class='{state}'>{state}</span> "
            f"w={r['weight']:.2f} yaw={_fmt(float(r['yaw_deg']), 0)}</div><div class='muted'>{esc(display_name(r['uri']))}</div>"
            + (f"<div class='dropped'>{esc(r['reject_reason'])}</div>" if _present(r["reject_reason"]) else "")
            + "</div>")
    if not cards:
        return ""
    return f"<h3 id='{esc(anchor)}'>{esc(title)} ({len(cards)})</h3><div class='grid'>{''.join(cards)}</div>"


def _rounds_section(store: Store, version: int) -> str:
    files = store.list_scores(version)
    manifest = Manifest.read(store, version)
    if "scores" in manifest.tables:
        files.insert(0, f"{store.version_dir(version)}/scores.parquet")
    evals = _round_evaluations(store)
    if not files:
        return evals or "<p class='muted'>No trainer round has scored this version yet.</p>"
    rows = []
    for f in files:
        s = read_table_file(store.fs, f).to_pandas()
        rows.append([f.rsplit("/", 1)[-1], int(s["round"].iloc[0]) if len(s) else "-", len(s), float(s.cycle_error.median()),
                     float(s.landmark_residual.median()), float(s.critic_score.median()), float(s.new_weight.mean()),
                     int((s.new_weight < 0.1).sum())])
    parts = [_table(["scores file", "round", "faces", "median cycle %", "median residual %", "median critic",
                     "mean new weight", "weight < 0.1"], rows, id_="rounds-table"), evals]
    if "scores" in manifest.tables and manifest.parent:
        parts.append(_state_changes(store, manifest.parent, version))
    return "".join(parts)


def _latest_scores(store: Store, version: int) -> tuple[str, pd.DataFrame] | None:
    """The newest trainer round's scores for this version: its own round, else the one it folded."""
    files = store.list_scores(version)
    if files:
        name = files[-1].rsplit("/", 1)[-1].removesuffix(".parquet")
        return name, read_table_file(store.fs, files[-1]).to_pandas()
    folded = f"{store.version_dir(version)}/scores.parquet"
    if not store.fs.exists(folded):
        return None
    return "folded round", read_table_file(store.fs, folded).to_pandas()


def _round_evaluations(store: Store) -> str:
    """NME per round against the reference labels of each trained version (rounds/vNNNN/eval.json)."""
    rows = []
    for round_version in store.round_versions():
        path = f"{store.round_dir(round_version)}/eval.json"
        if not store.fs.exists(path):
            continue
        with store.fs.open(path, "rb") as f:
            e = json.loads(f.read())
        m, p = e["model"], e["pseudo_labels"]
        rows.append([f"v{round_version:04d}", e["faces"], *(b["mean"] for b in m["bins"]), m["balanced"], p["balanced"]])
    if not rows:
        return ""
    return "<h3>NME per round (reference faces of the trained version)</h3>" + _table(
        ["round on", "faces", "0-30", "30-60", "60-90", "model balanced", "pseudo-labels balanced"], rows,
        id_="round-nme")


def _state_changes(store: Store, parent: int, version: int) -> str:
    """What folding a round's scores changed: faces whose keep flipped and how weights moved."""
    cols = ["face_id", "keep", "weight"]
    before = read_faces(store, parent, columns=cols).to_pandas().set_index("face_id")
    after = read_faces(store, version, columns=cols).to_pandas().set_index("face_id")
    both = before.join(after, lsuffix="_before", rsuffix="_after", how="inner")
    delta = both.weight_after - both.weight_before
    rows = [["kept -> dropped", int((both.keep_before & ~both.keep_after).sum())],
            ["dropped -> kept", int((~both.keep_before & both.keep_after).sum())],
            ["weight down by > 0.1", int((delta < -0.1).sum())], ["weight up by > 0.1", int((delta > 0.1).sum())],
            ["mean weight before", float(both.weight_before.mean())], ["mean weight after", float(both.weight_after.mean())]]
    return f"<h3>Changes from v{parent} to v{version}</h3>" + _table(["change", "faces"], rows, id_="state-changes")


def constant_features(faces: pd.DataFrame, features: list[str]) -> dict[str, list[str]]:
    """Per source, the features that take one value on all its faces (e.g. face_px and det_score on
    pre-cropped crops): the rules cannot learn anything from them there, and the report says so."""
    out = {}
    for source, rows in faces.groupby("source"):
        if len(rows) < 2:
            continue
        names = [f for f in features if rows[f].notna().any() and rows[f].nunique(dropna=False) == 1]
        if names:
            out[str(source)] = names
    return out


def _label_quality_html(quality: dict) -> str:
    html = []
    for kind, q in quality.items():
        what = "68 points, AFLW2000-3D protocol" if kind == "68" else "AFLW's 21 points"
        rows = [[f"NME {name}", *t["bins"], t["mean"]] for name, t in q["nme_by_candidate"].items()]
        rows += [["kept label NME", *q["kept_nme_by_bin"], None], ["dropped label NME", *q["dropped_nme_by_bin"], None],
                 ["share kept", *q["kept_share_by_bin"], None],
                 ["share of good labels (<= 8%) kept", *q["good_kept_share_by_bin"], q["kept_under_8_share"]]]
        html.append(f"<h3>{esc(what)}: {q['faces']} faces (label: {esc(q['label'])})</h3>")
        html.append(_table(["", "0-30", "30-60", "60-90", "all / kept under 8%"], rows, id_=f"label-quality-{kind}"))
        if "verifier_auc" in q:
            a = q["verifier_auc"]
            html.append(f"<p>Verifier ROC-AUC for label NME &gt; 5%: {a['over_5']:.3f}, &gt; 8%: {a['over_8']:.3f}</p>")
    return "".join(html)


_REPORT_COLUMNS = ["face_id", "uri", "source", "keep", "weight", "reject_reason", "crop", "crop_affine", "landmarks",
                   "ref_landmarks", "alt_landmarks", "landmarker", "det_score", *FEATURE_COLUMNS]


def _header_html(summary: dict) -> list[str]:
    manifest: Manifest = summary["manifest"]
    return [f"<h1>Landmark quality report: {esc(summary['ref'])}</h1>",
            f"<p class='muted'>created {esc(manifest.created_at)}, parent v{esc(manifest.parent)}, catalog "
            f"{esc(manifest.catalog_hash[:12])}; detectors: "
            + ", ".join(f"{esc(d.name)} ({esc(d.role)})" for d in manifest.detectors) + "</p>"]


def _funnel_html(counts: Counts, quarantine: pd.DataFrame) -> list[str]:
    """Images and faces through each stage, with the reasons files were quarantined and faces dropped."""
    funnel = [["images seen", counts.images_seen], ["decoded", counts.images_decoded],
              ["quarantined", counts.images_quarantined], ["duplicates", counts.images_duplicate],
              ["images with faces", counts.images_with_faces], ["faces found", counts.faces],
              ["faces kept", counts.faces_kept], ["faces dropped", counts.faces_dropped]]
    parts = ["<h2 id='funnel'>Funnel</h2>", _table(["stage", "count"], funnel, id_="funnel-table")]
    if counts.quarantine_reasons:
        parts.append("<h3>Quarantined, by reason</h3>" + _table(
            ["reason", "images"], sorted(counts.quarantine_reasons.items()), id_="quarantine-reasons"))
        q = quarantine.head(50)
        parts.append("<details><summary>quarantined files</summary>" + _table(
            ["uri", "stage", "reason", "detail"], q[["uri", "stage", "reason", "detail"]].values.tolist(), left=4)
            + "</details>")
    if counts.drop_reasons:
        parts.append("<h3>Dropped, by rule</h3>" + _table(["rule", "faces"], sorted(counts.drop_reasons.items()),
                                                          id_="drop-reasons"))
    return parts


def _features_html(faces: pd.DataFrame) -> list[str]:
    """One histogram per quality feature, kept against dropped."""
    parts = ["<h2 id='features'>Quality features (<span class='kept'>kept</span> vs <span class='dropped'>dropped</span>)</h2>"]
    kept, dropped = faces[faces.keep], faces[~faces.keep]
    features = [c for c in ("det_score", *FEATURE_COLUMNS) if c in faces.columns]
    constant = constant_features(faces, features)
    if constant:
        parts.append("<p id='constant-features'>Constant on a source, so no evidence there: " + "; ".join(
            f"{esc(src)}: {', '.join(esc(f) for f in names)}" for src, names in sorted(constant.items())) + "</p>")
    for name in features:
        parts.append(_histogram_svg(name, kept[name].to_numpy(np.float64), dropped[name].to_numpy(np.float64)))
    return parts


def _pose_html(faces: pd.DataFrame) -> list[str]:
    yaw_bin = yaw_bins(faces.yaw_deg.to_numpy(np.float64))
    rows = []
    for b, label in enumerate(YAW_BINS):
        sel = faces[yaw_bin == b]
        rows.append([label, len(sel), int(sel.keep.sum()), float(sel.agreement_nme_pct.median()) if len(sel) else None,
                     float(sel.flip_nme_pct.median()) if len(sel) else None])
    return ["<h2 id='pose'>Per yaw bin</h2>",
            _table(["yaw", "faces", "kept", "median agreement NME %", "median flip NME %"], rows, id_="yaw-table")]


def _reference_nme_html(summary: dict, faces: pd.DataFrame, present: set[str]) -> list[str]:
    """NME per yaw bin of each landmarker against the reference labels, and their CED curves."""
    if not summary["reference_nme"]:
        return []
    rows, curves = [], {}
    ref_rows = faces[faces.ref_landmarks.notna()]
    ref = np.stack(ref_rows.ref_landmarks.to_numpy()).reshape(-1, 68, 2)
    for name, t in summary["reference_nme"].items():
        b = t["bins"]
        rows.append([name, b[0]["mean"], b[1]["mean"], b[2]["mean"], t["balanced"], t.get("auc_7"),
                     t.get("failure_10"), t["kept_mean"], t["dropped_mean"], t["count"]])
    label_name = "label" if "label_source" in present else str(ref_rows.landmarker.iloc[0])
    predictions = {label_name: np.stack(ref_rows.landmarks.to_numpy()).reshape(-1, 68, 2)}
    for i, alts in enumerate(ref_rows.alt_landmarks):
        for alt in (alts if alts is not None else []):
            predictions.setdefault(alt["name"], np.full((len(ref_rows), 68, 2), np.nan))[i] = \
                np.asarray(alt["points"], np.float64).reshape(68, 2)
    for name, pred in predictions.items():  # one CED curve per landmarker
        curves[name] = ced_curve(nme_pct(pred, ref), max_pct=10)
    return ["<h2 id='nme'>Against reference labels (AFLW2000-3D protocol)</h2>",
            _table(["landmarker", "0-30", "30-60", "60-90", "balanced", "AUC@7", "fail@10", "kept", "dropped",
                    "n"], rows, id_="nme-table"), _ced_svg(curves)]


def _galleries_html(store: Store, version: int, faces: pd.DataFrame, seed: int) -> list[str]:
    """Crops with their points: kept, dropped, the worst by each score, a random draw, and each yaw bin."""
    kept, dropped = faces[faces.keep], faces[~faces.keep]
    rng = np.random.default_rng(seed)
    galleries = [("kept", kept.sample(min(GALLERY_SIZE, len(kept)), random_state=seed) if len(kept) else kept),
                 ("dropped", dropped.sample(min(GALLERY_SIZE, len(dropped)), random_state=seed) if len(dropped) else dropped),
                 ("worst agreement", faces.nlargest(GALLERY_SIZE, "agreement_nme_pct")),
                 *([("worst verifier score", faces.nlargest(GALLERY_SIZE, "verifier_nme_pct"))]
                   if "verifier_nme_pct" in faces.columns and faces.verifier_nme_pct.notna().any() else []),
                 ("random", faces.sample(min(GALLERY_SIZE, len(faces)), random_state=int(rng.integers(1 << 30))))]
    latest = _latest_scores(store, version)
    if latest is not None:
        name, scores = latest
        scored = faces.merge(scores[["face_id", "new_weight"]].rename(columns={"new_weight": "score"}), on="face_id")
        galleries.insert(3, (f"worst scored ({name})", scored.nsmallest(GALLERY_SIZE, "score")))
    yaw_bin = yaw_bins(faces.yaw_deg.to_numpy(np.float64))
    for b, label in enumerate(YAW_BINS):
        sel = faces[yaw_bin == b]
        galleries.append((f"yaw {label}", sel.sample(min(6, len(sel)), random_state=seed) if len(sel) else sel))
    return ["<h2 id='galleries'>Galleries</h2>",
            *(_gallery(title, rows, "gallery-" + title.replace(" ", "-")) for title, rows in galleries)]


def _files_html(store: Store, version: int, manifest: Manifest) -> list[str]:
    vdir = Path(store.version_dir(version))
    links = [f"<li><a href='{esc((vdir / e.file).as_uri())}'>{esc(e.file)}</a> ({e.rows} faces)</li>"
             for e in manifest.shards[:200]]
    return ["<h2 id='files'>Files</h2>",
            f"<p><a id='manifest-link' href='{esc((vdir / 'manifest.json').as_uri())}'>manifest.json</a></p>",
            f"<ul>{''.join(links)}</ul>"]


def render_report(store: Store, version: int | None = None, *, seed: int = 0,
                  summary: dict | None = None) -> str:
    version = resolve_version(store, version)
    summary = summary or version_summary(store, version)
    manifest: Manifest = summary["manifest"]
    counts = manifest.counts
    present = set(faces_schema(store, version).names)  # versions before the verifier lack its columns
    faces = read_faces(store, version, columns=[c for c in _REPORT_COLUMNS if c in present]).to_pandas()
    quarantine = read_side_table(store, version, "quarantine").to_pandas()

    parts = [*_header_html(summary), *_funnel_html(counts, quarantine), *_features_html(faces), *_pose_html(faces),
             *_reference_nme_html(summary, faces, present)]
    if summary.get("label_quality"):
        parts += ["<h2 id='label-quality'>Labels, verifier and rules against references</h2>",
                  _label_quality_html(summary["label_quality"])]
    parts += ["<h2 id='rounds'>Trainer rounds</h2>", _rounds_section(store, version),
              *_galleries_html(store, version, faces, seed), *_files_html(store, version, manifest)]
    body = "\n".join(p for p in parts if p)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(summary['ref'])} quality report</title>"
            f"<style>{_CSS}</style></head><body>{body}<div id='lightbox'><div><img alt='enlarged'><p></p></div></div>"
            f"<script>{_JS}</script><script type='application/json' id='counts'>"
            f"{_script_json(counts.to_dict())}</script></body></html>")


def write_report(store: Store, version: int | None = None, out_dir: str | Path | None = None,
                 summary: dict | None = None) -> Path:
    """Write the report next to the version (or into `out_dir`); returns the HTML file's path."""
    version = resolve_version(store, version)
    out = Path(out_dir) if out_dir else Path(store.dir) / "reports"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{store.dataset}-v{version:04d}.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(render_report(store, version, summary=summary), encoding="utf-8")
    tmp.replace(path)
    return path
