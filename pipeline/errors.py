"""The errors a user can fix: a bad setting, bad input data or a model that does not fit its settings.

The entry point prints a :class:`UserError` as one line naming the setting or file at fault (exit code 2);
any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


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
