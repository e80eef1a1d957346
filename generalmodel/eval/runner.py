"""Evaluating models over a Ray cluster: the work (token windows, multiple-choice examples, problems) is
cut into chunks scored by Ray tasks, each holding the model it got through the object store
(put once per model). Results are one row per model, logged to MLflow: a parent run with the
comparison table, a child run per model tagged with the model version and the run that
produced it."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from generalmodel.eval.scoring import (
    WindowScore,
    corpus_windows,
    loglikelihoods,
    mc_accuracy,
    read_hellaswag,
    score_windows,
    token_bytes,
)

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    reference: str
    cfg: Any
    state: dict
    tokenizer_json: str

    def build(self):
        from generalmodel.infer.export import build_with_state

        return build_with_state(self.cfg, self.state, self.tokenizer_json, self.reference)


@dataclass
class ModelResult:
    reference: str
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


def _score_windows_task(loaded: LoadedModel, windows: list[np.ndarray], batch_size: int) -> WindowScore:
    model, tokenizer = loaded.build()
    return score_windows(model, windows, token_bytes(tokenizer), batch_size)


def _loglikelihood_task(loaded: LoadedModel, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
    from generalmodel.data.tokenizer import eos_id

    model, tokenizer = loaded.build()
    return loglikelihoods(model, tokenizer, pairs, eos_id(tokenizer))


def _solve_task(loaded: LoadedModel, rows: list[dict], samples: int, params, tools: list[str] | None) -> list:
    from generalmodel.eval.problems import solve

    model, _ = loaded.build()
    return solve(model, loaded.tokenizer_json, rows, samples, params, tools=tools)


def chunks(items: list, n: int) -> list[list]:
    n = max(1, min(n, len(items)))
    size = -(-len(items) // n)
    return [items[i : i + size] for i in range(0, len(items), size)]


class ClusterScorer:
    """Scores with Ray tasks, `parallelism` chunks at a time (default: the cluster's CPUs)."""

    def __init__(self, loaded: LoadedModel, parallelism: int | None = None, batch_size: int = 8):
        import ray

        self.loaded_ref = ray.put(loaded)  # one put; every task gets it from the object store
        self.parallelism = parallelism or max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.batch_size = batch_size

    def windows(self, windows: list[np.ndarray]) -> WindowScore:
        import ray

        task = ray.remote(num_cpus=1)(_score_windows_task)
        parts = ray.get([task.remote(self.loaded_ref, c, self.batch_size) for c in chunks(windows, self.parallelism)])
        total = WindowScore()
        for part in parts:
            total = total.add(part)
        return total

    def loglikelihoods(self, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        import ray

        task = ray.remote(num_cpus=1)(_loglikelihood_task)
        parts = ray.get([task.remote(self.loaded_ref, c) for c in chunks(pairs, self.parallelism)])
        return [score for part in parts for score in part]

    def solve(self, rows: list[dict], samples: int, params, tools: list[str] | None = None) -> list:
        """generalmodel.eval.problems.solve over chunks of the rows, in order."""
        import ray

        task = ray.remote(num_cpus=1)(_solve_task)
        parts = [task.remote(self.loaded_ref, c, samples, params, tools) for c in chunks(rows, self.parallelism)]
        parts = ray.get(parts)
        return [solved for part in parts for solved in part]


def dataset_windows(uri: str, storage, tokenizer_json: str, limit: int | None) -> list[np.ndarray]:
    """The val split's rows of a prepared dataset, refused when its tokenizer is not the model's."""
    from generalmodel import UserError
    from generalmodel.data.loader import TokenDataset
    from generalmodel.data.tokenizer import tokenizer_hash

    ds = TokenDataset.open(uri, storage)
    if tokenizer_hash(ds.tokenizer_json()) != tokenizer_hash(tokenizer_json):
        raise UserError(
            f"dataset {uri} was tokenized with another tokenizer than the model's: its token ids mean other "
            f"things to this model; evaluate on the raw text instead (--corpus=SOURCE), which every model "
            f"tokenizes itself"
        )
    split = "val" if "val" in ds.shards else next(iter(ds.shards))
    rows = [row for shard in ds.split_shards(split) for row in ds.read_shard(shard).astype(np.int64)]
    return rows[:limit] if limit else rows


def corpus_texts(source: str, storage, limit_docs: int | None) -> list[str]:
    """The documents of a raw corpus (any data.source), normalized as preparation does."""
    from generalmodel.config import DataConfig
    from generalmodel.data.sources import list_pieces, read_documents

    data = DataConfig(source=source)
    texts: list[str] = []
    for piece in list_pieces(data, storage):
        texts.extend(read_documents(piece, data, storage).texts)
        if limit_docs and len(texts) >= limit_docs:
            return texts[:limit_docs]
    return texts


def evaluate(loaded: LoadedModel, cfg, storage) -> dict[str, float]:
    """Every metric `cfg` asks for, for one model."""
    from generalmodel.data.tokenizer import eos_id, load_tokenizer

    scorer = ClusterScorer(loaded, cfg.parallelism, cfg.batch_size)
    tokenizer = load_tokenizer(loaded.tokenizer_json, loaded.reference)
    metrics: dict[str, float] = {}
    if cfg.dataset:
        score = scorer.windows(dataset_windows(cfg.dataset, storage, loaded.tokenizer_json, cfg.limit))
        metrics |= {"val_loss": score.loss, "val_bpb": score.bits_per_byte, "val_tokens": float(score.tokens)}
    if cfg.corpus:
        texts = corpus_texts(cfg.corpus, storage, cfg.limit)
        windows = corpus_windows(tokenizer, texts, loaded.cfg.max_seq_len, eos_id(tokenizer))
        score = scorer.windows(windows)
        metrics |= {"corpus_loss": score.loss, "corpus_bpb": score.bits_per_byte, "corpus_bytes": float(score.bytes)}
    for path in cfg.tasks:
        name = os.path.splitext(os.path.basename(path))[0]
        examples = read_hellaswag(path, cfg.limit)
        pairs = [(e.context, c) for e in examples for c in e.continuations]
        flat = scorer.loglikelihoods(pairs)
        scores, i = [], 0
        for e in examples:
            scores.append([ll for ll, _ in flat[i : i + len(e.choices)]])
            i += len(e.choices)
        metrics |= {f"{name}.{k}": v for k, v in mc_accuracy(examples, scores).items()}
    if cfg.problems:
        from generalmodel.eval.problems import read_problems, summarize

        rows = read_problems(cfg.problems, storage, cfg.limit)
        solved = scorer.solve(rows, cfg.samples, cfg.sampling, list(cfg.tools) or None)
        metrics |= summarize(solved, cfg.pass_k)
        wrong = next((s for s in solved if not s.greedy), None)
        if wrong is not None:
            log.info("%s: a wrong greedy answer (%s L%d): %r", loaded.reference, wrong.task, wrong.level, wrong.example)
    if cfg.harness_tasks:
        from generalmodel.eval.harness import run_harness

        metrics |= run_harness(loaded, cfg.harness_tasks, cfg.limit, scorer, cfg.harness_include)
    return metrics


def comparison(results: list[ModelResult]) -> tuple[str, str]:
    """The results as a markdown table and a CSV, one row per model."""
    keys = sorted({k for r in results for k in r.metrics})
    header = ["model", *keys]
    rows = [[r.reference, *(_cell(r.metrics.get(k)) for k in keys)] for r in results]
    markdown = "\n".join(
        ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(row) + " |" for row in rows)]
    )
    csv = "\n".join(",".join(row) for row in [header, *rows]) + "\n"
    return markdown, csv


def _cell(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.0f}" if float(value).is_integer() and abs(value) > 1 else f"{value:.4f}"  # counts whole


def log_to_mlflow(uri: str, experiment: str, name: str, results: list[ModelResult], config_yaml: str) -> str:
    """A parent run with the comparison (eval.md, eval.csv) and one child run per model."""
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    from generalmodel.tracking import ensure_experiment

    client = MlflowClient(uri)
    now = int(time.time() * 1000)
    experiment_id = ensure_experiment(uri, experiment)
    parent = client.create_run(experiment_id, run_name=name, tags={"generalmodel.kind": "eval"}).info.run_id
    for result in results:
        child = client.create_run(
            experiment_id,
            run_name=f"{name}: {result.reference}",
            tags={"mlflow.parentRunId": parent, "evaluated_model": result.reference, **result.tags},
        ).info.run_id
        client.log_batch(
            child,
            metrics=[Metric(k, v, now, 0) for k, v in result.metrics.items()],
            tags=[RunTag("generalmodel.kind", "eval")],
        )
        client.set_terminated(child)
    markdown, csv = comparison(results)
    client.log_text(parent, markdown + "\n", "eval.md")
    client.log_text(parent, csv, "eval.csv")
    client.log_text(parent, config_yaml, "eval_config.yaml")
    client.set_terminated(parent)
    return parent
