"""The package version, in a module of its own so that the command line reads it without the public API."""

__version__ = "0.1.0"
