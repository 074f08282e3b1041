"""BRCD distillation, stages A–D of DESIGN §1, as one Ray Train job.

The stages run in `brcd_dist.train.worker.run_stages` on every Ray Train worker; this script checks the input,
opens the MLflow run and calls `brcd_dist.reporting.launch_and_publish` (-> `brcd_dist.driver.launch`).

    python jobs/distill.py                                   # embedded default: Fashion-MNIST, local Ray, CPU
    python jobs/distill.py --config X.yaml brcd.alpha=0.7    # any config + overrides
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/distill.py --config X.yaml

Everything that can be wrong with the input is checked before a worker starts: the config, the tracking store and
registry names, the shards (made here when missing).
"""
from __future__ import annotations

from _cli import config_from_args, parser, preflight, setup_logging

from brcd_dist.driver import absolute_paths, run_name
from brcd_dist.reporting import launch_and_publish, result_table
from brcd_dist import tracking


def main(argv=None) -> dict:
    args = parser(__doc__.splitlines()[0]).parse_intermixed_args(argv)
    setup_logging()
    cfg = absolute_paths(config_from_args(args))
    name = run_name(cfg)
    uri, manifest = preflight(cfg, args.address, name)
    run_id = tracking.start_run(cfg, run_name=name, manifest_digest=manifest.digest()) if uri else None
    outputs = launch_and_publish(cfg, run_id, name)
    print(result_table(cfg, outputs))
    return outputs.test


if __name__ == "__main__":
    main()
