"""The default chain end to end - JPEG bytes on disk -> committed shard rows - on the GPU path vs
the CPU path, in this process on the same files, plus the decode ceiling and how far the two
paths' landmarks differ.

The files are distinct copies of real 450x450 AFLW2000 JPEGs (a numbered JPEG comment segment makes
each copy's content hash new, so the build's de-duplication does not drop them). Each variant is a
whole `pipeline.build.build` of its own catalog (bundled chain, device and decoder set), mapped over
`--threads` threads as a dask worker's threads would run it. Models load before the clock starts.
Without CUDA only the CPU path runs (and the JSON says so).

Usage: .venv/bin/python bench/default_chain.py [--images 512] [--batch 128] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from common import emit, header

from flows.inprocess import build_in_process
from pipeline.catalog import load_catalog, store_of
from pipeline.decode import decode_image
from pipeline.device_images import to_device
from pipeline.gpu_decode import _nvjpeg, decode_device, nvjpeg_available
from pipeline.labeling import get_chain, label_images
from pipeline.settings import shared_root
from pipeline.store.faces import read_faces

ROOT = Path(__file__).resolve().parent.parent


def distinct_copies(sources: list[Path], n: int, folder: Path) -> list[Path]:
    """n JPEG files cycling over `sources`, each with its own comment segment (new bytes, same pixels)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(n):
        data = sources[k % len(sources)].read_bytes()
        text = f"facecurate bench copy {k}".encode()
        comment = b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text
        path = folder / f"copy{k:06d}.jpg"
        path.write_bytes(data[:2] + comment + data[2:])
        out.append(path)
    return out


def variant_catalog(folder: Path, out_root: Path, *, device: str, decode: str, batch: int) -> Path:
    data = yaml.safe_load((ROOT / "catalog.yaml").read_text())
    data["sources"] = [{"name": "bench", "kind": "folder", "path": str(folder)}]
    data["output_root"] = str(out_root)
    data["execution"] = {**data.get("execution", {}), "batch_images": batch, "decode": decode}
    for spec in [data["detectors"]["face"], *data["detectors"]["landmarkers"]]:
        spec["device"] = device
    path = out_root.parent / f"catalog-{out_root.name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_build(catalog_path: Path, threads: int) -> tuple[float, int, int]:
    catalog = load_catalog(catalog_path)
    chain = get_chain(catalog.detectors)
    sample = decode_image(next(Path(catalog.sources[0].path).glob("*.jpg")).read_bytes())
    device = decode_device(catalog)
    warm = [sample] * 4 if device.type == "cpu" else to_device([sample] * 4, device)
    label_images(chain, warm, [False] * 4)  # models loaded and warmed outside the clock
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = build_in_process(catalog, threads=threads)
    seconds = time.perf_counter() - start
    faces = read_faces(store_of(catalog), result["version"], columns=["face_id"]).num_rows
    return seconds, faces, result["processed"]


def landmark_gap(cpu_catalog: Path, gpu_catalog: Path) -> dict:
    """Per face present in both: mean point distance / sqrt(w*h) of the CPU path's points, in %."""
    def table(path):
        catalog = load_catalog(path)
        t = read_faces(store_of(catalog), None, columns=["face_id", "landmarks", "bbox"]).to_pandas()
        return t.set_index("face_id")

    a, b = table(cpu_catalog), table(gpu_catalog)
    common = a.index.intersection(b.index)
    nme, box = [], []
    for fid in common:
        pa_, pb = (np.asarray(t.at[fid, "landmarks"], np.float32).reshape(68, 2) for t in (a, b))
        size = np.sqrt(np.prod(pa_.max(0) - pa_.min(0)))
        nme.append(100 * np.linalg.norm(pa_ - pb, axis=1).mean() / size)
        box.append(np.abs(np.asarray(a.at[fid, "bbox"]) - np.asarray(b.at[fid, "bbox"])).max())
    nme = np.array(nme)
    return {"faces_compared": len(common), "faces_only_cpu": len(a.index.difference(b.index)),
            "faces_only_gpu": len(b.index.difference(a.index)),
            "nme_pct_median": float(np.median(nme)) if len(nme) else None,
            "nme_pct_q90": float(np.quantile(nme, 0.9)) if len(nme) else None,
            "nme_pct_max": float(nme.max()) if len(nme) else None,
            "box_px_max": float(np.max(box)) if box else None}


def decode_rates(paths: list[Path]) -> dict:
    datas = [p.read_bytes() for p in paths]
    start = time.perf_counter()
    for d in datas[:256]:
        decode_image(d)
    out = {"cpu_decode_images_per_s": min(len(datas), 256) / (time.perf_counter() - start)}
    device = torch.device("cuda")
    if nvjpeg_available(device):
        _nvjpeg(datas[:64], device)  # warm-up: nvJPEG handles, CUDA context
        torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(0, len(datas), 256):
            _nvjpeg(datas[i:i + 256], device)
        torch.cuda.synchronize()
        out["nvjpeg_decode_images_per_s"] = len(datas) / (time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--source-dir", default=str(shared_root() / "data" / "aflw2000-dev"))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpu-images", type=int, default=None, help="fewer images for the (slow) CPU path")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="facecurate-bench-"))
    sources = sorted(Path(args.source_dir).glob("*.jpg"))
    paths = distinct_copies(sources, args.images, work / "images")
    cpu_dir = work / "images-cpu"
    if args.cpu_images and args.cpu_images < args.images:
        cpu_dir.mkdir()
        for p in paths[: args.cpu_images]:
            (cpu_dir / p.name).symlink_to(p)
    else:
        cpu_dir = work / "images"

    result = {**header(), "images": args.images, "batch_images": args.batch, "threads": args.threads,
              "source": args.source_dir, **decode_rates(paths)}
    cpu_cat = variant_catalog(cpu_dir, work / "out-cpu", device="cpu", decode="cpu", batch=args.batch)
    seconds, faces, items = run_build(cpu_cat, args.threads)
    result.update(cpu_images=items, cpu_faces=faces, cpu_seconds=seconds, cpu_faces_per_s=faces / seconds)
    if torch.cuda.is_available():
        gpu_cat = variant_catalog(work / "images", work / "out-gpu", device="cuda", decode="auto", batch=args.batch)
        seconds, faces, items = run_build(gpu_cat, args.threads)
        result.update(gpu_images=items, gpu_faces=faces, gpu_seconds=seconds, gpu_faces_per_s=faces / seconds,
                      gpu_over_cpu=(faces / seconds) / result["cpu_faces_per_s"])
        result.update({f"gap_{k}": v for k, v in landmark_gap(cpu_cat, gpu_cat).items()})
    else:
        result["gpu"] = "not run: no CUDA device"
    emit(result, args.json)


if __name__ == "__main__":
    main()
