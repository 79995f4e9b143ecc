"""The errors a user can fix: a bad setting, bad input data or a model that does not fit its settings.

The entry point prints a :class:`UserError` as one line naming the setting or file at fault (exit code 2);
any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Callable


class UserError(ValueError):
    """Something the user can fix; the message names the setting, file or model at fault."""


class ConfigError(UserError):
    """A setting that is invalid or inconsistent with another; the message names the setting."""


class DatasetError(UserError):
    """A dataset layout that cannot be read at all (missing class file, unknown split, ...)."""


class ModelError(UserError):
    """A model, checkpoint or layer name that cannot be used; the message says which and why."""


class StageFailed(UserError):
    """A stage stopped before it finished its work (``extract.fail_fast``, an earlier stage that failed); the
    message says what is left and how to go on."""


class MissingInput(UserError):
    """What a stage reads (an earlier stage's output) is missing; the message names it and the command that makes it."""


class OutputError(UserError):
    """A file of the run (a part, the index, a statistics table, the ledger) that cannot be read; the message
    names the file and the command that rebuilds it."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a stage; the message says how far it got and that rerunning resumes it.

    ``message`` may be a function, called when the error is printed: by then the stage's cluster is closed, so
    what it counts on disk (the shards published) is final.
    """

    def __init__(self, message: str | Callable[[], str]):
        super().__init__(message if isinstance(message, str) else "interrupted")
        self.message = message

    def __str__(self) -> str:
        return self.message() if callable(self.message) else self.message
