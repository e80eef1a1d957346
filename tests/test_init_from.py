"""`train.init_from` with the real MLflow server and a local Ray cluster: a run continues from a
registered model (lineage tags, the dataset as its input), and that model's transformers export
is the same starting point bit for bit; disagreeing model settings and a dataset of another
tokenizer are refused."""

import dataclasses

import pytest
import torch
from conftest import TINY_RUN, write_corpus

from generalmodel import UserError
from generalmodel.config import load_config
from generalmodel.train.init_from import load_init
from jobs import prepare_data, pretrain

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def base(ray_cluster, mlflow_server, tmp_path_factory):
    """A registered model trained 30 steps, and the overrides its runs share."""
    root = tmp_path_factory.mktemp("init-from")
    common = {
        **TINY_RUN, "data.source": str(write_corpus(root / "corpus", 60, seed=81)), "tracking.uri": mlflow_server.uri,
        "train.log_every": 1, "train.eval_every": 1000, "train.checkpoint_every": 1000, "optim.warmup_steps": 2,
        "tracking.registered_model": "init-base",
    }  # fmt: skip
    result = pretrain.main(load_config(overrides={**common, "storage.root": str(root / "a"), "train.steps": 30}))
    return result, common, root


def losses(uri, run_id):
    from mlflow.tracking import MlflowClient

    return [m.value for m in sorted(MlflowClient(uri).get_metric_history(run_id, "loss"), key=lambda m: m.step)]


def test_continue_from_the_registry_and_from_the_transformers_export(base, mlflow_server):
    import mlflow
    from mlflow.tracking import MlflowClient

    result, common, root = base
    continued = {**common, "storage.root": str(root / "b"), "train.steps": 4, "tracking.registered_model": "init-cont"}
    from_registry = pretrain.main(
        load_config(overrides={**continued, "train.init_from": result["model_uri"], "train.run_name": "registry"})
    )
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(from_registry["run_id"])
    version = result["model_uri"].rsplit("/", 1)[1]
    assert run.data.tags["init_from"] == result["model_uri"] and run.data.tags["init_model_version"] == version
    assert run.data.tags["init_run_id"] == result["run_id"]
    assert run.inputs.dataset_inputs[0].dataset.name == "tiny"  # the prepared dataset, logged as the input
    assert run.data.params["model.n_layers"] == "2"

    scratch = losses(mlflow_server.uri, result["run_id"])
    continued_losses = losses(mlflow_server.uri, from_registry["run_id"])
    assert continued_losses[0] < scratch[0] - 1.0  # it starts where the base model ended, not from scratch

    # The transformers export starts a run from the same model, bit for bit: what the run above
    # trained from (the training path after load_init is the one it took).
    mlflow.set_tracking_uri(mlflow_server.uri)
    hf_dir = mlflow.artifacts.download_artifacts(f"runs:/{result['run_id']}/model/hf")
    registry_cfg, registry_source = load_init(
        load_config(overrides={**continued, "train.init_from": result["model_uri"]}), mlflow_server.uri
    )
    hf_cfg, hf_source = load_init(load_config(overrides={**continued, "train.init_from": hf_dir}), mlflow_server.uri)
    same_width = [dataclasses.replace(c.model, ffn_hidden=c.model.hidden) for c in (hf_cfg, registry_cfg)]
    assert same_width[0] == same_width[1] and hf_source.tokenizer_json == registry_source.tokenizer_json
    assert registry_source.state.keys() == hf_source.state.keys()
    for key, tensor in registry_source.state.items():
        assert torch.equal(hf_source.state[key], tensor), key


def test_disagreeing_model_settings_and_another_tokenizer_are_refused(base, tmp_path):
    result, common, root = base
    with pytest.raises(UserError, match=r"decides the model; .*model\.n_layers=3 \(the source has 2\)"):
        pretrain.main(load_config(overrides={**common, "train.init_from": result["model_uri"], "model.n_layers": 3}))
    other = tmp_path / "other"
    prepare_data.main(load_config(overrides={**common, "data.output": str(other), "data.vocab_size": 300}))
    with pytest.raises(UserError, match="was tokenized with another tokenizer than train.init_from"):
        pretrain.main(
            load_config(
                overrides={
                    **common,
                    "storage.root": str(tmp_path),
                    "train.init_from": result["model_uri"],
                    "train.dataset": str(other),
                }  # fmt: skip
            )
        )
