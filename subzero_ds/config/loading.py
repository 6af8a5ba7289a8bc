"""Reading a DeepSpeed JSON config: a path or a dict, a JSON object, no key set twice."""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Mapping

from .errors import ConfigError


def load_ds_config(config: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """Read a DeepSpeed config from a JSON file path or take a copy of a dict.

    Raises:
        ConfigError: the file is missing, unreadable or not a JSON object.
    """
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    path = os.fspath(config)
    try:
        with open(path, encoding="utf-8") as f:
            loaded = json.load(f, object_pairs_hook=_unique_keys)
    except FileNotFoundError:
        raise ConfigError(
            f"DeepSpeed config file {path!r} does not exist. Pass the path of a JSON file "
            f"(e.g. ds_configs/zero3_subzero.json) or a dict."
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"DeepSpeed config {path!r} is a directory. Pass the path of a JSON file in it.") from None
    except OSError as e:
        raise ConfigError(
            f"DeepSpeed config file {path!r} cannot be read ({e.strerror}). Check its permissions."
        ) from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"DeepSpeed config file {path!r} is not UTF-8 text (byte {e.start}): pass a JSON file, saved as UTF-8."
        ) from None
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"DeepSpeed config file {path!r} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}. "
            "Fix the JSON syntax there."
        ) from None
    except _DuplicateKey as e:
        raise ConfigError(
            f"DeepSpeed config file {path!r} sets {e.args[0]!r} twice in the same object; JSON would silently keep "
            "the last one. Remove one of them."
        ) from None
    except RecursionError:
        raise ConfigError(f"DeepSpeed config file {path!r} is nested too deeply to be a DeepSpeed config.") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"DeepSpeed config file {path!r} must hold a JSON object, got {type(loaded).__name__}.")
    return loaded


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result
