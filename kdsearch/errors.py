"""Errors a user can cause and fix: the CLI prints them as one line and exits 2."""

from __future__ import annotations


class KdsearchError(Exception):
    """Bad user input (a space file, a path, a name). Never a bug in kdsearch.

    The CLI turns it into exactly one line on stderr and exit code 2.
    """

    exit_code = 2


class SpaceError(KdsearchError):
    """A search-space file that is malformed: says which file, which key, what is allowed."""

    def __init__(self, source: str, key: str, message: str):
        self.source = source
        self.key = key
        self.message = message
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {message}")


class RunFailed(KdsearchError):
    """A run that ended without what it was for (a search with no trained trial): not the
    user's input, so the CLI prints its one line and exits 1."""

    exit_code = 1
