"""Stage D for any teacher/student pair, by checkpoint path or MLflow URI: mAP@K in SSHP and ASHP, and the teacher
alone, of a query split against the database, encoded with Ray Data on the cluster.

    python jobs/evaluate.py models:/brcd-student@candidate
    python jobs/evaluate.py runs/x/student.pt --teacher runs/x/teacher.pt --split val_query eval.topk=100

Without --teacher, a registered student's teacher is taken from the run that logged it (runs:/RUN/teacher). The
encoding is brcd_dist/batch_encoding.py: one encoder actor a GPU or CPU, on a local Ray instance when there is no
--address or RAY_ADDRESS. Prints the mAPs as JSON.
"""

from __future__ import annotations

import json

from _cli import (
    check_model_reachable,
    config_from_args,
    fail,
    parse,
    parser,
    setup_logging,
    tracking_uri,
    unvalidated_config,
)


def teacher_of(student_uri: str) -> str | None:
    """runs:/RUN/teacher for a registered student (its version carries the run_id tag), else None."""
    if not student_uri.startswith("models:/"):
        return None
    from mlflow import MlflowClient

    name, _, ref = student_uri[len("models:/") :].partition("@")
    client = MlflowClient()
    mv = (
        client.get_model_version_by_alias(name, ref)
        if ref
        else client.get_model_version(*student_uri[len("models:/") :].split("/", 1))
    )
    run_id = mv.tags.get("run_id") or mv.run_id
    return f"runs:/{run_id}/teacher" if run_id else None


def make_parser():
    p = parser(
        __doc__,
        prog="evaluate.py",
        first=("student", "the student: models:/NAME@alias, models:/NAME/VERSION, runs:/RUN/student or a file"),
    )
    p.add_argument("--teacher", default=None, help="teacher: same forms (default: the student's run's teacher)")
    p.add_argument(
        "--split", default="test_query", choices=["val_query", "test_query"], help="query split (default test_query)"
    )
    return p


def main(argv=None) -> dict:
    args = parse(make_parser(), argv)
    if "=" in args.student and not args.student.startswith(("models:/", "runs:/")):
        fail(
            f"expected the student model first (models:/NAME@alias, runs:/RUN/student or a file), got {args.student!r}"
        )
    light = unvalidated_config(args)
    if light is not None:  # a model that cannot be there is refused before the config's torch-importing checks
        for role, model in (("student", args.student), ("--teacher", args.teacher)):
            if model:
                check_model_reachable(model, tracking_uri(light.tracking.uri), role)
    cfg = config_from_args(args)  # before the imports below (torch, Ray, MLflow): bad input is refused in a second
    from brcd_dist import tracking
    from brcd_dist.batch_encoding import encode_images, image_source
    from brcd_dist.data import ensure_shards
    from brcd_dist.driver import absolute_paths, connect_ray
    from brcd_dist.retrieval import evaluate_paradigms

    setup_logging()
    cfg = absolute_paths(cfg)
    uri = tracking.set_tracking_uri(cfg.tracking.uri)
    try:
        student = tracking.load_model(args.student)
        teacher_uri = args.teacher or teacher_of(args.student)
        teacher = tracking.load_model(teacher_uri) if teacher_uri else None
    except tracking.TrackingError as err:
        fail(f"{err} (tracking uri {uri})")
    manifest = ensure_shards(cfg)
    if student.bits != (teacher.bits if teacher is not None else student.bits):
        fail(f"student has {student.bits} bits but teacher has {teacher.bits}: ASHP needs equal code lengths")
    connect_ray(args.address)

    def encode(model, split):
        """(packed codes, labels) sorted by key: the pipeline's order, so ties break alike."""
        source = image_source(manifest.shards_dir, split, cfg.data.shards_url)
        encoded = encode_images(
            model, source, batch_size=cfg.eval.batch_size, max_member_bytes=cfg.data.max_member_bytes
        )
        return encoded.codes, encoded.labels  # packed: ranked without unpacking

    codes = {}
    for role, model in (("student", student), ("teacher", teacher)):
        if model is not None:
            (q, q_labels), (db, db_labels) = encode(model, args.split), encode(model, "database")
            codes[role] = {"query": q, "database": db}
    maps = evaluate_paradigms(codes, q_labels, db_labels, cfg.eval.topk)
    result = {f"{args.split}/{k}_map": float(v) for k, v in maps.items()}  # full precision: exact reproduction checks
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
