"""The bundled build's speed: this checkout against a baseline commit on the same images, and against
the chain's model-bound rate.

1. Builds. `facecurate build` (the README's command: the Prefect flow on a dask LocalCluster) of the
   same catalog into empty stores, once with the code of `--baseline` (extracted with `git archive`)
   and once with this checkout, alternating over `--repeats`, each in its own subprocess. The rate is
   the command's own line ("processed N images in T s"), faces/s from the committed version.
2. Labels. The two builds' faces are compared face by face: the same face ids, the largest label
   difference in pixels, the same keep decisions, the largest predicted-NME difference.
3. Model-bound rate. In this process, with this checkout's thread layout (`pipeline.threads`): the
   chain labels the same images batch by batch while every network call is recorded (ONNX Runtime
   sessions, the teacher network, the verifier's trunk and head); the recorded calls are then replayed
   alone, timed, with as many batches side by side as the build runs. faces / replay seconds is the
   rate the chain could reach if everything but the networks cost nothing.

Usage: .venv/bin/python bench/build_speed.py [--baseline c679b14] [--repeats 1] [--limit N] [--photos N] [--json out.json]
(`--limit N`: the first N images of each source, for a quick look; the figures use every image.
`--photos N`: instead of the bundled sources, N synthetic 1920x1080 photos, each one AFLW2000-3D dev image
scaled to 300-700 px and pasted on a blurred enlargement of another: the full-photo path (decode, detection
on a large image, crops cut from it) that the bundled set, mostly 120 px crops, hardly exercises.)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from common import emit, header

from pipeline.settings import shared_root
from pipeline.store.faces import read_faces
from pipeline.store.layout import Store

ROOT = Path(__file__).resolve().parent.parent
RATE_LINE = re.compile(r"processed (\d+) images in ([\d.]+) s")


def synthetic_photos(folder: Path, n: int) -> Path:
    """`n` 1920x1080 JPEG photos, the same for every run with the same `n` (seeded)."""
    import cv2

    if folder.exists():
        return folder
    folder.mkdir()
    faces = sorted((shared_root() / "data" / "aflw2000-dev").glob("*.jpg"))
    rng = np.random.default_rng(0)
    for i in range(n):
        photo = cv2.GaussianBlur(cv2.resize(cv2.imread(str(faces[(i + 7) % len(faces)])), (1920, 1080)), (31, 31), 0)
        side = int(rng.integers(300, 700))
        x, y = int(rng.integers(0, 1920 - side)), int(rng.integers(0, 1080 - side))
        photo[y:y + side, x:x + side] = cv2.resize(cv2.imread(str(faces[i % len(faces)])), (side, side))
        cv2.imwrite(str(folder / f"photo_{i:04d}.jpg"), photo, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return folder


def bench_catalog(work: Path, name: str, limit: int | None, photos: int | None = None) -> Path:
    """The bundled catalog writing to its own store; with `limit`, each folder source cut to its first
    `limit` images (symlinks; every other file of the folder, such as .mat labels, linked too); with
    `photos`, one source of that many synthetic photos instead of the bundled ones."""
    data = yaml.safe_load((ROOT / "catalog.yaml").read_text())
    data["output_root"] = str(work / f"store-{name}")
    if photos:
        data["sources"] = [{"name": "photos", "kind": "folder", "path": str(synthetic_photos(work / "photos", photos))}]
    if limit:
        for source in data["sources"]:
            folder = Path(source["path"].replace("${FACECURATE_SHARED}", str(shared_root())))
            cut = work / f"{source['name']}-{limit}"
            if not cut.exists():
                cut.mkdir()
                images = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
                for p in images[:limit] + [p for p in folder.iterdir() if p not in images]:
                    (cut / p.name).symlink_to(p)
            source["path"] = str(cut)
    path = work / f"catalog-{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def extract(commit: str, folder: Path) -> Path:
    folder.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def run_build(code: Path, catalog: Path) -> dict:
    """`facecurate build` with `code`'s packages first on the path, in a subprocess."""
    env = {**os.environ, "PYTHONPATH": str(code), "FACECURATE_SHARED": str(shared_root())}
    cmd = [sys.executable, "-c", "import sys; from flows.cli import main; sys.exit(main(sys.argv[1:]))",
           "build", "--catalog", str(catalog)]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"build with {code} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    images, seconds = RATE_LINE.search(done.stdout).groups()
    return {"images": int(images), "seconds": float(seconds), "command_s": wall}


def faces_of(catalog: Path) -> dict:
    """The latest version's faces, read by this checkout's store reader (it reads older layouts too)."""
    data = yaml.safe_load(catalog.read_text())
    t = read_faces(Store(data["output_root"], data["dataset"]), None,
                   columns=["face_id", "landmarks", "keep", "verifier_nme_pct"])
    order = np.argsort(t.column("face_id").to_numpy(zero_copy_only=False))
    return {"face_id": t.column("face_id").to_numpy(zero_copy_only=False)[order],
            "landmarks": np.stack(t.column("landmarks").to_numpy(zero_copy_only=False))[order],
            "keep": t.column("keep").to_numpy(zero_copy_only=False)[order],
            "nme": t.column("verifier_nme_pct").to_numpy(zero_copy_only=False).astype(np.float64)[order]}


def compare_labels(a: dict, b: dict) -> dict:
    same_faces = a["face_id"].shape == b["face_id"].shape and bool((a["face_id"] == b["face_id"]).all())
    out = {"labels_same_faces": same_faces, "labels_faces": int(len(a["face_id"]))}
    if same_faces:
        out.update(labels_max_px_diff=float(np.abs(a["landmarks"] - b["landmarks"]).max()),
                   labels_keep_differs=int((a["keep"] != b["keep"]).sum()),
                   labels_max_nme_pred_diff=float(np.nanmax(np.abs(a["nme"] - b["nme"]))))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", default="c679b14")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--photos", type=int, default=None)
    parser.add_argument("--no-model-bound", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="facecurate-build-speed-"))
    codes = {"baseline": extract(args.baseline, work / "baseline"), "current": ROOT}
    result = {**header(), "baseline": args.baseline, "limit": args.limit, "photos": args.photos,
              "current": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                        capture_output=True, text=True).stdout.strip()}
    runs: dict[str, list[dict]] = {name: [] for name in codes}
    for rep in range(args.repeats):
        for name, code in codes.items():
            catalog = bench_catalog(work, f"{name}-{rep}", args.limit, args.photos)
            runs[name].append({**run_build(code, catalog), "faces": len(faces_of(catalog)["face_id"])})
            print(f"{name} run {rep}: {runs[name][-1]}", flush=True)
    for name, rs in runs.items():
        best = min(rs, key=lambda r: r["seconds"])
        result[f"{name}_images_per_s"] = best["images"] / best["seconds"]
        result[f"{name}_faces_per_s"] = best["faces"] / best["seconds"]
        result[f"{name}_seconds"] = [r["seconds"] for r in rs]
    result["speedup"] = result["current_images_per_s"] / result["baseline_images_per_s"]
    result.update(compare_labels(faces_of(work / "catalog-baseline-0.yaml"), faces_of(work / "catalog-current-0.yaml")))
    if not args.no_model_bound:
        from model_bound import model_bound_rate

        bound = model_bound_rate(bench_catalog(work, "model-bound", args.limit, args.photos))
        result.update(bound)
        result["build_share_of_model_bound"] = result["current_faces_per_s"] / bound["model_bound_faces_per_s"]
    emit(result, args.json)


if __name__ == "__main__":
    main()
