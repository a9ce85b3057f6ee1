"""Training batches streamed from a dataset version: train-split, kept, weighted faces only.

Row groups are split across DataLoader workers and shuffled through a seeded buffer; nothing loads whole.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.crops import CROP_SIZE, apply_affine
from pipeline.store.files import open_for_arrow
from pipeline.store.layout import Store
from pipeline.store.manifest import Manifest
from trainer.augment import AugmentSettings, choose_map, face_size_px, sample_rng
from trainer.augment import augment as augment_face  # the name `augment` is the settings argument below

log = logging.getLogger(__name__)

COLUMNS = ["face_id", "split", "keep", "weight", "crop", "landmarks", "crop_affine", "params_62", "ref_params",
           "alt_landmarks"]  # the face's candidates: real wrong labels for the student to correct
TRAIN_SPLIT = "train"


def fold_of(face_id: str, folds: int) -> int:
    """A face's cross-fitting fold, from its image's content hash (every face of an image in one fold)."""
    return int(face_id[:8], 16) % folds


def _train_mask(batch: pa.RecordBatch, holdout: tuple[int, int] | None = None) -> pa.Array:
    # 'eval' rows (reference sources) must never reach the optimiser; dropped faces carry weight 0.
    mask = pc.and_(pc.equal(batch.column("split"), TRAIN_SPLIT), batch.column("keep"))
    mask = pc.and_(mask, pc.greater(batch.column("weight"), 0.0))
    if holdout is not None:  # cross-fitting: the held-out fold's faces are scored, never trained on
        fold, folds = holdout
        out = pa.array([fold_of(f, folds) != fold for f in batch.column("face_id").to_pylist()], pa.bool_())
        mask = pc.and_(mask, out)
    return mask


def count_train_rows(store: Store, version: int, holdout: tuple[int, int] | None = None) -> int:
    """Rows a training epoch sees (reads only the filter columns)."""
    total = 0
    for unit in _row_groups(store, version):
        cols = _read_unit(store, version, unit, ["face_id", "split", "keep", "weight"])
        total += int(pc.sum(_train_mask(cols, holdout).cast(pa.int64())).as_py() or 0)
    return total


def _row_groups(store: Store, version: int) -> list[tuple[str, int]]:
    """(shard file, row group) units: finer than shards, so one big shard still feeds every worker."""
    vdir = store.version_dir(version)
    units = []
    for shard in Manifest.read(store, version).shards:
        with open_for_arrow(store.fs, f"{vdir}/{shard.file}") as f:
            units += [(shard.file, g) for g in range(pq.ParquetFile(f).num_row_groups)]
    return units


def _read_unit(store: Store, version: int, unit: tuple[str, int], columns: list[str]) -> pa.RecordBatch:
    with open_for_arrow(store.fs, f"{store.version_dir(version)}/{unit[0]}") as f:
        table = pq.ParquetFile(f).read_row_group(unit[1], columns=columns)
    return table.combine_chunks().to_batches()[0] if table.num_rows else pa.RecordBatch.from_pylist(
        [], schema=table.schema)


def _nan62(values: np.ndarray | None) -> tuple[torch.Tensor, bool]:
    if values is None:
        return torch.full((62,), float("nan")), False
    return torch.as_tensor(np.asarray(values, np.float32)), True


def decode_row(row: dict[str, Any], augment: AugmentSettings | None = None, seed: int = 0,
               epoch: int = 0) -> dict[str, Any]:
    """A raw Parquet row -> one training sample (img RGB uint8 [3,120,120], points in crop px, ...).

    With `augment`, the crop, its label and its params move together (trainer.augment) and the map
    points are the label with noise and dropped points (NaN: not drawn); without it the map points
    are the label itself (rescoring, tests of the plain 2DASL step)."""
    bgr = cv2.imdecode(np.frombuffer(row["crop"], np.uint8), cv2.IMREAD_COLOR)
    if bgr is None or bgr.shape[:2] != (CROP_SIZE, CROP_SIZE):
        raise ValueError(f"face {row['face_id']}: crop is not a decodable {CROP_SIZE}x{CROP_SIZE} JPEG "
                         "(rebuild the version)")
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    points_img = np.asarray(row["landmarks"], dtype=np.float32).reshape(68, 2)
    points = apply_affine(points_img, np.asarray(row["crop_affine"]))
    params = [None if row[k] is None else np.asarray(row[k], np.float32) for k in ("ref_params", "params_62")]
    map_pts, extra = points, []
    if augment is not None:
        rng = sample_rng(seed, epoch, row["face_id"])
        candidates = [apply_affine(np.asarray(a["points"], np.float32).reshape(68, 2), np.asarray(row["crop_affine"]))
                      for a in (row.get("alt_landmarks") or [])]
        rgb, points, params, _ = augment_face(rgb, points, params, rng, augment, others=candidates)
        map_pts = choose_map(points, candidates, rng, augment)
        extra = [choose_map(points, candidates, rng, augment) for _ in range(augment.map_extra)]
    ref_params, has_params = _nan62(params[0])
    teacher, has_teacher = _nan62(params[1])
    return {
        "img": torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))),
        "points": torch.from_numpy(points),
        "map_points": torch.from_numpy(np.ascontiguousarray(map_pts, dtype=np.float32)),
        "map_nme": torch.tensor(_map_nme(map_pts, points), dtype=torch.float32),
        "map_extra": torch.from_numpy(np.asarray(extra, np.float32).reshape(len(extra), 68, 2)),
        "map_extra_nme": torch.tensor([_map_nme(e, points) for e in extra], dtype=torch.float32),
        "weight": torch.tensor(float(row["weight"]), dtype=torch.float32),
        "params": ref_params,
        "has_params": torch.tensor(has_params),
        "teacher_params": teacher,
        "has_teacher": torch.tensor(has_teacher),
        "face_id": row["face_id"],
    }


def _map_nme(map_pts: np.ndarray, label: np.ndarray) -> float:
    """NME (%) of the given map against the label over the map's points; NaN for an empty map."""
    present = np.isfinite(map_pts).all(-1)
    if not present.any():
        return float("nan")
    err = np.linalg.norm(map_pts[present] - label[present], axis=-1).mean()
    return float(100.0 * err / face_size_px(label))


def _shuffled(rows: Iterator[dict], buffer_size: int, rng: random.Random) -> Iterator[dict]:
    """Streaming shuffle: hold `buffer_size` rows, emit a random one as each new row arrives."""
    buffer: list[dict] = []
    for row in rows:
        if len(buffer) < buffer_size:
            buffer.append(row)
            continue
        i = rng.randrange(len(buffer))
        buffer[i], row = row, buffer[i]
        yield row
    rng.shuffle(buffer)
    yield from buffer


class FaceStream(IterableDataset):
    """Training samples of one version, streamed; `set_epoch` reseeds the order (same seed -> same order).

    `skip_batches` resumes mid-epoch: each worker drops the rows of the batches it already produced
    (DataLoader takes batches from workers round-robin), before any JPEG is decoded.
    """

    def __init__(self, store: Store, version: int, *, shuffle: bool = True, seed: int = 0,
                 buffer_size: int = 2048, batch_size: int = 1, epoch: int = 0, skip_batches: int = 0,
                 rank: int = 0, world_size: int = 1, augment: AugmentSettings | None = None,
                 holdout: tuple[int, int] | None = None):
        super().__init__()
        self.holdout = holdout
        self.augment = augment
        self.rank, self.world_size = rank, world_size
        self.store, self.version = store, version
        self.shuffle, self.seed, self.buffer_size = shuffle, seed, buffer_size
        self.batch_size, self.epoch, self.skip_batches = batch_size, epoch, skip_batches
        self._units: list[tuple[str, int]] | None = None

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    def units(self) -> list[tuple[str, int]]:
        if self._units is None:
            self._units = _row_groups(self.store, self.version)
        return self._units

    def _rows(self, units: list[tuple[str, int]]) -> Iterator[dict]:
        from pipeline.store.faces import faces_schema

        present = set(faces_schema(self.store, self.version).names)
        columns = [c for c in COLUMNS if c in present]  # versions before the candidate columns still train
        for unit in units:
            batch = _read_unit(self.store, self.version, unit, columns)
            yield from batch.filter(_train_mask(batch, self.holdout)).to_pylist()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        units = list(self.units())
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(units)
        # Row groups are dealt to processes (data-parallel ranks) first, then to their loader workers.
        mine = units[self.rank::self.world_size]
        if not mine:
            raise ValueError(f"{self.store.dataset}@v{self.version} has {len(units)} row groups, fewer than the "
                             f"{self.world_size} training processes: rebuild it with a smaller "
                             "execution.row_group_rows in the catalog, or use fewer processes")
        rows = self._rows(mine[worker::n_workers])
        if self.shuffle:
            rows = _shuffled(rows, self.buffer_size,
                             random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{worker}"))
        skip = len(range(worker, self.skip_batches, n_workers)) * self.batch_size
        for i, row in enumerate(rows):
            if i >= skip:
                yield decode_row(row, self.augment, self.seed, self.epoch)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors; face ids stay a list of strings."""
    out: dict[str, Any] = {k: torch.stack([s[k] for s in samples]) for k in samples[0] if k != "face_id"}
    out["face_id"] = [s["face_id"] for s in samples]
    return out


def build_loader(cfg, store: Store, version: int, shuffle: bool = True, epoch: int = 0,
                 skip_batches: int = 0, rank: int = 0, world_size: int = 1) -> DataLoader:
    """A DataLoader over the version's training faces for `epoch`, `skip_batches` batches in; with
    several training processes, over this `rank`'s share of the row groups."""
    stream = FaceStream(store, version, shuffle=shuffle, seed=cfg.training.seed,
                        buffer_size=cfg.data.shuffle_buffer, batch_size=cfg.training.batch_size, epoch=epoch,
                        skip_batches=skip_batches, rank=rank, world_size=world_size,
                        augment=cfg.augmentation.settings(), holdout=cfg.data.holdout())
    share = len(stream.units()[rank::world_size])
    workers = min(cfg.data.num_workers, max(share, 1))  # idle workers would only cost memory
    return DataLoader(stream, batch_size=cfg.training.batch_size, num_workers=workers, collate_fn=collate,
                      pin_memory=torch.cuda.is_available(), drop_last=False,
                      prefetch_factor=4 if workers else None, persistent_workers=False)


def batches_per_epoch(n_rows: int, batch_size: int) -> int:
    return max(math.ceil(n_rows / batch_size), 1)
