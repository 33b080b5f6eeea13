"""Exceptions with messages meant for the person running a command."""


class CorpusError(ValueError):
    """Bad or missing input data. The message names the file (and line) at fault."""
