"""Where ``hfserve start`` finds its API keys: ``--api-key`` (repeatable), ``HFSERVE_API_KEY``, and
``--api-key-file`` (one key per line; blank lines and ``#`` comments ignored). A service should use
the variable or the file: a command-line argument is visible to every local user in ``ps``."""

from __future__ import annotations

import os
from pathlib import Path

from cli.preflight import ConfigError
from sanic_serve.auth import VALID_KEY

ENV = "HFSERVE_API_KEY"


def _checked(key: str, where: str) -> str:
    if not VALID_KEY.fullmatch(key):
        # Never the key itself in the message: it may be close to a real one.
        raise ConfigError(
            f"an API key from {where} is not usable: keys are 1 to 512 printable ASCII characters, no spaces"
        )
    return key


def load_api_keys(given: list[str], key_file: Path | None) -> tuple[str, ...]:
    keys = [_checked(k, "--api-key") for k in given]
    from_env = os.environ.get(ENV, "").strip()
    if from_env:
        keys.append(_checked(from_env, ENV))
    if key_file is not None:
        try:
            lines = key_file.read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"--api-key-file {key_file}: {exc.strerror or exc}") from exc
        found = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not found:
            raise ConfigError(f"--api-key-file {key_file} holds no key")
        keys += [_checked(k, f"--api-key-file {key_file}") for k in found]
    return tuple(dict.fromkeys(keys))
