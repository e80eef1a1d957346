"""Rollouts: groups of sampled completions scored by the verifiers, on Ray actors.

A `RolloutWorker` holds a copy of the policy and decodes many sequences at once on the batched
KV-cache engine (generalmodel.infer.engine). Every completion has its own seed, a function of
(train.seed, step, its place in the step), so which actor runs it — or a replacement after an
actor died — never changes what it samples.

`RayRollouts` (the learner's rank 0 owns it) spreads a step over `rl.rollout_workers` actors.
New weights go to them through the object store (one `ray.put` per version, one `get` per actor)
or, with rl.weight_sync=collective, by a broadcast over a gloo group of the learner and the actors
(generalmodel.post.rl.weight_sync); either way a background thread times each version from the
publish until every actor holds it (`weight_sync_s`, `weight_sync_bytes`), and the learner does
not wait for it. Each rollout says which version produced it. An actor that dies is replaced (the
new one loads the current version) and its share of the step runs again. `LocalRollouts` is the same in the
learner's own process, for runs without Ray (tests, the GPU machine).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from generalmodel import UserError
from generalmodel.config import Config
from generalmodel.eval.problems import seed_of
from generalmodel.infer import SamplingParams, load_state
from generalmodel.post.rl.rewards import Rewards
from generalmodel.post.rl.tasks import PromptSet

log = logging.getLogger(__name__)

READY_S = 300.0  # how long rollout actors may wait for resources (an autoscaler may add a node)


@dataclass
class Rollout:
    prompt: int  # index into the prompt set's train (or held-out) prompts
    completion: list[int]  # sampled ids, the stop id last when the model stopped
    logprobs: list[float]  # of each completion id, under the distribution it was sampled from
    reward: float
    scores: dict[str, float]  # each verifier's
    stopped: bool  # ended with the end-of-turn (or EOS) token, not at the token budget
    version: int  # the policy version (learner steps taken) that sampled it
    text: str = ""
    # rl.tools: which completion ids the policy sampled (the tools' results between its turns are
    # not: the learner leaves them out, and their logprobs are 0); None: all of them
    policy: list[bool] | None = None

    @property
    def sampled(self) -> int:
        """Completion ids the policy sampled."""
        return len(self.completion) if self.policy is None else sum(self.policy)


@dataclass
class Batch:
    """What one request to the rollout workers produced, and what it cost them."""

    rollouts: list[Rollout] = field(default_factory=list)
    generated_tokens: int = 0
    generate_s: float = 0.0  # summed over the workers (they run in parallel)

    def extend(self, other: Batch) -> None:
        self.rollouts += other.rollouts
        self.generated_tokens += other.generated_tokens
        self.generate_s += other.generate_s


def sample_seed(seed: int, step: int, position: int) -> int:
    """The seed of the completion at `position` (prompt slot × group size + sample) of `step`."""
    return seed_of(seed, step, position)


class RolloutWorker:
    """One copy of the policy that samples, scores and (greedily) evaluates."""

    def __init__(
        self, cfg: Config, tokenizer_json: str, prompts: PromptSet, device: str = "cpu", threads: int | None = None
    ):
        from generalmodel.data.chat import ChatFormat
        from generalmodel.data.tokenizer import eos_id
        from models import build_model

        if threads is not None:  # an actor of its own: as many threads as CPUs it reserved
            torch.set_num_threads(threads)
        self.cfg, self.prompts = cfg, prompts
        self.device = torch.device(device)
        self.model = build_model(cfg.model).to(self.device).eval()
        fmt = ChatFormat.from_json(tokenizer_json)
        self.tokenizer = fmt.tokenizer
        self.fmt = fmt
        self.stop_ids = frozenset({fmt.end_id, eos_id(fmt.tokenizer)})
        self.rewards = Rewards(cfg.rl.rewards)
        self.version = -1

    def load(self, version: int, state: dict[str, torch.Tensor]) -> int:
        load_state(self.model, state, f"policy version {version}")
        self.version = version
        return version

    def join_group(self, host: str, port: int, rank: int, size: int, generation: int, layout) -> bool:
        """rl.weight_sync=collective: join the learner's weight group (blocks until all have)."""
        from generalmodel.post.rl.weight_sync import WeightGroup

        self.group = WeightGroup(None, host, port, rank, size, generation)
        self.layout, self.buffers = layout, layout.empty()
        return True

    def receive(self, version: int) -> int:
        """rl.weight_sync=collective: take part in the broadcast of `version`, then load it."""
        self.group.broadcast(self.buffers)
        return self.load(version, self.layout.unflatten(self.buffers))

    def placement(self) -> dict[str, Any]:
        """Where this actor runs: its node's id and the resources Ray gave it (CPU, GPU and any
        rl.rollout_resources)."""
        import ray

        context = ray.get_runtime_context()
        return {"node": context.get_node_id(), "resources": context.get_assigned_resources()}

    def rollouts(self, step: int, slots: list[tuple[int, int]], crash: bool = False) -> Batch:
        """Sample and score: `slots` are (position in the step, prompt index) pairs, each one
        completion (the group's samples are consecutive positions of one prompt). `crash`
        (rl.kill_rollout_at_step): the actor's process dies in this call, before it returns."""
        if crash:
            log.warning("rl.kill_rollout_at_step: rollout actor exits during step %d's rollouts", step)
            os._exit(1)
        rl = self.cfg.rl
        params = [
            SamplingParams(
                temperature=rl.temperature,
                max_new_tokens=rl.max_new_tokens,
                seed=sample_seed(self.cfg.train.seed, step, pos),
            )
            for pos, _ in slots
        ]
        return self._run([self.prompts.train[i] for _, i in slots], [i for _, i in slots], params)

    def evaluate(self, indices: list[int], samples: int = 0) -> Batch:
        """Held-out prompts, scored: for each, its greedy completion and then `samples` sampled ones
        (rl.temperature; seeds named by the prompt, so every version is sampled with the same ones)."""
        rl = self.cfg.rl
        greedy = SamplingParams(temperature=0, max_new_tokens=rl.max_new_tokens)
        params = [
            greedy
            if j == 0
            else SamplingParams(
                temperature=rl.temperature,
                max_new_tokens=rl.max_new_tokens,
                seed=seed_of(self.cfg.train.seed, "heldout", i, j),
            )
            for i in indices
            for j in range(1 + samples)
        ]
        repeated = [i for i in indices for _ in range(1 + samples)]
        return self._run([self.prompts.heldout[i] for i in repeated], repeated, params)

    @torch.no_grad()
    def _run(self, prompts, indices: list[int], params: list[SamplingParams]) -> Batch:
        """Decode every prompt on the batched engine; each finished sequence is scored by the
        verifiers in a second thread while the engine decodes the others (the engine's kernels
        release the GIL), so scoring overlaps generation instead of following it."""
        from generalmodel.infer.engine import Engine, Request

        if self.cfg.rl.tools:
            return self._run_with_tools(prompts, indices, params)
        started = time.perf_counter()
        capacity = min(self.cfg.model.max_seq_len, max(len(p.ids) for p in prompts) + self.cfg.rl.max_new_tokens)
        engine = Engine(self.model, min(self.cfg.rl.rollout_slots, len(prompts)), capacity=capacity)
        requests = [engine.add(Request(list(p.ids), q, self.stop_ids)) for p, q in zip(prompts, params, strict=True)]
        prompt_of = {r.id: (p, i) for r, p, i in zip(requests, prompts, indices, strict=True)}
        scored = {}
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="verifiers") as scorer:
            while not engine.idle():
                for event in engine.step():
                    if event.finished:
                        scored[event.request.id] = scorer.submit(
                            self._rollout, event.request, *prompt_of[event.request.id]
                        )
            batch = Batch(generate_s=time.perf_counter() - started)
            for request in requests:
                rollout = scored[request.id].result()
                batch.rollouts.append(rollout)
                batch.generated_tokens += len(rollout.completion)
        return batch

    def _run_with_tools(self, prompts, indices: list[int], params: list[SamplingParams]) -> Batch:
        """rl.tools: each rollout takes up to rl.tool_rounds turns, batched turn by turn; a turn
        whose calls parse has them run (generalmodel.infer.tools.call) and their results appended
        as tool turns, then the policy answers again. Round r > 0 samples with the seed of
        (the completion's seed, r). The verifiers score the last turn's content."""
        from generalmodel.infer.engine import Engine, Request
        from generalmodel.infer.tools import call

        started = time.perf_counter()
        rl, tools, fmt = self.cfg.rl, list(self.cfg.rl.tools), self.fmt
        completions: list[list[int]] = [[] for _ in prompts]
        policy: list[list[bool]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        last: list = [None] * len(prompts)  # (request, reply) of each rollout's last turn
        open_ = list(range(len(prompts)))
        for round_ in range(rl.tool_rounds):
            room = self.cfg.model.max_seq_len - rl.max_new_tokens
            open_ = [i for i in open_ if len(prompts[i].ids) + len(completions[i]) <= room]
            if not open_:
                break
            longest = max(len(prompts[i].ids) + len(completions[i]) for i in open_)
            engine = Engine(self.model, min(rl.rollout_slots, len(open_)), capacity=longest + rl.max_new_tokens)
            turn = [
                p if round_ == 0 else p.model_copy(update={"seed": seed_of(p.seed, "turn", round_)})
                for p in (params[i] for i in open_)
            ]
            requests = [
                engine.add(Request(prompts[i].ids + completions[i], q, self.stop_ids))
                for i, q in zip(open_, turn, strict=True)
            ]
            while not engine.idle():
                engine.step()
            still = []
            for i, request in zip(open_, requests, strict=True):
                stopped = request.finish_reason == "stop"
                sampled = request.tokens + ([request.stop_id] if stopped else [])
                completions[i] += sampled
                policy[i] += [True] * len(sampled)
                logprobs[i] += list(request.logprobs)
                reply = fmt.reply(request.tokens, tools)
                last[i] = (request, reply)
                if stopped and request.stop_id == fmt.end_id and reply.calls and reply.error is None:
                    results = fmt.tool_results([call(c["name"], c["arguments"]) for c in reply.calls])
                    completions[i] += results
                    policy[i] += [False] * len(results)
                    logprobs[i] += [0.0] * len(results)
                    still.append(i)
            open_ = still
        batch = Batch(generate_s=time.perf_counter() - started)
        for i, (prompt, index) in enumerate(zip(prompts, indices, strict=True)):
            request, reply = last[i]
            reward, scores = self.rewards(prompt.text, reply.content, prompt.fields)
            stopped = request.finish_reason == "stop" and not reply.calls  # answered, not left after calls
            rollout = Rollout(
                index, completions[i], logprobs[i], reward, scores, stopped, self.version, reply.content, policy[i]
            )
            batch.rollouts.append(rollout)
            batch.generated_tokens += rollout.sampled
        return batch

    def _rollout(self, request, prompt, index: int) -> Rollout:
        """A finished request, scored."""
        stopped = request.finish_reason == "stop"
        text = self.tokenizer.decode(request.tokens)
        reward, scores = self.rewards(prompt.text, text, prompt.fields)
        completion = request.tokens + ([request.stop_id] if stopped else [])
        return Rollout(index, completion, list(request.logprobs), reward, scores, stopped, self.version, text)


def shards(items: list, n: int) -> list[list]:
    """`items` in n contiguous, nearly equal parts (empty parts left out)."""
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (i < extra)
        if end > start:
            out.append(items[start:end])
        start = end
    return out


class LocalRollouts:
    """The rollout worker in this process: each request runs when it is made."""

    def __init__(self, cfg: Config, tokenizer_json: str, prompts: PromptSet, device: str = "cpu"):
        self.worker = RolloutWorker(cfg, tokenizer_json, prompts, device)
        self.replaced = 0

    def publish(self, version: int, state: dict[str, torch.Tensor]) -> None:
        self.worker.load(version, state)

    def sync_metrics(self) -> dict[str, float]:
        return {}

    def submit(self, step: int, slots: list[tuple[int, int]]) -> Batch:
        return self.worker.rollouts(step, slots)

    def submit_eval(self, indices: list[int], samples: int = 0) -> Batch:
        return self.worker.evaluate(indices, samples)

    def collect(self, handle: Batch) -> Batch:
        return handle

    def close(self) -> None:
        pass


class RayRollouts:
    """`rl.rollout_workers` actors; see the module doc."""

    def __init__(self, cfg: Config, tokenizer_json: str, prompts: PromptSet):
        import ray

        rl = cfg.rl
        self.cfg = cfg
        self.cls = ray.remote(
            num_cpus=rl.rollout_cpus, num_gpus=rl.rollout_gpus, resources=rl.rollout_resources or None, max_restarts=0
        )(RolloutWorker)
        device = "cuda" if rl.rollout_gpus > 0 else "cpu"
        self.args = (cfg, tokenizer_json, ray.put(prompts), device, max(1, int(rl.rollout_cpus)))
        self.actors = [self._spawn() for _ in range(rl.rollout_workers)]
        self.weights = None  # (version, ObjectRef of the state dict; None: sent by the collective)
        self.replaced = 0
        self.states: dict[int, dict[str, torch.Tensor]] = {}  # collective: the versions a replacement may need
        self.group = self.store = self.layout = None  # collective: the group, the learner's store
        self.generation = 0
        self.syncing: threading.Thread | None = None  # the collective's last broadcast
        self.last_sync: dict[str, float] = {}
        placed = [a.placement.remote() for a in self.actors]
        ready, _ = ray.wait(placed, num_returns=len(self.actors), timeout=READY_S)
        if len(ready) < len(self.actors):
            raise UserError(
                f"{len(self.actors) - len(ready)} of rl.rollout_workers={rl.rollout_workers} rollout actors did not "
                f"start within {READY_S:.0f} s: each reserves rl.rollout_cpus={rl.rollout_cpus} CPUs, "
                f"rl.rollout_gpus={rl.rollout_gpus} GPUs and rl.rollout_resources={rl.rollout_resources} beside the "
                f"learner's ray.num_workers x ray.cpus_per_worker; the cluster has {ray.cluster_resources()}"
            )
        placements = ray.get(placed)
        log.info(
            "%d rollout actors on node(s) %s, each holding %s (the learner's rank 0: node %s)",
            len(self.actors),
            ", ".join(sorted({p["node"][:12] for p in placements})),
            placements[0]["resources"],
            ray.get_runtime_context().get_node_id()[:12],
        )

    def _spawn(self):
        return self.cls.remote(*self.args)

    def publish(self, version: int, state: dict[str, torch.Tensor]) -> None:
        """Send `version` to every actor: it runs before any rollout submitted after it (actor order)."""
        import ray

        started, nbytes = time.perf_counter(), sum(t.nbytes for t in state.values())
        if self.cfg.rl.weight_sync == "object_store":
            self.weights = (version, ray.put(state))  # one put; each actor gets it from the object store
            acks = [actor.load.remote(*self.weights) for actor in self.actors]
            buffers = None
        else:
            self.states[version] = state
            for old in [v for v in self.states if v < version - self.cfg.rl.max_staleness - 1]:
                del self.states[old]
            self.weights = (version, None)
            if self.syncing is not None:
                self.syncing.join()  # one broadcast at a time
            if self.group is None:
                self._form_group(state)
            buffers = self.layout.flatten(state)
            acks = [actor.receive.remote(version) for actor in self.actors]
        self.syncing = threading.Thread(target=self._sync, args=(started, nbytes, acks, buffers), daemon=True)
        self.syncing.start()

    def _sync(self, started: float, nbytes: int, acks: list, buffers: list[torch.Tensor] | None) -> None:
        """The background half of a publish: the broadcast (collective), then every actor's
        acknowledgement, timed. A dead actor is the next collect's to replace."""
        import ray

        try:
            if buffers is not None:
                self.group.broadcast(buffers)
            ray.get(acks)
        except Exception as e:
            log.warning(
                "a rollout actor did not take the new weights (%s): it is replaced when its part is collected", e
            )
            self.group = None  # formed again, with the replacement, before the next version goes out
            return
        self.last_sync = {"weight_sync_s": time.perf_counter() - started, "weight_sync_bytes": float(nbytes)}

    def _form_group(self, state: dict[str, torch.Tensor]) -> None:
        """The learner (rank 0) and every actor as a new generation of the weight group."""
        import ray

        from generalmodel.cluster import free_port
        from generalmodel.post.rl.weight_sync import Layout, WeightGroup, host_store

        self.layout = Layout.of(state)
        if self.store is None:
            self.host, self.port = ray.util.get_node_ip_address(), free_port()
            self.store = host_store(self.port)
        self.generation += 1
        size = len(self.actors) + 1
        joins = [
            actor.join_group.remote(self.host, self.port, i + 1, size, self.generation, self.layout)
            for i, actor in enumerate(self.actors)
        ]
        self.group = WeightGroup(self.store, self.host, self.port, 0, size, self.generation)
        ray.get(joins)

    def sync_metrics(self) -> dict[str, float]:
        """The last version's `weight_sync_s` (publish to every actor holding it) and bytes."""
        return dict(self.last_sync)

    def _state_ref(self, weights):
        """The object-store copy of `weights` (a version the collective sent: put now, for a replacement)."""
        import ray

        version, ref = weights
        return ref if ref is not None else ray.put(self.states[version])

    def submit(self, step: int, slots: list[tuple[int, int]]) -> list:
        # rl.kill_rollout_at_step: actor 0 dies inside this request (its process exits in the call,
        # so the death always lands mid-request, however fast the rollouts are); its replacement
        # runs the part again without the flag.
        crash = self.cfg.rl.kill_rollout_at_step == step
        return self._submit("rollouts", [(step, part) for part in shards(slots, len(self.actors))], crash)

    def submit_eval(self, indices: list[int], samples: int = 0) -> list:
        return self._submit("evaluate", [(part, samples) for part in shards(indices, len(self.actors))])

    def _submit(self, method: str, parts: list[tuple], crash_first: bool = False) -> list:
        """Part i to actor i: (actor index, the weights it runs with, the call, its result ref)."""
        return [
            (
                i,
                self.weights,
                (method, *args),
                getattr(self.actors[i], method).remote(*args, **({"crash": True} if crash_first and i == 0 else {})),
            )
            for i, args in enumerate(parts)
        ]

    def collect(self, handle: list) -> Batch:
        """The request's results; a part whose actor died runs again on its replacement, with the
        weights the request was made with (so the replacement samples what the actor would have)."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        batch = Batch()
        for i, weights, call, ref in handle:
            for attempt in range(3):
                try:
                    batch.extend(ray.get(ref))
                    break
                except (RayActorError, ActorDiedError, ActorUnavailableError) as e:
                    if attempt == 2:
                        raise
                    log.warning(
                        "rollout actor %d died (%s): replacing it and running its part again", i, type(e).__name__
                    )
                    ref = self._replace(i, weights, call)
        return batch

    def _replace(self, i: int, weights, call: tuple):
        import ray

        try:
            ray.kill(self.actors[i], no_restart=True)
        except Exception:  # already gone
            pass
        self.actors[i] = self._spawn()
        self.replaced += 1
        self.group = None  # collective: formed again with the replacement before the next version
        if weights is not None:
            self.actors[i].load.remote(weights[0], self._state_ref(weights))
        method, *args = call
        ref = getattr(self.actors[i], method).remote(*args)
        if self.weights is not None and weights is not self.weights:
            self.actors[i].load.remote(self.weights[0], self._state_ref(self.weights))  # the newest, for what's next
        return ref

    def close(self) -> None:
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
