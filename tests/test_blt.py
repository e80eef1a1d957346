"""The Byte Latent Transformer (models/blt.py): where patches start (a stride, the entropy model's
entropy, its rise), hash n-grams that stay inside their document, and — with patches that vary
from byte to byte (the monotonic rule at threshold 0 on an untrained entropy model) — no leak
eager or regionally compiled, decoding with its caches equal to the full forward (the latent
transformer run once per patch), documents that do not see each other, exact resume and 2 FSDP2
ranks equal to one; the frozen entropy model outside the optimizer and the parameter count; the
job's loading of the entropy model. The zoo's gates run on the presets too (tests/test_model_zoo.py,
test_causality.py, test_decode.py, test_documents.py, test_interp.py)."""

import dataclasses
import math

import pytest
import torch

from generalmodel import UserError
from generalmodel.cli import parse_args
from generalmodel.infer import SamplingParams, generate
from generalmodel.infer.engine import generate_batch
from generalmodel.train.leak import check
from models import PRESETS, build_model
from models.attention import document_ids
from models.blt import BLTConfig, entropies, ngram_hashes, patch_starts
from models.cache import new_cache

VOCAB = 64


def varied(**changes):
    """A small BLT whose patches start wherever the untrained entropy model's entropy rose (about
    every other byte, differently in every row); the patch count padded to 32 (the leak check's
    rows): the latent's shapes do not change with the tokens."""
    torch.manual_seed(0)
    spec = dict(vocab_size=VOCAB, max_seq_len=64, d_model=32, n_layers=2, n_heads=2, local_d_model=32)
    spec |= dict(local_heads=2, patching="monotonic", entropy_threshold=0.0, patch_pad=32, entropy_d_model=32)
    return build_model(BLTConfig(**{**spec, **changes})).eval()


def test_static_patches_restart_at_every_document():
    cfg = BLTConfig(patching="static", patch_size=3)
    doc_pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]])
    assert patch_starts(cfg, doc_pos, None).int().tolist() == [[1, 0, 0, 1, 0, 1, 0, 0, 1]]


def test_entropy_rules_read_the_two_positions_before_the_byte():
    ent = torch.tensor([[1.0, 3.0, 0.5, 0.9, 2.5, 2.6]])
    pos = torch.arange(6)[None]
    glob = BLTConfig(patching="entropy", entropy_threshold=2.0)
    # byte t starts a patch when the entropy at t-1 (the model's doubt about byte t) is above 2
    assert patch_starts(glob, pos, ent).int().tolist() == [[1, 0, 1, 0, 0, 1]]
    rise = BLTConfig(patching="monotonic", entropy_threshold=0.3)
    # ... or when it rose by more than 0.3 from t-2 to t-1 (t-1 = 0: no rise to read)
    assert patch_starts(rise, pos, ent).int().tolist() == [[1, 0, 1, 0, 1, 1]]
    assert patch_starts(rise, torch.tensor([[0, 1, 2, 0, 1, 2]]), ent).int().tolist() == [[1, 0, 1, 1, 0, 1]]


def test_ngram_hashes_stay_inside_their_document():
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8]])
    pos = torch.arange(8)[None]
    rows = ngram_hashes(ids, pos, (3, 4), 1000)
    assert rows[0, :2, 0].tolist() == [-1, -1] and rows[0, :3, 1].tolist() == [-1, -1, -1]
    assert rows[0, 6, 0] == rows[0, 2, 0] and rows[0, 7, 1] == rows[0, 3, 1]  # the same n-gram, the same row
    assert rows[0, 3, 0] != rows[0, 2, 0] and (rows[..., 1][rows[..., 1] >= 0] >= 1000).all()  # table 2 offset
    restart = ngram_hashes(ids, torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]]), (3, 4), 1000)
    assert restart[0, 5].tolist() == [-1, -1] and torch.equal(restart[0, 4:], restart[0, :4])


def test_the_varied_patches_really_vary():
    model = varied()
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        starts = patch_starts(model.cfg, torch.arange(32).expand(2, 32), entropies(model.entropy(ids)))
    per_row = starts.sum(1)
    assert (per_row > 8).all() and (per_row < 24).all() and not torch.equal(starts[0], starts[1])


# (full+loss runs on the blt-tiny preset in tests/test_causality.py: 30 s of compile)
@pytest.mark.parametrize("mode", ["eager", "regional"])
def test_varied_patches_leak_nothing(mode):
    torch._dynamo.reset()
    leak = check(varied(), mode, VOCAB, batch=2, seq=32, cut=13)
    assert leak.later > 0.01, "the check changed nothing it could see"
    assert leak.earlier == 0.0, f"positions <= 13 changed by {leak.earlier}"


@torch.no_grad()
def test_decoding_equals_the_full_forward_and_runs_the_latent_once_per_patch():
    model = varied(max_seq_len=96)
    calls = []
    latent = model.part("latent")[0]
    handle = latent.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[:2]))
    idx = torch.randint(0, VOCAB, (2, 90), generator=torch.Generator().manual_seed(1))
    full = model(idx)
    calls.clear()
    cache = new_cache(model, batch=2)
    cache.reserve(25)
    steps = [model(idx[:, :25], cache)]
    for t in range(25, 90):
        cache.reserve(1)
        steps.append(model(idx[:, t : t + 1], cache))
    handle.remove()
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
    patches = cache.state.patches
    assert sum(rows for rows, _ in calls) == int(patches.sum())  # one latent step per row and patch
    assert all(t == 1 for _, t in calls) and len(calls) < 90  # only at the bytes that start one
    starts = patch_starts(model.cfg, torch.arange(90).expand(2, 90), entropies(model.entropy(idx)))
    assert patches.tolist() == starts.sum(1).tolist()


def test_batched_greedy_decoding_equals_one_at_a_time_and_a_recomputation():
    model = varied()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (1, 7, 20)]
    params = SamplingParams(temperature=0, max_new_tokens=12)
    batched = [r.tokens for r in generate_batch(model, prompts, params)]
    alone = [list(generate(model, p, params)) for p in prompts]
    full = []
    with torch.no_grad():
        for p in prompts:
            ids = list(p)
            for _ in range(12):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            full.append(ids[len(p) :])
    assert batched == alone == full
    with pytest.raises(ValueError, match="cannot roll back"):
        new_cache(model, 1).rollback([0])


@torch.no_grad()
def test_documents_with_varied_patches_do_not_see_each_other():
    model = varied()
    a = torch.randint(3, VOCAB, (2, 32), generator=torch.Generator().manual_seed(3))
    a[:, 12] = a[1, 20] = 1
    b = a.clone()
    b[:, :12] = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    masked = [model(t, docs=document_ids(t, 1))[:, 13:] for t in (a, b)]
    assert (masked[0] - masked[1]).abs().max() == 0
    assert (model(a)[:, 13:] - model(b)[:, 13:]).abs().max() > 0.01  # without the masks it sees them
    alone = model(a[1:, 13:21])  # row 1's second document alone: patches and positions restart
    torch.testing.assert_close(alone[0], masked[0][1, :8], rtol=1e-5, atol=1e-5)


def test_the_entropy_model_is_frozen_and_not_counted():
    from generalmodel.config import OptimConfig
    from generalmodel.optim.build import build_optimizer

    model = build_model(PRESETS["blt-tiny"])
    entropy = {id(p) for p in model.entropy.parameters()}
    assert entropy and not any(p.requires_grad for p in model.entropy.parameters())
    optimized = {
        id(p) for group in build_optimizer(model, OptimConfig(name="muon")).param_groups for p in group["params"]
    }
    assert optimized and not optimized & entropy
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert model.num_params() == trained and model.entropy_params() == sum(
        p.numel() for p in model.entropy.parameters()
    )
    static = build_model(PRESETS["blt-static-tiny"])
    assert static.entropy is None and static.num_params() == model.num_params()
    # the latent runs once per patch: FLOPs per byte fall as patches grow, the byte parts' do not
    wide = build_model(dataclasses.replace(PRESETS["blt-static-tiny"], patch_size=8))
    latent_params = sum(p.numel() for p in static.part("latent").parameters())
    assert static.flops_per_token(1024) - wide.flops_per_token(1024) > 6 * latent_params / 8


def test_init_stds_follow_each_parts_depth():
    cfg = dataclasses.replace(PRESETS["blt-static-tiny"], d_model=256, local_d_model=256, local_heads=4)
    torch.manual_seed(0)
    model = build_model(cfg)
    std = cfg.init_std
    for part, layers in (("encoder", 1), ("latent", 4), ("decoder", 2)):
        for block in model.part(part):
            assert block.attn.q_proj.weight.std().item() == pytest.approx(std, rel=0.05)
            assert block.mlp.down.weight.std().item() == pytest.approx(std / math.sqrt(2 * layers), rel=0.05)
    for weight in (model.embed.weight, model.ngram_embed.weight, model.pool.q_proj.weight, model.latent_out.weight):
        assert weight.std().item() == pytest.approx(std, rel=0.05)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model.window=8"], "model.name='blt' does not use window=8"),
        (["--model.patching=static", "--model.entropy_model=models:/x/1"], "entropy_model is for patching"),
        (["--model.local_heads=5"], "local_heads=5 must divide local_d_model"),
        (["--model.ngram_sizes=[1,3]"], "ngram_sizes must be distinct sizes >= 2"),
    ],
)
def test_bad_blt_configs_are_clear_errors(args, message):
    with pytest.raises(Exception, match=message):
        parse_args(["--model.preset=blt-tiny", *args])


def test_the_job_loads_the_entropy_model_and_refuses_one_of_another_shape(tmp_path):
    from generalmodel.config import load_config
    from generalmodel.data.tokenizer import byte_tokenizer
    from generalmodel.infer.export import export_files
    from generalmodel.train.init_from import entropy_init

    blt = PRESETS["blt-tiny"]
    torch.manual_seed(5)
    trained = build_model(blt.entropy_config())
    source = tmp_path / "entropy"
    source.mkdir()
    for name, data in export_files(trained.cfg, trained.state_dict(), byte_tokenizer().to_str()).items():
        (source / name).write_bytes(data)
    cfg = load_config(None, {"model": {"preset": "blt-tiny", "entropy_model": str(source)}})
    init = entropy_init(cfg, None)
    for key, value in trained.state_dict().items():
        assert torch.equal(init.state[f"entropy.{key}"], value), key
    assert init.tags == {"entropy_model": str(source)}
    torch.manual_seed(cfg.train.seed)  # the rest is the run's own seeded init
    assert torch.equal(init.state["latent_start"], build_model(cfg.model).latent_start)
    other = load_config(None, {"model": {"preset": "blt-tiny", "entropy_model": str(source), "entropy_d_model": 32}})
    with pytest.raises(UserError, match="d_model=64 \\(needs 32\\)"):
        entropy_init(other, None)
    with pytest.raises(UserError, match="needs model.entropy_model"):
        entropy_init(load_config(None, {"model": {"preset": "blt-tiny"}}), None)
    assert entropy_init(load_config(None, {"model": {"preset": "blt-static-tiny"}}), None) is None


# The training loop's tiny run (tests/test_train.py) with a BLT over its 320 ids: varied patches.
LOOP = {
    "model.name": "blt",
    "model.patching": "monotonic",
    "model.entropy_threshold": 0.0,
    "model.patch_pad": 32,
    "model.local_d_model": 32,
    "model.local_heads": 2,
    "model.entropy_d_model": 32,
}


def test_training_resumes_exactly_and_two_fsdp_ranks_equal_one(train_dataset, tmp_path):
    from test_train import run, tiny, two_processes

    reference, last = run(tiny(train_dataset, tmp_path / "a", **LOOP))
    assert reference[12] < reference[1] - 0.5 and 1 < last["bytes_per_patch"] < 4
    with pytest.raises(RuntimeError, match="injected failure at step 8"):
        run(tiny(train_dataset, tmp_path / "b", **LOOP, **{"train.fail_at_step": 8}))
    resumed, _ = run(tiny(train_dataset, tmp_path / "b", **LOOP))
    assert min(resumed) == 7 and all(loss == reference[step] for step, loss in resumed.items())
    torch.set_num_threads(1)
    two = two_processes(tiny(train_dataset, tmp_path / "two", **LOOP, **{"train.batch_size": 2, "train.steps": 4}))
    one, _ = run(tiny(train_dataset, tmp_path / "one", **LOOP, **{"train.steps": 4}))
    for step, loss in one.items():
        assert math.isclose(two[step], loss, rel_tol=1e-5), (step, two[step], loss)
