"""Encode a database with a hash model on the cluster (Ray Data) and write a searchable FAISS binary index.

    python jobs/index.py models:/brcd-student@champion --images data/fashion_mnist --out indexes/fmnist
    python jobs/index.py models:/brcd-student/3 --images /data/imagenet --split train --kind ivf --out idx/in1k
    python jobs/index.py runs/x/student.pt --images photos/ --out idx/photos --no-log
    python jobs/index.py models:/brcd-student@champion --images s3://bucket/shards --out s3://bucket/indexes/fmnist

--images is a shard directory (its manifest.json; --split picks the split, default database; local, s3:// or
gs://) or a local ImageFolder root. --out, a directory or an s3:// / gs:// prefix, gets codes.npy, keys.npy,
labels.npy, index.faiss, model.pt and meta.json (which model version made it); a registered or logged model's run
gets the index as artifacts under index/NAME, and a registered version a tag brcd.index naming them.
Query it with jobs/search.py.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from _cli import check_model_reachable, fail, parse, parser, setup_logging, tracking_uri

INDEX_TAG = "brcd.index"
KINDS = ("auto", "flat", "ivf", "hnsw")  # brcd_dist.index.KINDS, spelled out so that --kind is checked before FAISS


def model_source(uri: str) -> dict:
    """Where a model comes from: {"model_uri", and for MLflow models "run_id", "registered_model", "version"}."""
    out = {"model_uri": uri}
    if uri.startswith("runs:/"):
        out["run_id"] = uri[len("runs:/") :].split("/", 1)[0]
    elif uri.startswith("models:/") and not uri.startswith("models:/m-"):
        from mlflow import MlflowClient

        client = MlflowClient()
        ref = uri[len("models:/") :]
        name, _, alias = ref.partition("@")
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(*ref.split("/", 1))
        out.update(registered_model=mv.name, version=str(mv.version), run_id=mv.tags.get("run_id") or mv.run_id or None)
    return out


def log_index(index, source: dict, name: str) -> str | None:
    """The index into its model's run (index/NAME) and, for a registered version, tag brcd.index; returns the
    artifact URI or None when the model has no run."""
    run_id = source.get("run_id")
    if not run_id:
        return None
    from mlflow import MlflowClient

    from brcd_dist import tracking

    with tempfile.TemporaryDirectory() as tmp:  # MLflow logs local files; --out may be on the object store
        index.save(tmp)
        tracking.log_artifact(run_id, Path(tmp), f"index/{name}")
    artifact = f"runs:/{run_id}/index/{name}"
    if source.get("version"):
        MlflowClient().set_model_version_tag(source["registered_model"], source["version"], INDEX_TAG, artifact)
    return artifact


def make_parser():
    p = parser(
        __doc__,
        config=False,
        prog="index.py",
        first=("model", "models:/NAME@alias, models:/NAME/VERSION, runs:/RUN/student or a checkpoint file"),
    )
    p.add_argument(
        "--images", required=True, help="shard directory or s3:// / gs:// prefix (manifest.json), or ImageFolder root"
    )
    p.add_argument("--out", required=True, help="directory or s3:// / gs:// prefix for the index")
    p.add_argument("--split", default="database", help="shard split, or train/val of an ImageFolder (default database)")
    p.add_argument(
        "--kind", default="auto", choices=KINDS, help="auto (exact flat up to 1M codes, else ivf), flat, ivf, hnsw"
    )
    p.add_argument("--nlist", type=int, default=None, help="IVF cells (default about 4 sqrt(N))")
    p.add_argument("--nprobe", type=int, default=None, help="IVF cells searched a query (default nlist/16)")
    p.add_argument("--batch-size", type=int, default=256, help="images an encode batch (default 256)")
    p.add_argument("--actors", type=int, default=None, help="encoder actors (default: one a GPU, else one a CPU)")
    p.add_argument(
        "--tracking-uri",
        default="",
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else mlflow.db in BRCD_HOME or .)",
    )
    p.add_argument("--no-log", action="store_true", help="do not log the index to the model's MLflow run")
    return p


def main(argv=None) -> dict:
    args = parse(make_parser(), argv)
    for flag in ("batch_size", "actors", "nlist", "nprobe"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            fail(f"--{flag.replace('_', '-')}={value}: must be >= 1")
    if "://" not in args.images and not Path(args.images).exists():
        fail(f"--images {args.images}: no such directory (a shard directory or an image folder)")
    check_model_reachable(args.model, tracking_uri(args.tracking_uri), "model")
    # the heavy imports (FAISS, torch, Ray, MLflow) after the checks that need none of them
    from brcd_dist import tracking
    from brcd_dist.batch_encoding import encode_images, image_source
    from brcd_dist.index import Index

    setup_logging()

    try:
        # the encoder actors run in other directories (and on other nodes): a local path goes to them absolute
        local = "://" not in args.images
        images = image_source(str(Path(args.images).resolve()) if local else args.images, args.split)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    is_file = Path(args.model).is_file()
    uri = None if is_file else tracking.set_tracking_uri(tracking_uri(args.tracking_uri))
    try:
        model = tracking.load_model(args.model)
        source = {"model_uri": args.model} if is_file else model_source(args.model)
    except (tracking.TrackingError, Exception) as err:  # noqa: BLE001 - MLflow raises several types
        fail(f"{args.model}: {str(err).splitlines()[0]} (tracking uri {uri})")
    if not hasattr(model, "encode"):
        fail(f"{args.model}: not a brcd_dist hash model (logged without its checkpoint)")
    from brcd_dist.driver import connect_ray

    connect_ray(args.address)
    t0 = time.perf_counter()
    encoded = encode_images(model, images, batch_size=args.batch_size, actors=args.actors)
    encode_s = time.perf_counter() - t0
    source.update(images=args.images, split=args.split, encode_seconds=round(encode_s, 3))
    index = Index.build(
        encoded.codes,
        encoded.keys,
        encoded.labels,
        model,
        kind=args.kind,
        nlist=args.nlist,
        nprobe=args.nprobe,
        source=source,
    )
    index.save(args.out)
    name = args.out.rstrip("/").rsplit("/", 1)[-1]
    artifact = None if (args.no_log or is_file) else log_index(index, source, name)
    summary = {
        "out": args.out,
        "kind": index.kind,
        "count": len(index),
        "bits": index.meta["bits"],
        "encode_images_per_s": round(len(index) / encode_s, 1),
        "model": source,
        "logged": artifact,
    }
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
