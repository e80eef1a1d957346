"""Post-training with the real Ray cluster and MLflow server: chat and preference datasets prepared
by Ray Data (exact masks, counts, malformed rows), the SFT loss on the training loop (2-process FSDP2
== 1 process, exact resume), DPO's precomputed reference == the online one, and the SFT → DPO jobs
from a registered base that lacks chat tokens."""

import json
import math
import time

import pytest
import torch
from conftest import SEQ, make_documents, write_jsonl
from test_train import run, two_processes

from generalmodel import UserError
from generalmodel.config import load_config
from generalmodel.data.chat import ChatFormat
from generalmodel.data.loader import TokenDataset
from generalmodel.storage import RunLayout
from generalmodel.train.loop import train
from generalmodel.train.reference import ensure_reference
from jobs import dpo, prepare_data, sft
from models import build_model

pytestmark = pytest.mark.integration


def test_the_chat_dataset_supervises_exactly_the_assistant_tokens(post_data):
    root, chats, _ = post_data
    ds = TokenDataset.open(str(root / "chat-ds"))
    manifest = ds.manifest
    assert manifest["format"] == "chat" and manifest["columns"] == ["tokens", "mask", "docs"]
    splits = manifest["splits"]
    assert splits["train"]["conversations"] + splits["val"]["conversations"] == len(chats)
    assert splits["val"]["conversations"] > 0 and splits["train"]["truncated"] == splits["val"]["truncated"] == 0
    fmt = ChatFormat.from_json(ds.tokenizer_json())
    plain = fmt.tokenizer
    expected = sum(
        len(plain.encode(m["content"], add_special_tokens=False).ids) + 1
        for c in chats
        for m in c["messages"]
        if m["role"] == "assistant"
    )
    supervised = sum(
        int(ds.read_columns(s)["mask"].sum()) for split in ("train", "val") for s in ds.split_shards(split)
    )
    assert supervised == expected == splits["train"]["supervised_tokens"] + splits["val"]["supervised_tokens"]
    # the split is by `group`: no group in both
    groups = {"train": set(), "val": set()}
    owners: dict[tuple, set] = {}  # a conversation that occurs in two groups says nothing
    for c in chats:
        owners.setdefault(tuple(fmt.render(c["messages"]).ids), set()).add(c["group"])
    for split in groups:
        for s in ds.split_shards(split):
            for row in ds.read_columns(s)["tokens"].tolist():
                while row[-1] == manifest["tokenizer"]["special_tokens"]["<|pad|>"]:
                    row.pop()  # one conversation per row, padded
                if len(owners.get(tuple(row), ())) == 1:
                    groups[split] |= owners[tuple(row)]
    assert groups["train"] and groups["val"] and not groups["train"] & groups["val"]


def test_malformed_rows_name_file_and_line_or_are_counted(post_data, tmp_path):
    root, chats, _ = post_data
    source = write_jsonl(tmp_path / "bad.jsonl", chats[:40], ['{"messages": [{"role": "user", "content": "hi"}]}\n'])
    overrides = {
        "data.source": str(source),
        "data.format": "chat",
        "data.tokenizer": str(root / "tokenizer.json"),
        "data.seq_len": SEQ,
        "data.val_fraction": 0.25,
        "data.output": str(tmp_path / "ds"),
    }
    with pytest.raises(UserError, match=r"bad.jsonl:41: no assistant message"):
        prepare_data.main(load_config(overrides=overrides))
    assert not (tmp_path / "ds" / "manifest.json").exists()
    prepare_data.main(load_config(overrides={**overrides, "data.bad_rows": "skip"}))
    manifest = TokenDataset.open(str(tmp_path / "ds")).manifest
    assert manifest["source"]["bad_rows"] == 1 and manifest["source"]["bad_rows_named"][0][0].endswith("bad.jsonl:41")
    with pytest.raises(UserError, match="data.format='chat' needs the model's tokenizer"):
        prepare_data.main(
            load_config(overrides={**overrides, "data.tokenizer": None, "data.output": str(tmp_path / "x")})
        )


def tiny(dataset, root, **overrides):
    base = {
        "train.dataset": dataset,
        "storage.root": str(root),
        "model.vocab_size": 320,
        "model.max_seq_len": SEQ,
        "model.n_layers": 2,
        "model.n_heads": 2,
        "model.d_model": 32,
        "train.steps": 8,
        "train.batch_size": 4,
        "train.log_every": 1,
        "train.eval_every": 4,
        "train.eval_batches": 2,
        "train.checkpoint_every": 3,
        "optim.warmup_steps": 2,
        "optim.lr": 1e-2,
    }
    base.update(overrides)
    return load_config(overrides=base)


def test_sft_on_two_fsdp_processes_equals_one_and_resumes_exactly(post_data, tmp_path):
    root, _, _ = post_data
    data = str(root / "chat-ds")
    torch.set_num_threads(1)
    single, last = run(tiny(data, tmp_path / "one", **{"train.batch_size": 8}))
    assert "val_loss" in last
    two = two_processes(tiny(data, tmp_path / "two"))
    for step, loss in single.items():
        assert math.isclose(two[step], loss, rel_tol=1e-5), (step, two[step], loss)
    with pytest.raises(RuntimeError, match="injected failure at step 5"):
        run(tiny(data, tmp_path / "killed", **{"train.batch_size": 8, "train.fail_at_step": 5}))
    resumed, _ = run(tiny(data, tmp_path / "killed", **{"train.batch_size": 8, "train.fail_at_step": 5}))
    assert min(resumed) == 4  # from the step-3 checkpoint
    for step, loss in resumed.items():
        assert loss == single[step], step  # bit-identical on CPU


def test_dpo_starts_at_log_2_and_the_precomputed_reference_equals_the_online_one(post_data, tmp_path):
    root, _, _ = post_data
    data = str(root / "pref-ds")
    cfg = tiny(data, tmp_path / "online", **{"train.init_from": "a random model", "dpo.reference": "online"})
    torch.manual_seed(7)
    state = build_model(cfg.model).state_dict()
    online = {}
    train(cfg, lambda m: online.__setitem__(m["step"], m), init=lambda: state)
    assert abs(online[1]["loss"] - math.log(2)) < 1e-6  # policy == reference before the first update
    assert online[1]["rewards_chosen"] == 0 and online[8]["val_preference_accuracy"] >= 0
    # Only the SVF vectors (train.adapter): at z = 1 the policy is its frozen reference, then they move it.
    adapter = {"train.init_from": "a random model", "dpo.reference": "online", "train.adapter": "svf", "optim.lr": 0.3}
    vectors = {}
    train(
        tiny(data, tmp_path / "svf", **adapter), lambda m: vectors.__setitem__(m["step"], m["loss"]), init=lambda: state
    )
    assert abs(vectors[1] - math.log(2)) < 1e-6 and all(abs(vectors[s] - math.log(2)) > 1e-4 for s in (6, 7, 8))

    pre_cfg = tiny(data, tmp_path / "pre", **{"train.init_from": "a random model"})
    layout = RunLayout.of(pre_cfg)
    reference = ensure_reference(pre_cfg, layout, TokenDataset.open(data), state)
    assert reference.startswith(str(root / "pref-ds" / "references"))
    assert ensure_reference(pre_cfg, layout, TokenDataset.open(data), state) == reference  # reused
    layout = RunLayout(**{**layout.__dict__, "reference": reference})
    precomputed = {}
    train(pre_cfg, lambda m: precomputed.__setitem__(m["step"], m), layout, init=lambda: state)
    for step, metrics in online.items():
        for key in ("loss", "reward_margin", "preference_accuracy"):
            assert math.isclose(precomputed[step][key], metrics[key], rel_tol=1e-5, abs_tol=1e-6), (step, key)
    with pytest.raises(UserError, match="no reference log-probs attached"):
        train(tiny(data, tmp_path / "none", **{"train.init_from": "x"}), init=lambda: state)


@pytest.mark.e2e
def test_sft_then_dpo_from_a_registered_base_without_chat_tokens(post_data, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from generalmodel.infer import export_files
    from generalmodel.tracking.runs import log_model, register
    from models.llama import LlamaConfig

    root, chats, pairs = post_data
    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain.train_from_iterator(
        make_documents(40, seed=8) + [m["content"] for c in chats for m in c["messages"]],
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    # The base: a small llama with that tokenizer, logged and registered as a pretraining run's
    # model is (pretraining itself is tested in test_pretrain.py).
    cfg = LlamaConfig(vocab_size=plain.get_vocab_size(), max_seq_len=SEQ, n_layers=2, n_heads=2, d_model=32)
    torch.manual_seed(0)
    export = tmp_path / "base-export"
    export.mkdir()
    for name, data in export_files(cfg, build_model(cfg).state_dict(), plain.to_str()).items():
        (export / name).write_bytes(data)
    client = MlflowClient(mlflow_server.uri)
    experiment = client.create_experiment(f"post-base-{time.time_ns()}")
    base_run = client.create_run(experiment).info.run_id
    log_model(client, base_run, str(export))
    client.set_terminated(base_run)
    base = {"model_uri": register(client, "post-base", base_run)}
    common = {
        "storage.root": str(tmp_path / "store"),
        "tracking.uri": mlflow_server.uri,
        "train.log_every": 1,
        "train.checkpoint_every": 1000,
        "train.batch_size": 4,
        "train.eval_batches": 2,
        "optim.warmup_steps": 2,
        "train.sample_prompts": [],
    }
    post = {
        **common,
        "data.seq_len": SEQ,
        "data.split_key": "group",
        "data.val_fraction": 0.25,
        "train.answer_eval": 8,
        "train.eval_every": 6,
    }
    tuned = sft.main(
        load_config(
            overrides={
                **post,
                "data.source": str(root / "chats.jsonl"),
                "train.init_from": base["model_uri"],
                "train.steps": 12,
            }
        )
    )
    assert tuned["model_uri"].startswith("models:/post-base-sft/")
    version = client.get_model_version("post-base-sft", tuned["model_uri"].rsplit("/", 1)[1])
    assert (
        version.tags["init_model_name"] == "post-base" and version.tags["init_model_version"] == base["model_uri"][-1]
    )
    assert version.tags["chat_tokens_added"] == "<|system|> <|user|> <|assistant|> <|end|>"
    assert "/datasets/chats-" in version.tags["dataset"] and version.tags["dataset_sha256"]  # + tokenizer hash
    run = client.get_run(tuned["run_id"]).data
    assert {"heldout_exact_match", "heldout_exact_match_base", "val_loss"} <= set(run.metrics)

    preferred = dpo.main(
        load_config(
            overrides={
                **post,
                "data.source": str(root / "pairs.jsonl"),
                "train.init_from": "models:/post-base-sft/latest",
                "train.steps": 6,
            }
        )
    )
    assert preferred["model_uri"].startswith("models:/post-base-dpo/")
    run = client.get_run(preferred["run_id"]).data
    assert run.tags["init_model_name"] == "post-base-sft"
    assert {
        "heldout_preference_accuracy",
        "val_preference_accuracy",
        "reward_margin",
        "heldout_exact_match_sft",
    } <= set(run.metrics)
    assert 0 <= preferred["preference_accuracy"] <= 1
    with pytest.raises(UserError, match="the SFT job starts from a model: set --train.init_from"):
        sft.main(load_config(overrides={**post, "data.source": str(root / "chats.jsonl")}))


def test_preference_data_and_its_reference_on_s3(post_data, s3_server, tmp_path):
    """Source, tokenizer, dataset and the reference's log-probs all on the S3 server."""
    root, _, pairs = post_data
    bucket = s3_server.new_bucket()
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="src/pairs.jsonl", Body="".join(json.dumps(p) + "\n" for p in pairs[:80]))
    client.put_object(Bucket=bucket, Key="tok/tokenizer.json", Body=(root / "tokenizer.json").read_bytes())
    cfg = load_config(
        overrides={
            **s3_server.storage_overrides(),
            "data.source": f"s3://{bucket}/src",
            "data.format": "preference",
            "data.tokenizer": f"s3://{bucket}/tok",
            "data.seq_len": SEQ,
            "data.val_fraction": 0.25,
            "data.output": f"s3://{bucket}/ds",
            "storage.root": f"s3://{bucket}/store",
            "model.vocab_size": 320,
            "model.max_seq_len": SEQ,
            "model.n_layers": 2,
            "model.n_heads": 2,
            "model.d_model": 32,
        }
    )
    manifest = prepare_data.main(cfg)
    assert manifest["splits"]["train"]["pairs"] + manifest["splits"]["val"]["pairs"] == 80
    layout = RunLayout.of(cfg)
    ds = TokenDataset.open(layout.dataset, layout.storage)
    state = build_model(cfg.model).state_dict()
    uri = ensure_reference(cfg, layout, ds, state)
    assert uri.startswith(f"s3://{bucket}/ds/references/")
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="ds/references/")["Contents"]}
    assert any(k.endswith("manifest.json") for k in keys)
    ds.attach_published(uri, layout.storage)
    columns = ds.read_columns(ds.split_shards("train")[0])
    assert columns["ref_chosen"].shape == (columns["chosen"].shape[0],) and (columns["ref_chosen"] < 0).all()
