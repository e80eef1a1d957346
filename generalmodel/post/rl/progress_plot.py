"""What the RL job prints and logs at the end: held-out accuracy from the first evaluation (the
starting model) to the last, and the plot of accuracy, reward and the zero-variance groups vs step."""

from __future__ import annotations

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
    return {"accuracy_start": start, "accuracy_end": end, "accuracy_ratio": ratio}
