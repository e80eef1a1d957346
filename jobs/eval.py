"""Evaluate one or more models side by side: val loss and bits per byte (on a prepared dataset's
val split, or on raw text each model tokenizes itself), multiple-choice tasks in HellaSwag's
jsonl format (acc, acc_norm), problems with checkable answers (the reasoning suite of
jobs/reasoning.py: pass@1 greedy and sampled, pass@k, per task and level), and
lm-evaluation-harness tasks. The work runs as Ray tasks; results go to MLflow (a parent run with
the comparison table, a child run per model).

    python -m jobs.eval --models='[models:/llama-tiny/1, models:/llama-tiny/2]' --corpus=sotu
    python -m jobs.eval --models=models:/llama-tiny/2 --dataset=.generalmodel/store/datasets/sotu \\
        --tasks='[evals/hellaswag-val.jsonl]'
    python -m jobs.eval --models=models:/llama-tiny-reason-cot/latest \\
        --problems=.generalmodel/reasoning/test.jsonl --samples=8 --pass_k='[8]'
    python -m jobs.eval --models=models:/llama-tiny-reason-tools/latest \
        --problems=.generalmodel/reasoning/test.jsonl --tools='[calculator]'   # with the calculator
    python -m jobs.eval --models=... --harness_tasks='[hellaswag]'      # needs the eval extra, online
"""

from __future__ import annotations

import yaml
from pydantic import Field, model_validator

from generalmodel.cli import run_job
from generalmodel.cluster import ray_session
from generalmodel.config import RayConfig, Section, StorageConfig, Strings, TrackingConfig
from generalmodel.eval.runner import LoadedModel, ModelResult, comparison, evaluate, log_to_mlflow
from generalmodel.infer import SamplingParams
from generalmodel.infer.export import read_export
from generalmodel.infer.tools import BUILTIN
from generalmodel.tracking import check_reachable, model_tags, tracking_uri
from generalmodel.tracking.registry import download_model


class ProblemSampling(SamplingParams):
    """How --problems' answers are sampled (the greedy answer besides): temperature, then top-k / top-p / min-p."""

    max_new_tokens: int = Field(160, gt=0, description="Tokens an answer may take (a worked solution's steps).")


class EvalConfig(Section):
    """Which models, on what."""

    models: Strings = Field(..., description="Model references (models:/NAME/VERSION, @ALIAS, runs:/ID, URIs).")
    dataset: str | None = Field(None, description="A prepared dataset: val loss and bits per byte on its val split.")
    corpus: str | None = Field(
        None, description="Raw text (any data.source: sotu, a path, s3://, hf:ID): loss and bits per byte."
    )
    tasks: Strings = Field([], description="Multiple-choice jsonl files (HellaSwag format): acc, acc_norm.")
    problems: str | None = Field(
        None, description="Problems with checkable answers (jobs/reasoning.py's test.jsonl): pass@1 and pass@k."
    )
    samples: int = Field(8, ge=0, description="--problems: sampled answers per problem (besides the greedy one).")
    pass_k: list[int] = Field([8], description="--problems: the k of each pass@k reported (each <= samples).")
    tools: Strings = Field(
        [],
        description=f"--problems: built-in tools the model is told of and whose calls are run ({', '.join(BUILTIN)}; "
        "a model fine-tuned with data.tools): tool_use and tool_call_errors are reported besides.",
    )
    sampling: ProblemSampling = ProblemSampling()
    harness_tasks: Strings = Field([], description="lm-evaluation-harness task names (the eval extra).")
    harness_include: str | None = Field(None, description="A directory of lm-eval task YAMLs of your own.")
    limit: int | None = Field(None, gt=0, description="At most this many examples per task / windows / documents.")
    batch_size: int = Field(8, gt=0, description="Windows per forward pass.")
    parallelism: int | None = Field(None, gt=0, description="Ray tasks per evaluation (default: the cluster's CPUs).")
    name: str = Field("eval", description="The MLflow parent run's name.")
    tracking: TrackingConfig = TrackingConfig()
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _something_to_do(self):
        if not (self.dataset or self.corpus or self.tasks or self.problems or self.harness_tasks):
            raise ValueError("nothing to evaluate: give --dataset, --corpus, --tasks, --problems or --harness_tasks")
        unknown = [t for t in self.tools if t not in BUILTIN]
        if unknown:
            raise ValueError(f"tools {unknown}: the built-in tools are {', '.join(BUILTIN)}")
        if self.tools and not self.problems:
            raise ValueError("tools: only --problems answers with tools")
        bad = [k for k in self.pass_k if not 0 < k <= self.samples]
        if self.problems and bad:
            raise ValueError(f"pass_k {bad}: each k must be in 1..samples={self.samples}")
        if not self.models:
            raise ValueError("models: give at least one model reference")
        return self


def main(cfg: EvalConfig) -> list[ModelResult]:
    uri = tracking_uri(cfg)
    check_reachable(uri)
    storage = cfg.storage.resolved()
    results = []
    with ray_session(cfg.ray):
        for reference in cfg.models:
            model, state, tokenizer_json, _ = read_export(download_model(reference, uri, storage))
            print(f"evaluating {reference} ({type(model).__name__}, {model.n_layers} layers)", flush=True)
            metrics = evaluate(LoadedModel(reference, model, state, tokenizer_json), cfg, storage)
            results.append(ModelResult(reference, metrics, model_tags(reference, uri)))
    markdown, _ = comparison(results)
    print(f"\n{markdown}\n")
    parent = log_to_mlflow(uri, cfg.tracking.experiment, cfg.name, results, yaml.safe_dump(cfg.model_dump(mode="json")))
    print(f"MLflow: run {parent} ({uri}, experiment {cfg.tracking.experiment!r}): eval.md, one child run per model")
    return results


def cli() -> None:
    run_job(main, EvalConfig, __doc__)


if __name__ == "__main__":
    cli()
