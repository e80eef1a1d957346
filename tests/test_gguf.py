"""GGUF (llama.cpp) export of the native classes llama.cpp takes as they are: read back with the
`gguf` package, every tensor is the transformers export's (Llama/Arcee queries and keys in
llama.cpp's interleaved rotary layout, which gives the same attention scores as ours), the
hyperparameters and the vocabulary are ours; what llama.cpp cannot run as it is, is refused."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import make_documents

from generalmodel.data.tokenizer import special_ids, train_bpe
from generalmodel.interop.adapter import ExportError
from generalmodel.interop.hf import adapter_for
from generalmodel.interop.llamacpp import gguf_architecture, permute_rotary, write_gguf
from models import PRESETS, build_model
from models.llama import LlamaConfig

gguf = pytest.importorskip("gguf")

SHAPE = {"vocab_size": 400, "max_seq_len": 64, "n_layers": 2, "n_heads": 4, "d_model": 64}
VARIANTS = {
    "llama": LlamaConfig(**SHAPE, n_kv_heads=2, rope_theta=500000.0),
    "qwen3": LlamaConfig(**SHAPE, n_kv_heads=2, qk_norm=True, tie_embeddings=True),
    "arcee": LlamaConfig(**SHAPE, mlp="relu2"),
}


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(make_documents(40, seed=3), 380)  # fewer tokens than the model's vocab: padded


def written(name, tokenizer, tmp_path, dtype="float32"):
    cfg = VARIANTS[name]
    torch.manual_seed(0)
    model = build_model(cfg)
    path = write_gguf(cfg, model.state_dict(), tokenizer.to_str(), str(tmp_path / f"{name}.gguf"), dtype)
    return cfg, model, gguf.GGUFReader(path)


def field(reader, key):
    f = reader.fields[key]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode()
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        return [
            bytes(f.parts[i]).decode() if f.types[-1] == gguf.GGUFValueType.STRING else f.parts[i][0] for i in f.data
        ]
    return f.parts[f.data[0]][0]


@pytest.mark.parametrize("name", VARIANTS)
def test_the_file_reads_back_with_our_tensors_shape_and_vocabulary(name, tokenizer, tmp_path):
    cfg, model, reader = written(name, tokenizer, tmp_path)
    assert field(reader, "general.architecture") == name
    assert field(reader, f"{name}.block_count") == 2 and field(reader, f"{name}.context_length") == 64
    assert (
        field(reader, f"{name}.attention.head_count") == 4
        and field(reader, f"{name}.attention.head_count_kv") == cfg.kv_heads
    )
    assert field(reader, f"{name}.feed_forward_length") == cfg.hidden
    assert field(reader, f"{name}.rope.freq_base") == pytest.approx(cfg.rope_theta)
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert tokens[:380] == [tokenizer.id_to_token(i) for i in range(380)] and tokens[380] == "[PAD380]"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    assert field(reader, "tokenizer.ggml.merges") == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert field(reader, "tokenizer.ggml.eos_token_id") == special_ids(tokenizer)["eos"]

    expected = adapter_for(cfg).to_hf(cfg, model.state_dict())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[name.upper()], cfg.n_layers)
    read = {t.name: np.array(t.data) for t in reader.tensors}
    assert len(read) == len(expected)
    for hf_name, tensor in expected.items():
        if name != "qwen3" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            tensor = permute_rotary(tensor, cfg.n_heads if "q_proj" in hf_name else cfg.kv_heads)
        got = read[names.get_name(hf_name, try_suffixes=(".weight",))]
        assert np.array_equal(got, tensor.numpy()), hf_name


def rotate_half_rope(x, theta):
    """Ours (and transformers'): dimension j pairs with j + d/2."""
    d = x.shape[-1]
    freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.arange(x.shape[0], dtype=torch.float64)[:, None] * freq
    a, b = x[:, : d // 2], x[:, d // 2 :]
    return torch.cat([a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos()], dim=-1)


def interleaved_rope(x, theta):
    """llama.cpp's `llama` rotary (rope type NORM): dimension 2j pairs with 2j + 1, same frequencies."""
    d = x.shape[-1]
    freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.arange(x.shape[0], dtype=torch.float64)[:, None] * freq
    a, b = x[:, 0::2], x[:, 1::2]
    out = torch.empty_like(x)
    out[:, 0::2], out[:, 1::2] = a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos()
    return out


def test_the_permuted_queries_and_keys_give_our_attention_scores_under_llama_cpp_rotary():
    torch.manual_seed(0)
    heads, d, width, T = 2, 8, 16, 5
    wq, wk = torch.randn(heads * d, width, dtype=torch.float64), torch.randn(heads * d, width, dtype=torch.float64)
    x = torch.randn(T, width, dtype=torch.float64)
    pq, pk = permute_rotary(wq, heads), permute_rotary(wk, heads)
    for h in range(heads):
        rows = slice(h * d, (h + 1) * d)
        ours = rotate_half_rope(x @ wq[rows].T, 1e4) @ rotate_half_rope(x @ wk[rows].T, 1e4).T
        theirs = interleaved_rope(x @ pq[rows].T, 1e4) @ interleaved_rope(x @ pk[rows].T, 1e4).T
        torch.testing.assert_close(theirs, ours)


def test_float16_keeps_the_norms_in_float32(tokenizer, tmp_path):
    _, _, reader = written("llama", tokenizer, tmp_path, "float16")
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert kinds["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32


@pytest.mark.parametrize(
    "cfg, named",
    [
        (PRESETS["gpt2-tiny"], "exports as 'gpt2'"),
        (PRESETS["mla-tiny"], "exports as 'generalmodel'"),
        (dataclasses.replace(VARIANTS["qwen3"], window=16), "window=16"),
    ],
)
def test_what_llama_cpp_cannot_run_as_it_is_is_refused_and_no_file_is_left(cfg, named, tokenizer, tmp_path):
    with pytest.raises(ExportError, match=named):
        gguf_architecture(cfg)
    model = build_model(cfg)
    with pytest.raises(ExportError, match=named):
        write_gguf(cfg, model.state_dict(), tokenizer.to_str(), str(tmp_path / "x.gguf"))
    assert not list(tmp_path.iterdir())


def test_the_export_job_writes_gguf_from_an_export(tokenizer, tmp_path):
    from generalmodel import UserError
    from generalmodel.infer.export import export_files
    from jobs.export import ExportConfig
    from jobs.export import main as export_job

    cfg = VARIANTS["qwen3"]
    native = tmp_path / "native"
    native.mkdir()
    for name, data in export_files(cfg, build_model(cfg).state_dict(), tokenizer.to_str()).items():
        (native / name).write_bytes(data)
    out = export_job(ExportConfig(model=str(native), out=str(tmp_path / "q.gguf"), format="gguf", dtype="float16"))
    assert field(gguf.GGUFReader(out), "general.architecture") == "qwen3"
    with pytest.raises(UserError, match="exists: GGUF is one new file"):
        export_job(ExportConfig(model=str(native), out=out, format="gguf"))
