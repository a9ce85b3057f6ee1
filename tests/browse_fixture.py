"""One small built version for the browse and export tests: real images of every kind (pre-cropped
wild faces, a two-face scene, AFLW2000-3D faces with reference labels), a tar member and a file
with hostile names, several shards, and one source image deleted after the build."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.browse.queries import WORST_FIRST, View
from pipeline.build import build
from pipeline.catalog import load_catalog, store_of
from pipeline.store.manifest import Manifest
from tests.conftest import AFLW_DEV, DATA, WILD, copy_images, write_catalog

SCRIPT_NAME = "<script>alert(1)</script>.jpg"  # a tar member may be called this
IMG_NAME = "<img src=x onerror=alert(2)>.jpg"  # a plain file name can be this
GONE = "gone.jpg"  # deleted after the build: its face's original image is missing
# Tighter than the bundled rules, so the few faces here are both kept and dropped, for two reasons.
RULES = {"drop": [{"feature": "agreement_nme_pct", "max": 6}, {"feature": "flip_nme_pct", "max": 1.3}],
         "weight": [{"feature": "flip_nme_pct", "offset": 1, "scale": 2}], "min_weight": 0.05}


def build_browse_version(root: Path):
    """(store, version) of a version of ~20 faces in several shards."""
    wild = copy_images(root / "src/wild", "aflw-wild-crops", WILD[40:48])
    shutil.copy(DATA / "aflw-wild-crops" / WILD[48], wild / IMG_NAME)
    shutil.copy(DATA / "aflw-wild-crops" / WILD[49], wild / GONE)
    tar_path = root / "src/shard.tar"
    with tarfile.open(tar_path, "w") as tar:
        data = (DATA / "aflw-wild-crops" / WILD[50]).read_bytes()
        info = tarfile.TarInfo(SCRIPT_NAME)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    dev = copy_images(root / "src/dev", "aflw2000-dev", AFLW_DEV[:5], with_mat=True)
    scenes = root / "src/scenes"
    scenes.mkdir(parents=True)
    shutil.copy(DATA / "scenes" / "3ddfa_v2_trump_hillary.jpg", scenes)
    catalog = load_catalog(write_catalog(root / "catalog.yaml", [
        {"name": "wild", "kind": "folder", "path": str(wild), "pre_cropped": True},
        {"name": "shard", "kind": "tar", "path": str(tar_path), "pre_cropped": True},
        {"name": "dev", "kind": "folder", "path": str(dev), "labels": "mat", "split": "eval"},
        {"name": "scenes", "kind": "folder", "path": str(scenes)},
    ], output_root=str(root / "out"), extra={
        "rules": RULES,
        # several small files (commit compacts a version's faces into files of shard_rows)
        "execution": {"batch_images": 4, "shard_rows": 6, "row_group_rows": 2}}))
    version, _ = build(catalog)
    (wild / GONE).unlink()
    return store_of(catalog), version


def faces_frame(store, version) -> pd.DataFrame:
    """Every face row, straight from the version's Parquet files (the tests' independent reading)."""
    vdir = store.version_dir(version)
    files = [f"{vdir}/{s.file}" for s in Manifest.read(store, version).shards]
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def default_sort(df: pd.DataFrame) -> str:
    """The worst-first column the app should pick: the first of WORST_FIRST the version has."""
    return next(c for c in WORST_FIRST if c in df.columns)


def expected(df: pd.DataFrame, view: View) -> pd.DataFrame:
    """The view, computed with pandas: NaN fails every range and sorts last; face_id breaks ties."""
    keep = pd.Series(True, index=df.index)
    if view.source:
        keep &= df.source.isin(view.source)
    if view.split:
        keep &= df.split.isin(view.split)
    if view.status:
        keep &= df.keep == (view.status == "kept")
    if view.reason:
        keep &= df.reject_reason.fillna("").str.split(" ").str[0].isin(view.reason)
    if view.yaw:
        a = df.yaw_deg.abs()
        bins = {"0-30": a <= 30, "30-60": (a > 30) & (a <= 60), "60-90": a > 60}
        keep &= np.logical_or.reduce([bins[b] for b in view.yaw])
    for column, lo, hi in view.ranges:
        keep &= df[column].notna() & (df[column] >= (lo if lo is not None else -np.inf)) \
            & (df[column] <= (hi if hi is not None else np.inf))
    sort = view.sort or default_sort(df)
    descending = view.order == "desc" or (not view.order and not view.sort)
    out = df[keep].copy()
    out["_missing"] = out[sort].isna()
    return out.sort_values(["_missing", sort, "face_id"], ascending=[True, not descending, True],
                           kind="stable")
