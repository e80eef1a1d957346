"""Tokenizers other than our own BPE: special tokens found by role (the names common tokenizers
use), only an end-of-sequence token required; a Hugging Face tokenizer directory as
data.tokenizer prepares a dataset whose documents end with that tokenizer's EOS, and the
transformers export names its special tokens."""

import json
import random

import pytest
from conftest import make_documents
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from generalmodel import UserError
from generalmodel.config import load_config
from generalmodel.data.tokenizer import eos_id, load_tokenizer, special_ids


def gpt2_style(vocab_size=400, specials=("<|endoftext|>",)) -> Tokenizer:
    """A byte-level BPE whose only special token is GPT-2's `<|endoftext|>` (not our names)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tokenizer.train_from_iterator(make_documents(30, seed=2), trainer)
    return tokenizer


def test_special_tokens_by_role():
    tokenizer = gpt2_style(specials=("<|endoftext|>", "<my_pad>"))
    ids = special_ids(tokenizer)
    assert ids["eos"] == tokenizer.token_to_id("<|endoftext|>") and ids["bos"] is None and ids["pad"] is None
    assert eos_id(load_tokenizer(tokenizer.to_str(), "t.json")) == tokenizer.token_to_id("<|endoftext|>")
    with pytest.raises(UserError, match="t.json: the tokenizer has no end-of-sequence token; looked for"):
        load_tokenizer(gpt2_style(specials=()).to_str(), "t.json")


def test_a_hugging_face_tokenizer_directory_prepares_and_exports(ray_cluster, txt_corpus, tmp_path):
    import torch

    from generalmodel.data.loader import TokenDataset
    from generalmodel.interop.hf import write_hf
    from jobs import prepare_data
    from models import build_model
    from models.llama import LlamaConfig

    tokenizer = gpt2_style()
    hf_dir = tmp_path / "gpt2-tokenizer"
    hf_dir.mkdir()
    (hf_dir / "tokenizer.json").write_text(tokenizer.to_str())
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    out = tmp_path / "ds"
    manifest = prepare_data.main(
        load_config(
            overrides={
                "data.source": str(txt_corpus),
                "data.output": str(out),
                "data.seq_len": 32,
                "data.tokenizer": str(hf_dir),
                "data.val_fraction": 0.1,
            }
        )  # fmt: skip
    )
    eos = tokenizer.token_to_id("<|endoftext|>")
    assert manifest["tokenizer"]["special_tokens"] == {"<|endoftext|>": eos}
    ds = TokenDataset.open(str(out))
    rows = ds.read_shard(ds.shards["train"][0]).reshape(-1)
    assert (rows == eos).sum() >= 1  # documents end with this tokenizer's EOS

    model = build_model(LlamaConfig(vocab_size=tokenizer.get_vocab_size(), max_seq_len=32, n_layers=1, n_heads=2,
                                    d_model=32))  # fmt: skip
    torch.manual_seed(0)
    directory = write_hf(model.cfg, model.state_dict(), tokenizer.to_str(), str(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|endoftext|>" and config["bos_token"] is None
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == eos
    assert directory


def test_the_byte_tokenizer_gives_each_utf8_byte_its_own_token():
    from generalmodel.data.tokenizer import byte_tokenizer, special_ids
    from generalmodel.tokens import SPECIAL_TOKENS

    tokenizer = byte_tokenizer()
    offset = len(SPECIAL_TOKENS)
    assert tokenizer.get_vocab_size() == 256 + offset
    assert special_ids(tokenizer) == {"bos": 0, "eos": 1, "pad": 2}
    rng = random.Random(0)
    alphabet = "abc XYZ\n\t\r!~ éüß—日本語🙂\x00\x7f"
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert ids == [b + offset for b in text.encode()]
        assert tokenizer.decode(ids) == text
    assert [tokenizer.id_to_token(b + offset) for b in b"Az"] == ["A", "z"]
