"""The `facecurate` command: build, datasets, show.

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
    if not verbose:  # the progress bar and the summary are the output; per-task INFO lines bury them
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")


def cmd_build(args) -> int:
    from flows.build import run_build
    from pipeline.build import store_of
    from pipeline.catalog import load_catalog
    from pipeline.summary import format_summary, version_summary

    catalog = load_catalog(args.catalog)
    started = time.perf_counter()
    result = run_build(args.catalog, dask_address=args.dask_address, workers=args.workers)
    seconds = time.perf_counter() - started
    summary = version_summary(store_of(catalog), result["version"])
    print(format_summary(summary))
    verb = "built" if result["created"] else "unchanged:"
    rate = ""
    if result["processed"]:
        rate = f", {result['processed'] / seconds:.1f} images/s"
    print(f"{verb} {summary['ref']}: processed {result['processed']} images in {seconds:.1f} s{rate}")
    return 0


def cmd_datasets(args) -> int:
    from pipeline import shards
    from pipeline.build import store_of
    from pipeline.catalog import load_catalog

    store = store_of(load_catalog(args.catalog))
    versions = shards.list_versions(store)
    if not versions:
        print(f"no versions of {store.dataset!r} under {store.root}")
        return 0
    print(f"{'version':<16}{'parent':>7}{'images':>8}{'faces':>7}{'kept':>7}{'quarantined':>13}  created")
    for v in versions:
        m = shards.read_manifest(store, v)
        c = m["counts"]
        print(f"{store.dataset + '@v' + str(v):<16}{str(m['parent'] or '-'):>7}{c['images_seen']:>8}{c['faces']:>7}"
              f"{c['faces_kept']:>7}{c['images_quarantined']:>13}  {m['created_at']}")
    return 0


def cmd_show(args) -> int:
    from pipeline.build import store_of
    from pipeline.catalog import load_catalog
    from pipeline.shards import Store, parse_ref
    from pipeline.summary import format_summary, version_summary

    catalog = load_catalog(args.catalog)
    name, version = parse_ref(args.ref)
    store = Store(catalog.output_root, name) if name else store_of(catalog)
    summary = version_summary(store, version)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(format_summary(summary))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facecurate", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_catalog(p):
        p.add_argument("--catalog", default=DEFAULT_CATALOG, help="catalog file (default: ./catalog.yaml)")
        return p

    p = with_catalog(sub.add_parser("build", help="crawl, label and commit the next dataset version"))
    p.add_argument("--dask-address", default=None, help="an existing dask scheduler (default: a LocalCluster)")
    p.add_argument("--workers", type=int, default=None, help="LocalCluster workers (default: catalog)")
    p.set_defaults(fn=cmd_build)
    with_catalog(sub.add_parser("datasets", help="list versions with counts")).set_defaults(fn=cmd_datasets)
    p = with_catalog(sub.add_parser("show", help="summarise NAME@vN (funnel, reasons, pose, reference NME)"))
    p.add_argument("ref", help="NAME@vN, or NAME for the latest")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _prefect_defaults(args.verbose)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from pipeline.catalog import CatalogError
    from pipeline.shards import LockedError
    from pipeline.weights import WeightsError

    try:
        return args.fn(args)
    except (CatalogError, WeightsError, LockedError, FileNotFoundError, ValueError) as err:
        print(f"facecurate {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
