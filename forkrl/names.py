"""Config values that name an entry of a registry (the plain dict literals at the bottom of forkrl's modules).

``named(REGISTRY, "what")`` is the type of such a value: a str checked, when the config is validated, against the
registry as it is then (so a name registered later is valid too), whose error lists the valid names. Config
sections use it instead of a ``Literal`` that would repeat a registry's keys.
"""

from __future__ import annotations

from typing import Annotated, Mapping

from pydantic import AfterValidator


def named(registry: Mapping, what: str, *, extra: tuple[str, ...] = ()):
    """A str that must name an entry of ``registry`` (or be one of ``extra``, e.g. "none")."""

    def check(value: str) -> str:
        if value not in extra and value not in registry:
            valid = ", ".join(repr(v) for v in (*extra, *registry))
            raise ValueError(f"unknown {what} {value!r}; valid: {valid}")
        return value

    return Annotated[str, AfterValidator(check)]
