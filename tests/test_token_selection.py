"""Selective language modelling (Rho-1: train.token_selection, train.selection_reference): each row
keeps exactly ⌊k·n⌋ of its n supervised tokens — those whose loss most exceeds a reference model's —
and only they get a gradient, chunked or not; the reference's per-token losses are computed once by
a Ray Data pass beside the dataset and reused; a run with selection resumes exactly and does not
depend on how rows are split into micro-batches; bad references are refused by name."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_train import tiny

from generalmodel.config import ConfigError, load_config
from generalmodel.data.loader import TOKEN_REFERENCE_KIND, TokenDataset
from generalmodel.errors import UserError
from generalmodel.storage import RunLayout, read_manifest, resolve
from generalmodel.train.init_from import InitSource
from generalmodel.train.loop import train
from generalmodel.train.objectives import SelectiveLanguageModeling
from generalmodel.train.reference import score_tokens, with_token_references
from models import build_model
from models.loss import IGNORE, Selection, keep_mask, kept, linear_cross_entropy, selected_cross_entropy, token_losses


def brute_force_targets(losses, reference, targets, fraction):
    """The targets of the kept tokens (IGNORE elsewhere), chosen row by row with Python's sort."""
    out = torch.full_like(targets, IGNORE)
    for r in range(targets.shape[0]):
        valid = [t for t in range(targets.shape[1]) if targets[r, t] != IGNORE]
        ranked = sorted(valid, key=lambda t: (-(losses[r, t] - reference[r, t]).item(), t))
        for t in ranked[: kept(len(valid), fraction)]:
            out[r, t] = targets[r, t]
    return out


@pytest.mark.parametrize("chunk", [0, 5])
@pytest.mark.parametrize("fraction", [0.3, 0.6, 1.0])
def test_each_row_keeps_its_top_excess_tokens_and_only_they_get_a_gradient(chunk, fraction):
    torch.manual_seed(0)
    B, T, d, V = 3, 11, 8, 17
    x = torch.randn(B * T, d, requires_grad=True)
    w = torch.randn(V, d, requires_grad=True)
    targets = torch.randint(0, V, (B, T))
    targets[1, ::3] = IGNORE  # a chat row: some targets are not supervised
    targets[2, :] = IGNORE  # a row with nothing supervised keeps nothing
    reference = torch.rand(B, T) * 4
    loss = selected_cross_entropy(x, w, targets.flatten(), Selection(reference, fraction), 3.0, chunk)
    loss.backward()
    got = (x.grad.clone(), w.grad.clone())

    losses = token_losses(x, w, targets.flatten(), 3.0).view(B, T)
    chosen = brute_force_targets(losses, reference, targets, fraction)
    per_row = [(chosen[r] != IGNORE).sum().item() for r in range(B)]
    assert per_row == [kept(T, fraction), kept(T - 4, fraction), 0]
    x.grad = w.grad = None
    expected = linear_cross_entropy(x, w, chosen.flatten(), 3.0, 0)
    expected.backward()
    assert torch.allclose(loss, expected, rtol=1e-6)
    assert torch.allclose(got[0], x.grad, rtol=1e-5, atol=1e-7) and torch.allclose(got[1], w.grad, rtol=1e-5, atol=1e-7)
    # the objective passes float16 losses as their int16 bits (FSDP2 would cast floats to bf16)
    half = Selection(reference.half().view(torch.int16), fraction)
    assert torch.equal(
        selected_cross_entropy(x, w, targets.flatten(), half, 3.0, chunk),
        selected_cross_entropy(x, w, targets.flatten(), Selection(reference.half().float(), fraction), 3.0, chunk),
    )


def test_the_device_count_is_the_host_count():
    """keep_mask's count (float64 on the device) and `kept` (the host's, for the loss's denominator)
    agree for every row length and the fractions people write (0.29 × 100 is 29, not 28)."""
    lengths = torch.arange(0, 301)
    valid = torch.arange(300).expand(len(lengths), 300) < lengths[:, None]
    zeros = torch.zeros(valid.shape)
    for fraction in (0.1, 0.29, 0.3, 1 / 3, 0.6, 0.7, 0.999, 1.0):
        counts = keep_mask(zeros, zeros, valid, fraction).sum(dim=1).tolist()
        assert counts == [kept(n, fraction) for n in lengths.tolist()], fraction
    assert kept(100, 0.29) == 29 and kept(10, 0.7) == 7 and kept(3, 0.3) == 0


def test_the_model_selects_inside_its_loss_and_scores_per_token():
    """Decoder.forward: per_token losses sum to the summed loss; selection with fraction 1 is the
    plain loss; the objective's host count is what the model kept."""
    cfg = load_config(overrides={"model.vocab_size": 64, "model.max_seq_len": 16, "model.n_layers": 1,
                                 "model.n_heads": 2, "model.d_model": 16})  # fmt: skip
    torch.manual_seed(1)
    model = build_model(cfg.model)
    tokens = torch.randint(0, 64, (3, 13))
    x, y = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        per_token = model(x, targets=y, per_token=True)
        total = model(x, targets=y)
        every = model(x, targets=y, select=Selection(torch.zeros(3, 12), 1.0))
    assert per_token.shape == (3, 12) and torch.allclose(per_token.sum(), total, rtol=1e-5)
    assert torch.allclose(every, total, rtol=1e-5)
    mask = torch.ones(3, 13, dtype=torch.bool)
    mask[0, :7] = False  # row 0 supervises its last 6 targets
    objective = SelectiveLanguageModeling(0.5)
    assert objective.count({"tokens": tokens, "mask": mask}) == kept(6, 0.5) + 2 * kept(12, 0.5)
    assert objective.count({"tokens": tokens}) == 3 * kept(12, 0.5)
    assert type(objective.evaluation).__name__ == "LanguageModeling"  # validation: every token


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train.token_selection": 0.6}, "set train.selection_reference"),
        ({"train.selection_reference": "models:/ref/1"}, "token_selection is 1"),
        ({"train.token_selection": 0}, "greater than 0"),
        ({"train.token_selection": 1.5}, "less than or equal to 1"),
    ],
)
def test_bad_selection_settings_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_preference_pairs_refuse_selection():
    """DPO's pairs have no next-token loss to select from: refused with the dataset's checks."""
    from types import SimpleNamespace

    from generalmodel.train.loop import check_compatible
    from generalmodel.train.resume import TrainingError

    cfg = load_config(
        overrides={"train.token_selection": 0.5, "train.selection_reference": "x", "model.vocab_size": 64}
    )
    pairs = SimpleNamespace(uri="datasets/pairs", format="preference", vocab_size=64, seq_len=16, columns=("chosen",))
    with pytest.raises(TrainingError, match="token_selection is for next-token losses"):
        check_compatible(cfg, pairs)


def reference_source(train_dataset, seed: int = 3, tokenizer_json: str | None = None) -> InitSource:
    """A reference model for the tiny dataset (random weights: what matters here is that its scores
    are its own), as the job loads one."""
    cfg = tiny(train_dataset, "/tmp")
    torch.manual_seed(seed)
    state = build_model(cfg.model).state_dict()
    tokenizer = tokenizer_json or TokenDataset.open(train_dataset).tokenizer_json()
    return InitSource("test-reference", cfg.model, state, tokenizer)


@pytest.fixture(scope="module")
def scored(train_dataset, tmp_path_factory):
    """The tiny dataset with a reference's per-token losses (one Ray Data pass)."""
    cfg = tiny(train_dataset, tmp_path_factory.mktemp("rho1"))
    source = reference_source(train_dataset)
    layout = with_token_references(cfg, RunLayout.of(cfg), TokenDataset.open(train_dataset), source)
    return layout, source


def test_reference_losses_are_computed_once_beside_the_dataset(train_dataset, scored):
    layout, source = scored
    uri = layout.token_references["dataset"]
    assert uri.startswith(train_dataset.rstrip("/") + "/references/")
    manifest, _ = read_manifest(resolve(uri), TOKEN_REFERENCE_KIND)
    ds = TokenDataset.open(train_dataset)
    assert set(manifest["shards"]) == {s.path for shards in ds.shards.values() for s in shards}
    again = with_token_references(tiny(train_dataset, "/tmp"), RunLayout.of(tiny(train_dataset, "/tmp")), ds, source)
    assert again.token_references == layout.token_references  # found and reused, not scored again
    ds.attach_published(uri, None, TOKEN_REFERENCE_KIND)
    shard = ds.split_shards("val")[0]
    columns = ds.read_columns(shard)
    assert columns["ref_loss"].dtype == np.float16 and columns["ref_loss"].shape == (shard.rows, ds.row_len - 1)
    model = build_model(source.model)
    model.load_state_dict(source.state)
    model.eval()
    here = score_tokens(model, {"tokens": columns["tokens"][:4]}, torch.device("cpu"), None)["ref_loss"]
    assert np.array_equal(here, columns["ref_loss"][:4])  # the attached column is the reference's own loss


def test_selection_trains_resumes_exactly_and_does_not_depend_on_the_micro_batches(train_dataset, scored, tmp_path):
    layout, _ = scored
    refs = {"train.token_selection": 0.5, "train.selection_reference": "test-reference"}

    def run(root, **extra):
        cfg = tiny(train_dataset, root, **{**refs, "train.steps": 8, "train.eval_every": 4, **extra})
        here = RunLayout.of(cfg)
        here = RunLayout(**{**here.__dict__, "token_references": layout.token_references})
        metrics: list[dict] = []
        return train(cfg, metrics.append, here), {m["step"]: m for m in metrics if "loss" in m}

    last, steps = run(tmp_path / "a")
    plain_last, plain = run(tmp_path / "plain", **{"train.token_selection": 1.0, "train.selection_reference": None})
    assert steps[1]["loss"] > plain[1]["loss"]  # the kept half: the tokens the model finds harder
    # validation measures every token either way; the runs learned from different tokens
    assert math.isfinite(last["val_loss"]) and last["val_loss"] != plain_last["val_loss"]

    _, accumulated = run(tmp_path / "accum", **{"train.batch_size": 2, "train.grad_accum": 2})
    for step, metrics in steps.items():  # rows 2 + 2 select what one micro-batch of 4 does
        assert math.isclose(accumulated[step]["loss"], metrics["loss"], rel_tol=1e-5), step

    with pytest.raises(RuntimeError, match="injected failure at step 6"):
        run(tmp_path / "b", **{"train.fail_at_step": 6, "train.checkpoint_every": 4})
    _, resumed = run(tmp_path / "b", **{"train.fail_at_step": 6, "train.checkpoint_every": 4})
    assert min(resumed) == 5  # from the step-4 checkpoint
    assert all(m["loss"] == steps[s]["loss"] for s, m in resumed.items())  # bit-identical on CPU


def test_a_reference_with_another_tokenizer_is_refused_by_name(train_dataset, tmp_path):
    """In the loop's check and, as a user meets it, from jobs/pretrain: one line, exit 2, before
    Ray starts."""
    from conftest import REPO

    from generalmodel.data.tokenizer import train_bpe
    from generalmodel.infer.export import export_files

    other = train_bpe(["another corpus, another vocabulary " * 20], 320).to_str()
    source = reference_source(train_dataset, tokenizer_json=other)
    cfg = tiny(train_dataset, tmp_path, **{"train.token_selection": 0.6, "train.selection_reference": "x"})
    with pytest.raises(UserError, match="another tokenizer than dataset"):
        with_token_references(cfg, RunLayout.of(cfg), TokenDataset.open(train_dataset), source)

    export = tmp_path / "reference"
    export.mkdir()
    for name, data in export_files(source.model, source.state, other).items():
        (export / name).write_bytes(data)
    args = [
        f"--train.dataset={train_dataset}", f"--storage.root={tmp_path}", f"--tracking.uri=sqlite:///{tmp_path}/m.db",
        "--train.token_selection=0.6", f"--train.selection_reference={export}",
    ]  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-m", "jobs.pretrain", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "was trained with another tokenizer than dataset" in out.stderr
    assert "Traceback" not in out.stderr and out.stderr.strip().count("\n") == 0, out.stderr[-2000:]
    assert "Started a local Ray instance" not in out.stdout + out.stderr
