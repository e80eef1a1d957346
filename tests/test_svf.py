"""Singular-value fine-tuning (train.adapter=svf): all vectors at 1 are the base model, the merged
weights equal the adapted layers, only the vectors train, training with an adapter on 2 FSDP2 ranks
equals 1 rank and resumes exactly (DPO's: tests/test_post.py; RL's: tests/test_rl.py), two-pass
inference picks or mixes experts, and the registry stores only the vectors as a version naming its
base, which every reader gets merged."""

import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from conftest import SEQ, qa_rows, spawn_ranks, write_jsonl
from safetensors.torch import load_file
from test_train import tiny
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from generalmodel import UserError
from generalmodel.cluster import free_port
from generalmodel.config import load_config
from generalmodel.data.tokenizer import train_bpe
from generalmodel.infer.export import export_files, load_model
from generalmodel.tracking.registry import download_model
from generalmodel.train.init_from import InitSource, adapter_config
from generalmodel.train.loop import train
from models import build_model, svf
from models.llama import LlamaConfig


def small_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(LlamaConfig(vocab_size=64, max_seq_len=32, n_layers=2, n_heads=2, d_model=32)).eval()


def test_vectors_at_one_are_the_base_and_merging_equals_the_adapted_layers():
    model = small_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(0, 64, (3, 16))
    before = model(tokens)
    names = svf.attach(model, ["blocks.*"])
    linears = [n for n, m in small_model().named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("blocks")]
    assert names == linears and len(names) == 2 * 7  # q, k, v, out and the MLP's gate, up and down, per block
    assert torch.equal(model(tokens), before)  # z = 1: bit for bit
    assert svf.base_state(model.state_dict()).keys() == base.keys()

    torch.manual_seed(1)
    for name in names:
        model.get_submodule(name).z.data.uniform_(0.5, 1.5)
    adapted = model(tokens)
    assert not torch.allclose(adapted, before, atol=1e-3)
    merged = small_model()
    merged.load_state_dict(svf.merge(base, svf.vectors(model.state_dict())))
    torch.testing.assert_close(merged(tokens), adapted, rtol=1e-4, atol=1e-5)

    adapted.float().pow(2).mean().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {f"{name}.z" for name in names}  # the base, U, s and V stay frozen
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trained


def test_targets_and_bad_vectors_are_named():
    model = small_model()
    mlps = [f"blocks.{i}.mlp.{w}" for i in range(2) for w in ("gate", "up", "down")]
    assert svf.attach(model, ["blocks.*.mlp.*"]) == mlps
    with pytest.raises(ValueError, match=r"no linear layer matches \['decoder\.\*'\]"):
        svf.attach(small_model(), ["decoder.*"])
    base = small_model().state_dict()
    with pytest.raises(ValueError, match="'blocks.0.attn.q_proj' has shape \\(5,\\); its \\(32, 32\\) weight has 32"):
        svf.merge(base, {"blocks.0.attn.q_proj": torch.ones(5)})
    with pytest.raises(ValueError, match="'blocks.9.mlp.up', which is not a matrix"):
        svf.merge(base, {"blocks.9.mlp.up": torch.ones(32)})


def test_the_job_side_check_refuses_added_tokens_and_pins_the_base():
    model = LlamaConfig(vocab_size=64, max_seq_len=32, n_layers=2, n_heads=2, d_model=32)
    cfg = load_config(overrides={"train.init_from": "models:/base/latest", "train.adapter": "svf"})
    cfg = cfg.model_copy(update={"model": model})
    tags = {"init_model_name": "base", "init_model_version": "3"}
    source = InitSource("models:/base/latest", model, {}, "{}", tags)
    assert adapter_config(cfg, source).train.init_from == "models:/base/3"  # latest would move
    added = InitSource("models:/base/latest", model, {}, "{}", {**tags, "chat_tokens_added": "<|user|>"})
    with pytest.raises(UserError, match="added tokens to it \\(chat_tokens_added: <\\|user\\|>\\)"):
        adapter_config(cfg, added)
    narrow = cfg.model_copy(update={"train": cfg.train.model_copy(update={"adapter_targets": ["head*"]})})
    with pytest.raises(UserError, match="train.adapter_targets: no linear layer matches"):
        adapter_config(narrow, source)
    with pytest.raises(ValueError, match="adapts a trained model and keeps its weights: set train.init_from"):
        load_config(overrides={"train.adapter": "svf"})


def write_export(directory, files: dict[str, bytes]) -> str:
    directory.mkdir()
    for name, blob in files.items():
        (directory / name).write_bytes(blob)
    return str(directory)


def test_two_pass_inference_picks_or_mixes_expert_vectors(tmp_path):
    from generalmodel.infer.experts import Experts
    from generalmodel.infer.export import adapter_files, merge_adapter

    model = small_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    tokenizer = Tokenizer(WordLevel({"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, 64)}}, unk_token="w1"))
    tokenizer.pre_tokenizer = Whitespace()
    base_dir = write_export(tmp_path / "base", export_files(model.cfg, base, tokenizer.to_str()))
    svf.attach(model, ["blocks.*.attn.*"])
    experts, vectors = {}, {}
    for name, low in (("a", 0.2), ("b", 1.5)):
        for module in svf.vectors(model.state_dict()):
            model.get_submodule(module).z.data.uniform_(low, low + 0.3)
        vectors[name] = {k: v.clone() for k, v in svf.vectors(model.state_dict()).items()}
        files = adapter_files(model.cfg, model.state_dict(), tokenizer.to_str(), base_dir)
        experts[name] = write_export(tmp_path / name, files)

    prompt = list(range(1, 20))
    top1 = Experts(base_dir, experts, "top1")
    losses = top1.prompt_losses(prompt)
    best = min(losses, key=losses.get)
    chosen, alpha = top1.adapt(prompt)
    assert alpha == {name: float(name == best) for name in experts} and losses["a"] != losses["b"]
    merged, _ = load_model(merge_adapter(experts[best], base_dir))
    tokens = torch.tensor([prompt])
    torch.testing.assert_close(chosen(tokens), merged(tokens), rtol=1e-4, atol=1e-5)

    mixed, alpha = Experts(base_dir, experts, "softmax", temperature=10.0).adapt(prompt)
    assert math.isclose(sum(alpha.values()), 1.0, rel_tol=1e-6) and 0.01 < alpha["a"] < 0.99
    z = {m: alpha["a"] * vectors["a"][m] + alpha["b"] * vectors["b"][m] for m in vectors["a"]}
    reference = small_model()
    reference.load_state_dict(svf.merge(base, z))
    torch.testing.assert_close(mixed(tokens), reference(tokens), rtol=1e-4, atol=1e-5)

    other = Tokenizer(WordLevel({"<|endoftext|>": 0, "v": 1}, unk_token="v")).to_str()
    stranger = write_export(tmp_path / "stranger", adapter_files(model.cfg, model.state_dict(), other, base_dir))
    with pytest.raises(UserError, match="expert 'c' .* was trained with another tokenizer"):
        Experts(base_dir, {**experts, "c": stranger})


ADAPTER = {
    "train.init_from": "a random model",
    "train.adapter": "svf",
    "optim.lr": 0.3,
    "train.batch_size": 8,
    "train.steps": 8,
    "train.eval_every": 4,
}


def base_state(cfg):
    torch.manual_seed(3)
    return build_model(cfg.model).state_dict()


def _rank(rank, port, cfg, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    losses = {}
    train(cfg, lambda m: losses.__setitem__(m["step"], m["loss"]), init=lambda: base_state(cfg))
    if rank == 0:
        out.update(losses)
    torch.distributed.destroy_process_group()


@pytest.mark.integration
def test_svf_on_two_ranks_equals_one_resumes_exactly_and_exports_only_vectors(train_dataset, tmp_path):
    data = train_dataset
    torch.set_num_threads(1)
    cfg = tiny(data, tmp_path / "one", **ADAPTER)
    losses = {}
    train(cfg, lambda m: losses.__setitem__(m["step"], m["loss"]), init=lambda: base_state(cfg))
    frozen = {}  # the same batches with the vectors left at 1
    still = tiny(data, tmp_path / "still", **{**ADAPTER, "optim.lr": 1e-12})
    train(still, lambda m: frozen.__setitem__(m["step"], m["loss"]), init=lambda: base_state(cfg))
    assert frozen[1] == losses[1] and losses[8] < frozen[8] - 0.02, (losses, frozen)  # the vectors alone learn

    two = mp.Manager().dict()
    spawn_ranks(_rank, (free_port(), tiny(data, tmp_path / "two", **{**ADAPTER, "train.batch_size": 4}), two), 2)
    for step, loss in losses.items():
        assert math.isclose(two[step], loss, rel_tol=1e-5), (step, two[step], loss)

    killed = tiny(data, tmp_path / "killed", **{**ADAPTER, "train.fail_at_step": 5})
    with pytest.raises(RuntimeError, match="injected failure at step 5"):
        train(killed, init=lambda: base_state(cfg))
    resumed = {}
    train(killed, lambda m: resumed.__setitem__(m["step"], m["loss"]), init=lambda: base_state(cfg))
    assert min(resumed) == 4 and all(resumed[s] == losses[s] for s in resumed)  # bit-identical on CPU

    export = tmp_path / "one/checkpoints/pretrain/export"
    assert sorted(os.listdir(export)) == ["adapter.json", "adapter.safetensors", "model_config.json", "tokenizer.json"]
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    for name, blob in export_files(cfg.model, base_state(cfg), (export / "tokenizer.json").read_text()).items():
        (base_dir / name).write_bytes(blob)
    # The adapter names "a random model"; pointed at the base's directory it loads, merged.
    meta = (export / "adapter.json").read_text().replace('"a random model"', f'"{base_dir}"')
    (export / "adapter.json").write_text(meta)
    assert (export / "adapter.safetensors").stat().st_size < (base_dir / "model.safetensors").stat().st_size / 10
    merged = download_model(str(export), None, cfg.storage.resolved())
    model, _ = load_model(merged)
    reference = build_model(cfg.model)
    reference.load_state_dict(base_state(cfg))
    names = svf.attach(reference, ["blocks.*"])
    for name, z in load_file(export / "adapter.safetensors").items():
        reference.get_submodule(name).z.data.copy_(z)
    assert sorted(load_file(export / "adapter.safetensors")) == sorted(names)
    tokens = torch.randint(0, 320, (2, 24))
    torch.testing.assert_close(model(tokens), reference.eval()(tokens), rtol=1e-4, atol=1e-5)


@pytest.mark.e2e
def test_an_svf_sft_version_holds_only_vectors_names_its_base_and_loads_merged(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from generalmodel.tracking.runs import log_model, register
    from jobs import coconut, sft

    chats, _ = qa_rows(240, seed=5)
    chats_file = write_jsonl(tmp_path / "chats.jsonl", chats)
    # A tokenizer trained here: the chat tokens are reserved (a base without them is refused).
    tokenizer_json = train_bpe([m["content"] for c in chats for m in c["messages"]], 320).to_str()
    cfg = LlamaConfig(vocab_size=320, max_seq_len=SEQ, n_layers=2, n_heads=2, d_model=32)
    torch.manual_seed(0)
    base_weights = build_model(cfg).state_dict()
    export = tmp_path / "base-export"
    export.mkdir()
    for name, data in export_files(cfg, base_weights, tokenizer_json).items():
        (export / name).write_bytes(data)
    client = MlflowClient(mlflow_server.uri)
    base_run = client.create_run(client.create_experiment(f"svf-base-{os.getpid()}-{id(cfg)}")).info.run_id
    log_model(client, base_run, str(export))
    client.set_terminated(base_run)
    base = register(client, "svf-base", base_run)
    overrides = {
        "storage.root": str(tmp_path / "store"),
        "tracking.uri": mlflow_server.uri,
        "data.source": str(chats_file),
        "data.seq_len": SEQ,
        "data.split_key": "group",
        "data.val_fraction": 0.25,
        "train.init_from": "models:/svf-base/latest",
        "train.adapter": "svf",
        "train.adapter_targets": ["blocks.*.mlp.*"],
        "train.steps": 6,
        "train.batch_size": 4,
        "train.eval_every": 6,
        "train.eval_batches": 2,
        "train.answer_eval": 4,
        "optim.lr": 0.3,
        "optim.warmup_steps": 0,
    }
    tuned = sft.main(load_config(overrides=overrides))
    name, number = tuned["model_uri"].removeprefix("models:/").split("/")
    version = client.get_model_version(name, number)
    assert name == "svf-base-sft" and version.tags["adapter"] == "svf"
    assert version.tags["adapter_base"] == base  # pinned: models:/svf-base/latest would move
    files = {a.path.rsplit("/", 1)[1] for a in client.list_artifacts(tuned["run_id"], "model/data/export")}
    assert files == {"adapter.json", "adapter.safetensors", "model_config.json", "tokenizer.json"}
    assert "heldout_exact_match" in client.get_run(tuned["run_id"]).data.metrics  # generated with the merged model
    run_tags = client.get_run(tuned["run_id"]).data.tags
    assert run_tags["hf_export"].startswith("none: an adapter")

    model, _ = load_model(download_model(tuned["model_uri"], mlflow_server.uri, load_config().storage))
    merged = model.state_dict()
    changed = {k for k in base_weights if not torch.equal(merged[k], base_weights[k])}
    assert changed == {f"blocks.{i}.mlp.{w}.weight" for i in range(2) for w in ("gate", "up", "down")}
    # Two-pass sampling with the one expert equals sampling from the version itself.
    from generalmodel.config import TrackingConfig
    from jobs.sample import SampleConfig
    from jobs.sample import main as sample

    asked = {
        "model": "models:/svf-base/latest",
        "prompt": ["What is 3 plus 4?"],
        "chat": True,
        "tracking": TrackingConfig(uri=mlflow_server.uri),
        "sampling": {"max_new_tokens": 6, "temperature": 0},
    }
    assert sample(SampleConfig(**asked, experts=[tuned["model_uri"]])) == sample(
        SampleConfig(**{**asked, "model": tuned["model_uri"]})
    )
    # The MLflow model of the version (`mlflow models serve`, pyfunc) loads its base from the registry.
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(mlflow_server.uri)
    pyfunc = mlflow.pyfunc.load_model(tuned["model_uri"])
    chat = {"max_new_tokens": 6, "temperature": 0.0, "chat": True}
    assert list(pyfunc.predict(pd.DataFrame({"prompt": ["What is 3 plus 4?"]}), params=chat)) == sample(
        SampleConfig(**{**asked, "model": tuned["model_uri"]})
    )
    with pytest.raises(UserError, match=f"expert {base} is not an adapter"):
        sample(SampleConfig(**asked, experts=[base]))
    with pytest.raises(UserError, match="train.adapter='svf': the COCONUT job trains the whole model"):
        coconut.main(load_config(overrides={**overrides, "train.init_from": base}))
