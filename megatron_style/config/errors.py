"""The one exception of the configuration layer, and the check that raises it."""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration key has a bad value, or does not exist. The message starts with the
    key (`data.micro_batch_size: ...`) and says what would be accepted."""


def check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")
