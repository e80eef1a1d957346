"""Document masks for packed rows (train.document_mask): a document's logits do not change when
another document of its row is replaced, for every tiny preset (GQA, MLA, sliding windows, KV
sharing, MoE, memory layers, learned positions); its positions restart, so packed it computes what
it computes alone in a row; the flex path masks as SDPA does; text documents end at EOS, chat rows
carry their conversations (`docs`), and a packed SFT batch's loss is the sum of its conversations'
losses alone. Without the switch a later document does see an earlier one (the check can fail)."""

import dataclasses

import numpy as np
import pytest
import torch
from test_chat import NO_SYSTEM, SYSTEM_MULTI_TURN, _unit, fmt  # noqa: F401 (a fixture)

from generalmodel.config import load_config
from generalmodel.data.loader import FORMAT_VERSION, TokenDataset
from generalmodel.storage import resolve
from generalmodel.train.loop import check_compatible
from generalmodel.train.objectives import LanguageModeling
from generalmodel.train.resume import TrainingError
from models import PRESETS, build_model
from models.attention import Documents, document_ids, set_backend

VOCAB, EOS = 128, 1
CASES = {
    **{name: {} for name in PRESETS if name.endswith("-tiny")},
    "hybrid-wrapping": dict(base="hybrid-tiny", window=8),
    # Its values read the stream without a norm: at std 0.02 another document moves a logit ~5e-3.
    "moeut-tiny": dict(init_std=0.1),
}
# grouped expert matmuls: another document's tokens change the rounding
MOE = {"moe-tiny", "deepseek-tiny", "moeut-tiny"}


def build(case: str):
    spec = dict(CASES[case])
    base = spec.pop("base", case)
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS[base], vocab_size=VOCAB, d_model=64, n_layers=2, max_seq_len=40, **spec)
    return build_model(cfg).eval()


def rows(seed=1):
    """Two rows of 32 tokens: row 0 holds documents [0, 12] and [13, 31]; row 1 [0, 12], [13, 20], [21, 31]."""
    tokens = torch.randint(3, VOCAB, (2, 32), generator=torch.Generator().manual_seed(seed))
    tokens[:, 12] = EOS
    tokens[1, 20] = EOS
    return tokens


def test_document_ids_end_each_document_with_its_separator_and_positions_restart():
    tokens = torch.tensor([[5, 6, EOS, 7, EOS, EOS, 8], [EOS, 9, 9, 9, 9, 9, 9]])
    ids = document_ids(tokens, EOS)
    assert ids.tolist() == [[0, 0, 0, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]
    docs = Documents.of(ids)
    assert docs.pos.tolist() == [[0, 1, 2, 0, 1, 0, 0], [0, 0, 1, 2, 3, 4, 5]]
    mask = docs.mask(None)[1, 0]
    assert mask[1].tolist() == [False, True, False, False, False, False, False]  # not the EOS before it
    assert docs.mask(2)[1, 0, 5].tolist() == [False, False, False, False, True, True, False]  # window 2


@pytest.mark.parametrize("case", CASES)
def test_no_document_sees_another_in_its_row(case):
    model = build(case)
    a = rows()
    b = a.clone()
    b[:, :12] = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))  # another first document
    with torch.no_grad():
        masked = [model(t, docs=document_ids(t, EOS))[:, 13:] for t in (a, b)]
        plain = [model(t)[:, 13:] for t in (a, b)]
        alone = model(a[1:, 13:21])  # row 1's second document alone in a row, at positions 0..7
    changed = (masked[0] - masked[1]).abs().max().item()
    assert changed <= (1e-6 if case in MOE else 0.0), f"{case}: the later documents changed by {changed}"
    assert (plain[0] - plain[1]).abs().max().item() > 0.01  # without the mask they do see it
    torch.testing.assert_close(alone[0], masked[0][1, :8], rtol=1e-5, atol=1e-5)  # positions restart


def test_a_shorter_previous_document_moves_the_next_without_changing_it():
    model = build("llama-tiny")
    a = rows()[:1]
    b = torch.cat([a[:, 4:13], a[:, 13:], torch.randint(3, VOCAB, (1, 4))], dim=1)  # first document 4 tokens shorter
    with torch.no_grad():
        got_a = model(a, docs=document_ids(a, EOS))[0, 13:]
        got_b = model(b, docs=document_ids(b, EOS))[0, 9:28]
    torch.testing.assert_close(got_a, got_b, rtol=1e-5, atol=1e-5)


def test_flex_masks_documents_as_sdpa_does():
    model = build("hybrid-wrapping")
    tokens = rows()
    docs = document_ids(tokens, EOS)
    with torch.no_grad():
        sdpa = model(tokens, docs=docs)
        assert set_backend(model, "flex", seq_len=32) == 2
        flex = model(tokens, docs=docs)
    torch.testing.assert_close(flex, sdpa, rtol=1e-5, atol=1e-5)


def test_decoding_with_a_cache_refuses_documents():
    from models.cache import KVCache

    model = build("llama-tiny")
    tokens = rows()
    with pytest.raises(ValueError, match="not decoding with a cache"):
        model(tokens, cache=KVCache(model, batch=2), docs=document_ids(tokens, EOS))


def test_packed_conversations_lose_what_each_loses_alone(fmt):  # noqa: F811 (the fixture)
    """SFT with data.packing and train.document_mask: a row's summed loss is the sum of its
    conversations' losses, each alone in its own row; the docs column numbers them."""
    conversations = [NO_SYSTEM, SYSTEM_MULTI_TURN, NO_SYSTEM]
    packed = _unit(fmt, format="chat", val_fraction=0, packing=True, seq_len=255)
    single = _unit(fmt, format="chat", val_fraction=0, seq_len=255)
    for i, messages in enumerate(conversations):
        packed.add(f"p:{i}", {"messages": messages})
        single.add(f"s:{i}", {"messages": messages})
    columns = packed.columns("train", pad=2, dtype=np.uint16)
    assert len(columns["tokens"]) == 1  # all three in one row
    lengths = [len(fmt.render(m).ids) for m in conversations]
    expected_docs = np.repeat([0, 1, 2, 3], [*lengths, 256 - sum(lengths)])
    assert (columns["docs"][0] == expected_docs).all()

    def batch(cols):
        return {k: torch.from_numpy(v.astype(bool if k.endswith("mask") else np.int64)) for k, v in cols.items()}

    torch.manual_seed(0)
    cfg = load_config(overrides={"model.vocab_size": fmt.tokenizer.get_vocab_size(), "model.max_seq_len": 256,
                                 "model.n_layers": 2, "model.n_heads": 2, "model.d_model": 32})  # fmt: skip
    model = build_model(cfg.model).eval()
    objective = LanguageModeling(separator=EOS)
    with torch.no_grad():
        together, _ = objective.loss(model, batch(columns), torch.autocast("cpu", enabled=False))
        apart, _ = objective.loss(
            model, batch(single.columns("train", pad=2, dtype=np.uint16)), torch.autocast("cpu", enabled=False)
        )
        unmasked, _ = LanguageModeling().loss(model, batch(columns), torch.autocast("cpu", enabled=False))
    torch.testing.assert_close(together, apart, rtol=1e-5, atol=1e-5)
    assert abs(unmasked.item() - apart.item()) > 1e-3  # packed without the mask: conversations see each other


def dataset(tmp_path, kind: str, columns: list[str], seq_len: int = 32) -> TokenDataset:
    manifest = {"format_version": FORMAT_VERSION, "format": kind, "row_len": seq_len + 1, "seq_len": seq_len,
                "column": columns[0], "columns": columns, "tokenizer": {"vocab_size": 320}, "splits": {}}  # fmt: skip
    return TokenDataset(resolve(str(tmp_path / kind)), manifest, "0" * 64, 1.0)


def test_document_masks_refuse_pairs_and_chat_rows_without_their_documents(tmp_path):
    cfg = load_config(overrides={"model.vocab_size": 320, "model.max_seq_len": 32, "train.document_mask": True})
    check_compatible(cfg, dataset(tmp_path, "text", ["tokens"]))
    check_compatible(cfg, dataset(tmp_path, "chat", ["tokens", "mask", "docs"]))
    with pytest.raises(TrainingError, match="preference pairs, one sequence per row"):
        check_compatible(cfg, dataset(tmp_path, "preference", ["chosen", "chosen_mask", "rejected", "rejected_mask"]))
    with pytest.raises(TrainingError, match=r"without the conversations' document ids \(the docs column\)"):
        check_compatible(cfg, dataset(tmp_path, "chat", ["tokens", "mask"]))


def test_sequence_parallel_refuses_rows_its_ranks_cannot_split(tmp_path):
    """Before any worker starts: rows of 30 positions cannot be split over 4 tensor ranks (without
    sequence parallel they need not be); rows of 32 can."""
    tp = {"model.vocab_size": 320, "model.max_seq_len": 32, "parallel.tensor": 4, "model.n_heads": 4}
    check_compatible(load_config(overrides=tp), dataset(tmp_path, "text", ["tokens"]))
    whole = load_config(overrides={**tp, "parallel.sequence_parallel": False})
    check_compatible(whole, dataset(tmp_path, "text", ["tokens"], seq_len=30))
    with pytest.raises(TrainingError, match=r"parallel.tensor=4 ranks, and dataset .* has rows of 30 positions"):
        check_compatible(load_config(overrides=tp), dataset(tmp_path, "text", ["tokens"], seq_len=30))
