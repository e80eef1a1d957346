"""The TinyStories benchmark path offline, on TinyStories-format Parquet files (a `text` column
of short stories) with the preset's real model shape for a few steps: prepared, trained,
evaluated (val loss, bits per byte), registered, sampled."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.e2e

NAMES = ["Lily", "Ben", "Tom", "Mia", "Sam", "Anna", "Max", "Lucy"]
THINGS = ["a red ball", "a big tree", "a small cat", "a shiny stone", "a blue kite", "a funny dog", "a warm cake"]
PLACES = ["the park", "the garden", "the beach", "the forest", "the kitchen", "the school"]
FEELINGS = ["happy", "sad", "scared", "proud", "sleepy", "excited"]


def stories(n, seed):
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.sample(NAMES, 2)
        thing, place, feeling = rng.choice(THINGS), rng.choice(PLACES), rng.choice(FEELINGS)
        out.append(
            f"Once upon a time, {a} went to {place} with {b}. They found {thing}. {a} was very {feeling}. "
            f'"Look at this!" said {a}. {b} smiled and said, "Let\'s share it." They played all day and went home.'
        )
    return out


@pytest.fixture
def tinystories(tmp_path):
    root = tmp_path / "tinystories"
    root.mkdir()
    for part in range(2):
        pq.write_table(pa.table({"text": stories(300, seed=part)}), root / f"train-{part:05d}-of-00002.parquet")
    return root


def test_the_tinystories_benchmark_path_offline(ray_cluster, mlflow_server, tinystories, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from benchmarks.tinystories import main

    args = {
        "data.source": tinystories, "data.tokenizer_sample_mb": 1, "data.val_fraction": 0.1,
        "storage.root": tmp_path / "store", "tracking.uri": mlflow_server.uri, "train.steps": 4,
        "train.batch_size": 2, "train.grad_accum": 1, "train.eval_every": 4, "train.eval_batches": 1,
        "train.checkpoint_every": 4, "train.log_every": 2, "optim.warmup_steps": 1,
        "tracking.registered_model": "tinystories-test",
    }  # fmt: skip
    result = main([f"--{k}={v}" for k, v in args.items()])
    out = capsys.readouterr().out
    model_uri = result["pretrain"]["model_uri"]
    assert model_uri.startswith("models:/tinystories-test/")
    params = MlflowClient(mlflow_server.uri).get_run(result["pretrain"]["run_id"]).data.params
    assert (params["model.d_model"], params["model.n_layers"], params["model.n_heads"]) == ("288", "6", "6")
    assert int(params["model.vocab_size"]) < 4096  # followed the tokenizer this small corpus supports
    assert 0 < result["eval"]["val_bpb"] < 10 and result["eval"]["val_loss"] > 0
    assert "| llama2.c 15M (32K Llama 2 tokenizer) | 32000 | 1.072 |" in out
    assert "sample: Once upon a time" in out
