"""lm-evaluation-harness on our own models (the optional `eval` extra: `pip install
generalmodel[eval]`): an `lm_eval` model whose log-likelihoods come from the same scorer and Ray
tasks as our own evaluation, so any harness task runs on a native model — standard tasks by name
when online (`--harness_tasks='[hellaswag, arc_easy]'`), or task YAMLs of your own
(`--harness_include=DIR`, e.g. over a local jsonl)."""

from __future__ import annotations

from typing import Any

from generalmodel import UserError


def _lm_class():
    try:
        from lm_eval.api.model import LM
    except ImportError:
        raise UserError("harness_tasks need lm-evaluation-harness: pip install 'generalmodel[eval]'") from None

    class GeneralModelLM(LM):
        def __init__(self, loaded, scorer):
            super().__init__()
            self.loaded, self.scorer = loaded, scorer
            self.model, self.tokenizer = loaded.build()

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            return self.scorer.loglikelihoods([tuple(r.args[:2]) for r in requests])

        def loglikelihood_rolling(self, requests) -> list[float]:
            from generalmodel.data.tokenizer import eos_id
            from generalmodel.eval.scoring import corpus_windows

            out = []
            for r in requests:
                windows = corpus_windows(
                    self.tokenizer, [r.args[0]], self.loaded.cfg.max_seq_len, eos_id(self.tokenizer)
                )
                out.append(-self.scorer.windows(windows).nats)
            return out

        def generate_until(self, requests) -> list[str]:
            from generalmodel.data.tokenizer import eos_id
            from generalmodel.infer import SamplingParams, generate

            out = []
            for r in requests:
                context, options = r.args[0], (r.args[1] if len(r.args) > 1 else {}) or {}
                until = options.get("until") or []
                params = SamplingParams(temperature=0, max_new_tokens=options.get("max_gen_toks", 128))
                ids = self.tokenizer.encode(context, add_special_tokens=False).ids
                text = self.tokenizer.decode(list(generate(self.model, ids, params, eos_id(self.tokenizer))))
                cut = min([text.index(s) for s in until if s in text], default=len(text))
                out.append(text[:cut])
            return out

    return GeneralModelLM


def run_harness(loaded, tasks: list[str], limit: int | None, scorer, include: str | None = None) -> dict[str, Any]:
    """`tasks` through lm-eval on the model; metrics as `harness.<task>.<metric>`."""
    lm = _lm_class()(loaded, scorer)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(
        model=lm, tasks=list(tasks), limit=limit, task_manager=TaskManager(include_path=include), log_samples=False
    )
    metrics = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            name = key.split(",")[0]  # "acc,none" → "acc"
            if isinstance(value, int | float) and not name.endswith("_stderr") and name != "alias":
                metrics[f"harness.{task}.{name}"] = float(value)
    return metrics
