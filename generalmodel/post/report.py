"""What a post-training job prints and logs at the end: held-out answer accuracy (exact match)
of the model it started from and of the model it made, on the same questions."""

from __future__ import annotations

import logging

from generalmodel.infer.sampling import build_with_state, load_model
from generalmodel.post.answers import answer_accuracy, heldout_questions
from generalmodel.train.init import InitSource
from generalmodel.train.job import Trained

log = logging.getLogger(__name__)


def answers_before_after(trained: Trained, before: dict[str, InitSource], uri: str) -> dict[str, float]:
    """Exact-match accuracy of each model in `before` and of the trained one on the held-out
    questions; printed, and logged to the trained model's MLflow run (heldout_exact_match, and
    heldout_exact_match_<label> for the others)."""
    from mlflow.tracking import MlflowClient

    cfg = trained.cfg
    if cfg.train.answer_eval == 0:
        return {}
    questions = heldout_questions(cfg, cfg.train.answer_eval)
    if not questions:
        print("held-out answers: the val split has no question (raise data.val_fraction)")
        return {}
    stage = cfg.tracking.registered_model.rsplit("-", 1)[-1]
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
