"""The errors a user can fix: a bad setting, bad input data or a model that does not fit its settings.

The entry point prints a :class:`UserError` as one line naming the setting or file at fault (exit code 2);
any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import re
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


#: what to do about an environment error, by errno
_REMEDIES = {
    errno.ENOSPC: "no space left on the device; free some space (or set paths.outputs to a roomier disk) and rerun the same command",
    errno.EDQUOT: "disk quota exceeded; free some space (or set paths.outputs elsewhere) and rerun the same command",
    errno.EROFS: "read-only file system; make it writable or set paths.outputs to a writable folder, then rerun",
    errno.EACCES: "permission denied; make it writable for this user or set paths.outputs to a writable folder, then rerun",
    errno.EPERM: "operation not permitted; make it writable for this user or set paths.outputs elsewhere, then rerun",
    errno.ENOENT: "vanished while the stage ran (or was never there); restore it, or rerun the stage that writes it, then rerun",
    errno.EIO: "input/output error of the device; check the disk, then rerun the same command",
}


def environment_problem(err: OSError, where) -> str | None:
    """One line for an error of the machine rather than of the code: a full disk, a read-only or unwritable
    folder, a file that vanished under a stage. It names the path (the run folder ``where`` when the error has
    none) and what to do; None for any other ``OSError`` (a bug keeps its traceback).

    Example:
        >>> environment_problem(OSError(errno.ENOSPC, "No space left on device"), "outputs/demo")
        'outputs/demo: no space left on the device; free some space (or set paths.outputs to a roomier disk) and rerun the same command (finished work is kept)'
    """
    code = err.errno
    if code is None:  # pyarrow and others put the errno in the message only
        found = re.search(r"\[errno (\d+)\]", str(err), re.IGNORECASE)
        code = int(found.group(1)) if found else None
    if code not in _REMEDIES:
        return None
    path = err.filename
    if path is None:
        named = re.search(r"'(/[^']+)'", str(err))
        path = named.group(1) if named else where
    return f"{path}: {_REMEDIES[code]} (finished work is kept)"
