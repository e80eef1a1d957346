"""The two kinds of failure every job reports (generalmodel.cli maps them to exit codes)."""


class RunFailed(RuntimeError):
    """A run that started and then failed for good: diverged, retries exhausted, storage outage.

    Jobs print its one-line message and exit 1 (a UserError exits 2); the MLflow run is FAILED.
    """


class UserError(ValueError):
    """A mistake in the user's input (config, paths, credentials, data).

    Jobs print its message and exit non-zero without a traceback; its text must name the
    offending key/file/value and say what was expected.
    """
