"""Typed policy errors. Messages keep Headscale's wording and add where the problem is."""

from __future__ import annotations


class PolicyError(ValueError):
    """The policy cannot be loaded. `errors` holds every problem found (at least one)."""

    def __init__(self, message: str, errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errors = errors if errors is not None else [message]


class PolicyTestError(PolicyError):
    """The policy is valid but its embedded `tests` / `sshTests` fail."""

    def __init__(self, details: list[str]) -> None:
        super().__init__("test(s) failed:\n" + "\n".join(details), details)
        self.details = details
