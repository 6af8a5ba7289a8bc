"""The planner's one error type: a user mistake in what it was given."""

from __future__ import annotations


class MemoryPlanError(ValueError):
    """A user-fixable problem in what was given to the memory planner (names the value and the fix)."""
