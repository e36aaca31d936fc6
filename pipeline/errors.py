"""The two kinds of failure a stage reports, mapped to the exit codes of docs/design.md §10."""


class InputError(Exception):
    """Unusable input or configuration: exit status 2, nothing written."""

    exit_code = 2


class CheckFailed(Exception):
    """A gate or check failed on usable input: exit status 1."""

    exit_code = 1


class ServiceUnavailable(Exception):
    """A service (the MLflow server, a DVC remote) could not be reached: exit status 3, worth a retry."""

    exit_code = 3


class DriftFound(CheckFailed):
    """`monitor`: thresholds crossed, retraining called for: exit status 1, the summary on stdout."""
