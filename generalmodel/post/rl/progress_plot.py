"""What the RL job prints and logs at the end: held-out accuracy from the first evaluation (the
starting model) to the last — with rl.eval_samples, pass@1 greedy and sampled, pass@k and the share
of the greedy -> pass@k gap closed — and the plot of accuracy, reward and the zero-variance groups
vs step."""

from __future__ import annotations

from generalmodel.post.rl.learner import gap_k, pass_ks
from generalmodel.train.job import Trained

PLOT = "rl_progress.png"


def accuracy_report(trained: Trained, uri: str) -> dict[str, float]:
    """{"accuracy_start", "accuracy_end", "accuracy_ratio"} from the run's heldout_accuracy history
    (empty when rl.eval_prompts=0); the plot goes to the run as rl_progress.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)

    def history(key: str) -> list[tuple[int, float]]:
        return sorted({m.step: m.value for m in client.get_metric_history(trained.run_id, key)}.items())

    accuracy = history("heldout_accuracy")
    fig, (ax_acc, ax_reward) = plt.subplots(1, 2, figsize=(11, 4))
    if accuracy:
        ax_acc.plot(*zip(*accuracy, strict=True), marker="o")
    ax_acc.set(xlabel="step", ylabel="held-out accuracy (greedy)", title=trained.cfg.train.run_name, ylim=(0, None))
    for key, label in (("reward_mean", "rollout reward (mean)"), ("zero_variance_groups", "groups with no variance")):
        points = history(key)
        if points:
            ax_reward.plot(*zip(*points, strict=True), label=label)
    ax_reward.set(xlabel="step")
    ax_reward.legend()
    fig.tight_layout()
    client.log_figure(trained.run_id, fig, PLOT)
    plt.close(fig)
    if not accuracy:
        return {}
    (first_step, start), (last_step, end) = accuracy[0], accuracy[-1]
    ratio = end / start if start > 0 else float("inf") if end > 0 else 1.0
    if start > 0:
        client.log_metric(trained.run_id, "heldout_accuracy_ratio", ratio)
    print(
        f"held-out accuracy: step {first_step} {start:.1%} -> step {last_step} {end:.1%} "
        f"({ratio:.2f}x; plot: run artifact {PLOT})"
    )
    out = {"accuracy_start": start, "accuracy_end": end, "accuracy_ratio": ratio}
    n = trained.cfg.rl.eval_samples
    at_k = {k: dict(history(f"heldout_pass{k}")) for k in pass_ks(n)} if n else {}
    if at_k and len(at_k[gap_k(n)]) >= 2:
        out.update(pass_report(dict(accuracy), dict(history("heldout_pass1_sampled")), at_k, gap_k(n)))
        if "gap_closed" in out:
            client.log_metric(trained.run_id, "heldout_gap_closed", out["gap_closed"])
    return out


def pass_report(
    greedy: dict[int, float], sampled: dict[int, float], at_k: dict[int, dict[int, float]], gap: int
) -> dict:
    """Print pass@1 (greedy, sampled) and each pass@k (k -> {step: value}) at the first and the last
    step that measured them, and the share of the first's greedy -> pass@`gap` gap the greedy answer
    closed by the last."""
    first, last = min(at_k[gap]), max(at_k[gap])
    rows = {"pass@1 greedy": greedy, "pass@1 sampled": sampled, **{f"pass@{k}": v for k, v in sorted(at_k.items())}}
    print(f"held-out, step {first} -> step {last}:")
    for name, values in rows.items():
        print(f"  {name:<15} {values[first]:.1%} -> {values[last]:.1%}")
    out = {"pass1_start": greedy[first], "pass1_end": greedy[last]}
    for k, values in at_k.items():
        out.update({f"pass{k}_start": values[first], f"pass{k}_end": values[last]})
    width = at_k[gap][first] - greedy[first]
    if width > 0:
        out["gap_closed"] = (greedy[last] - greedy[first]) / width
        print(f"  greedy pass@1 -> pass@{gap} gap closed: {out['gap_closed']:+.2f} (of {width:.1%})")
    else:
        print(f"  no pass@1 -> pass@{gap} gap at step {first}: nothing to close")
    return out
