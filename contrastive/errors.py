"""The error a wrong setting raises, at the bottom of the package so that every layer can raise it."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value that cannot work, with the key that holds it in the message."""
