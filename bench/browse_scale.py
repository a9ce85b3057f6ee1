"""Does `facecurate browse` open as fast on 100,000 faces as on 1,000? And does paging keep memory flat?

Builds a small real version (bundled images, the bundled chain), repeats its rows into temporary
stores of 1,000 and 100,000 faces (distinct face_ids, features jittered so sorts are not all ties,
shards of a build's batch size), then times the app's pages in this process (FastAPI's TestClient:
the whole request, query + page render, without the network): the first page (the default view,
worst first) and a filtered page (two filters, a range and a sort, page 3), each cold (the first
request after start) and warm (best of 3). Then it pages through N pages of the big store and
prints the process's RSS as it goes.

Usage: .venv/bin/python bench/browse_scale.py [--faces 100000] [--small 1000] [--pages 60] [--from-root DIR]
(--from-root: an output root with a built `faces` version to take the rows from instead of building)

A version in the committed layout (--scale N, e.g. 1000000): N synthetic faces written as commit
writes them (pipeline/compact.py: files of --shard-rows, row groups of --row-group-rows; crops from a
pool of distinct re-encoded JPEGs, reused), then, each in its own child process so its peak RSS is its
own (ru_maxrss): `browse` opened and paged (time to the first page, a next page, a page deep in the
version, one past the end, a filtered page) and `export` (COCO JSON) written whole.
    .venv/bin/python bench/browse_scale.py --scale 1000000 --shard-rows 50000 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.settings import shared_root  # noqa: E402
from pipeline.store.faces import read_faces  # noqa: E402
from pipeline.store.files import write_table  # noqa: E402
from pipeline.store.layout import Store, latest_version  # noqa: E402
from pipeline.store.manifest import Counts, Manifest  # noqa: E402
from pipeline.store.schema import SCHEMA_VERSION  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FILTERED = ("/?source=wild&status=kept&min_flip_nme_pct=1&sort=det_score&order=asc&page=3")


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build_base(tmp: Path) -> tuple[Store, int]:
    """A real version of ~40 faces from the bundled images (wild crops, dev faces, a scene)."""
    from flows.inprocess import build_in_process
    from pipeline.catalog import load_catalog, store_of

    data = shared_root() / "data"
    folders = {"wild": ("aflw-wild-crops", 24, True), "dev": ("aflw2000-dev", 12, False)}
    sources = []
    for name, (folder, n, pre_cropped) in folders.items():
        dst = tmp / "src" / name
        dst.mkdir(parents=True)
        for p in sorted((data / folder).glob("*.jpg"))[:n]:
            shutil.copy(p, dst / p.name)
        sources.append({"name": name, "kind": "folder", "path": str(dst), "pre_cropped": pre_cropped})
    scenes = tmp / "src" / "scenes"
    scenes.mkdir(parents=True)
    shutil.copy(data / "scenes" / "3ddfa_v2_trump_hillary.jpg", scenes)
    sources.append({"name": "scenes", "kind": "folder", "path": str(scenes)})
    bundled = yaml.safe_load((ROOT / "catalog.yaml").read_text())
    catalog_path = tmp / "catalog.yaml"
    catalog_path.write_text(yaml.safe_dump({
        "dataset": "faces", "output_root": str(tmp / "base"), "sources": sources,
        "detectors": bundled["detectors"], "rules": bundled["rules"], "execution": {"batch_images": 64}}))
    catalog = load_catalog(str(catalog_path))
    return store_of(catalog), build_in_process(catalog)["version"]


def crop_variants(base: pa.Table, n: int, seed: int = 0) -> list[bytes]:
    """`n` distinct crop JPEGs (the base crops re-encoded with a little noise). Repeated bytes
    inside one shard would let zstd shrink the crop column far below real data's size."""
    rng = np.random.default_rng(seed)
    crops = base.column("crop").to_pylist()
    out = []
    for i in range(n):
        jpeg = np.frombuffer(crops[i % len(crops)], np.uint8)
        image = cv2.imdecode(jpeg, cv2.IMREAD_COLOR).astype(np.int16)
        noisy = np.clip(image + rng.integers(-3, 4, image.shape), 0, 255).astype(np.uint8)
        out.append(cv2.imencode(".jpg", noisy, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes())
    return out


def synthesise(base: pa.Table, root: Path, n_faces: int, shard_rows: int, seed: int = 0) -> Store:
    """A committed version of `n_faces` rows repeated from `base`, in shards of `shard_rows`."""
    store = Store(str(root), "faces")
    vdir = store.version_dir(1)
    rng = np.random.default_rng(seed)
    # A multiple of the base rows: row k's crop variant is still a copy of base row k % rows's crop.
    variants = crop_variants(base, base.num_rows * -(-2 * shard_rows // base.num_rows), seed)
    floats = [f.name for f in base.schema if pa.types.is_floating(f.type)]
    entries, keep_all = [], 0
    for start in range(0, n_faces, shard_rows):
        n = min(shard_rows, n_faces - start)
        take = pa.array(np.arange(start, start + n) % base.num_rows)
        table = base.take(take)
        ids = [f"{start + i:08x}{image_id[8:]}"
               for i, image_id in enumerate(table.column("image_id").to_pylist())]
        table = table.set_column(table.schema.get_field_index("image_id"), "image_id", pa.array(ids))
        face_ids = [f"{i}:{k}" for i, k in zip(ids, table.column("face_index").to_pylist())]
        table = table.set_column(table.schema.get_field_index("face_id"), "face_id", pa.array(face_ids))
        crops = [variants[(start + i) % len(variants)] for i in range(n)]
        table = table.set_column(table.schema.get_field_index("crop"), "crop", pa.array(crops, pa.binary()))
        for name in floats:  # jitter: a sort over 100,000 faces has real work to do
            values = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
            values = values * (1 + 0.05 * rng.standard_normal(n))
            idx = table.schema.get_field_index(name)
            field = table.schema.field(name)
            table = table.set_column(idx, field, pa.array(values, field.type))
        keep_all += sum(table.column("keep").to_pylist())
        entries.append(write_table(store.fs, f"{vdir}/faces-{start // shard_rows:05d}.parquet", table))
    Manifest(schema_version=SCHEMA_VERSION, dataset="faces", version=1, parent=None,
             note=f"synthetic: {n_faces} faces repeated from {base.num_rows}",
             counts=Counts(faces=n_faces, faces_kept=keep_all), shards=entries, tables={}).write(store)
    return store


def time_store(store: Store, label: str, pages: int) -> dict:
    from fastapi.testclient import TestClient

    from pipeline.browse.app import create_app

    gc.collect()
    before = rss_mib()
    started = time.perf_counter()
    client = TestClient(create_app(store, 1))
    out = {f"{label}_open_s": time.perf_counter() - started,
           f"{label}_rss_mib_added_by_open": rss_mib() - before}
    for name, url in (("first_page", "/"), ("filtered_page", FILTERED)):
        times = []
        for _ in range(4):
            t = time.perf_counter()
            response = client.get(url)
            times.append(time.perf_counter() - t)
            assert response.status_code == 200, response.text[:500]
        out[f"{label}_{name}_cold_ms"] = times[0] * 1000
        out[f"{label}_{name}_ms"] = min(times[1:]) * 1000
        total = response.text.split('<span id="total">', 1)[1].split("<", 1)[0]
        out[f"{label}_{name}_faces_matching"] = int(total)
    face_id = response.text.split('data-face-id="', 1)[1].split('"', 1)[0]
    t = time.perf_counter()
    assert client.get(f"/face/{face_id}").status_code == 200
    out[f"{label}_face_page_ms"] = (time.perf_counter() - t) * 1000
    if pages:
        rss = []
        for page in range(1, pages + 1):
            assert client.get(f"/?page={page}").status_code == 200
            rss.append(rss_mib())
        out[f"{label}_rss_mib_after_page_1"] = rss[0]
        out[f"{label}_rss_mib_after_page_{pages // 2}"] = rss[pages // 2 - 1]
        out[f"{label}_rss_mib_after_page_{pages}"] = rss[-1]
        out[f"{label}_rss_mib_max"] = max(rss)
    return out


def synthesise_compacted(base: pa.Table, root: Path, n_faces: int, shard_rows: int, row_group_rows: int,
                         pool: int = 4096, seed: int = 0) -> Store:
    """A committed version of `n_faces` rows repeated from `base`, laid out as commit lays a version out
    (pipeline/compact.py), written in chunks so memory stays flat whatever `n_faces`."""
    from pipeline.compact import FacesWriter

    store = Store(str(root), "faces")
    vdir = store.version_dir(1)
    rng = np.random.default_rng(seed)
    variants = pa.array(crop_variants(base, base.num_rows * -(-pool // base.num_rows), seed), pa.binary())
    floats = [f.name for f in base.schema if pa.types.is_floating(f.type)]
    keep_all, chunk = 0, 16_384
    with FacesWriter(store.fs, vdir, "faces-v0001", shard_rows=shard_rows, row_group_rows=row_group_rows) as writer:
        for start in range(0, n_faces, chunk):
            n = min(chunk, n_faces - start)
            rows = np.arange(start, start + n)
            table = base.take(pa.array(rows % base.num_rows))
            ids = [f"{start + i:08x}{image_id[8:]}" for i, image_id in enumerate(table.column("image_id").to_pylist())]
            face_ids = [f"{i}:{k}" for i, k in zip(ids, table.column("face_index").to_pylist())]
            for name, values in (("image_id", pa.array(ids)), ("face_id", pa.array(face_ids)),
                                 ("crop", variants.take(pa.array(rows % len(variants))))):
                table = table.set_column(table.schema.get_field_index(name), name, values)
            for name in floats:  # jitter: a sort over the version has real work to do
                values = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
                field = table.schema.field(name)
                table = table.set_column(table.schema.get_field_index(name), field,
                                         pa.array(values * (1 + 0.05 * rng.standard_normal(n)), field.type))
            keep_all += int(np.asarray(table.column("keep")).sum())
            writer.add(table)
        entries = writer.close()
    Manifest(schema_version=SCHEMA_VERSION, dataset="faces", version=1, parent=None,
             note=f"synthetic: {n_faces} faces repeated from {base.num_rows}",
             counts=Counts(faces=n_faces, faces_kept=keep_all), shards=entries, tables={}).write(store)
    return store


def peak_rss_mib() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's
    RSS at fork and survives exec, so it would report the synthesis's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _get(client, url: str) -> tuple[float, str]:
    t = time.perf_counter()
    response = client.get(url)
    elapsed = time.perf_counter() - t
    assert response.status_code == 200, response.text[:500]
    return elapsed, response.text


def phase_browse(root: str) -> dict:
    """Open the version and page it, in this (fresh) process."""
    from fastapi.testclient import TestClient

    from pipeline.browse.app import create_app
    from pipeline.browse.queries import PAGE_SIZE

    store = Store(root, "faces")
    started = time.perf_counter()
    client = TestClient(create_app(store, 1))
    opened = time.perf_counter() - started
    first, html = _get(client, "/")
    out = {"browse_open_s": opened, "browse_first_page_s": first, "browse_time_to_first_page_s": opened + first,
           "browse_rss_mib_after_first_page": rss_mib()}
    total = int(html.split('<span id="total">', 1)[1].split("<", 1)[0])
    last = -(-total // PAGE_SIZE)
    for name, url in (("next_page", "/?page=2"), ("deep_page", f"/?page={last // 2}"),
                      ("last_page", f"/?page={last}"), ("past_end_page", f"/?page={last + 1000}"),
                      ("filtered_page", FILTERED)):
        times = [_get(client, url)[0] for _ in range(3)]
        out[f"browse_{name}_cold_s"], out[f"browse_{name}_s"] = times[0], min(times[1:])
    out.update(browse_faces=total, browse_pages=last, browse_peak_rss_mib=peak_rss_mib())
    return out


def phase_export(root: str, out_dir: str) -> dict:
    from pipeline.export import export_coco

    started = time.perf_counter()
    path, counts = export_coco(Store(root, "faces"), 1, Path(out_dir) / "faces.coco.json")
    out = {"export_s": time.perf_counter() - started, "export_annotations": counts["annotations"],
           "export_images": counts["images"], "export_mib": path.stat().st_size / 2**20,
           "export_peak_rss_mib": peak_rss_mib()}
    path.unlink()
    return out


def _child(phase: str, *args: str) -> dict:
    """Run a phase in a fresh interpreter: its peak RSS is its own, not the synthesis's."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, __file__, "--phase", phase, *args], env=env, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def scale_run(args, base: pa.Table, tmp: Path, head: dict) -> dict:
    t = time.perf_counter()
    store = synthesise_compacted(base, tmp / "scale", args.scale, args.shard_rows, args.row_group_rows)
    manifest = Manifest.read(store, 1)
    result = {**head, "faces": args.scale, "shard_rows": args.shard_rows, "row_group_rows": args.row_group_rows,
              "files": len(manifest.shards), "synthesis_s": time.perf_counter() - t,
              "mib_of_faces_files": sum(e.bytes for e in manifest.shards) / 2**20,
              "synthesis_peak_rss_mib": peak_rss_mib()}
    print(f"synthesised {args.scale} faces into {result['files']} files in {result['synthesis_s']:.0f} s", flush=True)
    result.update(_child("browse", str(tmp / "scale")))
    if not args.skip_export:
        result.update(_child("export", str(tmp / "scale"), str(tmp)))
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--faces", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=1_000)
    parser.add_argument("--shard-rows", type=int, default=128,
                        help="rows per shard (a build's batch: 128 images)")
    parser.add_argument("--pages", type=int, default=120, help="pages to walk for the RSS figures")
    parser.add_argument("--from-root", default=None, help="output root holding a built `faces` version")
    parser.add_argument("--json", default=None)
    parser.add_argument("--scale", type=int, default=0,
                        help="faces of a version in the committed layout (files of --shard-rows) to time "
                             "browse and export on, instead of the 1k-vs-100k comparison")
    parser.add_argument("--row-group-rows", type=int, default=256)
    parser.add_argument("--skip-export", action="store_true")
    parser.add_argument("--phase", choices=("browse", "export"), help=argparse.SUPPRESS)  # a child's job
    parser.add_argument("phase_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "browse":
        print(json.dumps(phase_browse(*args.phase_args)))
        return
    if args.phase == "export":
        print(json.dumps(phase_export(*args.phase_args)))
        return

    from common import emit, header  # torch, for the device line: not in the phases' children

    with tempfile.TemporaryDirectory(prefix="browse-scale-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        if args.from_root:
            base_store = Store(args.from_root, "faces")
            base_version = latest_version(base_store)
        else:
            base_store, base_version = build_base(tmp)
        base = read_faces(base_store, base_version)
        print(f"base rows: {base.num_rows} faces from {base_store.dataset}@v{base_version} "
              f"({time.perf_counter() - t:.1f} s)", flush=True)
        if args.scale:
            emit(scale_run(args, base, tmp, header()), args.json)
            return
        t = time.perf_counter()
        small = synthesise(base, tmp / "small", args.small, args.shard_rows)
        big = synthesise(base, tmp / "big", args.faces, args.shard_rows)
        size = sum(p.stat().st_size for p in (tmp / "big").rglob("*.parquet")) / 2**20
        print(f"synthesised {args.small} and {args.faces} faces ({size:.0f} MiB of shards) in "
              f"{time.perf_counter() - t:.1f} s", flush=True)
        result = {**header(), "faces_small": args.small, "faces_big": args.faces,
                  "shard_rows": args.shard_rows,
                  "rss_mib_before": rss_mib()}
        result.update(time_store(small, "small", 0))
        result.update(time_store(big, "big", args.pages))
        for name in ("first_page", "filtered_page"):
            result[f"ratio_{name}_big_vs_small"] = result[f"big_{name}_ms"] / result[f"small_{name}_ms"]
        emit(result, args.json)


if __name__ == "__main__":
    main()
