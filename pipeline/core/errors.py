"""The errors a user can fix: each message names the file, key or value at fault.

Every stage turns these into one ``error:`` line (``pipeline.core.stage``); anything else is a bug and
keeps its traceback. Torch-free, so that catching them imports nothing heavy.
"""


class PipelineError(ValueError):
    """Bad input or a missing artifact; the message says which and what to do."""


class ParamsError(PipelineError):
    """A params file or section is invalid; the message names the file and key."""


class CheckpointError(PipelineError):
    """A checkpoint directory is missing, malformed or incompatible. The message names the file."""


class DataError(PipelineError):
    """Bad input data; the message names the file or example."""


class CacheError(PipelineError):
    """A cache is damaged, incomplete or incompatible; the message names the file."""


class TrainingError(PipelineError):
    """Training diverged (a non-finite loss or weights); the message names the params key to change."""


class OutputError(PipelineError):
    """An output cannot be written (a full disk or quota, a read-only file system, no permission); the
    message names the path."""
