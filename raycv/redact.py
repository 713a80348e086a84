"""Secrets kept out of what raycv writes: the values of secret-like config keys become
``***`` in run folders' config.yaml, manifests, checkpoints and config error messages.

A key is secret-like by its name parts (split at ``_``, ``-``, ``.`` and camelCase):
``storage_token``, ``db_password``, ``aws_secret_access_key``, ``apiKey``. ``key`` counts
only as the last part, so ``api_key`` is a secret while ``key_file``, ``keep`` and
``metric`` are not. A redacted file cannot give the secret back: ``unredact`` takes it
from the config the user gives again (see ``raycv.config.load_saved``)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

REDACTED = "***"
SECRET_PARTS = frozenset(
    {
        "token",
        "password",
        "passwords",
        "passwd",
        "passphrase",
        "secret",
        "secrets",
        "apikey",
        "credential",
        "credentials",
    }
)
_PART = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")


class MissingSecretError(KeyError):
    """A value written as ``***`` that the config given now does not hold."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def name_parts(name: str) -> list[str]:
    return [part.lower() for part in _PART.findall(name)]


def is_secret(name: str) -> bool:
    parts = name_parts(name)
    return bool(parts) and (parts[-1] == "key" or not SECRET_PARTS.isdisjoint(parts))


def redact(value: Any) -> Any:
    """A copy of ``value`` (mappings and lists walked) with every secret-like key's value,
    unless None, replaced by ``***``."""
    if isinstance(value, Mapping):
        return {
            k: REDACTED if is_secret(str(k)) and v is not None else redact(v)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


def unredact(saved: Any, given: Any, where: str = "") -> Any:
    """``saved`` (a redacted mapping) with each ``***`` under a secret-like key replaced by
    the value at the same place in ``given``; MissingSecretError names the first key that
    ``given`` lacks."""
    if isinstance(saved, Mapping):
        given = given if isinstance(given, Mapping) else {}
        return {k: _unredact_item(k, v, given.get(k), where) for k, v in saved.items()}
    if isinstance(saved, (list, tuple)):
        given = given if isinstance(given, (list, tuple)) else ()
        return type(saved)(
            unredact(v, given[i] if i < len(given) else None, f"{where}[{i}]")
            for i, v in enumerate(saved)
        )
    return saved


def _unredact_item(key: Any, value: Any, given: Any, where: str) -> Any:
    path = f"{where}.{key}" if where else str(key)
    if value != REDACTED or not is_secret(str(key)):
        return unredact(value, given, path)
    if given is None or given == REDACTED:
        raise MissingSecretError(path)
    return given
