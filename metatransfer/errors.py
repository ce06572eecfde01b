"""Exceptions raised for people: each message names the file/key, what was
expected, what was found, and what to do."""


class MetatransferError(Exception):
    """Base class of every error the library raises on purpose."""


class ConfigError(MetatransferError, ValueError):
    """params.yaml (or a config mapping) is invalid."""


class DataError(MetatransferError, ValueError):
    """Input data is missing, corrupt or inconsistent."""


class ChecksumError(DataError):
    """A downloaded or mirrored file does not match its published checksum."""


class EpisodeError(MetatransferError, ValueError):
    """An episode request cannot be met by the split it samples from."""
