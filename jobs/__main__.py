"""`gm JOB [options]` (or `python -m jobs JOB ...`): run one of the jobs by name."""

from __future__ import annotations

import importlib
import sys

JOBS = {
    "prepare-data": "jobs.prepare_data",
    "pretrain": "jobs.pretrain",
    "sft": "jobs.sft",
    "dpo": "jobs.dpo",
    "rl": "jobs.rl",
    "coconut": "jobs.coconut",
    "quiet-star": "jobs.quiet_star",
    "arithmetic": "jobs.arithmetic",
    "reasoning": "jobs.reasoning",
    "sotu-qa": "jobs.sotu_qa",
    "index": "jobs.index",
    "sweep": "jobs.sweep",
    "sample": "jobs.sample",
    "serve": "jobs.serve",
    "export": "jobs.export",
    "eval": "jobs.eval",
    "interp": "jobs.interp",
    "cluster": "jobs.cluster",
    "submit-k8s": "jobs.submit_k8s",
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in JOBS:
        listing = "\n".join(f"  gm {name:<13} {_summary(module)}" for name, module in JOBS.items())
        print(f"usage: gm JOB [--config PRESET.yaml] [--section.key=value ...] [--help]\n\njobs:\n{listing}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown job {argv[0]!r}", file=sys.stderr)
            raise SystemExit(2)
        raise SystemExit(0 if argv else 2)
    module = importlib.import_module(JOBS[argv[0]])
    sys.argv = [f"gm {argv[0]}", *argv[1:]]
    module.cli()


def _summary(module: str) -> str:
    doc = importlib.import_module(module).__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


if __name__ == "__main__":
    main()
