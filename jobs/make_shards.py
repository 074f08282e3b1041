"""Make the WebDataset shards and manifest.json of a config's data section (DESIGN §1 `make_shards`).

    python jobs/make_shards.py [--config X.yaml] [key=value ...] [--procs P] [--ray auto]
    python jobs/make_shards.py --config configs/smoke.yaml          # data.max_images: a subset for smoke runs

Shards and manifest go to data.shards_url when set (s3://bucket/prefix, gs://...: each shard is uploaded as soon
as it is written; credentials and endpoint from the standard AWS/GCP variables), else to data.shards_dir.
Re-running with the same parameters verifies the shards' hashes and re-uses them; an interrupted run resumes
(shards already there with their recorded sha256 are kept); a location made with another source, seed or split
is refused (pick another data.shards_dir / data.shards_url).
"""

from __future__ import annotations

import os
import time

from _cli import config_from_args, fail, parse, parser, setup_logging, unvalidated_config


def make_parser():
    p = parser(__doc__, ray=False, prog="make_shards.py")
    p.add_argument(
        "--procs",
        type=int,
        default=os.cpu_count() or 1,
        help="processes encoding ImageFolder images (default: all cores)",
    )
    p.add_argument(
        "--ray",
        metavar="ADDRESS",
        default="",
        help="ImageFolder: one Ray task per shard on this cluster ('auto': the running one); the folder must be at "
        "the same path on every node",
    )
    return p


def main(argv=None) -> None:
    args = parse(make_parser(), argv)
    light = unvalidated_config(args)
    if (
        light is not None and light.data.source == "shards"
    ):  # before the config's own checks, which would ask for the shards this job makes
        from brcd_dist.data import sources

        fail(f"data.source=shards: this job makes shards; set data.source to one of {', '.join(sources.names())}")
    cfg = config_from_args(args, training=False)  # brcd.clusters does not concern the shards
    d = cfg.data
    from brcd_dist.data.manifest import ShardsMismatchError, manifest_location  # after the checks: the writer
    from brcd_dist.data.shards import ShardSpec, write  # stack (numpy, PIL, webdataset) is not light

    setup_logging()
    t0 = time.perf_counter()
    where = manifest_location(d.shards_dir, d.shards_url)
    try:
        manifest = write(ShardSpec.of_data(d), where, num_procs=args.procs, ray_address=args.ray)
    except (ShardsMismatchError, FileNotFoundError, ValueError, OSError) as err:
        fail(str(err))
    seconds = time.perf_counter() - t0
    print(
        f"{where}: {manifest.source}, seed {manifest.seed}, {manifest.num_classes} classes, "
        f"{manifest.image_size}px x {manifest.in_chans} ch, manifest sha256 {manifest.digest()[:12]}"
    )
    for name, split in manifest.splits.items():
        print(f"  {name:<11} {split.count:>8} images in {len(split.shards):>4} shards")
    print(f"done in {seconds:.1f} s")


if __name__ == "__main__":
    main()
