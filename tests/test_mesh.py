"""The device mesh (`parallel` section): FSDP2 over 4 ranks and HSDP 2 x 2 each equal one process
on the union batch (losses and every parameter), with AdamW and with Muon; so do expert parallel
and tensor parallel (FSDP 2 x TP 2, HSDP 2 x 1 x TP 2); HSDP reduces each step's gradients once
inside a shard group and once across the replicas; a checkpoint written by 4-rank FSDP resumes
under HSDP, one written under tensor or expert parallel by plain FSDP (DCP reshards them), on the
uninterrupted run's losses; a mesh that cannot be laid out is one clear line. Four gloo
processes on this box's CPUs: a tiny model, few steps, and every 4-rank run in one spawn
(`four_ranks`)."""

import math
import os
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp
from conftest import spawn_ranks
from safetensors.torch import load_file
from test_train import run, tiny

from generalmodel import UserError
from generalmodel.cluster import free_port
from generalmodel.config import ConfigError, ParallelConfig, load_config
from generalmodel.train.loop import train
from generalmodel.train.mesh import MeshShape, check_node_capacity, mesh_shape

pytestmark = pytest.mark.integration

WORLD, STEPS = 4, 3
HSDP = {"parallel.replicate": 2, "parallel.shard": 2}
# Newton–Schulz in fp32: in bf16 the ranks' fp32-rounding differences grow to ~1% of a weight in 3 steps.
MUON = {"optim.name": "muon", "optim.muon_ns_dtype": "float32", "model.tie_embeddings": False}
# An MoE model (4 routed experts of which each token takes 2, a shared expert) and expert parallelism.
MOE = {"model.moe_experts": 4, "model.moe_top_k": 2, "model.moe_hidden": 16}
EP2, EP4 = {"parallel.expert": 2}, {"parallel.expert": 4}
# Tensor parallel over 2 ranks, on a model with the parameters that act on a rank's heads only
# (QK-norm, value residual) and the chunked vocab-parallel loss; 4 rows per data-parallel rank
# (2 of them): the union batch of 8 rows.
TP_ADAMW = {"model.tie_embeddings": False, "model.qk_norm": True, "model.value_residual": True, "train.loss_chunk": 16}
TP_MODEL = {**MUON, **TP_ADAMW}
# One vocab-split parameter for the embedding and the head (with AdamW its near-zero moments lift one
# weight's difference to 1.8e-5 of its norm after 3 steps, the losses still equal to 1e-7: Muon here).
TP_TIED = {**TP_MODEL, "model.tie_embeddings": True}
TP2 = {"parallel.tensor": 2, "train.batch_size": 4}
HSDP_TP = {"parallel.replicate": 2, "parallel.shard": 1}


def config(dataset, root, **extra):
    """3 steps, 2 micro-batches per step (so accumulation is exercised), a checkpoint every step."""
    base = {"train.steps": STEPS, "train.checkpoint_every": 1, "train.eval_every": STEPS, "train.grad_accum": 2}
    return tiny(dataset, root, **{**base, **extra})


def _rank(rank, port, runs, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(seconds=120))  # a hung collective fails the test
    # Count the gradient collectives FSDP2 issues (the real ones run): reduce-scatters, and the
    # all-reduces over this rank's replica group ({rank mod 2, rank mod 2 + 2} under HSDP 2 x 2);
    # and those over its pair of consecutive ranks (a tensor group under tensor parallel).
    reduce_scatter, all_reduce, calls = dist.reduce_scatter_single, dist.all_reduce, []
    across, pair = sorted({rank % 2, rank % 2 + 2}), sorted({rank - rank % 2, rank - rank % 2 + 1})

    def counted_reduce_scatter(*args, **kwargs):
        calls.append("reduce_scatter")
        return reduce_scatter(*args, **kwargs)

    def counted_all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        ranks = sorted(dist.get_process_group_ranks(group)) if group is not None else None
        if ranks == across:
            calls.append("all_reduce_across_replicas")
        elif ranks == pair:
            calls.append("all_reduce_over_the_pair")
        return all_reduce(tensor, op=op, group=group, async_op=async_op)

    dist.reduce_scatter_single, dist.all_reduce = counted_reduce_scatter, counted_all_reduce
    for name, cfg, fail_after in runs:
        calls.clear()
        losses = _train(cfg, fail_after)
        if rank == 0:
            out[name] = (losses, {c: calls.count(c) for c in set(calls)})
        dist.barrier()
    dist.destroy_process_group()


def _train(cfg, fail_after: int | None) -> dict[int, float]:
    """The losses of a run, or {} when it stops after step `fail_after` (every rank raises there,
    after that step's checkpoint: as when the whole worker group is lost)."""
    losses = {}

    def report(metrics):
        losses[metrics["step"]] = metrics["loss"]
        if metrics["step"] == fail_after:
            raise RuntimeError(f"injected failure after step {fail_after}")

    try:
        train(cfg, report)
    except RuntimeError as e:
        assert fail_after and "injected failure" in str(e), e
        return {}
    return losses


@pytest.fixture(scope="module")
def four_ranks(train_dataset, tmp_path_factory):
    """Every 4-rank run, in one spawn of 4 processes: {name: (rank 0's losses, its collective
    counts, the run's storage root)}."""
    root = tmp_path_factory.mktemp("mesh")
    rows = {"train.batch_size": 2}
    runs = {  # name: (storage root, overrides, whether it fails on purpose)
        "fsdp": ("fsdp", rows, False),
        "hsdp": ("hsdp", {**rows, **HSDP}, False),
        "fsdp-muon": ("fsdp-muon", {**rows, **MUON}, False),
        "hsdp-muon": ("hsdp-muon", {**rows, **MUON, **HSDP}, False),
        # Resharding: 4-rank FSDP dies after step 2; HSDP 2 x 2 resumes from its last checkpoint.
        "reshard-fsdp": ("reshard", {**rows, "train.fail_at_step": 2}, True),
        "reshard-hsdp": ("reshard", {**rows, **HSDP}, False),
        # Expert parallel: experts over 2 ranks, FSDP2 over the other 2 (efsdp), blocks recomputed in
        # backward (all-to-alls included); all 4 ranks' experts over 4; HSDP 2 x 2 with experts
        # over the 2 ranks of a shard group, with Muon.
        "ep2": ("ep2", {**rows, **MOE, **EP2, "train.activation_checkpointing": "full"}, False),
        "ep4": ("ep4", {**rows, **MOE, **EP4}, False),
        "hsdp-ep2-muon": ("hsdp-ep2-muon", {**rows, **MOE, **MUON, **HSDP, **EP2}, False),
        # An expert-parallel checkpoint (HSDP 2 x 2, experts over 2) resumed by plain FSDP over 4.
        "reshard-ep2": ("reshard-ep", {**rows, **MOE, **HSDP, **EP2, "train.fail_at_step": 2}, True),
        "reshard-ep-fsdp": ("reshard-ep", {**rows, **MOE}, False),
        # Tensor parallel: FSDP 2 x TP 2 (sequence parallel); HSDP 2 x 1 x TP 2 without sequence
        # parallel; a TP checkpoint resumed by FSDP over 4.
        "tp2": ("tp2", {**TP_MODEL, **TP2}, False),
        "tp2-adamw": ("tp2-adamw", {**TP_ADAMW, **TP2}, False),
        "tp2-tied": ("tp2-tied", {**TP_TIED, **TP2}, False),
        "hsdp-tp2": ("hsdp-tp2", {**TP_MODEL, **TP2, **HSDP_TP, "parallel.sequence_parallel": False}, False),
        "reshard-tp2": ("reshard-tp", {**TP_MODEL, **TP2, "train.fail_at_step": 2}, True),
        "reshard-tp-fsdp": ("reshard-tp", {**rows, **TP_MODEL}, False),
        # ... and one resumed by a single process (test_a_tensor_parallel_checkpoint_resumes_in_one_process).
        "reshard-tp-one": ("reshard-tp-one", {**TP_MODEL, **TP2, "train.fail_at_step": 2}, True),
    }
    # Only the runs a resharding test fails or resumes checkpoint every step; the others once, at the end.
    resharded = {where for where, _, fails in runs.values() if fails}
    plans = [
        (name, config(train_dataset, root / where, **_saves(where in resharded), **extra), fails)
        for name, (where, extra, fails) in runs.items()
    ]
    out = mp.Manager().dict()
    spawn_ranks(_rank, (free_port(), plans, out), WORLD)
    return {name: (*out[name], root / where) for name, (where, _, _) in runs.items()}


def _saves(every_step: bool) -> dict:
    return {"train.checkpoint_every": 1 if every_step else STEPS}


@pytest.fixture(scope="module")
def one_process(train_dataset, tmp_path_factory):
    """The same runs in one process on the union batch (4 ranks x 2 rows = 8)."""
    root = tmp_path_factory.mktemp("mesh-one")
    return {
        name: (
            run(config(train_dataset, root / name, **{"train.batch_size": 8, **_saves(False), **extra}))[0],
            root / name,
        )
        for name, extra in (
            ("adamw", {}),
            ("muon", MUON),
            ("moe", MOE),
            ("moe-muon", {**MOE, **MUON}),
            ("tp", TP_MODEL),
            ("tp-adamw", TP_ADAMW),
            ("tp-tied", TP_TIED),
        )
    }


def export(root) -> dict[str, torch.Tensor]:
    return load_file(str(root / "checkpoints/pretrain/export/model.safetensors"))


def assert_same_run(losses, root, reference, reference_root) -> dict[str, torch.Tensor]:
    """Every step's loss rel 1e-5 and every exported tensor within 1e-5 of its norm (elementwise,
    AdamW's near-zero moments amplify) of the one-process run; returns the export."""
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, loss in reference.items():
        assert math.isclose(losses[step], loss, rel_tol=1e-5), (step, losses[step], loss)
    mine, theirs = export(root), export(reference_root)
    assert mine.keys() == theirs.keys()
    for key, value in theirs.items():
        assert (mine[key] - value).norm() <= 1e-5 * value.norm(), (
            key,
            ((mine[key] - value).norm() / value.norm()).item(),
        )
    return mine


@pytest.mark.parametrize("mesh", ["fsdp", "hsdp"])
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_four_ranks_equal_one_process_on_the_union_batch(four_ranks, one_process, mesh, optimizer):
    name = mesh if optimizer == "adamw" else f"{mesh}-muon"
    losses, _, root = four_ranks[name]
    assert_same_run(losses, root, *one_process[optimizer])


@pytest.mark.parametrize("mesh", ["ep2", "ep4", "hsdp-ep2-muon"])
def test_expert_parallel_equals_one_process_on_the_union_batch(four_ranks, one_process, mesh):
    """Routed experts as DTensors over an expert axis, FSDP2 over the rest; the gradient norm over
    both meshes clipped as one; Muon orthogonalising each rank's own experts; the routing bias
    from every rank's tokens — the same losses and the same exported model as one process."""
    losses, _, root = four_ranks[mesh]
    mine = assert_same_run(losses, root, *one_process["moe-muon" if "muon" in mesh else "moe"])
    assert "blocks.1.mlp.experts.w_up" in mine and "blocks.1.mlp.expert_bias" in mine


@pytest.mark.parametrize("mesh", ["tp2", "tp2-adamw", "tp2-tied", "hsdp-tp2"])
def test_tensor_parallel_equals_one_process_on_the_union_batch(four_ranks, one_process, mesh):
    """Attention split by heads and the MLP by columns over 2 ranks, the head by vocabulary with the
    loss computed on each rank's part of the logits; QK-norm's weights and value residual's λ,
    whole on each rank but used on its heads only (and with sequence parallel, the norms, used on
    its positions), summed over the pair; FSDP2 (or HSDP) over the other dimension; Muon on
    matrices split two ways — the same losses and exported model as one process."""
    losses, _, root = four_ranks[mesh]
    reference = {"tp2-adamw": "tp-adamw", "tp2-tied": "tp-tied"}.get(mesh, "tp")
    mine = assert_same_run(losses, root, *one_process[reference])
    assert "blocks.1.attn.v_mix" in mine and "blocks.1.attn.q_norm.weight" in mine


def test_a_tensor_parallel_checkpoint_resumes_in_one_process(four_ranks, one_process, train_dataset):
    """FSDP 2 x TP 2 dies after step 2; one process (the union batch of 8 rows) continues from its
    checkpoint on the uninterrupted run's losses."""
    failed, _, root = four_ranks["reshard-tp-one"]
    reference, _ = one_process["tp"]
    resumed, _ = run(config(train_dataset, root, **{**TP_MODEL, "train.batch_size": 8}))
    assert failed == {} and min(resumed) in (2, 3)
    for step, loss in resumed.items():
        assert math.isclose(loss, reference[step], rel_tol=1e-5), (step, loss, reference[step])


def test_expert_gradients_reduce_once_per_step_over_their_own_shard_group(four_ranks):
    """Each MoE layer's experts are an FSDP2 unit of their own: with experts over 2 ranks and FSDP
    over the other 2, one more reduce-scatter per layer and step; with experts over all 4 ranks
    (a shard group of one for them) none; under HSDP 2 x 2 their gradients join the cross-replica
    all-reduce, once per step."""
    dense_units, moe_layers = 2 + 1, 1  # tiny()'s 2 blocks and the root; block 1 is MoE (block 0 dense)
    assert four_ranks["ep2"][1] == {"reduce_scatter": STEPS * (dense_units + moe_layers)}
    assert four_ranks["ep4"][1] == {"reduce_scatter": STEPS * dense_units}
    assert four_ranks["hsdp-ep2-muon"][1] == {
        "reduce_scatter": STEPS * dense_units,
        "all_reduce_across_replicas": STEPS * (dense_units + moe_layers),
    }


def test_tensor_parallel_collectives_per_step(four_ranks):
    """FSDP 2 x TP 2, counted on the tensor pair: the vocab-parallel loss's two all-reduces per
    chunk of 16 positions (each position's max, then its sum of exponentials with its target's
    logit) and one for the input gradient per micro-batch; and one per optimizer step summing the
    gradients of the parameters a rank uses on its own heads or positions — beside FSDP2's one
    reduce-scatter per unit and step over the other pair. (The split layers' own collectives are
    DTensor's, not counted here.)"""
    units = 2 + 1  # tiny()'s 2 blocks and the root
    chunks = TP2["train.batch_size"] * 32 // TP_MODEL["train.loss_chunk"]  # rows of 32 positions
    per_micro_batch = 2 * chunks + 1
    evaluation = 2 * 2 * chunks  # train.eval_batches=2 at the last step, no gradient
    pair = STEPS * (2 * per_micro_batch + 1) + evaluation  # 2 micro-batches a step
    assert four_ranks["tp2"][1] == {"reduce_scatter": STEPS * units, "all_reduce_over_the_pair": pair}


def test_hsdp_reduces_gradients_once_per_step_inside_a_group_and_once_across(four_ranks):
    groups = 2 + 1  # FSDP2 units: tiny()'s 2 blocks and the root (embedding, final norm, head)
    _, fsdp, _ = four_ranks["fsdp"]
    _, hsdp, _ = four_ranks["hsdp"]
    # 2 micro-batches per step, yet one reduce-scatter per unit per optimizer step (no sync on the first)
    assert fsdp == {"reduce_scatter": STEPS * groups}, fsdp
    assert hsdp == {"reduce_scatter": STEPS * groups, "all_reduce_across_replicas": STEPS * groups}, hsdp


@pytest.mark.parametrize(
    "failed, resumed, reference",
    [
        ("reshard-fsdp", "reshard-hsdp", "adamw"),  # FSDP 4 → HSDP 2 x 2
        ("reshard-ep2", "reshard-ep-fsdp", "moe"),  # HSDP 2 x 2 + experts over 2 → FSDP 4
        ("reshard-tp2", "reshard-tp-fsdp", "tp"),  # FSDP 2 x TP 2 → FSDP 4
    ],
)
def test_a_checkpoint_resumes_on_another_mesh(four_ranks, one_process, failed, resumed, reference):
    """DCP reshards the checkpoint the first run wrote before it died; the second run, on another
    mesh, continues on the uninterrupted run's losses."""
    before, _, _ = four_ranks[failed]
    after, _, _ = four_ranks[resumed]
    losses, _ = one_process[reference]
    assert before == {} and min(after) in (2, 3)  # from a checkpoint it wrote (step 1 or 2), not from scratch
    for step, loss in after.items():
        assert math.isclose(loss, losses[step], rel_tol=1e-5), (step, loss, losses[step])


@pytest.mark.parametrize(
    "parallel, world, message",
    [
        ({"replicate": 3}, 4, "parallel.replicate=3 does not divide the 4 train workers (ray.num_workers)"),
        ({"shard": 3, "replicate": -1}, 4, "parallel.shard=3 does not divide the 4 train workers"),
        ({"replicate": 2, "shard": 4}, 4, "parallel.replicate=2 x parallel.shard=4 = 8 ranks, but there are 4"),
        ({"replicate": 2, "expert": 4}, 4, "parallel.expert=4 does not divide parallel.shard=2: an expert group lies"),
        ({"tensor": 3}, 4, "parallel.tensor=3 does not divide the 4 train workers (ray.num_workers)"),
        (
            {"tensor": 2, "replicate": 3},
            4,
            "parallel.replicate=3 does not divide the 2 data-parallel ranks (4 train workers / parallel.tensor=2)",
        ),
        ({"tensor": 2, "replicate": 2, "shard": 2}, 4, "x parallel.tensor=2 = 8 ranks, but there are 4"),
    ],
)
def test_a_mesh_that_cannot_be_laid_out_is_one_clear_line(parallel, world, message):
    with pytest.raises(UserError) as e:
        mesh_shape(ParallelConfig(**parallel), world)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_train_workers_per_node_count_custom_resources():
    """ray.worker_resources: a node holds as many train workers as its scarcest resource allows; a
    node without the custom resource (a rollout node) holds none."""
    from generalmodel.train.ray_trainer import worker_slots

    learner = {"ray.worker_resources": {"learner": 1}, "ray.cpus_per_worker": 2}
    cfg = load_config(overrides=learner)
    assert worker_slots({"CPU": 8, "learner": 2}, cfg) == 2  # the custom resource binds
    assert worker_slots({"CPU": 3, "learner": 4}, cfg) == 1  # the CPUs bind
    assert worker_slots({"CPU": 8, "rollout": 4}, cfg) == 0
    gpu = load_config(overrides={**learner, "ray.use_gpu": True})
    assert worker_slots({"CPU": 1, "GPU": 4, "learner": 8}, gpu) == 4  # by GPUs, as before
    assert worker_slots({"CPU": 8}, load_config(overrides={"ray.cpus_per_worker": 2})) == 4
    with pytest.raises(ConfigError, match=r"\['CPU'\] have options of their own"):
        load_config(overrides={"ray.worker_resources": {"CPU": 1}})
    with pytest.raises(ConfigError, match="resource amounts must be > 0"):
        load_config(overrides={"rl.rollout_resources": {"rollout": 0}})


def test_mesh_shapes_and_the_node_check():
    assert mesh_shape(ParallelConfig(), 4) == MeshShape(1, 4)
    assert mesh_shape(ParallelConfig(replicate=2), 8) == MeshShape(2, 4)
    assert mesh_shape(ParallelConfig(shard=8, replicate=-1), 32) == MeshShape(4, 8)
    assert mesh_shape(ParallelConfig(), 1).describe() == "one process"
    assert MeshShape(2, 4).dims == (("replicate", 2), ("shard", 4))
    within = ParallelConfig(replicate=2, shard=4, shard_within_node=True)
    check_node_capacity(within, MeshShape(2, 4), [4, 4])
    check_node_capacity(ParallelConfig(replicate=2, shard=4), MeshShape(2, 4), [2, 2, 2, 2])  # not asked
    with pytest.raises(UserError, match=r"parallel.shard=4 with parallel.shard_within_node=true, but no node .* 2"):
        check_node_capacity(within, MeshShape(2, 4), [2, 2, 2, 2])
    for bad, why in ((0, "must be a positive number of ranks"), (-2, "must be a positive number of ranks")):
        with pytest.raises(ConfigError, match=why):
            load_config(overrides={"parallel.shard": bad})
    with pytest.raises(ConfigError, match="cannot both be -1"):
        load_config(overrides={"parallel.replicate": -1})
    assert mesh_shape(ParallelConfig(replicate=2, expert=2), 8) == MeshShape(2, 4, 2)
    assert MeshShape(2, 4, 2).describe() == "HSDP: 2 replicas x 4 shards, experts over 2 ranks"
    with pytest.raises(ConfigError, match=r"parallel.expert=2 .* model 'llama' has none \(model.moe_experts=0\)"):
        load_config(overrides={"parallel.expert": 2})
    with pytest.raises(ConfigError, match="parallel.expert=3 does not divide model.moe_experts=8"):
        load_config(overrides={"model.preset": "moe-tiny", "parallel.expert": 3})
    with pytest.raises(ConfigError, match="must be a positive number of ranks"):
        load_config(overrides={"parallel.expert": 0})


def test_tensor_parallel_meshes_and_what_it_refuses():
    assert mesh_shape(ParallelConfig(tensor=2), 8) == MeshShape(1, 4, 1, 2)
    assert mesh_shape(ParallelConfig(tensor=2, replicate=2), 8) == MeshShape(2, 2, 1, 2)
    assert MeshShape(1, 4, 1, 2).describe() == "FSDP over 4 ranks, tensor parallel over 2 ranks"
    assert MeshShape(1, 1, 1, 4).describe() == "no data parallel, tensor parallel over 4 ranks"
    assert MeshShape(2, 2, 1, 2).data == 4 and MeshShape(2, 2, 1, 2).world == 8
    within = ParallelConfig(shard=4, tensor=2, shard_within_node=True)
    check_node_capacity(within, MeshShape(1, 4, 1, 2), [8])
    with pytest.raises(UserError, match=r"parallel.shard=4 x parallel.tensor=2 with .* Use parallel.shard<=2"):
        check_node_capacity(within, MeshShape(1, 4, 1, 2), [4, 4])
    load_config(overrides={"parallel.tensor": 2})  # the default model: tied embedding and head, split as one
    refusals = [
        ({"model.preset": "moe-tiny"}, "MoE layers (model.moe_experts) are not tensor-parallel: use parallel.expert"),
        ({"model.attention": "mla"}, "MLA attention (model.attention=mla) is not split by heads"),
        ({"model.value_embeds": 1}, "value embeddings (model.value_embeds) are not split by heads"),
        ({"model.n_heads": 6, "model.d_model": 96}, "model.n_heads=6 is not a multiple of it"),
        ({"model.vocab_size": 1001}, "model.vocab_size=1001 is not a multiple of it"),
        ({"train.compile": "regional", "train.activation_checkpointing": "full"}, "use one of the two"),
        ({"train.adapter": "svf", "train.init_from": "models:/base/1"}, "an adapter (train.adapter=svf) wraps"),
    ]
    for overrides, why in refusals:
        with pytest.raises(ConfigError) as e:
            load_config(overrides={"parallel.tensor": 4, **overrides})
        assert "parallel.tensor=4: " in str(e.value) and why in str(e.value), (overrides, str(e.value))


def test_an_elastic_run_keeps_its_global_batch_at_every_size_or_is_refused():
    from generalmodel.train.mesh import check_world_sizes, for_world, world_sizes

    cfg = load_config(overrides={"ray.num_workers": 4, "ray.min_workers": 2, "train.grad_accum": 3})
    assert world_sizes(cfg) == [2, 3, 4]
    assert check_world_sizes(cfg) == MeshShape(1, 4)
    assert [for_world(cfg, w).train.grad_accum for w in (2, 3, 4)] == [6, 4, 3]  # 12 micro-batches each time
    assert for_world(cfg, 4) is cfg
    with pytest.raises(
        UserError, match=r"a group of 3 workers cannot keep the global batch of 4 micro-batches .* ray.min_workers>=4"
    ):
        check_world_sizes(load_config(overrides={"ray.num_workers": 4, "ray.min_workers": 2}))
    hsdp = {
        "ray.num_workers": 4,
        "ray.min_workers": 2,
        "train.grad_accum": 3,
        "parallel.shard": 2,
        "parallel.replicate": -1,
    }
    with pytest.raises(
        UserError, match=r"ray.min_workers=2: a group of 3 workers has no mesh: parallel.shard=2 does not divide"
    ):
        check_world_sizes(load_config(overrides=hsdp))
    with pytest.raises(ConfigError, match="ray.min_workers=5 is more than ray.num_workers=4"):
        load_config(overrides={"ray.num_workers": 4, "ray.min_workers": 5})
