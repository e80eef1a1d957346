"""The memory floor of a training worker (generalmodel/train/memory.py): the logits term follows
train.loss_chunk (one chunk's logits live at a time, not the whole batch's); a long memory adds its
far read; expert and tensor parallel hold their parts."""

import torch

from generalmodel.config import load_config
from generalmodel.train.memory import estimate
from models import PRESETS, build_model


def test_the_logits_term_is_one_chunk_with_a_chunked_loss():
    base = {"model.vocab_size": 50304, "train.batch_size": 16}
    whole = estimate(load_config(overrides=base), seq_len=1024, world_size=1)
    chunked = estimate(load_config(overrides={**base, "train.loss_chunk": 4096}), seq_len=1024, world_size=1)
    huge_chunk = estimate(load_config(overrides={**base, "train.loss_chunk": 10**6}), seq_len=1024, world_size=1)
    # logits + their gradient, fp32: 2 × rows × vocab × 4 bytes
    assert whole.activations_bytes - chunked.activations_bytes == 2 * (16 * 1024 - 4096) * 50304 * 4
    assert huge_chunk.activations_bytes == whole.activations_bytes  # a chunk never exceeds the batch
    assert chunked.parameters == whole.parameters


def test_each_rank_holds_its_shard_groups_share():
    """FSDP over 8 ranks holds 1/8 of the weights, gradients and optimizer state per rank; HSDP
    2 x 4 holds 1/4 (each replica a whole copy); both hold two all-gathered blocks; one process none."""
    base = {"model.preset": "llama-124m", "ray.num_workers": 8}
    fsdp = estimate(load_config(overrides=base), seq_len=1024, world_size=8)
    hsdp = estimate(load_config(overrides={**base, "parallel.replicate": 2}), seq_len=1024, world_size=8)
    alone = estimate(load_config(overrides=base), seq_len=1024, world_size=1)
    assert hsdp.params_bytes == 2 * fsdp.params_bytes and hsdp.optimizer_bytes == 2 * fsdp.optimizer_bytes
    assert alone.params_bytes == 8 * fsdp.params_bytes and alone.gathered_bytes == 0
    assert fsdp.gathered_bytes == hsdp.gathered_bytes > 0
    assert "HSDP: 2 replicas x 4 shards" in hsdp.describe() and "FSDP over 8 ranks" in fsdp.describe()


def test_a_long_memory_layer_adds_its_dense_far_read():
    """Each memory layer keeps (B, heads, T, T) fp32 scores and weights: 8 bytes a pair per head;
    under full activation checkpointing one layer's at a time."""
    base = {"model.preset": "memorizing-tiny", "train.batch_size": 4}
    one = estimate(load_config(overrides=base), seq_len=256, world_size=1)
    two = estimate(load_config(overrides={**base, "model.long_memory_layers": [1, 2]}), seq_len=256, world_size=1)
    plain = estimate(
        load_config(overrides={**base, "model.long_memory": "none", "model.long_memory_layers": []}), 256, 1
    )
    assert two.activations_bytes - one.activations_bytes == one.activations_bytes - plain.activations_bytes
    assert one.activations_bytes - plain.activations_bytes == 4 * 4 * 256 * 256 * 8
    full = {"train.activation_checkpointing": "full"}
    recomputed = estimate(load_config(overrides={**base, **full, "model.long_memory_layers": [1, 2]}), 256, 1)
    none = {"model.long_memory": "none", "model.long_memory_layers": []}
    recomputed_plain = estimate(load_config(overrides={**base, **full, **none}), 256, 1)
    assert recomputed.activations_bytes - recomputed_plain.activations_bytes == 4 * 4 * 256 * 256 * 8


def test_expert_parallel_gathers_only_a_ranks_own_experts():
    """deepseek-16b on 8 ranks: FSDP all-gathers every routed expert of a block; with the experts
    over the 8 ranks each gathers its 8 of 64; the shards held are 1/8 either way."""
    base = {"model.preset": "deepseek-16b", "ray.num_workers": 8, "ray.use_gpu": True}
    fsdp = estimate(load_config(overrides=base), seq_len=4096, world_size=8)
    ep = estimate(load_config(overrides={**base, "parallel.expert": 8}), seq_len=4096, world_size=8)
    assert ep.params_bytes == fsdp.params_bytes and ep.optimizer_bytes == fsdp.optimizer_bytes
    moe_block = 2 * 64 * 2048 * 1408 * 3  # bf16 (2 bytes) x 64 experts of d x 3h, two blocks
    assert fsdp.gathered_bytes - ep.gathered_bytes == moe_block * 7 / 8 * 2
    assert "experts over 8 ranks" in ep.describe()


def test_tensor_parallel_holds_a_slice_of_each_linear_layer():
    """llama-8b on 8 GPUs of a node with 8 tensor ranks (no data parallel): each holds 1/8 of every
    linear layer, the embedding and the head but whole norms; the activations and logits are 1/8
    too. FSDP over the same 8 ranks holds 1/8 of everything but all-gathers whole
    blocks. 8 × 8 ranks (FSDP 8 × TP 8) hold 1/64 of the split parts."""
    base = {"model.preset": "llama-8b", "ray.num_workers": 8, "ray.use_gpu": True, "train.batch_size": 1}
    tp = estimate(load_config(overrides={**base, "parallel.tensor": 8}), seq_len=4096, world_size=8)
    fsdp = estimate(load_config(overrides=base), seq_len=4096, world_size=8)
    both = estimate(
        load_config(overrides={**base, "ray.num_workers": 64, "parallel.tensor": 8}), seq_len=4096, world_size=64
    )
    with torch.device("meta"):
        model = build_model(PRESETS["llama-8b"])
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    split = model.num_params() - norms  # every linear, the embedding and the head
    assert tp.params_bytes == 4 * (split / 8 + norms)
    assert both.params_bytes == tp.params_bytes / 8
    assert fsdp.params_bytes == 4 * model.num_params() / 8
    assert tp.gathered_bytes == 0 < fsdp.gathered_bytes  # no FSDP: nothing all-gathered
    assert tp.activations_bytes < fsdp.activations_bytes
    assert "no data parallel, tensor parallel over 8 ranks" in tp.describe()
    # Sequence parallel (the default) splits the 34·d bytes of a token's layer; without it 10·d stay whole.
    whole_stream = estimate(
        load_config(overrides={**base, "parallel.tensor": 8, "parallel.sequence_parallel": False}), 4096, 8
    )
    logits = 2 * 4096 * PRESETS["llama-8b"].vocab_size / 8 * 4
    layers = 4096 * PRESETS["llama-8b"].n_layers * PRESETS["llama-8b"].d_model * 2 / 2  # tokens x layers x d x bf16/2
    assert tp.activations_bytes - logits == layers * 34 / 8
    assert whole_stream.activations_bytes - logits == layers * (10 + 24 / 8)
