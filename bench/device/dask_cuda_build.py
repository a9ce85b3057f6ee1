"""The build's batches on a dask_cuda.LocalCUDACluster: one worker process per GPU, each loading the
detector chain once, two batches in flight per worker - then the same build through a second client
that only knows the scheduler's address (the "existing scheduler" case).

The lent GPU machine has no Prefect, so this drives `pipeline.build.build` with dask's own client
(what prefect-dask's DaskTaskRunner does under the build flow). Without dask-cuda or a GPU it runs
on a distributed.LocalCluster of CPU processes instead (a smoke run of the same code).
Usage: python3 bench/device/dask_cuda_build.py [--images 2048] [--batch 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ (common, default_chain)

from common import emit, header  # noqa: E402
from default_chain import distinct_copies, variant_catalog  # noqa: E402

from pipeline.build import build  # noqa: E402
from pipeline.catalog import load_catalog, store_of  # noqa: E402
from pipeline.settings import shared_root  # noqa: E402
from pipeline.store.faces import read_faces  # noqa: E402


def chains_loaded() -> int:
    from pipeline import labeling

    return len(labeling._CHAINS)


def run(client, catalog_path: Path) -> tuple[float, int, dict]:
    catalog = load_catalog(catalog_path)
    start = time.perf_counter()
    version, _ = build(catalog, map_batches=lambda fn, batches: client.gather(client.map(fn, batches, pure=False)))
    seconds = time.perf_counter() - start
    faces = read_faces(store_of(catalog), version, columns=["face_id"]).num_rows
    return seconds, faces, client.run(chains_loaded)


def main() -> None:
    from distributed import Client, LocalCluster

    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="facecurate-dask-"))
    sources = sorted((shared_root() / "data" / "aflw2000-dev").glob("*.jpg"))
    distinct_copies(sources, args.images, work / "images")
    half = work / "images-2"  # new files for the second build (the first one's are in its ledger)
    distinct_copies(sources[::-1], args.images // 2, half)
    gpu = torch.cuda.is_available() and importlib.util.find_spec("dask_cuda") is not None
    device = "cuda" if gpu else "cpu"
    if gpu:
        from dask_cuda import LocalCUDACluster

        cluster = LocalCUDACluster(threads_per_worker=2, dashboard_address=None)
    else:
        cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None)
    result = {**header(), "cluster": type(cluster).__name__, "workers": len(cluster.workers), "images": args.images}
    with Client(cluster) as client:
        cat = variant_catalog(work / "images", work / "out", device=device, decode="auto", batch=args.batch)
        seconds, faces, chains = run(client, cat)
        result.update(first_build_seconds=seconds, first_version_faces=faces, faces_per_s=faces / seconds,
                      chains_per_worker=sorted(chains.values()))
    with Client(cluster.scheduler_address) as client:  # an existing scheduler, known by address only
        # same catalog (same dataset and chain) with one more folder: the next version, incrementally
        import yaml

        data = yaml.safe_load(Path(cat).read_text())
        data["sources"].append({"name": "more", "kind": "folder", "path": str(half)})
        cat2 = cat.with_name("catalog-more.yaml")
        cat2.write_text(yaml.safe_dump(data))
        seconds, faces, chains = run(client, cat2)
        result.update(second_build_seconds=seconds, second_version_faces=faces,
                      chains_per_worker_after=sorted(chains.values()))
    cluster.close()
    emit(result, args.json)


if __name__ == "__main__":
    main()
