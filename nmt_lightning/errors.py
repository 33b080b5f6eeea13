"""Exceptions with messages meant for the person running a command.

Both are ``ValueError``s, so ``except ValueError`` still catches every refused input; catch
one of them to tell bad data from a bad model file."""

from compression_contract.checkpoints import CheckpointError


class CorpusError(ValueError):
    """Bad or missing input data (corpora, references, translations). The message names the file
    (and line) at fault."""


class ModelFileError(CheckpointError):
    """A checkpoint or exported model that cannot be read, may not be read (it holds Python
    objects), or is not the model asked for. The message is one line naming the file."""
