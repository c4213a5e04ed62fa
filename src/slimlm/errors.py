"""Errors a user can cause, each with the exit code the CLI returns for it.

Exit codes: 0 success, 1 a bug (a traceback), 2 bad input (recipe, files, models, data),
3 a quality gate failed, 4 a stage failed while running (e.g. a non-finite loss), 130 interrupted
by SIGINT (Ctrl-C), 143 stopped by SIGTERM (`docker stop`, Kubernetes, batch schedulers).
"""

import signal


class SlimlmError(Exception):
    """An error whose message is meant for the user: what went wrong and how to fix it."""

    exit_code = 1


class RecipeError(SlimlmError):
    """The recipe (or a --set override) is invalid."""

    exit_code = 2


class SourceError(SlimlmError):
    """A model or data source cannot be found, read or trusted."""

    exit_code = 2


class UnsupportedModelError(SlimlmError):
    """The model's architecture is not one slimlm knows how to handle."""

    exit_code = 2


class RunDirectoryError(SlimlmError):
    """The run directory cannot be used: another live run holds its lock, or it cannot be created or written."""

    exit_code = 2


class GateFailed(SlimlmError):
    """A quality gate between stages did not pass; artifacts are kept."""

    exit_code = 3


class StageFailed(SlimlmError):
    """A stage could not finish (e.g. training diverged); earlier artifacts are kept."""

    exit_code = 4


class PromptTooLong(SlimlmError, ValueError):
    """A prompt does not fit in the model's context window (`max_position_embeddings`)."""

    exit_code = 2


class EmptyPrompt(SlimlmError, ValueError):
    """A prompt that encodes to no tokens: there is nothing to continue."""

    exit_code = 2


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: the run stops where it is, keeps what it finished and its checkpoints, and the
    same command resumes it. A KeyboardInterrupt, so code that cleans up after Ctrl-C cleans up after both."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum


def last_line(proc) -> str:
    """What a failed subprocess said last (its stderr, else its stdout), for a one-line error message."""
    lines = (proc.stderr or proc.stdout or "").strip().splitlines()
    return lines[-1][:300] if lines else "no output"
