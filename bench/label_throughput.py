"""How fast the default labelling chain runs, batched across images vs one image at a time.

Both variants run in this process on the same decoded images; the ratio is what to compare.
Usage: .venv/bin/python bench/label_throughput.py [--images 64] [--source aflw2000-dev] [--json out.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import emit, header, timed

from pipeline.catalog import load_catalog
from pipeline.decode import decode_image
from pipeline.labeling import get_chain, label_images

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--catalog", default=str(ROOT / "catalog.yaml"))
    parser.add_argument("--source", default="aflw2000-dev")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    catalog = load_catalog(args.catalog)
    source = catalog.source(args.source)
    paths = sorted(Path(source.path).glob("*.jpg"))[: args.images]
    images = [decode_image(p.read_bytes()) for p in paths]
    pre = [source.pre_cropped] * len(images)
    chain = get_chain(catalog.detectors)
    label_images(chain, images[:2], pre[:2])  # load models, warm up

    t_decode, _ = timed(lambda: [decode_image(p.read_bytes()) for p in paths])
    t_loop, per_image = timed(lambda: [label_images(chain, [img], [p])[0] for img, p in zip(images, pre)])
    t_batch, batched = timed(lambda: label_images(chain, images, pre))
    faces = sum(len(f) for f in batched)
    assert faces == sum(len(f) for f in per_image)
    result = {
        **header(),
        "images": len(images), "faces": faces, "source": args.source,
        "decode_images_per_s": len(images) / t_decode,
        "per_image_faces_per_s": faces / t_loop,
        "batched_faces_per_s": faces / t_batch,
        "batched_over_per_image": t_loop / t_batch,
    }
    emit(result, args.json)


if __name__ == "__main__":
    main()
