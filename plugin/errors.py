"""Errors a user can act on. Each one says which file, key, tensor or value is at fault.

The CLI prints `str(error)` on one line; anything else escaping is a bug and gets a traceback.
"""


class GPTQBridgeError(Exception):
    """Base class: a problem with the user's input, environment or checkpoint, not with gptq-bridge."""


class ConfigError(GPTQBridgeError):
    """The quantization settings are missing or invalid."""


class SourceError(GPTQBridgeError):
    """The model source (directory or hub id) cannot be resolved."""


class CheckpointError(GPTQBridgeError):
    """The weight files are missing, unsafe, truncated, or disagree with the config or the model."""


class KernelError(GPTQBridgeError):
    """No kernel can serve the checkpoint, or the one asked for cannot."""


class QuantizeError(GPTQBridgeError):
    """Quantization cannot start or go on: bad options, source or calibration data."""


class CalibrationError(QuantizeError):
    """The calibration data is missing, unreadable or too short."""
