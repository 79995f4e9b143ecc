"""One setting's declaration: its default, its one-line doc and the values it allows, in dataclass field metadata.

A setting is a dataclass field made by :func:`setting`; OmegaConf checks its type when the command is composed,
:func:`allowed` says in words what it takes and :func:`problem` finds what is wrong with a value.

Example:
    >>> from dataclasses import dataclass, fields
    >>> @dataclass
    ... class Extract:
    ...     batch_size: int = setting(8, "clips per forward pass", at_least=1)
    >>> spec = fields(Extract)[0].metadata
    >>> problem(spec, 0), allowed(spec)
    ('>= 1', 'an integer >= 1')
"""

from __future__ import annotations

import copy
from dataclasses import field
from typing import Any

from omegaconf import MISSING

_NUMBER_WORDS = {int: "an integer", float: "a number"}


def setting(
    default: Any = MISSING,
    doc: str = "",
    *,
    choices: tuple = (),
    number: type | None = None,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    nullable: bool = False,
) -> Any:
    """A dataclass field holding one setting.

    Args:
        default: the setting's one default (``omegaconf.MISSING``, ``???``: the user must give it).
        doc: one line for ``--help`` and for the error that rejects a value.
        choices: the values allowed (besides a number when ``number`` is set), e.g. ``("auto", True, False)``.
        number: ``int`` or ``float``: a number is allowed too, within ``at_least`` / ``above`` / ``at_most``.
        nullable: ``null`` is allowed too (for fields typed ``Any``; ``Optional[...]`` fields say it themselves).
    """
    if number is None and any(bound is not None for bound in (at_least, above, at_most)):
        number = float if any(isinstance(b, float) for b in (at_least, above, at_most) if b is not None) else int
    metadata = dict(doc=doc, choices=tuple(choices), number=number, at_least=at_least, above=above, at_most=at_most)
    metadata["nullable"] = nullable or default is None
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _word(value) -> str:
    """A value as the command line spells it: true, false, null, auto, 3."""
    if value is None or isinstance(value, bool):
        return {True: "true", False: "false", None: "null"}[value]
    return str(value)


def allowed(spec) -> str:
    """What the setting takes, in words (empty when any value of its type goes)."""
    parts = [" | ".join(_word(c) for c in spec.get("choices", ()))] if spec.get("choices") else []
    number = spec.get("number")
    if number is not None:
        bounds = [
            f"{op} {spec[key]}"
            for key, op in (("at_least", ">="), ("above", ">"), ("at_most", "<="))
            if spec.get(key) is not None
        ]
        parts.append(" ".join([_NUMBER_WORDS[number], " and ".join(bounds)]).strip())
    if spec.get("nullable") and parts:
        parts.append("null")
    return ", or ".join(parts) if len(parts) < 3 else ", ".join(parts[:-1]) + ", or " + parts[-1]


def problem(spec, value) -> str | None:
    """Why ``value`` is not allowed by ``spec`` (a field's metadata), or None when it is."""
    if value is None and spec.get("nullable"):
        return None
    choices, number = spec.get("choices", ()), spec.get("number")
    if not choices and number is None:
        return None
    if any(value == c and type(value) is type(c) for c in choices):  # True is not 1, "1" is not 1
        return None
    if number is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
        if number is int and not float(value).is_integer():
            return "not an integer"
        for key, op, fails in (
            ("at_least", ">=", lambda v, b: v < b),
            ("above", ">", lambda v, b: v <= b),
            ("at_most", "<=", lambda v, b: v > b),
        ):
            if spec.get(key) is not None and fails(value, spec[key]):
                return f"{op} {spec[key]}"
        return None
    return "not one of the allowed values"
