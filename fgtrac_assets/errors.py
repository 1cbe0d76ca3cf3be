"""The errors a user can fix: FgtracError and its generic kinds (imports nothing of the project).

Only a FgtracError becomes a one-line failure (`fgtrac: <message>`, exit status 2, in the CLI; a failed
step without a traceback in Dagster). Every other exception is a bug and keeps its traceback. A module
with errors of its own derives them from FgtracError; where callers catch the builtin (ValueError,
OSError, ...) the class keeps that as its second base.
"""


class FgtracError(Exception):
    """An error the user can fix; shown as one line, without a traceback."""


class InputError(FgtracError, ValueError):
    """Bad input the user gave: an argument, a setting, a configuration value or the content of a file."""


class MissingInput(FgtracError, FileNotFoundError):
    """A file or directory the user named (a source, a receipt, a folder to serve) does not exist."""


class StorageError(FgtracError, OSError):
    """A file fgtrac writes or reads for the user failed at the operating system (disk full, not writable)."""
