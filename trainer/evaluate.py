"""The AFLW2000-3D protocol on any folder of jpg + mat: 68-point 2D NME / sqrt(w*h) of the reference
box, yaw bins 0-30 / 30-60 / 60-90 (reference pose), balanced mean, CED, AUC@7%, failure rate @10%.

Crop geometry (one per protocol, the same for every model and map of a run):
- `gt` (3DDFA's, as the papers report): the roi of the reference points (`roi_from_landmarks`).
- `detector` (ours): the curation chain's crop of the face whose SCRFD box matches the reference,
  i.e. the teacher's refine-pass roi, the crop `facecurate build` labels and trains with.
Map source (the 4-channel student's 4th channel; the teacher ignores it):
- `fused` (the default): the face's label as the curation chain makes it (`label_images`: the
  verifier-weighted fusion of teacher, mirrored teacher, Peppa, OpenSeeFace), moved into the crop's
  px. `detector`: the matched face's own label; `gt`: the chain run with the reference points' box
  as the face box. These labels are independent of the student, as in 2DASL (2D FAN points).
- `teacher`: the teacher's own points on the same crop (carries nothing the teacher lacks).
- `zero`: no point drawn (all background, what map dropout feeds in training); `shuffled`: another
  image's fused points (a fixed-seed derangement). These two are the channel ablation.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.crops import apply_affine, crop_affine, crop_roi, match_reference, roi_from_landmarks
from pipeline.decode import decode_image
from pipeline.landmarks import YAW_BINS, ced_curve, nme_pct, nme_table, yaw_bins
from pipeline.references import load_mat_reference

log = logging.getLogger(__name__)

PROTOCOLS = ("gt", "detector")
MAPS = ("fused", "teacher", "zero", "shuffled")


@dataclass
class EvalSet:
    names: list[str]
    images: list[np.ndarray]
    ref_points: np.ndarray  # [N, 68, 2] image px
    yaw_deg: np.ndarray  # [N] from the reference pose


def load_eval_set(data_dir: str | Path, limit: int | None = None) -> EvalSet:
    """Every `<name>.jpg` with a `<name>.mat` beside it (AFLW2000-3D / 300W-LP layout)."""
    data_dir = Path(data_dir)
    pairs = [p for p in sorted(data_dir.glob("*.jpg")) if p.with_suffix(".mat").is_file()]
    if not pairs:
        raise FileNotFoundError(f"{data_dir}: no .jpg with a .mat beside it (AFLW2000-3D layout)")
    pairs = pairs[:limit] if limit else pairs
    names, images, points, yaws = [], [], [], []
    for path in pairs:
        image = decode_image(path.read_bytes())
        ref = load_mat_reference(path.with_suffix(".mat"), image_height=image.shape[0])
        names.append(path.stem)
        images.append(image)
        points.append(ref.landmarks_68)
        yaws.append(ref.yaw_pitch_roll_deg[0])
    return EvalSet(names, images, np.stack(points), np.asarray(yaws, np.float64))


# ------------------------------------------------------------------------------------ models


class TeacherModel:
    """The 3-channel 3DDFA_V2 mb05 exactly as the pipeline runs it (the `teacher` checkpoint)."""

    uses_map = False

    def __init__(self, landmarker):
        self.sha256 = landmarker.weights_sha256

    def predict_points(self, faces: ProtocolFaces, map_points: np.ndarray | None) -> np.ndarray:
        return faces.teacher_points


class StudentModel:
    """A 4-channel 2DASL model (untrained = teacher + zero filters, or a checkpoint)."""

    uses_map = True

    def __init__(self, predictor):
        self.predictor = predictor
        self.sha256 = predictor.sha256

    def predict_points(self, faces: ProtocolFaces, map_points: np.ndarray | None) -> np.ndarray:
        """Crop-px points from the crops and the map drawn from `map_points` (None: a blank map)."""
        if map_points is None:
            return self.predictor.points(blank_map_params(self.predictor, faces.crops))
        return self.predictor.answer(faces.crops, map_points)


def blank_map_params(predictor, crops: np.ndarray) -> np.ndarray:
    """[B,62] params with a map of no point (the map's background everywhere)."""
    import torch

    net, out = predictor.net, [np.zeros((0, 62), np.float32)]
    with torch.inference_mode():
        for i in range(0, len(crops), predictor.chunk):
            img = net.preprocess(crops[i:i + predictor.chunk], predictor.device)
            blank = torch.full((img.shape[0], 68, 2), float("nan"), device=img.device)  # no point given
            out.append(net(img, blank).float().cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def load_model(spec: str, teacher, device: str = "auto"):
    """'teacher' -> TeacherModel; 'untrained' (the 4-channel model at step 0) or a path -> StudentModel."""
    if spec == "teacher":
        return TeacherModel(teacher)
    from trainer.checkpoint import load_predictor

    return StudentModel(load_predictor("teacher" if spec == "untrained" else spec, device=device))


# ------------------------------------------------------------------------- faces and maps


@dataclass
class ProtocolFaces:
    """The faces one crop protocol evaluates, computed once for every model and map of a run."""

    protocol: str
    index: np.ndarray  # [n] evaluated images (the reference's face was found)
    rois: np.ndarray  # [n, 4] image px
    crops: np.ndarray  # [n, 120, 120, 3] RGB uint8
    teacher_points: np.ndarray  # [n, 68, 2] crop px: the teacher on the crop
    label_points: np.ndarray | None  # [n, 68, 2] crop px: the chain's label moved into the crop
    label_sources: list[str]  # "fused", or the candidate the label is (a chain without a verifier)


def reference_box(points_68: np.ndarray) -> np.ndarray:
    """The bounding box of the reference points: the face box the chain starts from under `gt`."""
    return np.concatenate([points_68.min(axis=0), points_68.max(axis=0)]).astype(np.float32)


def prepare_faces(protocol: str, data: EvalSet, chain, with_labels: bool) -> ProtocolFaces:
    """Crops, the teacher's points and (with_labels) the chain's labels under one crop protocol."""
    from pipeline.labeling import label_images

    n = len(data.images)
    labels, sources = None, []
    if protocol == "gt":
        index = np.arange(n)
        rois = np.stack([roi_from_landmarks(p) for p in data.ref_points])
        crops = np.stack([crop_roi(img, roi) for img, roi in zip(data.images, rois)])
        if with_labels:
            boxes = [reference_box(p)[None] for p in data.ref_points]
            faces = [found[0] for found in label_images(chain, data.images, [False] * n, boxes=boxes)]
            labels = np.stack([apply_affine(f.label, crop_affine(roi)) for f, roi in zip(faces, rois)])
            sources = [f.label_source for f in faces]
    elif protocol == "detector":
        index, matched = [], []
        for i, found in enumerate(label_images(chain, data.images, [False] * n)):
            match = match_reference([f.box.bbox for f in found], data.ref_points[i])
            if match is not None:  # a miss is counted, not scored
                index.append(i)
                matched.append(found[match])
        index = np.asarray(index, np.int64)
        rois = np.stack([f.roi for f in matched]).reshape(-1, 4)
        # The labelled face's crop is the teacher's refine-roi crop, cut the way curation cuts it.
        crops = np.stack([f.crop_rgb for f in matched]).reshape(-1, 120, 120, 3)
        if with_labels:
            labels = np.stack([apply_affine(f.label, f.affine) for f in matched]).reshape(-1, 68, 2)
            sources = [f.label_source for f in matched]
    else:
        raise ValueError(f"crop protocol {protocol!r}: expected one of {PROTOCOLS}")
    teacher = chain.landmarkers[0]
    _, teacher_pts = teacher.predict_crops(crops)
    return ProtocolFaces(protocol, index, rois, crops, teacher_pts[..., :2], labels, sources)


def derangement(n: int, seed: int = 0) -> np.ndarray:
    """A fixed-seed permutation with no fixed point: image order[k] takes image order[k+1]'s map."""
    if n < 2:
        raise ValueError("a shuffled map needs at least two images")
    order = np.random.default_rng(seed).permutation(n)
    out = np.empty(n, np.int64)
    out[order] = np.roll(order, -1)
    return out


def map_points_for(kind: str, faces: ProtocolFaces, seed: int = 0) -> np.ndarray | None:
    """The crop-px points a map of `kind` is drawn from; None for the blank (`zero`) map."""
    if kind == "teacher":
        return faces.teacher_points
    if kind in ("fused", "shuffled") and faces.label_points is None:
        raise ValueError(f"the {kind!r} map needs the chain's labels (prepare_faces with_labels=True)")
    if kind == "fused":
        return faces.label_points
    if kind == "shuffled":
        return faces.label_points[derangement(len(faces.label_points), seed)]
    if kind == "zero":
        return None
    raise ValueError(f"map {kind!r}: expected one of {MAPS}")


# --------------------------------------------------------------------------------- scoring


def score_points(points_crop: np.ndarray, faces: ProtocolFaces, data: EvalSet) -> tuple[np.ndarray, dict]:
    """(per-image NME, its table) of crop-px points, mapped back to the image through each roi."""
    from pipeline.bfm import project_to_image

    points = np.stack([project_to_image(p, roi) for p, roi in zip(points_crop, faces.rois)]).reshape(-1, 68, 2)
    nme = nme_pct(points, data.ref_points[faces.index])
    table = nme_table(nme, data.yaw_deg[faces.index])
    x, y = ced_curve(nme, max_pct=10.0, steps=51)
    table.update({"found": len(faces.index), "missed": len(data.images) - len(faces.index),
                  "ced": {"nme_pct": x.round(3).tolist(), "fraction": y.round(4).tolist()},
                  "per_image": {data.names[i]: round(float(v), 4) for i, v in zip(faces.index, nme)}})
    return nme, table


def label_table(faces: ProtocolFaces, data: EvalSet) -> dict | None:
    """The NME of the fused map's own points (the chain's labels): what the map can tell the student."""
    if faces.label_points is None:
        return None
    _, table = score_points(faces.label_points, faces, data)
    sources = {s: faces.label_sources.count(s) for s in sorted(set(faces.label_sources))}
    return {k: table[k] for k in ("bins", "balanced", "mean", "count")} | {"label_sources": sources}


def evaluate(model, data: EvalSet, faces_by_protocol: dict[str, ProtocolFaces],
             maps: tuple[str, ...] = ("fused",), seed: int = 0) -> dict:
    """NME tables per protocol for `model`, one per map (a student; the first map is the headline
    `protocols` table), on faces prepared once (`prepare_faces`)."""
    maps = tuple(maps) if model.uses_map else (None,)
    out = {"model_sha256": model.sha256, "images": len(data.images), "map": maps[0],
           "protocols": {}, "by_map": {}, "_nme": {}}
    for kind in maps:
        for protocol, faces in faces_by_protocol.items():
            points = model.predict_points(faces, None if kind is None else map_points_for(kind, faces, seed))
            nme, table = score_points(points, faces, data)
            table["map"] = kind
            out["by_map"].setdefault(str(kind), {})[protocol] = table
            if kind == maps[0]:
                out["protocols"][protocol] = table
                out["_nme"][protocol] = nme  # for the paired comparison; not written to JSON
    if not model.uses_map:
        del out["by_map"]
    return out


# -------------------------------------------------------------------------- paired bootstrap


def stratified_indices(bins: np.ndarray, rows: int, rng: np.random.Generator) -> np.ndarray:
    """[rows, n] resampled indices, each row drawn with replacement *within* each bin, so every row
    keeps the original bin counts (the balanced mean is over the same pose mix in every resample)."""
    bins = np.asarray(bins)
    parts = []
    for b in np.unique(bins):
        members = np.flatnonzero(bins == b)
        parts.append(members[rng.integers(0, len(members), size=(rows, len(members)))])
    return np.concatenate(parts, axis=1) if parts else np.zeros((rows, 0), np.int64)


def _ci(samples: np.ndarray) -> list[float]:
    return [float(v) for v in np.percentile(samples, [2.5, 97.5])]


def paired_bootstrap(nme_a, nme_b, yaw, n: int = 10_000, seed: int = 0, chunk: int = 1000) -> dict:
    """The paired bootstrap 95% interval of (a - b) on the same images: (1) the mean per-image NME
    difference (images resampled freely) and (2) the balanced-NME difference (images resampled
    within each yaw bin, stratified; balanced = the mean of the bin means), with per-bin differences.

    Images where either NME or the yaw is not finite are left out (counted in `dropped`)."""
    a, b = np.asarray(nme_a, np.float64), np.asarray(nme_b, np.float64)
    yaw = np.asarray(yaw, np.float64)
    if not a.shape == b.shape == yaw.shape:
        raise ValueError(f"nme_a {a.shape}, nme_b {b.shape} and yaw {yaw.shape} must be the same images")
    ok = np.isfinite(a) & np.isfinite(b) & np.isfinite(yaw)
    a, b, bins = a[ok], b[ok], yaw_bins(yaw[ok])
    d = a - b
    if d.size == 0:
        raise ValueError("paired_bootstrap: no image with both NMEs")
    present = [k for k in range(3) if (bins == k).any()]
    col_bin = np.concatenate([np.full((bins == k).sum(), k) for k in present])  # stratified_indices' column order
    rng = np.random.default_rng(seed)
    mean_bs, bin_bs = np.empty(n), np.empty((n, len(present)))
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        mean_bs[start:start + rows] = d[rng.integers(0, d.size, size=(rows, d.size))].mean(axis=1)
        strat = d[stratified_indices(bins, rows, rng)]
        for j, k in enumerate(present):
            bin_bs[start:start + rows, j] = strat[:, col_bin == k].mean(axis=1)
    balanced_bs = bin_bs.mean(axis=1)

    def balanced(v):
        return float(np.mean([v[bins == k].mean() for k in present]))

    return {
        "resamples": n, "seed": seed, "images": int(d.size), "dropped": int((~ok).sum()),
        "mean": {"a": float(a.mean()), "b": float(b.mean()), "diff": float(d.mean()), "ci95": _ci(mean_bs)},
        "balanced": {"a": balanced(a), "b": balanced(b), "diff": balanced(d), "ci95": _ci(balanced_bs)},
        "bins": [{"bin": YAW_BINS[k], "count": int((bins == k).sum()), "diff": float(d[bins == k].mean()),
                  "ci95": _ci(bin_bs[:, j])} for j, k in enumerate(present)],
    }


# ---------------------------------------------------------------------------------- output


def format_result(result: dict, title: str) -> str:
    lines = [f"{title}  (model sha256 {result['model_sha256'][:12]}..., {result['images']} images)",
             f"  {'crops':<10}{'map':<10}{'found':>7}{'0-30':>8}{'30-60':>8}{'60-90':>8}{'balanced':>10}"
             f"{'mean':>8}{'AUC@7':>8}{'fail@10':>9}"]
    by_map = result.get("by_map") or {"-": result["protocols"]}
    for kind, tables in by_map.items():
        for protocol, t in tables.items():
            bins = [b["mean"] for b in t["bins"]]
            cells = "".join(f"{v:8.2f}" if v is not None else f"{'-':>8}" for v in bins)
            lines.append(f"  {protocol:<10}{kind:<10}{t['found']:>7}{cells}{t['balanced']:10.2f}{t['mean']:8.2f}"
                         f"{t['auc_7']:8.3f}{t['failure_10'] * 100:8.1f}%")
    for protocol, t in (result.get("map_labels") or {}).items():
        lines.append(f"  the fused map's own points ({protocol}): balanced {t['balanced']:.2f}, mean {t['mean']:.2f}")
    return "\n".join(lines)


def format_comparison(result: dict) -> str:
    """The paired comparison with the baseline, one block per protocol."""
    name, base = result["checkpoint"], result["baseline"]["checkpoint"]
    first = next(iter(result["comparison"].values()))
    lines = [f"{name} ({result['map'] or 'no'} map) - {base} ({result['baseline']['map'] or 'no'} map), paired "
             f"on the same faces; bootstrap {first['resamples']} resamples, seed {first['seed']}"]
    for protocol, c in result["comparison"].items():
        bal, mean = c["balanced"], c["mean"]
        lines.append(f"  {protocol:<10}balanced {bal['a']:.3f} vs {bal['b']:.3f}: diff {bal['diff']:+.3f}, "
                     f"95% CI [{bal['ci95'][0]:+.3f}, {bal['ci95'][1]:+.3f}]; mean per-image diff "
                     f"{mean['diff']:+.3f}, 95% CI [{mean['ci95'][0]:+.3f}, {mean['ci95'][1]:+.3f}] "
                     f"({c['images']} images)")
        lines.append("  " + " " * 10 + "bins: " + ", ".join(
            f"{r['bin']} {r['diff']:+.3f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}] (n={r['count']})"
            for r in c["bins"]))
    return "\n".join(lines)


def write_result(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return path


def measurement_chain(detectors, device: str, with_labels: bool):
    """The catalog's chain at full precision (a measurement, whatever the chain runs at on a GPU); with
    only the teacher and no verifier when no map needs the chain's labels (the crops are the same)."""
    def exact(spec):
        update = {"precision": "fp32"} | ({"device": device} if device != "auto" else {})
        return spec.model_copy(update=update)

    landmarkers = tuple(exact(s) for s in detectors.landmarkers)
    if with_labels:
        return detectors.model_copy(update={"face": exact(detectors.face), "landmarkers": landmarkers})
    return detectors.model_copy(update={"face": exact(detectors.face), "landmarkers": landmarkers[:1],
                                        "verifier": None})


def evaluate_checkpoint(detectors, checkpoint: str, data_dir: str | Path, *, crops: str = "both",
                        limit: int | None = None, device: str = "auto", maps: tuple[str, ...] = ("fused",),
                        baseline: str | None = None, resamples: int = 10_000, seed: int = 0) -> dict:
    """`checkpoint` ('teacher': 3DDFA_V2 mb05 as the pipeline runs it; 'untrained': the 4-channel model at
    step 0; or a checkpoint path) on a folder in the AFLW2000-3D layout, with crops from the reference
    points (`gt`), from the catalog's chain (`detector`) or `both`; a student once per map in `maps`.

    With `baseline` (the same kinds of name), the baseline runs on the same faces (a student with the
    first map) and `comparison` holds the paired bootstrap of (checkpoint - baseline) per protocol.
    `detectors` is the catalog's chain: its primary landmarker must be the teacher (tddfa_mb05)."""
    from pipeline.labeling import get_chain

    if detectors.landmarkers[0].name != "tddfa_mb05":
        raise ValueError("evaluate needs tddfa_mb05 as the catalog's primary landmarker, "
                         f"got {detectors.landmarkers[0].name!r}")
    maps = tuple(maps)
    if not maps or any(m not in MAPS for m in maps):
        raise ValueError(f"maps {maps}: expected some of {MAPS}")
    names = [checkpoint] + ([baseline] if baseline else [])
    students = [n for n in names if n != "teacher"]
    with_labels = bool(students) and any(m in ("fused", "shuffled") for m in maps)
    chain = get_chain(measurement_chain(detectors, device, with_labels))
    teacher = chain.landmarkers[0]
    data = load_eval_set(data_dir, limit=limit)
    protocols = PROTOCOLS if crops == "both" else (crops,)
    faces = {p: prepare_faces(p, data, chain, with_labels) for p in protocols}

    result = evaluate(load_model(checkpoint, teacher, device), data, faces, maps, seed)
    result.update({"checkpoint": checkpoint, "data": str(data_dir), "seed": seed})
    labels = {p: label_table(f, data) for p, f in faces.items()}
    result["map_labels"] = {p: t for p, t in labels.items() if t is not None}  # empty: no map used them
    if baseline:
        base = evaluate(load_model(baseline, teacher, device), data, faces, maps[:1], seed)
        base.update({"checkpoint": baseline})
        result["comparison"] = {
            p: paired_bootstrap(result["_nme"][p], base["_nme"][p], data.yaw_deg[f.index], n=resamples, seed=seed)
            for p, f in faces.items()}
        base.pop("_nme")
        result["baseline"] = base
    result.pop("_nme")
    return result


def evaluate_version(predictor, store, version: int, batch_size: int = 128) -> dict | None:
    """The model's NME on a version's evaluation faces (`split == "eval"`, with reference labels), with
    the pseudo-labels' own NME on the same faces beside it; None when the version has no such face.

    Labelled faces of training sources are not counted (the model was trained on them: they would
    flatter it); the result says how many were left out (`labelled_train_faces_skipped`).
    The model sees each face's stored crop and the map drawn from its pseudo-label, as in training;
    its points go back to the image through the stored crop affine.
    """
    import cv2
    import pyarrow.compute as pc

    from pipeline.crops import apply_affine, invert_affine
    from pipeline.store.faces import read_faces

    faces = read_faces(store, version, columns=["face_id", "split", "crop", "crop_affine", "landmarks",
                                                 "ref_landmarks", "ref_pose"])
    faces = faces.filter(pc.is_valid(faces.column("ref_landmarks")))
    labelled = faces.num_rows
    faces = faces.filter(pc.equal(faces.column("split"), "eval"))
    n, skipped = faces.num_rows, labelled - faces.num_rows
    if skipped:
        log.info("%s@v%d: %d labelled faces of training sources left out of the evaluation; %d eval faces",
                 store.dataset, version, skipped, n)
    if n == 0:
        return None
    pseudo_img = np.asarray(faces.column("landmarks").to_pylist(), np.float32).reshape(n, 68, 2)
    ref = np.asarray(faces.column("ref_landmarks").to_pylist(), np.float32).reshape(n, 68, 2)
    affines = np.asarray(faces.column("crop_affine").to_pylist(), np.float32).reshape(n, 6)
    yaw = np.asarray(faces.column("ref_pose").to_pylist(), np.float64)[:, 0]
    crops = np.stack([cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
                      for b in faces.column("crop").to_pylist()])
    pseudo_crop = apply_affine(pseudo_img, affines)
    points = []
    for i in range(0, n, batch_size):
        points.append(predictor.points(predictor.params(crops[i:i + batch_size], pseudo_crop[i:i + batch_size])))
    model_img = apply_affine(np.concatenate(points), np.stack([invert_affine(a) for a in affines]))
    return {"faces": n, "split": "eval", "labelled_train_faces_skipped": skipped,
            "model": nme_table(nme_pct(model_img, ref), yaw),
            "pseudo_labels": nme_table(nme_pct(pseudo_img, ref), yaw)}
