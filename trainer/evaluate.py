"""The AFLW2000-3D protocol on any folder of jpg + mat: 68-point 2D NME / sqrt(w*h) of the reference
box, yaw bins 0-30 / 30-60 / 60-90 (reference pose), balanced mean, CED, AUC@7%, failure rate @10%.

Two crop protocols: `gt` (3DDFA's: the crop from the reference points, as the papers report) and
`detector` (ours: SCRFD boxes, then the teacher's refine crop, as `facecurate build` labels faces).
The 4-channel model's landmark map is drawn from the teacher's points on the same crop: the
pseudo-labels it is trained with (2DASL's own test feeds 2D FAN points the same way).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.crops import crop_roi, match_reference, roi_from_landmarks
from pipeline.decode import decode_image
from pipeline.landmarks import ced_curve, nme_pct, nme_table
from pipeline.references import load_mat_reference

log = logging.getLogger(__name__)

PROTOCOLS = ("gt", "detector")


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


class TeacherModel:
    """The 3-channel 3DDFA_V2 mb05 exactly as the pipeline runs it (the `teacher` checkpoint)."""

    def __init__(self, landmarker):
        self.teacher = landmarker
        self.sha256 = landmarker.weights_sha256

    def predict_points(self, crops: np.ndarray, teacher_points: np.ndarray) -> np.ndarray:
        return teacher_points


class StudentModel:
    """A 4-channel 2DASL model (untrained = teacher + zero filters, or a checkpoint)."""

    def __init__(self, predictor):
        self.predictor = predictor
        self.sha256 = predictor.sha256

    def predict_points(self, crops: np.ndarray, teacher_points: np.ndarray) -> np.ndarray:
        return self.predictor.points(self.predictor.params(crops, teacher_points))


def _crops_for(protocol: str, data: EvalSet, teacher, detector) -> tuple[list[int], list[np.ndarray]]:
    """(indices of evaluated images, their rois) under a crop protocol."""
    if protocol == "gt":
        return list(range(len(data.images))), [roi_from_landmarks(p) for p in data.ref_points]
    found, boxes = [], []
    for i, faces in enumerate(detector(data.images)):
        match = match_reference([f.bbox for f in faces], data.ref_points[i])
        if match is not None:  # a miss is counted, not scored
            found.append(i)
            boxes.append(faces[match].bbox[None])
    # The crop the pipeline labels with: the teacher's refine-pass roi, all found faces in one call.
    labels = teacher([data.images[i] for i in found], boxes)
    return found, [faces[0].roi for faces in labels]


def evaluate(model, data: EvalSet, teacher, detector=None, protocols: tuple[str, ...] = PROTOCOLS) -> dict:
    """NME tables per protocol for `model` (TeacherModel or StudentModel)."""
    from pipeline.bfm import project_to_image

    out = {"model_sha256": model.sha256, "images": len(data.images), "protocols": {}}
    for protocol in protocols:
        if protocol == "detector" and detector is None:
            raise ValueError("the detector protocol needs a face detector")
        idx, rois = _crops_for(protocol, data, teacher, detector)
        crops = np.stack([crop_roi(data.images[i], roi) for i, roi in zip(idx, rois)])
        _, teacher_crop_pts = teacher.predict_crops(crops)
        points_crop = model.predict_points(crops, teacher_crop_pts[..., :2])
        points = np.stack([project_to_image(p, roi) for p, roi in zip(points_crop, rois)])
        nme = nme_pct(points, data.ref_points[idx])
        table = nme_table(nme, data.yaw_deg[idx])
        x, y = ced_curve(nme, max_pct=10.0, steps=51)
        table.update({"found": len(idx), "missed": len(data.images) - len(idx),
                      "ced": {"nme_pct": x.round(3).tolist(), "fraction": y.round(4).tolist()},
                      "per_image": {data.names[i]: round(float(v), 4) for i, v in zip(idx, nme)}})
        out["protocols"][protocol] = table
    return out


def format_result(result: dict, title: str) -> str:
    lines = [f"{title}  (model sha256 {result['model_sha256'][:12]}..., {result['images']} images)",
             f"  {'crops':<10}{'found':>7}{'0-30':>8}{'30-60':>8}{'60-90':>8}{'balanced':>10}{'mean':>8}"
             f"{'AUC@7':>8}{'fail@10':>9}"]
    for protocol, t in result["protocols"].items():
        bins = [b["mean"] for b in t["bins"]]
        cells = "".join(f"{v:8.2f}" if v is not None else f"{'-':>8}" for v in bins)
        lines.append(f"  {protocol:<10}{t['found']:>7}{cells}{t['balanced']:10.2f}{t['mean']:8.2f}"
                     f"{t['auc_7']:8.3f}{t['failure_10'] * 100:8.1f}%")
    return "\n".join(lines)


def write_result(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return path


def evaluate_checkpoint(detectors, checkpoint: str, data_dir: str | Path, *, crops: str = "both",
                        limit: int | None = None, device: str = "auto") -> dict:
    """`checkpoint` ('teacher': 3DDFA_V2 mb05 as the pipeline runs it; 'untrained': the 4-channel model at
    step 0; or a checkpoint path) on a folder in the AFLW2000-3D layout, with crops from the reference
    points (`gt`), from the catalog's face detector (`detector`) or `both`.

    `detectors` is the catalog's chain: its primary landmarker must be the teacher (tddfa_mb05), which
    draws the landmark map. A measurement runs at full precision, whatever the chain runs at on a GPU."""
    from pipeline.detect.registry import build_face_detector, build_landmarker

    primary = detectors.landmarkers[0]
    if primary.name != "tddfa_mb05":
        raise ValueError(f"evaluate needs tddfa_mb05 as the catalog's primary landmarker, got {primary.name!r}")
    teacher = build_landmarker(primary.model_copy(update={"precision": "fp32"}))
    protocols = PROTOCOLS if crops == "both" else (crops,)
    detector = (build_face_detector(detectors.face.model_copy(update={"precision": "fp32"}))
                if "detector" in protocols else None)
    if checkpoint == "teacher":
        model = TeacherModel(teacher)
    else:
        from trainer.checkpoint import load_predictor

        model = StudentModel(load_predictor("teacher" if checkpoint == "untrained" else checkpoint, device=device))
    result = evaluate(model, load_eval_set(data_dir, limit=limit), teacher, detector, protocols)
    result.update({"checkpoint": checkpoint, "data": str(data_dir)})
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
    from pipeline.shards import read_faces

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
