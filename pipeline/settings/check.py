"""Checking a whole command against the schema, and saying in one line what is wrong.

:func:`check` runs on the composed configuration before any stage (every section, whichever stages the command
names); :func:`composition_error` turns what Hydra raises while composing (a misspelt key, a value of the wrong
type, an unknown group option) into the same kind of line, with the nearest valid name (difflib).

Example:
    >>> nearest("batch_sise", ["batch_size", "num_workers"])
    'batch_size'
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Iterable, Iterator

from hydra.errors import MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from pipeline.errors import ConfigError
from pipeline.settings.fields import allowed, problem


def nearest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to a misspelt ``name`` (difflib's ratio >= 0.6), or None."""
    found = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1, cutoff=0.6)
    return found[0] if found else None


def settings_of(node: DictConfig, prefix: str = "") -> Iterator[tuple[str, DictConfig, dataclasses.Field]]:
    """Every setting of ``node`` that its schema declares: (dotted key, the node holding it, its field)."""
    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):
        return
    for spec in dataclasses.fields(schema):
        if spec.name not in node or OmegaConf.is_missing(node, spec.name):
            continue
        key = f"{prefix}{spec.name}"
        value = node._get_node(spec.name)
        if isinstance(value, DictConfig) and not value._is_none():
            yield from settings_of(node[spec.name], key + ".")
        else:
            yield key, node, spec


def check(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` (one line: the setting, the value, what is allowed) at the first value the schema
    does not allow. Types were checked when Hydra composed the command; here: choices and ranges."""
    for key, node, spec in settings_of(cfg):
        value = node[spec.name]
        why = problem(spec.metadata, value)
        if why is not None:
            shown = OmegaConf.to_container(value) if isinstance(value, DictConfig) else value
            raise ConfigError(f"{key}={_spell(shown)}: not allowed; {key} takes {allowed(spec.metadata)}")


def _spell(value) -> str:
    return (
        {True: "true", False: "false", None: "null"}[value] if value is None or isinstance(value, bool) else str(value)
    )


def composition_error(err: BaseException) -> str | None:
    """One line for an error Hydra raised composing the command, or None when it is not about the settings."""
    cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
    if isinstance(err, MissingConfigException) and err.missing_cfg_file:
        return _unknown_option(err)
    if isinstance(err, OverrideParseException):
        return f"cannot read the command line: {str(err).splitlines()[0]}"
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.full_key:
        return _unknown_key(cause)
    if isinstance(cause, ValidationError) and cause.full_key:
        return _bad_type(cause)
    if isinstance(cause, OmegaConfBaseException) or "override" in str(err).lower():
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        return f"{first.rstrip('.')}" + (f": {str(cause).splitlines()[0]}" if cause is not err else "")
    return None


def _unknown_key(cause: ConfigKeyError | ConfigAttributeError) -> str:
    full_key = str(cause.full_key)
    prefix, _, name = full_key.rpartition(".")
    parent = cause.parent_node
    keys = [str(k) for k in parent if k != "hydra"] if isinstance(parent, DictConfig) else []
    match = nearest(name, keys)
    where = f"{prefix}." if prefix else ""
    if match:
        return f"{full_key}: no such setting; did you mean {where}{match}?"
    elsewhere = _in_other_options(prefix, name)
    if elsewhere:
        return f"{full_key}: no such setting of this {prefix} option; {elsewhere}"
    return f"{full_key}: no such setting; {prefix or 'the top level'} has {', '.join(keys) or 'no settings'}"


def _in_other_options(group: str, name: str) -> str | None:
    """Which options of ``group`` have the setting ``name``, with what it takes (``method.combine``: fusion's)."""
    from pipeline.settings.groups import OPTIONS

    holders = {}
    for option, schema in OPTIONS.get(group, {}).items():
        for spec in dataclasses.fields(schema):
            if spec.name == name:
                holders[option] = spec
    if not holders:
        return None
    option, spec = next(iter(holders.items()))
    words = allowed(spec.metadata)
    takes = f" and takes {words}" if words else ""
    return f"it is a setting of {group}={' | '.join(holders)}{takes} (e.g. {group}={option} {group}.{name}=...)"


def _bad_type(cause: ValidationError) -> str:
    full_key = str(cause.full_key)
    parent, name = cause.parent_node, str(cause.full_key).rpartition(".")[2]
    schema = OmegaConf.get_type(parent) if isinstance(parent, DictConfig) else None
    specs = {f.name: f for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else {}
    message = str(cause.msg).splitlines()[0]
    value = re.match(r"Value '(.*?)' of type", message) or re.search(r"Invalid value '(.*?)'", message)
    shown = f"={value.group(1)}" if value else ""
    if name in specs:
        spec = specs[name]
        words = allowed(spec.metadata) or _TYPE_WORDS.get(_base(spec.type), f"a {_base(spec.type)}")
        return f"{full_key}{shown}: not allowed; {full_key} takes {words}"
    return f"{full_key}{shown}: {message}"


_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _base(annotation) -> str:
    text = str(annotation).replace("typing.", "")
    return re.sub(r"^Optional\[(.*)\]$", r"\1", text)


def _unknown_option(err: MissingConfigException) -> str:
    group, _, option = str(err.missing_cfg_file).rpartition("/")
    options = list(err.options or [])
    match = nearest(option, options)
    hint = f"did you mean {group}={match}? " if match else ""
    if not group:
        return f"{err.missing_cfg_file}: no such config"
    return f"{group}={option}: no such option; {hint}(options: {', '.join(options)})"
