"""What a post-training job prints and logs at the end: held-out answer accuracy (exact match)
of the model it started from and of the model it made, on the same questions; for DPO, the
held-out preference accuracy."""

from __future__ import annotations

import logging

from generalmodel.infer.export import build_with_state, load_model
from generalmodel.post.answers import answer_accuracy, heldout_questions, preference_accuracy
from generalmodel.train.init_from import InitSource
from generalmodel.train.job import Trained

log = logging.getLogger(__name__)


def answers_before_after(trained: Trained, stage: str, before: dict[str, InitSource], uri: str) -> dict[str, float]:
    """Exact-match accuracy of each model in `before` and of the trained one (`stage`: sft, dpo)
    on the held-out questions; printed, and logged to the trained model's MLflow run
    (heldout_exact_match, and heldout_exact_match_<label> for the others)."""
    from mlflow.tracking import MlflowClient

    cfg = trained.cfg
    if cfg.train.answer_eval == 0:
        return {}
    questions = heldout_questions(cfg, cfg.train.answer_eval)
    if not questions:
        print("held-out answers: the val split has no question (raise data.val_fraction)")
        return {}
    scores = {}
    for label, source in before.items():
        model, _ = build_with_state(source.model, source.state, source.tokenizer_json, source.reference)
        scores[label] = answer_accuracy(model, source.tokenizer_json, questions).accuracy
    model, tokenizer = load_model(trained.export_dir)
    result = answer_accuracy(model, tokenizer.to_str(), questions)
    scores[stage] = result.accuracy
    client = MlflowClient(uri)
    client.log_metric(trained.run_id, "heldout_exact_match", result.accuracy)
    for label, value in scores.items():
        if label != stage:
            client.log_metric(trained.run_id, f"heldout_exact_match_{label}", value)
    steps = " -> ".join(f"{label} {value:.1%}" for label, value in scores.items())
    print(f"held-out exact match ({len(questions)} questions): {steps}")
    for question, expected, got in result.examples[:3]:
        print(f"  {question[:70]!r}: expected {expected!r}, {stage} answered {got!r}")
    return scores


def preference_report(trained: Trained, reference: InitSource, uri: str) -> float:
    """Held-out preference accuracy of the trained policy against `reference` (the model DPO
    started from): printed and logged as heldout_preference_accuracy."""
    from mlflow.tracking import MlflowClient

    from generalmodel.data.loader import TokenDataset

    policy, _ = load_model(trained.export_dir)
    ds = TokenDataset.open(trained.layout.dataset, trained.layout.storage)
    frozen = None
    if trained.layout.reference is not None:  # computed once already: not scored again here
        ds.attach_published(trained.layout.reference, trained.layout.storage)
    else:
        frozen, _ = build_with_state(reference.model, reference.state, reference.tokenizer_json, reference.reference)
    accuracy, pairs = preference_accuracy(policy, frozen, ds)
    print(f"held-out preference accuracy ({pairs} pairs): {accuracy:.1%} (the DPO reward prefers the chosen answer)")
    MlflowClient(uri).log_metric(trained.run_id, "heldout_preference_accuracy", accuracy)
    return accuracy
