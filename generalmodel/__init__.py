"""GeneralModel: prepare corpora, pretrain, sweep and track language models on Ray.

One subpackage per stage of the flow (see docs/architecture.md): config → storage → data → train → …
A stage imports the ones before it, never after.
"""

__version__ = "0.1.0"


class RunFailed(RuntimeError):
    """A run that started and then failed for good: diverged, retries exhausted, storage outage.

    Jobs print its one-line message and exit 1 (a UserError exits 2); the MLflow run is FAILED.
    """


class UserError(ValueError):
    """A mistake in the user's input (config, paths, credentials, data).

    Jobs print its message and exit non-zero without a traceback; its text must name the
    offending key/file/value and say what was expected.
    """
