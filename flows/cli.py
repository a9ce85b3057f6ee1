"""The `facecurate` command: build, datasets, show, train, rescore, round, rounds, evaluate, report, serve, server.

Each subcommand calls a flow or a library function; errors print one clear line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

DEFAULT_CATALOG = "catalog.yaml"


def _prefect_defaults(verbose: bool) -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # The libraries log through `logging`; inside a flow run these reach Prefect's logs (and UI) too.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "pipeline,trainer")
    if not verbose:  # the progress bar and the summary are the output; per-task INFO lines bury them
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")


def cmd_build(args) -> int:
    _build(args, args.scores)
    return 0


def _build(args, scores_path: str | None) -> int:
    """Build the next version (in this process, or as the Prefect flow on dask), print its summary and
    return it (or the unchanged latest)."""
    from flows.catalog import load_catalog
    from pipeline.catalog import store_of
    from pipeline.summary import format_summary, version_summary

    started = time.perf_counter()  # the build's clock: the catalog's reading counts too
    if args.in_process:
        from flows.inprocess import build_in_process

        catalog = load_catalog(args.catalog)
        result = build_in_process(catalog, scores_path=scores_path)
        seconds = time.perf_counter() - started
    else:
        from flows.server import temporary_server

        # The server first, even before the catalog: it starts on another core while this process reads
        # the catalog (which imports torch, for the trainer's config), imports the rest and loads the
        # models. A bad catalog stops it before anything else starts.
        with temporary_server() as server:
            catalog = load_catalog(args.catalog)
            from flows.build import run_build

            result = run_build(args.catalog, dask_address=args.dask_address, workers=args.workers,
                               scores_path=scores_path, temporary_server=server)
            seconds = time.perf_counter() - started  # the server's shutdown is not the build's
    summary = version_summary(store_of(catalog), result["version"])
    print(format_summary(summary))
    verb = "built" if result["created"] else "unchanged:"
    rate = ""
    if result["processed"]:
        rate = f", {result['processed'] / seconds:.1f} images/s"
    print(f"{verb} {summary['ref']}: processed {result['processed']} images in {seconds:.1f} s{rate}")
    timings = summary["manifest"].timings if result["created"] else None
    if getattr(args, "profile", False) and timings:
        from pipeline.timings import format_timings

        print(f"stages ({timings.faces} faces, seconds summed over batches):")
        print(format_timings(timings.seconds, timings.faces))
    return result["version"]


def cmd_datasets(args) -> int:
    from flows.catalog import load_catalog
    from pipeline.catalog import store_of
    from pipeline.store.layout import list_versions
    from pipeline.store.manifest import Manifest

    store = store_of(load_catalog(args.catalog))
    versions = list_versions(store)
    if not versions:
        print(f"no versions of {store.dataset!r} under {store.root}")
        return 0
    print(f"{'version':<16}{'parent':>7}{'images':>8}{'faces':>7}{'kept':>7}{'quarantined':>13}  created")
    for v in versions:
        m = Manifest.read(store, v)
        c = m.counts
        print(f"{store.dataset + '@v' + str(v):<16}{str(m.parent or '-'):>7}{c.images_seen:>8}{c.faces:>7}"
              f"{c.faces_kept:>7}{c.images_quarantined:>13}  {m.created_at}")
    return 0


def cmd_show(args) -> int:
    from flows.catalog import load_catalog
    from pipeline.catalog import store_for_ref
    from pipeline.summary import format_summary, summary_json, version_summary

    store, version = store_for_ref(load_catalog(args.catalog), args.ref)
    summary = version_summary(store, version)
    if args.json:
        print(summary_json(summary))
    else:
        print(format_summary(summary))
    return 0


def train_config_of(args):
    """The catalog's `training:` section, under the --config file, under the flags that were given
    (a flag sets the TrainConfig field of its own flat name, trainer.config.FLAT_KEYS)."""
    import yaml

    from flows.catalog import load_catalog
    from trainer.config import FLAT_KEYS, train_config

    catalog = load_catalog(args.catalog)
    overrides = yaml.safe_load(open(args.config)) if args.config else {}
    overrides["dataset_root"] = catalog.output_root
    overrides.update({name: getattr(args, name) for name in FLAT_KEYS
                      if getattr(args, name, None) is not None})
    return train_config(catalog.training, overrides)


def cmd_train(args) -> int:
    from trainer.train import train

    result = train(train_config_of(args))
    losses = " ".join(f"{k}={v:.4g}" for k, v in result.final_losses.items())
    print(f"trained {result.steps} steps ({result.epochs} epochs): {result.checkpoint}\n  last step: {losses}")
    return 0


def _rescore(catalog, store, version: int | None, args):
    """Score (and, with a verifier in the catalog's chain, relabel) every face of store@version with
    --checkpoint and print the round; (version, path, table)."""
    from pipeline.store.layout import resolve_version
    from trainer.config import train_config
    from trainer.rescore import rescore_version

    version = resolve_version(store, version)
    round_index = version if args.round is None else args.round
    drop = train_config(catalog.training, {}).round.drop_worst_pct  # the catalog's, as a round's
    version, path, table = rescore_version(store, version, args.checkpoint, round_index=round_index,
                                           device=args.device, chain=catalog.detectors, drop_worst_pct=drop)
    _say_rescored(store, version, round_index, table, path)
    return version, path, table


def _say_rescored(store, version: int, round_index: int, table, path: str) -> None:
    weights = table.column("new_weight").to_numpy()
    relabelled = table.num_rows - table.column("relabel_landmarks").null_count
    from pipeline.rounds import round_of_drop

    reasons = [r for r in table.column("drop_reason").to_pylist() if r]
    new = sum(round_of_drop(r) == round_index for r in reasons)
    print(f"rescored {store.dataset}@v{version} round {round_index}: {table.num_rows} faces, "
          f"mean new weight {weights.mean():.3f}, {(weights < 0.1).sum()} under 0.1, {relabelled} relabelled, "
          f"{len(reasons)} dropped ({new} by this round's cycle error, {len(reasons) - new} by earlier rounds) -> {path}")


def cmd_rescore(args) -> int:
    from flows.catalog import load_catalog
    from pipeline.catalog import store_for_ref
    from trainer.rescore import scores_against_references

    catalog = load_catalog(args.catalog)
    store, version = store_for_ref(catalog, args.dataset)
    version, _, scores = _rescore(catalog, store, version, args)
    report = scores_against_references(store, version, scores, threshold_pct=args.bad_above)
    if report is not None and "auc" in report:  # 68-point reference labels ride along: judge the score
        aucs = ", ".join(f"{k} {v:.3f}" for k, v in report["auc"].items())
        kept, dropped = (f"{v:.2f}%" if v is not None else "n/a"
                         for v in (report["label_nme_kept_pct"], report["label_nme_dropped_pct"]))
        print(f"against the references ({report['n']} faces, {report['n_bad']} with label NME > "
              f"{args.bad_above}%): ROC-AUC {aucs}; label NME of kept faces {kept}, of dropped ones {dropped} "
              f"(dropped: weight < {report['weight_threshold']}, {report['n_dropped']} faces)")
    if report is not None:
        from pipeline.summary import format_label_quality

        print("\n".join(format_label_quality(report["label_quality"])))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
    return 0


def cmd_round(args) -> int:
    """One round with a given checkpoint instead of training (`flows.rounds.run_round`): rescore the latest
    version with it, then build the next version with those scores. The round's index is the version it
    scores; --round, where given, must say the same."""
    from flows.catalog import load_catalog
    from flows.rounds import run_round
    from pipeline.catalog import store_of
    from pipeline.store.files import read_table_file
    from pipeline.store.layout import resolve_version

    catalog = load_catalog(args.catalog)
    store = store_of(catalog)
    version = resolve_version(store, None)
    if args.round is not None and args.round != version:
        raise ValueError(f"--round {args.round}: a round's index is the version it scores, here "
                         f"{store.dataset}@v{version} (leave --round out, or give {version})")
    run_round(catalog, store, version, checkpoint=args.checkpoint, overrides={"device": args.device}, evaluate=False,
              build=lambda scores_path: _build(args, scores_path),
              scored=lambda record: _say_rescored(store, version, version, read_table_file(store.fs, record["scores"]),
                                                  record["scores"]))
    return 0


def cmd_rounds(args) -> int:
    """Build if needed, then N times: train on the latest version, rescore and relabel it, fold it into the
    next. One line per step; the last line is the final checkpoint's path alone (for scripts)."""
    from flows.catalog import load_catalog
    from flows.rounds import run_rounds

    overrides = {name: value for name, value in (("max_steps", args.max_steps), ("batch_size", args.batch_size),
                                                 ("device", args.device)) if value is not None}
    checkpoint = run_rounds(load_catalog(args.catalog), args.rounds, overrides=overrides,
                            say=lambda line: print(line, flush=True))
    print(checkpoint)
    return 0


def cmd_evaluate(args) -> int:
    from flows.catalog import load_catalog
    from trainer.evaluate import evaluate_checkpoint, format_comparison, format_result, write_result

    maps = tuple(m.strip() for m in args.maps.split(",") if m.strip())
    result = evaluate_checkpoint(load_catalog(args.catalog).detectors, args.checkpoint, args.data,
                                 crops=args.crops, limit=args.limit, device=args.device, maps=maps,
                                 baseline=args.baseline, resamples=args.resamples, seed=args.seed)
    print(format_result(result, f"{args.checkpoint} on {args.data}"))
    if args.baseline:
        print(format_result(result["baseline"], f"baseline {args.baseline}"))
        print(format_comparison(result))
    if args.json:
        print(f"wrote {write_result(result, args.json)}")
    return 0


def cmd_report(args) -> int:
    from flows.catalog import load_catalog
    from pipeline.catalog import store_for_ref
    from pipeline.report import write_report

    store, version = store_for_ref(load_catalog(args.catalog), args.ref)
    print(f"wrote {write_report(store, version, args.out)}")
    return 0


def cmd_browse(args) -> int:
    """A local read-only web app over one version; blocks until stopped."""
    from flows.catalog import load_catalog
    from pipeline.browse.app import serve
    from pipeline.catalog import store_for_ref

    store, version = store_for_ref(load_catalog(args.catalog), args.ref)
    serve(store, version, host=args.host, port=args.port, on_ready=lambda url, faces: print(
        f"browsing {faces.ref} ({faces.facets()['faces']} faces"
        f"{f', {len(faces.unavailable)} shards unreadable' if faces.unavailable else ''}) on {url}; Ctrl-C stops",
        flush=True))
    return 0


def cmd_export(args) -> int:
    from flows.catalog import load_catalog
    from pipeline.catalog import store_for_ref
    from pipeline.export import export_coco

    store, version = store_for_ref(load_catalog(args.catalog), args.ref)
    path, counts = export_coco(store, version, args.out)
    print(f"wrote {path}: COCO keypoints, {counts['annotations']} faces ({counts['kept']} kept) "
          f"in {counts['images']} images")
    return 0


def cmd_verifier_train(args) -> int:
    """Train the label verifier from the catalog's referenced faces (cross-fitted report + shipped head)."""
    from flows.catalog import load_catalog
    from flows.verifier import train_verifier_for_catalog
    from trainer.verifier import VerifierTrainConfig

    cfg = VerifierTrainConfig(epochs=args.epochs, folds=args.folds, seed=args.seed,
                              **({"target_clean": args.target_clean} if args.target_clean else {}))
    report = train_verifier_for_catalog(load_catalog(args.catalog), args.out, cfg, dataset_ref=args.dataset)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    fused, rule = report["train_cross_fitted"]["fused"], report["train_cross_fitted"]["rule"]
    print(f"verifier on {report['faces']} training faces (cross-fitted, {cfg.folds} folds): fused label NME "
          f"{fused['mean']:.2f}% (teacher {report['train_cross_fitted']['candidates']['tddfa_mb05']['mean']:.2f}%), "
          f"ROC-AUC > 8% {fused['auc_8']:.3f}, > 5% {fused['auc_5']:.3f}; rule keeps {rule['kept_share']:.1%}, "
          f"{rule['kept_under_8_share']:.2%} of kept under 8%")
    print(f"shipped rule: max_by_yaw_bin {report['shipped_rule']['max_by_yaw_bin']}; wrote {args.out}")
    return 0


def cmd_serve(args) -> int:
    from flows.catalog import load_catalog
    from flows.serve import serve_catalog
    from flows.server import prefect_server_configured

    if not prefect_server_configured():
        raise ValueError("serve needs a Prefect server: set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api; "
                         "`facecurate server` starts a local one)")
    serve_catalog(load_catalog(args.catalog))
    return 0


def cmd_server(args) -> int:
    """A local Prefect server (UI + API) for users who have none; blocks until stopped."""
    import subprocess

    print(f"Prefect server on http://{args.host}:{args.port}; in another shell: "
          f"export PREFECT_API_URL=http://{args.host}:{args.port}/api && facecurate serve")
    return subprocess.call([sys.executable, "-m", "prefect", "server", "start", "--host", args.host,
                            "--port", str(args.port)])


def _in_process(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--in-process", action="store_true",
                   help="build in this process without Prefect or dask (no flow run, event or report)")
    return p


def _with_catalog(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--catalog", default=DEFAULT_CATALOG, help="catalog file (default: ./catalog.yaml)")
    return p


def _scoring(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--checkpoint", required=True, help="a checkpoint path, or 'teacher'")
    p.add_argument("--round", type=int, default=None,
                   help="the scores' round index (default: the version scored, the index a round has)")
    p.add_argument("--device", default="auto")
    return p


def _add_dataset_commands(sub) -> None:
    """build, datasets, show: make versions and look at them."""
    p = _with_catalog(sub.add_parser("build", help="crawl, label and commit the next dataset version"))
    p.add_argument("--dask-address", default=None, help="an existing dask scheduler (default: a LocalCluster)")
    p.add_argument("--workers", type=int, default=None, help="LocalCluster workers (default: catalog)")
    p.add_argument("--scores", default=None, help="a trainer round's scores file to fold into the new version")
    p.add_argument("--profile", action="store_true",
                   help="print each stage's seconds and faces/s (the manifest keeps them under `timings`)")
    _in_process(p)
    p.set_defaults(fn=cmd_build)
    _with_catalog(sub.add_parser("datasets", help="list versions with counts")).set_defaults(fn=cmd_datasets)
    p = _with_catalog(sub.add_parser("show", help="summarise NAME@vN (funnel, reasons, pose, reference NME)"))
    p.add_argument("ref", help="NAME@vN, or NAME for the latest")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_show)


def _add_train_command(sub) -> None:
    # Every flag defaults to None so that only the flags given override the catalog and the config file.
    p = _with_catalog(sub.add_parser("train", help="train the 2DASL model on a dataset version"))
    p.add_argument("--dataset", required=True, help="NAME@vN (or NAME for the latest)")
    p.add_argument("--config", default=None, help="YAML of TrainConfig fields (flags override it)")
    p.add_argument("--backbone", choices=["mobilenet", "resnet50"], default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup-steps", type=int, default=None, help="linear learning-rate warm-up steps")
    p.add_argument("--map-fusion", choices=["late", "early"], default=None,
                   help="late: the student fits its label under a learned trust; early: 2DASL's 4th channel only")
    p.add_argument("--holdout-fold", type=int, default=None,
                   help="cross-fitting: leave this fold's faces out of training (of --folds)")
    p.add_argument("--folds", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue exactly from the newest checkpoint")
    p.set_defaults(fn=cmd_train)


def _add_round_commands(sub) -> None:
    """rescore, round, rounds: the trainer's judgement folded back into the data."""
    p = _scoring(_with_catalog(sub.add_parser("rescore", help="score every pseudo-label of a version")))
    p.add_argument("--dataset", required=True, help="NAME@vN (or NAME for the latest)")
    p.add_argument("--bad-above", type=float, default=8.0,
                   help="with reference labels: a label is bad above this NME %% (default 8)")
    p.add_argument("--json", default=None, help="with reference labels: write the score-vs-references report here")
    p.set_defaults(fn=cmd_rescore)
    p = _scoring(_with_catalog(sub.add_parser("round", help="rescore the latest version, build the next with it")))
    p.add_argument("--dask-address", default=None)
    p.add_argument("--workers", type=int, default=None)
    _in_process(p)
    p.set_defaults(fn=cmd_round)
    p = _with_catalog(sub.add_parser("rounds", help="N rounds in this process: train -> rescore/relabel -> next "
                                                    "version; prints the final checkpoint last"))
    p.add_argument("--rounds", type=int, default=2, help="rounds the latest version should hold (default 2)")
    p.add_argument("--max-steps", type=int, default=None, help="training steps per round (default: catalog)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the catalog's training section")
    p.add_argument("--device", default=None, help="cpu | cuda | auto (default: the catalog's training section)")
    p.set_defaults(fn=cmd_rounds)


def _add_evaluate_command(sub) -> None:
    p = _with_catalog(sub.add_parser("evaluate", help="AFLW2000-3D protocol on a folder of jpg + mat"))
    p.add_argument("--checkpoint", required=True,
                   help="'teacher' (3DDFA_V2 mb05), 'untrained' (the 4-channel model at step 0) or a path")
    p.add_argument("--data", required=True, help="folder in the AFLW2000-3D layout")
    p.add_argument("--crops", choices=["gt", "detector", "both"], default="both")
    p.add_argument("--limit", type=int, default=None, help="first N images only")
    p.add_argument("--device", default="auto")
    p.add_argument("--maps", "--map", dest="maps", default="fused",
                   help="a student's landmark map(s), comma-separated, one evaluation each: fused (the "
                        "curation chain's label), teacher (the teacher's points), zero (blank), shuffled "
                        "(another image's fused points); the first one is compared with --baseline")
    p.add_argument("--baseline", default=None,
                   help="'teacher', 'untrained' or a path: evaluated on the same faces, with the paired "
                        "bootstrap 95%% interval of (checkpoint - baseline) per protocol")
    p.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and the shuffled map")
    p.add_argument("--json", default=None, help="write the full result (tables, CED, per image) here")
    p.set_defaults(fn=cmd_evaluate)


def _add_output_commands(sub) -> None:
    """report, verifier-train, browse, export: what a version yields for people and for the build."""
    p = _with_catalog(sub.add_parser("report", help="write the HTML landmark quality report of a version"))
    p.add_argument("ref", nargs="?", default=None, help="NAME@vN (default: the catalog's latest version)")
    p.add_argument("--out", default=None, help="folder for the HTML file (default: <dataset>/reports/)")
    p.set_defaults(fn=cmd_report)
    p = _with_catalog(sub.add_parser("verifier-train", help="train the label verifier (cross-fitted report)"))
    p.add_argument("--dataset", default=None, help="NAME@vN to train from (default: build the catalog, use the latest)")
    p.add_argument("--out", default="pipeline/assets/verifier.pt", help="where the trained verifier goes")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-clean", type=float, default=None,
                   help="share of kept training labels under 8%% NME the rule's bounds aim at "
                        "(default: trainer.verifier.VerifierTrainConfig's)")
    p.add_argument("--json", default=None, help="write the report (docs/labels.json) here")
    p.set_defaults(fn=cmd_verifier_train)
    p = _with_catalog(sub.add_parser("browse", help="browse a version's faces in a local read-only web app"))
    p.add_argument("ref", nargs="?", default=None, help="NAME@vN (default: the catalog's latest version)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.set_defaults(fn=cmd_browse)
    p = _with_catalog(sub.add_parser("export", help="export a version as COCO keypoints JSON"))
    p.add_argument("ref", help="NAME@vN, or NAME for the latest")
    p.add_argument("--format", choices=["coco"], default="coco",
                   help="coco: COCO keypoints (68 points; fiftyone needs a database server, see the README)")
    p.add_argument("--out", default=None, help="output file (default: <dataset>/exports/NAME-vNNNN.coco.json)")
    p.set_defaults(fn=cmd_export)


def _add_server_commands(sub) -> None:
    """serve, server: the Prefect deployments and a local server for them."""
    _with_catalog(sub.add_parser("serve", help="serve the build (cron), retrain (on landed) and report deployments")
                  ).set_defaults(fn=cmd_serve)
    p = sub.add_parser("server", help="start a local Prefect server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4200)
    p.set_defaults(fn=cmd_server)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facecurate", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_dataset_commands(sub)
    _add_train_command(sub)
    _add_round_commands(sub)
    _add_evaluate_command(sub)
    _add_output_commands(sub)
    _add_server_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _prefect_defaults(args.verbose)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from pipeline.catalog import CatalogError
    from pipeline.store.lock import LockedError
    from pipeline.weights import WeightsError

    try:
        return args.fn(args)
    except (CatalogError, WeightsError, LockedError, FileNotFoundError, ValueError) as err:
        print(f"facecurate {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
