"""The package's error classes: every error that means "the input or the environment was wrong".

All derive from `Ssm2dError`, which the command line reports as one line (a bug inside the
library, any other exception, keeps its traceback). Each also derives from the built-in class
the code raised before these existed, so that `except ValueError` / `except RuntimeError` in a
user's code keeps working.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "DatasetError", "MissingFileError", "NonFiniteLossError", "Ssm2dError"]


class Ssm2dError(Exception):
    """Base class of the errors ssm2d raises for bad input, bad files or a diverging run."""


class ConfigError(Ssm2dError, ValueError):
    """A configuration, command-line value or run folder that cannot be used, with what was expected."""


class DatasetError(Ssm2dError, RuntimeError):
    """A data set is missing or corrupt; the message says what was expected where, and how to get it."""


class CheckpointError(Ssm2dError, RuntimeError):
    """A checkpoint file that is missing, unreadable or not one of ssm2d's."""


class MissingFileError(Ssm2dError, FileNotFoundError):
    """A file or folder named by an argument does not exist (or holds nothing usable); the message names the argument."""


class NonFiniteLossError(Ssm2dError, FloatingPointError):
    """The training loss became NaN or infinite; training stopped before the optimizer step."""
