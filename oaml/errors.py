"""Exceptions raised by oaml. Every message names the problem and how to fix it."""


class OamlError(Exception):
    """Base class of all errors raised deliberately by oaml."""


class ConfigError(OamlError, ValueError):
    """A configuration value or key is invalid."""


class DataError(OamlError):
    """A dataset is missing, incomplete or corrupt."""


class ShapeError(OamlError, ValueError):
    """Arrays or models do not have the shapes that belong together."""


class BankError(OamlError):
    """A feature/outlier bank is missing, incomplete or was made by something else."""


class NonFiniteError(OamlError, FloatingPointError):
    """A loss, score or feature became NaN or infinite."""
