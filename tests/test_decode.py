"""Batched decoding on the static KV cache (models/cache.py, generalmodel/infer/engine.py), on CPU:
for every attention variant, a batch of prompts of different lengths decodes greedily to the same
tokens as one prompt at a time and as a full recomputation without a cache; cached logits equal
the full forward's at every row's own position; sliding-window layers wrap a ring buffer of
`window` entries; requests join and leave a running batch without changing their tokens; the
context ends at max_seq_len."""

from dataclasses import replace

import pytest
import torch

from generalmodel.infer import SamplingParams, generate
from generalmodel.infer.engine import Engine, Request, generate_batch
from models import PRESETS, build_model
from models.cache import KVCache

VOCAB = 256
WRAP = dict(window=8)  # a small window, so that prompts and generations wrap the ring many times
VARIANTS = {
    # (the long-memory presets with a window that wraps: their memories fill and are read)
    **{name: WRAP if PRESETS[name].long_memory != "none" else {} for name in PRESETS if name.endswith("-tiny")},
    "llama-mha": dict(n_kv_heads=None),
    "llama-mqa": dict(n_kv_heads=1),
    "hybrid-wrapping": dict(base="hybrid-tiny", **WRAP),
    "local-only": dict(base="hybrid-tiny", global_every=0, **WRAP),
    "mla-hybrid": dict(base="mla-tiny", global_every=2, **WRAP),
    # groups of two layers sharing K/V: (local, global) shares a full cache, (local, local) a ring
    "kvshare-hybrid": dict(base="kvshare-tiny", global_every=2, **WRAP),
    "kvshare-local-groups": dict(base="kvshare-tiny", global_every=4, **WRAP),
    "gpt2-learned-positions-window": dict(base="gpt2-tiny", global_every=2, **WRAP),
    # the recipe switches that touch attention and the MLP (softcap and zero-init: tests/test_recipes.py)
    "llama-recipe-switches": dict(qk_norm=True, value_residual=True, mlp="relu2"),
    "llama-speedrun-pieces": dict(embed_skip=True, unet_skips=True, value_embeds=1),
}
PROMPT_LENGTHS = (1, 6, 23, 41)
GREEDY = SamplingParams(temperature=0, max_new_tokens=24)


def model_for(variant: str, **changes):
    spec = dict(VARIANTS[variant])
    base = spec.pop("base", variant if variant in PRESETS else "llama-tiny")
    torch.manual_seed(0)
    return build_model(replace(PRESETS[base], vocab_size=VOCAB, **spec, **changes)).eval()


def prompts(lengths=PROMPT_LENGTHS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def recompute_greedy(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("variant", VARIANTS)
def test_batched_greedy_equals_one_at_a_time_and_a_full_recomputation(variant):
    model = model_for(variant)
    batch = prompts()
    batched = [r.tokens for r in generate_batch(model, batch, GREEDY)]
    alone = [list(generate(model, p, GREEDY)) for p in batch]
    full = [recompute_greedy(model, p, GREEDY.max_new_tokens) for p in batch]
    assert batched == alone == full
    assert all(len(t) == GREEDY.max_new_tokens for t in batched)
    assert len({tuple(t) for t in batched}) == len(batch)  # the rows really differ


@pytest.mark.parametrize(
    "variant", ["llama-tiny", "mla-hybrid", "kvshare-hybrid", "local-only", "infini-tiny", "memorizing-tiny"]
)
@torch.no_grad()
def test_cached_logits_equal_the_full_forward_at_each_rows_own_position(variant):
    model = model_for(variant)
    rows = prompts((3, 11, 19), seed=2)
    cont = prompts((9, 9, 9), seed=3)
    cache = KVCache(model, batch=3)
    got = [[] for _ in rows]
    for i, p in enumerate(rows):  # prefill each row alone, at its own length
        view = cache.view([i])
        view.reserve(len(p))
        got[i].append(model(torch.tensor([p]), view)[0])
    for t in range(9):  # then decode the three rows together, each at its own position
        cache.reserve(1)
        step = model(torch.tensor([[c[t]] for c in cont]), cache)
        for i in range(3):
            got[i].append(step[i])
    for i, (p, c) in enumerate(zip(rows, cont, strict=True)):
        full = model(torch.tensor([p + c]))[0]
        torch.testing.assert_close(torch.cat(got[i]), full, rtol=1e-4, atol=1e-4)
    assert cache.lengths.tolist() == [12, 20, 28] == cache.host_lengths


def test_local_layers_keep_a_ring_of_window_entries_whatever_the_length():
    local = model_for("local-only")
    sizes = {capacity: KVCache(local, batch=2, capacity=capacity).nbytes() for capacity in (64, 128, 256)}
    assert len(set(sizes.values())) == 1, sizes  # constant in the sequence length
    hybrid = KVCache(model_for("hybrid-wrapping"), batch=2)
    assert [(layer, c.size, c.ring) for layer, c in hybrid.layers.items()] == [
        (0, 8, True),
        (1, 256, False),
        (2, 8, True),
        (3, 256, False),
    ]
    # a group holding a global layer needs the whole history; a group of local layers a ring
    assert {k: c.size for k, c in KVCache(model_for("kvshare-hybrid"), batch=1).layers.items()} == {0: 256, 2: 256}
    assert {k: c.size for k, c in KVCache(model_for("kvshare-local-groups"), batch=1).layers.items()} == {0: 8, 2: 256}


# (with a long memory: a row's memory is emptied for its next request)
@pytest.mark.parametrize("variant", ["hybrid-wrapping", "infini-tiny", "memorizing-tiny"])
def test_requests_join_and_leave_a_running_batch_without_changing_their_tokens(variant):
    model = model_for(variant)
    params = [
        SamplingParams(temperature=0, max_new_tokens=5),
        SamplingParams(temperature=0.9, top_k=20, seed=3, max_new_tokens=17),
        SamplingParams(temperature=1.0, top_p=0.8, seed=4, max_new_tokens=9),
        SamplingParams(temperature=0, max_new_tokens=12),
        SamplingParams(temperature=0.7, min_p=0.05, seed=5, max_new_tokens=14),
    ]
    engine = Engine(model, slots=2)
    requests = [engine.add(Request(p, q)) for p, q in zip(prompts((4, 30, 2, 13, 7), seed=4), params, strict=True)]
    steps, busiest, mixed = 0, 0, False
    while not engine.idle():
        events = engine.step()
        steps += 1
        busiest = max(busiest, engine.active)
        joined = {e.request.id for e in events if len(e.request.tokens) == 1 and e.token is not None}
        continued = {e.request.id for e in events if len(e.request.tokens) > 1}
        if joined and continued:
            mixed = True  # a request joined while another was mid-generation
    assert busiest == 2 and mixed
    assert steps < sum(q.max_new_tokens for q in params)  # rows decoded together
    for request, q in zip(requests, params, strict=True):
        assert request.finish_reason == "length"
        assert request.tokens == list(generate(model, request.prompt_ids, q))


def test_stop_ids_end_each_row_on_its_own():
    model = model_for("llama-tiny")
    a, b = prompts((5, 9), seed=5)
    # seeded sampling: the same tokens each time, different per row
    sampled = [SamplingParams(temperature=1.0, seed=seed, max_new_tokens=24) for seed in (7, 8)]
    free = generate_batch(model, [a, b], sampled)
    # the first token of row a that is new to it and never produced by row b ends row a there
    cut = next(i for i, t in enumerate(free[0].tokens) if i and t not in free[0].tokens[:i] + free[1].tokens)
    stopped = generate_batch(model, [a, b], sampled, stop_ids={free[0].tokens[cut]})
    assert stopped[0].tokens == free[0].tokens[:cut] and stopped[0].finish_reason == "stop"
    assert stopped[1].tokens == free[1].tokens and stopped[1].finish_reason == "length"


def test_the_context_ends_at_max_seq_len():
    model = model_for("llama-tiny", max_seq_len=32)
    (near_end,) = generate_batch(model, prompts((29,)), GREEDY)
    assert len(near_end.tokens) == 3 and near_end.finish_reason == "length"  # 29 + 3 = 32 tokens
    engine = Engine(model, slots=1)
    with pytest.raises(ValueError, match="prompt has 32 tokens; the model's context is 32"):
        engine.add(Request(prompts((32,))[0], GREEDY))
    # generate() keeps the last max_seq_len - 1 tokens of a longer prompt
    long = prompts((50,))[0]
    assert list(generate(model, long, GREEDY)) == list(generate(model, long[-31:], GREEDY))
    cache = KVCache(model, batch=1)
    cache.reserve(30)
    with pytest.raises(ValueError, match="row 0 would hold 33 tokens, over the cache's capacity 32"):
        cache.reserve(3)


def test_a_cancelled_request_frees_its_row_for_the_next():
    model = model_for("llama-tiny")
    engine = Engine(model, slots=1)
    first = engine.add(Request(prompts((4,))[0], GREEDY))
    second = engine.add(Request(prompts((6,), seed=9)[0], GREEDY))
    engine.step()
    engine.step()
    engine.cancel(first)
    assert first.finish_reason == "cancelled" and len(first.tokens) == 2
    while not engine.idle():
        engine.step()
    assert second.tokens == list(generate(model, second.prompt_ids, GREEDY))
