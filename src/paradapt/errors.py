"""Exceptions raised by paradapt.

Every error a user can cause names the field, adapter or file at fault, so a bad
config or a broken folder never surfaces as a stack trace from deep inside torch.
"""

from __future__ import annotations


class ParadaptError(Exception):
    """Base class of every error paradapt raises on purpose."""


class ConfigError(ParadaptError, ValueError):
    """A config field has a bad value. ``field`` names it."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message  # ``message``: without the field, to re-prefix it
        super().__init__(f"{field}: {message}")


class TargetNotFoundError(ConfigError):
    """A target pattern matched no module of the model."""


class AdapterExistsError(ParadaptError, ValueError):
    """An adapter name is already in use on this model."""


class AdapterNotFoundError(ParadaptError, KeyError):
    """No adapter of that name is on this model."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class IncompatibleAdapterError(ParadaptError, ValueError):
    """An adapter does not fit this model. ``field`` names the mismatch."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class AdapterFileError(ParadaptError, OSError):
    """An adapter folder or file is missing, truncated or malformed. ``path`` names it."""

    def __init__(self, path: str, message: str):
        self.path = str(path)
        super().__init__(f"{path}: {message}")


class MergeError(ParadaptError, ValueError):
    """An adapter cannot be merged (or unmerged) in its current state."""


class QuantizationError(ParadaptError, ValueError):
    """A model or layer cannot be quantised (or a quantised layer used) as asked; names the layer."""


class RoutingError(ParadaptError, ValueError):
    """A route or composition cannot be applied to this batch."""


class SetupError(ParadaptError):
    """Something the environment should provide is missing or wrong: ``$PARADAPT_ASSETS`` names
    no folder, or the package that ships the default model is not installed. The message says
    how to fix it."""


def one_line(error: BaseException) -> str:
    """``error``'s message on one line (its class name if it has none): how the command line
    prints an error, and how a load failure is quoted inside another message."""
    return " ".join(str(error).split()) or type(error).__name__
