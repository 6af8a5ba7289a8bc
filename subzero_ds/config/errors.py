"""The one error a user's configuration raises, and how its problems are written."""

from __future__ import annotations

from typing import Any, Iterable

SECTION = "subzero"


class ConfigError(ValueError):
    """A user-fixable problem in the DeepSpeed/subzero configuration (all problems at once)."""


def shown(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut short so that one huge value cannot bury the rest of the message."""
    return cut(repr(value), limit)


def cut(text: str, limit: int) -> str:
    """``text``, ending in "..." if it is longer than ``limit`` characters."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def raise_problems(problems: Iterable[str], source: str) -> None:
    """Raise one :class:`ConfigError` listing every problem (none: return)."""
    problems = list(problems)
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"found the following errors in {source}:\n{listing}")


def describe_validation_error(error: Any, prefix: str, descriptions: dict[str, str] | None = None) -> list[str]:
    """One line per key of a pydantic ``ValidationError`` (the first error of each key), naming
    ``prefix.key``, the bad value and what is expected."""
    first_per_key = {err["loc"][:1]: err for err in reversed(error.errors())}  # betas.0 and betas.1: one line
    lines = []
    for err in reversed(first_per_key.values()):
        key = ".".join([prefix, *map(str, err["loc"][:1])])
        expected = (descriptions or {}).get(str(err["loc"][0]) if err["loc"] else "", "")
        message = err["msg"].removeprefix("Value error, ")
        lines.append(f"`{key}`: {message[:1].lower() + message[1:]}, got {shown(err['input'])}."
                     + (f" Expected: {expected}" if expected else ""))
    return lines
