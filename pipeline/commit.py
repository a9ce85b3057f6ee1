"""Commit a build: the parent's faces (carried over, or re-decided) plus the batches' new ones become
the next immutable version; its manifest, written last by atomic rename, is the commit point.

The batches' part files (what a killed build resumes from) are compacted into the version's files of
`execution.shard_rows` (pipeline/compact.py) and removed only once the manifest is written."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.batch import BatchResult, decide, with_decisions
from pipeline.catalog import Catalog, store_of
from pipeline.compact import FacesWriter
from pipeline.plan import BuildPlan, chain_identity
from pipeline.store.faces import read_side_table
from pipeline.store.files import link_or_copy, open_for_arrow, read_table_file, write_table
from pipeline.store.layout import Store, latest_version
from pipeline.store.manifest import Manifest
from pipeline.store.schema import (
    IMAGES_SCHEMA,
    QUARANTINE_SCHEMA,
    SCHEMA_VERSION,
    conform_faces,
    conform_quarantine,
    conform_scores,
)
from pipeline.timings import summed

log = logging.getLogger(__name__)

# A parent's faces re-decided at commit are read in chunks of this many rows: memory stays bounded
# whatever the file's size, and each chunk's look-up into a round's scores table is amortised.
_REWRITE_ROWS = 16_384


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _with_version(table: pa.Table, version: int) -> pa.Table:
    col = table.schema.get_field_index("version")
    return table.set_column(col, "version", pa.array([version] * table.num_rows, pa.int32()))


def _round_in_effect(store: Store, version: int) -> tuple[int | None, pa.Table | None]:
    """The trainer round whose weights `version`'s faces carry: the scores table folded by it or by its
    nearest ancestor (versions that only add images or change rules keep the folded weights), or
    (None, None). A re-labelled version carries no round."""
    while version is not None:
        manifest = Manifest.read(store, version)
        if "scores" in manifest.tables:
            return version, conform_scores(read_side_table(store, version, "scores"))
        if manifest.relabelled:
            return None, None
        version = manifest.parent
    return None, None


def _reason_kind(reason: str) -> str:
    """What a drop reason is counted under: a trainer round's own drop, else its first word (a rule's
    feature, or `rescore` for a round's weight under the bound)."""
    from pipeline.rounds import is_round_drop

    return "round drop" if is_round_drop(reason) else reason.split(" ")[0]


def summarize_counts(images: pa.Table, quarantine: pa.Table, faces_keep: list[bool],
                     reasons: list[str | None]) -> dict:
    status = Counter(images.column("status").to_pylist())
    n_faces = images.column("n_faces").to_pylist()
    ok = [n for n, s in zip(n_faces, images.column("status").to_pylist()) if s == "ok"]
    return {
        "images_seen": images.num_rows,
        "images_decoded": status.get("ok", 0),
        "images_quarantined": status.get("quarantined", 0),
        "images_duplicate": status.get("duplicate", 0),
        "images_with_faces": sum(1 for n in ok if n > 0),
        "images_without_faces": sum(1 for n in ok if n == 0),
        "faces": len(faces_keep),
        "faces_kept": int(sum(faces_keep)),
        "faces_dropped": len(faces_keep) - int(sum(faces_keep)),
        "drop_reasons": dict(Counter(_reason_kind(r) for r in reasons if r)),
        "quarantine_reasons": dict(Counter(quarantine.column("reason").to_pylist())),
    }


@dataclass
class _Version:
    """What the version being committed holds so far."""

    number: int
    dir: str
    shards: list[dict] = field(default_factory=list)  # manifest entries of its faces files, in row order
    images: list[pa.Table] = field(default_factory=list)
    quarantine: list[pa.Table] = field(default_factory=list)
    keep: list[bool] = field(default_factory=list)
    reasons: list[str | None] = field(default_factory=list)
    seen_ids: set[str] = field(default_factory=set)  # images whose faces it holds
    round_from: int | None = None
    relabelled: int = 0  # faces whose label a folded round changed (vs the parent's label)

    def add_faces(self, table: pa.Table) -> None:
        self.keep += table.column("keep").to_pylist()
        self.reasons += table.column("reject_reason").to_pylist()


def _only_failed_retries(plan: BuildPlan, batch_images: list[pa.Table], redone: set[str],
                         scores: pa.Table | None) -> bool:
    """The build only retried quarantined items and every one failed again: nothing new to hold."""
    return (plan.parent is not None and not plan.relabel and not plan.rules_changed and scores is None
            and redone <= plan.retry_uris
            and all(st == "quarantined" for t in batch_images for st in t.column("status").to_pylist()))


def _carry_parent(store: Store, catalog: Catalog, plan: BuildPlan, new: _Version, redone: set[str],
                  scores: pa.Table | None, writer: FacesWriter, last_piece: bool) -> None:
    """The parent's ledger, quarantine and faces into `new`: faces files shared as they are where the
    layout allows (a full file, or the last rows of the version), otherwise streamed into `writer`;
    all streamed and re-decided by the rules where they changed or a round's scores are folded."""
    fs = store.fs
    pdir = store.version_dir(plan.parent)
    images = read_side_table(store, plan.parent, "images")
    quarantine = conform_quarantine(read_side_table(store, plan.parent, "quarantine"))
    if redone:  # read again by this build (a retry, a fixed file): the batches' rows replace these
        retried = pa.array(sorted(redone), pa.string())
        images = images.filter(pc.invert(pc.and_(pc.equal(images.column("status"), "quarantined"),
                                                 pc.is_in(images.column("uri"), value_set=retried))))
        quarantine = quarantine.filter(pc.invert(pc.is_in(quarantine.column("uri"), value_set=retried)))
    new.images.append(images)
    new.quarantine.append(quarantine)
    new.seen_ids.update(x for x in images.column("image_id").to_pylist() if x)
    rewrite = plan.rules_changed or scores is not None
    fold = scores
    if rewrite and scores is None:  # rules re-decided: the round folded earlier keeps its factor
        new.round_from, fold = _round_in_effect(store, plan.parent)
    if fold is not None:
        from pipeline.rounds import latest_round_per_face

        fold = latest_round_per_face(fold)  # once, not per chunk: each chunk takes its faces' rows
    entries = Manifest.read(store, plan.parent).shards
    for i, entry in enumerate(entries):
        src = f"{pdir}/{entry.file}"
        whole = entry.rows >= writer.shard_rows or (last_piece and i == len(entries) - 1)
        if not rewrite and whole and writer.at_file_boundary:
            link_or_copy(fs, src, f"{new.dir}/{entry.file}")
            writer.link(entry.to_dict())
            with open_for_arrow(fs, src) as f:
                new.add_faces(pq.read_table(f, columns=["keep", "reject_reason"]))
            continue
        with open_for_arrow(fs, src) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=_REWRITE_ROWS):
                table = conform_faces(pa.Table.from_batches([batch]))
                if rewrite:
                    table = _redecide(table, catalog, fold, new)
                writer.add(table)
                new.add_faces(table)


def _redecide(table: pa.Table, catalog: Catalog, fold: pa.Table | None, new: _Version) -> pa.Table:
    """A chunk of the parent's faces with a round's relabels and weights folded and the rules applied."""
    if fold is None:
        return with_decisions(table, decide(table, catalog.rules))
    from pipeline.rounds import apply_relabels, fold_scores

    mine = fold.filter(pc.is_in(fold.column("face_id"), value_set=table.column("face_id").combine_chunks()))
    table, changed = apply_relabels(table, mine)  # new labels first: the rules judge the label kept
    new.relabelled += changed
    return fold_scores(with_decisions(table, decide(table, catalog.rules)), mine)


def _add_batch(store: Store, staging: str, result: BatchResult, images: pa.Table, new: _Version,
               writer: FacesWriter) -> None:
    """One batch's parts into `new`; faces of images it already holds (the parent's, an earlier
    batch's) are dropped, so each image's faces appear once whatever order batches finished in."""
    fs = store.fs
    fresh_ids = set()
    status = images.column("status").to_pylist()
    for i, (image_id, st) in enumerate(zip(images.column("image_id").to_pylist(), status)):
        if st == "ok" and image_id in new.seen_ids:
            status[i] = "duplicate"  # seen in the parent or an earlier batch: its faces are there
        elif image_id:
            fresh_ids.add(image_id)
    images = images.set_column(images.schema.get_field_index("status"), "status", pa.array(status, pa.string()))
    new.images.append(_with_version(images, new.number))
    new.quarantine.append(conform_quarantine(
        _with_version(read_table_file(fs, f"{staging}/{result.quarantine_file}"), new.number)))
    if result.faces_file:
        faces = read_table_file(fs, f"{staging}/{result.faces_file}")
        dup = pa.array([i in new.seen_ids for i in faces.column("image_id").to_pylist()], pa.bool_())
        faces = faces.filter(pc.invert(dup))
        writer.add(faces)
        new.add_faces(faces)
    new.seen_ids |= fresh_ids


def commit_version(catalog: Catalog, plan: BuildPlan, results: Iterable[BatchResult],
                   *, scores: pa.Table | None = None, note: str = "") -> int:
    """Assemble a new immutable version from the parent and the batch parts; manifest written last.

    Caller holds the DatasetLock. Faces of images the parent (or an earlier batch) already has are
    dropped here, so each image's faces appear exactly once whatever order batches finished in.
    Items read again (a retried or changed file) replace the parent's quarantine rows for their uri.
    Returns the new version, or the parent when the build only retried quarantined items that all
    failed again (nothing new to hold).
    """
    store = store_of(catalog)
    fs = store.fs
    if scores is not None:
        scores = conform_scores(scores)  # a file written before the relabelling columns
    latest = latest_version(store)
    if latest != plan.parent:
        raise RuntimeError(f"{catalog.dataset}: v{latest} landed after this build was planned on v{plan.parent}; rerun")
    staging = store.staging_dir(plan.staging_key)
    results = sorted(results, key=lambda r: r.key)
    batch_images = [read_table_file(fs, f"{staging}/{r.images_file}") for r in results]
    redone = {u for t in batch_images for u in t.column("uri").to_pylist()}  # items read by this build
    if _only_failed_retries(plan, batch_images, redone, scores):
        log.info("%s: %d quarantined items tried again, all still failing: v%d stays the latest",
                 catalog.dataset, len(redone), plan.parent)
        if fs.exists(staging):
            fs.rm(staging, recursive=True)
        return plan.parent
    new = _Version((latest or 0) + 1, store.version_dir((latest or 0) + 1))
    if fs.exists(new.dir):  # a crashed commit: no manifest, so it never existed; start it over
        fs.rm(new.dir, recursive=True)
    fs.makedirs(new.dir, exist_ok=True)

    execution = catalog.execution
    with FacesWriter(fs, new.dir, f"faces-v{new.number:04d}", shard_rows=execution.shard_rows,
                     row_group_rows=execution.row_group_rows) as writer:
        if plan.parent is not None and not plan.relabel:  # a re-labelled version starts afresh
            last_piece = not any(r.faces_file for r in results)
            _carry_parent(store, catalog, plan, new, redone, scores, writer, last_piece)
        for result, images in zip(results, batch_images):
            _add_batch(store, staging, result, images, new, writer)
        new.shards = writer.close()

    images_all = pa.concat_tables(new.images) if new.images else IMAGES_SCHEMA.empty_table()
    quarantine_all = pa.concat_tables(new.quarantine) if new.quarantine else QUARANTINE_SCHEMA.empty_table()
    side = {"images": write_table(fs, f"{new.dir}/images.parquet", images_all),
            "quarantine": write_table(fs, f"{new.dir}/quarantine.parquet", quarantine_all)}
    if scores is not None:
        side["scores"] = write_table(fs, f"{new.dir}/scores.parquet", scores)
    manifest = Manifest(
        schema_version=SCHEMA_VERSION, dataset=catalog.dataset, version=new.number, parent=plan.parent,
        created_at=_now(), note=note, catalog_path=catalog.path, catalog_hash=catalog.content_hash(),
        rules_hash=catalog.rules_hash(), detectors=chain_identity(catalog),
        counts={**summarize_counts(images_all, quarantine_all, new.keep, new.reasons),
                "images_new": plan.new_items, "images_unchanged": plan.unchanged,
                "faces_relabelled": new.relabelled},
        shards=new.shards, tables=side,
        # This build's batches only (resumed ones as first run): stage -> seconds summed over batches.
        timings={"faces": sum(r.counts.get("faces", 0) for r in results),
                 "seconds": {k: round(v, 4) for k, v in summed(r.timings for r in results).items()}},
    )
    if plan.relabel:
        manifest.relabelled = plan.chain_change  # the parent's faces are not carried over
    if scores is not None and scores.num_rows:
        manifest.round_folded = sorted(pc.unique(scores.column("round")).to_pylist())  # the rounds it folds
    if new.round_from is not None:
        manifest.round_weights_from = new.round_from  # the version whose folded scores.parquet was re-applied
    manifest.write(store)  # the commit point
    if fs.exists(staging):
        fs.rm(staging, recursive=True)
    return new.number
