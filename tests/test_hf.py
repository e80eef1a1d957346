"""Hugging Face export and import against the real `transformers` (loaded offline from the
directory we write): logits equal ours in fp32 for Llama (MHA, GQA, MQA, tied), Qwen3 (QK-norm,
sliding windows), Arcee (ReLU²), DeepSeek-V3 (MLA + MoE) and GPT-2 variants, each exported as the class asserted here,
greedy continuations identical, ours → HF → ours bit-identical; what has no transformers
class is refused by name."""

import dataclasses

import pytest
import torch
from conftest import make_documents

from generalmodel import UserError
from generalmodel.data.tokenizer import EOS, train_bpe
from generalmodel.infer import SamplingParams, generate
from generalmodel.interop.hf import ExportError, hf_architecture, is_remote_code, read_hf, write_hf
from models import PRESETS, build_model
from models.deepseek import DeepSeekConfig
from models.gpt2 import GPT2Config
from models.llama import LlamaConfig

transformers = pytest.importorskip("transformers")

SHAPE = {"vocab_size": 384, "max_seq_len": 96, "n_layers": 2, "n_heads": 4, "d_model": 64}
VARIANTS = {
    "llama-mha": LlamaConfig(**SHAPE),
    "llama-gqa": LlamaConfig(**SHAPE, n_kv_heads=2, rope_theta=500000.0, norm_eps=1e-6),
    "llama-mqa-tied": LlamaConfig(**SHAPE, n_kv_heads=1, tie_embeddings=True),
    "qwen3-gqa": LlamaConfig(**SHAPE, n_kv_heads=2, qk_norm=True),
    # windows of 16 in rows of 96 positions; the second layer global (layer_types)
    "qwen3-window": LlamaConfig(**SHAPE, qk_norm=True, window=16, global_every=2, tie_embeddings=True),
    "arcee-relu2": LlamaConfig(**SHAPE, mlp="relu2", n_kv_heads=2),
    # MLA + MoE: a full query projection, the second layer MoE (4 experts, top-2, 1 shared)
    "deepseek-v3": DeepSeekConfig(**SHAPE, kv_lora_rank=32, qk_rope_head_dim=8, moe_experts=4, moe_hidden=32),
    # a query bottleneck, other head sizes, every layer MoE (top-3, 2 shared), tied
    "deepseek-qlora-tied": DeepSeekConfig(
        **SHAPE,
        kv_lora_rank=24,
        q_lora_rank=32,
        qk_rope_head_dim=12,
        qk_nope_head_dim=8,
        v_head_dim=20,
        moe_experts=6,
        moe_top_k=3,
        moe_shared_experts=2,
        moe_hidden=16,
        moe_first_dense=0,
        tie_embeddings=True,
    ),  # fmt: skip
    "gpt2": GPT2Config(**SHAPE),
    "gpt2-bias-untied": GPT2Config(**SHAPE, bias=True, tie_embeddings=False),
}
CLASSES = {
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "arcee": "ArceeForCausalLM",
    "deepseek": "DeepseekV3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(make_documents(40, seed=3), SHAPE["vocab_size"])


def random_model(cfg, seed=0):
    """Weights off their init everywhere (norm gains, biases and MoE routing biases too), so every
    tensor's mapping matters."""
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.add_(torch.randn_like(b) * 0.05)
    return model


def export(model, tokenizer, tmp_path):
    return write_hf(model.cfg, model.state_dict(), tokenizer.to_str(), str(tmp_path / "hf"))


def load_hf(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def assert_same_logits_and_greedy_text(model, hf, tokenizer, new_tokens: int) -> None:
    """fp32 logits within 1e-4 of ours; a greedy continuation identical to our sampler's."""
    ids = torch.randint(0, SHAPE["vocab_size"], (2, SHAPE["max_seq_len"]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4
    prompt = tokenizer.encode("The state of the Union", add_special_tokens=False).ids
    eos = tokenizer.token_to_id(EOS)
    mine = list(generate(model, prompt, SamplingParams(temperature=0, max_new_tokens=new_tokens), eos))
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos
        )
    theirs = out[0, len(prompt) :].tolist()
    assert mine == (theirs[:-1] if theirs and theirs[-1] == eos else theirs) and len(mine) > 0


@pytest.mark.parametrize("name", VARIANTS)
def test_transformers_gives_our_logits_and_greedy_text(name, tokenizer, tmp_path):
    model = random_model(VARIANTS[name])
    hf = load_hf(export(model, tokenizer, tmp_path))
    assert type(hf).__name__ == CLASSES[name.split("-")[0]]  # the native class, never a fallback
    assert_same_logits_and_greedy_text(model, hf, tokenizer, 64)


@pytest.mark.parametrize("name", VARIANTS)
def test_ours_to_hf_and_back_is_bit_identical(name, tokenizer, tmp_path):
    model = random_model(VARIANTS[name], seed=2)
    cfg, state, tokenizer_json = read_hf(export(model, tokenizer, tmp_path))
    assert type(cfg) is type(model.cfg)
    assert dataclasses.asdict(cfg) == dataclasses.asdict(model.cfg) | explicit_sizes(model.cfg)
    back = build_model(cfg)
    back.load_state_dict(state)
    for key, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key
    assert tokenizer_json == tokenizer.to_str()


def explicit_sizes(cfg) -> dict:
    """The sizes a config.json states that ours may leave to defaults (null: derived)."""
    sizes = {"ffn_hidden": cfg.hidden}
    if cfg.attention == "mla":
        sizes |= {
            "qk_nope_head_dim": cfg.qk_nope_head_dim or cfg.head_dim,
            "v_head_dim": cfg.v_head_dim or cfg.head_dim,
        }
    if cfg.moe_experts:
        sizes["moe_hidden"] = cfg.expert_hidden
    return sizes


def test_the_hf_tokenizer_encodes_and_decodes_as_ours(tokenizer, tmp_path):
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(
        export(random_model(VARIANTS["llama-mha"]), tokenizer, tmp_path)
    )
    text = "Fellow citizens, the state of the Union is strong.\nÜnïcode too."
    assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text, add_special_tokens=False).ids
    assert hf_tokenizer.eos_token == EOS and hf_tokenizer.eos_token_id == tokenizer.token_to_id(EOS)
    assert hf_tokenizer.decode(hf_tokenizer(text)["input_ids"]) == text


def test_bf16_export_is_loadable(tokenizer, tmp_path):
    model = random_model(VARIANTS["llama-gqa"])
    directory = write_hf(model.cfg, model.state_dict(), tokenizer.to_str(), str(tmp_path / "bf16"), dtype="bfloat16")
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory)
    assert hf.dtype == torch.bfloat16
    ids = torch.arange(16)[None]
    with torch.no_grad():
        ours, theirs = model.to(torch.bfloat16)(ids).float(), hf(ids).logits.float()
    assert (ours - theirs).abs().max().item() < 0.1  # bf16 rounding only


@pytest.mark.parametrize(
    "overrides, named",
    [  # asked for a native class only (remote_code=False)
        ({"attention": "mla"}, "attention='mla'"),
        ({"moe_experts": 4}, "moe_experts=4"),
        ({"window": 16}, "window=16"),  # Qwen3 has windows, with QK-norm only
        ({"kv_share_group": 2}, "kv_share_group=2"),
        ({"qk_norm": True, "mlp": "relu2"}, "mlp='relu2'"),
        ({"value_residual": True}, "value_residual=true"),
        ({"qk_norm": True, "bias": True}, "bias=true"),
    ],
)
def test_models_without_a_native_class_are_refused_by_name_when_remote_code_is_off(
    overrides, named, tokenizer, tmp_path
):
    model = build_model(LlamaConfig(**SHAPE, **overrides))
    with pytest.raises(ExportError, match=f"has no native transformers class: .*{named}"):
        write_hf(model.cfg, model.state_dict(), tokenizer.to_str(), str(tmp_path / "hf"), remote_code=False)
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())


def test_the_export_job_writes_a_transformers_directory_from_an_export(tokenizer, tmp_path):
    from generalmodel.infer.export import export_files
    from jobs.export import ExportConfig
    from jobs.export import main as export_job

    model = random_model(VARIANTS["llama-gqa"])
    native = tmp_path / "native"
    native.mkdir()
    for name, data in export_files(model.cfg, model.state_dict(), tokenizer.to_str()).items():
        (native / name).write_bytes(data)
    out = export_job(ExportConfig(model=str(native), out=str(tmp_path / "hf"), dtype="float32"))
    ids = torch.arange(32)[None]
    with torch.no_grad():
        assert (load_hf(out)(ids).logits - model(ids)).abs().max().item() <= 1e-4
    with pytest.raises(UserError, match="already holds a model"):
        export_job(ExportConfig(model=str(native), out=out))


def test_the_export_carries_the_chat_template_and_stops_at_the_end_of_a_turn(tokenizer, tmp_path):
    from generalmodel.data.chat import END, ChatFormat

    directory = export(random_model(VARIANTS["llama-mha"]), tokenizer, tmp_path)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Who spoke in 1790?"},
        {"role": "assistant", "content": "Washington."},
    ]
    fmt = ChatFormat(tokenizer)
    rendered = hf_tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
    assert list(rendered) == fmt.render(conversation).ids
    prompt = hf_tokenizer.apply_chat_template(conversation[:2], add_generation_prompt=True, return_dict=True)
    assert list(prompt["input_ids"]) == fmt.prompt_ids(conversation[:2])
    generation = transformers.GenerationConfig.from_pretrained(directory)
    assert generation.eos_token_id == [tokenizer.token_to_id(EOS), tokenizer.token_to_id(END)]


def test_a_qwen3_layer_pattern_we_cannot_build_is_refused_by_name(tokenizer, tmp_path):
    import json

    directory = export(random_model(VARIANTS["qwen3-window"]), tokenizer, tmp_path)
    config = json.loads((tmp_path / "hf/config.json").read_text())
    config["layer_types"] = ["full_attention", "sliding_attention"]  # global first: not every N-th
    (tmp_path / "hf/config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"config.json: layer_types has full-attention layers \[0\]"):
        read_hf(directory)


@pytest.mark.parametrize(
    "field, value",
    [("routed_scaling_factor", 2.5), ("n_group", 2), ("norm_topk_prob", False), ("scoring_func", "softmax")],
)
def test_deepseek_v3_routing_we_do_not_have_is_refused_by_name(field, value, tokenizer, tmp_path):
    """DeepSeek-V3's own routing scales the gates by 2.5 and limits each token to 4 of 8 groups:
    ours is one group, no scale; such a checkpoint is refused, never loaded with other routing."""
    import json

    directory = export(random_model(VARIANTS["deepseek-v3"]), tokenizer, tmp_path)
    config = json.loads((tmp_path / "hf/config.json").read_text()) | {field: value}
    (tmp_path / "hf/config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=f"does not map onto our deepseek: .*{field}"):
        read_hf(directory)


def test_a_deepseek_v3_directory_transformers_saved_reads_back_bit_identical(tokenizer, tmp_path):
    """What a user brings: our export loaded and saved again by transformers' own save_pretrained
    (which fuses the experts on load and writes them one by one again) reads back to our weights."""
    model = random_model(VARIANTS["deepseek-qlora-tied"], seed=3)
    saved = tmp_path / "saved"
    load_hf(export(model, tokenizer, tmp_path)).save_pretrained(saved)
    (saved / "tokenizer.json").write_text(tokenizer.to_str())
    _, state, _ = read_hf(str(saved))
    for key, tensor in model.state_dict().items():
        assert torch.equal(state[key], tensor), key


def test_a_bf16_deepseek_v3_export_keeps_the_routing_bias_in_fp32(tokenizer, tmp_path):
    """As DeepSeek's own checkpoints: the expert choice (sigmoid scores + bias) is made in fp32."""
    from safetensors import safe_open

    model = random_model(VARIANTS["deepseek-v3"])
    directory = write_hf(model.cfg, model.state_dict(), tokenizer.to_str(), str(tmp_path / "bf16"), dtype="bfloat16")
    with safe_open(f"{directory}/model.safetensors", "pt") as f:
        dtypes = {key: f.get_slice(key).get_dtype() for key in f.keys()}
    assert dtypes.pop("model.layers.1.mlp.gate.e_score_correction_bias") == "F32"
    assert set(dtypes.values()) == {"BF16"}
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        assert torch.isfinite(hf(torch.arange(16)[None]).logits.float()).all()


# Every tiny preset's class (a native one where it fits: a regression to remote code fails here),
# and the `make pretrain` recipe's (configs/llama-tiny.yaml: Muon + QK-norm + untied = Qwen3), and
# the recipe before it (+ value residual, ReLU², soft-cap: remote code).
EXPECTED_CLASS = {
    "gpt2-tiny": "gpt2",
    "llama-tiny": "llama",
    "deepseek-tiny": "deepseek_v3",
    **{
        f"{name}-tiny": "generalmodel"
        for name in ("mla", "moe", "hybrid", "kvshare", "memory", "peer", "ultramem", "infini", "memorizing", "moeut")
    },
}


def recipe_model():
    from generalmodel.config import load_config

    return load_config("configs/llama-tiny.yaml").model


REFUSED = {"blt-tiny", "blt-static-tiny"}  # byte models: the native export only, refused by name


def test_every_tiny_preset_exports_as_its_class():
    tiny = {name for name in PRESETS if name.endswith("-tiny")} - REFUSED
    assert tiny == set(EXPECTED_CLASS)  # a new preset gets its expected class here
    assert {name: hf_architecture(PRESETS[name]) for name in tiny} == EXPECTED_CLASS
    for name in REFUSED:
        with pytest.raises(ExportError, match="model 'blt' cannot be exported for transformers: a byte latent model"):
            hf_architecture(PRESETS[name])
    assert hf_architecture(recipe_model()) == "qwen3"
    # make long-memory's model: Qwen3's fields plus a memory Qwen3 does not have
    long_memory = dict(window=64, long_memory="knn", long_memory_layers=(1,))
    assert hf_architecture(dataclasses.replace(recipe_model(), **long_memory)) == "generalmodel"
    assert hf_architecture(previous_recipe_model()) == "generalmodel"


def previous_recipe_model():
    return dataclasses.replace(recipe_model(), value_residual=True, mlp="relu2", logit_softcap=15.0)


REMOTE = [name for name, kind in EXPECTED_CLASS.items() if kind == "generalmodel"] + ["previous-recipe"]


@pytest.mark.parametrize("name", REMOTE)
def test_remote_code_runs_the_zoo_in_transformers(name, tokenizer, tmp_path):
    """Export → `from_pretrained(trust_remote_code=True)`: fp32 logits ≤ 1e-4 of ours, a greedy
    32-token continuation identical on the zoo's KV cache, bf16 loads, and back bit-identical."""
    base = previous_recipe_model() if name == "previous-recipe" else PRESETS[name]
    cfg = dataclasses.replace(base, vocab_size=SHAPE["vocab_size"], max_seq_len=SHAPE["max_seq_len"])
    if cfg.long_memory != "none":  # a window the 32 tokens overrun: the memory is read
        cfg = dataclasses.replace(cfg, window=8)
    model = random_model(cfg)
    directory = export(model, tokenizer, tmp_path)
    assert is_remote_code(directory)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, trust_remote_code=True)
    assert type(hf).__name__ == "GeneralModelForCausalLM"
    assert_same_logits_and_greedy_text(model, hf.eval(), tokenizer, 32)
    ids = torch.arange(32)[None]
    with torch.no_grad():  # transformers' `labels` convention: the loss of predicting ids[1:]
        expected = torch.nn.functional.cross_entropy(model(ids)[0, :-1], ids[0, 1:])
        assert hf(ids, labels=ids).loss.item() == pytest.approx(expected.item(), rel=1e-5)

    cfg_back, state, _ = read_hf(directory)
    assert cfg_back == cfg
    for key, tensor in model.state_dict().items():
        assert torch.equal(state[key], tensor), key
    bf16 = write_hf(cfg, model.state_dict(), tokenizer.to_str(), str(tmp_path / "bf16"), dtype="bfloat16")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(bf16, trust_remote_code=True)
    assert loaded.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(loaded(torch.arange(16)[None]).logits.float()).all()


def test_a_tied_remote_code_model_exports_from_its_native_export(tokenizer, tmp_path):
    """What a registered version's hf/ is written from: the native export, which holds no tied head."""
    from generalmodel.infer.export import export_files, read_export

    cfg = dataclasses.replace(PRESETS["moe-tiny"], vocab_size=SHAPE["vocab_size"], max_seq_len=SHAPE["max_seq_len"])
    model = random_model(cfg)
    assert cfg.tie_embeddings
    native = tmp_path / "native"
    native.mkdir()
    for name, data in export_files(cfg, model.state_dict(), tokenizer.to_str()).items():
        (native / name).write_bytes(data)
    cfg_read, state, tokenizer_json, _ = read_export(str(native))
    directory = write_hf(cfg_read, state, tokenizer_json, str(tmp_path / "hf"))
    assert is_remote_code(directory)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, trust_remote_code=True)
    ids = torch.arange(32)[None]
    with torch.no_grad():
        assert (hf.eval()(ids).logits - model(ids)).abs().max().item() <= 1e-4
