"""Every setting of the pipeline, in one schema: Hydra structured configs registered in Hydra's ConfigStore.

- :mod:`pipeline.settings.schema`: the top-level sections (``extract.batch_size``, ``index.probe_batch``, ...);
- :mod:`pipeline.settings.groups`: the options of the config groups (``dataset=ucf101``, ``method=fusion``, ...);
- :mod:`pipeline.settings.check`: the whole command checked before any stage, one line per problem;
- :mod:`pipeline.settings.fields`: how a setting is declared.

``conf/config.yaml`` uses the schema as its base (``defaults: [settings, ...]``) and only picks group options and
overrides; each group option's YAML names its schema (``/schema/<group>/<option>@_here_``). Importing this
package registers everything (``python -m pipeline`` and ``tests/helpers/config.py`` do).

Adding a setting is one line in its section's dataclass, e.g. in ``schema.Evaluate``::

    protocol: str = setting("ours", "which deletion protocol: ours | li2021", choices=("ours", "li2021"))

Its type is checked when Hydra composes the command, its ``choices`` / ``at_least`` / ``above`` / ``at_most``
by :func:`check`, and ``--help`` lists it with its doc. A new group option: its YAML plus one entry in
:data:`pipeline.settings.groups.OPTIONS` (a new dataclass only when it has settings of its own).
Cross-setting rules that are not a value's type or range stay in the stages' ``check_settings`` / ``validate``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hydra.core.config_store import ConfigStore

from pipeline.settings.check import check, composition_error, nearest
from pipeline.settings.fields import allowed, setting
from pipeline.settings.groups import OPTIONS
from pipeline.settings.schema import Settings

__all__ = ["Settings", "allowed", "check", "composition_error", "help_text", "nearest", "register", "setting"]

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
USAGE = (
    "python -m pipeline stage=<index|extract|stats|evaluate|report|all|train|demo> [group=option] [setting=value ...]"
)


def _rows(schema: type, prefix: str = "") -> list[tuple[str, str, str]]:
    rows = []
    for spec in dataclasses.fields(schema):
        if dataclasses.is_dataclass(spec.type) or (isinstance(spec.type, str) and spec.type in _NESTED):
            rows += _rows(_NESTED.get(spec.type, spec.type), f"{prefix}{spec.name}.")
            continue
        if spec.name == "_target_" or spec.name in OPTIONS:
            continue
        if spec.default is not dataclasses.MISSING:
            default = spec.default
        elif spec.default_factory is not dataclasses.MISSING:
            default = spec.default_factory()
        else:
            default = "???"
        words = allowed(spec.metadata)
        doc = spec.metadata.get("doc", "") + (
            f" [{words}]" if words and words not in spec.metadata.get("doc", "") else ""
        )
        rows.append((f"{prefix}{spec.name}", _spelt(default), doc))
    return rows


def _spelt(value) -> str:
    if value is None or isinstance(value, bool):
        return {True: "true", False: "false", None: "null"}[value]
    return str(value)


def _nested() -> dict[str, type]:
    from pipeline.settings import groups, schema

    found = {}
    for module in (schema, groups):
        found.update({name: obj for name, obj in vars(module).items() if dataclasses.is_dataclass(obj)})
    return found


_NESTED: dict[str, type] = {}


def help_text() -> str:
    """The text of ``python -m pipeline --help``: the groups' options and every setting with its default and doc."""
    _NESTED.update(_nested())
    lines = [f"Saliency Tubes pipeline: {USAGE}", "", "== Config groups (group=option) =="]
    for group in OPTIONS:
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        lines.append(f"  {group}: {', '.join(options)}")
    sections = [("Settings", Settings, "")]
    seen: set[type] = set()
    for group, options in OPTIONS.items():
        for _option, schema in options.items():
            if schema not in seen:
                seen.add(schema)
                names = [o for o, s in options.items() if s is schema]
                sections.append((f"{group}={'|'.join(names)}", schema, f"{group}."))
    for title, schema, prefix in sections:
        rows = _rows(schema, prefix)
        if not rows:
            continue
        lines += ["", f"== {title} (setting = default: doc) =="]
        lines += [f"  {key} = {default}: {doc}" for key, default, doc in rows]
    lines += ["", "Hydra's own flags: --cfg job (print the composed config), --hydra-help, -m (sweeps)."]
    return "\n".join(lines)


def _template(text: str) -> str:
    """``text`` as a Hydra help template: ``$`` is string.Template's and ``${`` OmegaConf's, so both are escaped."""
    return text.replace("$", "$$").replace("$${", "$\\${")


def register() -> None:
    """Store the schema, the group options' schemas and the help text in Hydra's ConfigStore (idempotent)."""
    store = ConfigStore.instance()
    store.store(name="settings", node=Settings)
    for group, options in OPTIONS.items():
        for option, schema in options.items():
            store.store(group=f"schema/{group}", name=option, node=schema)
    store.store(
        group="hydra/help",
        name="pipeline",
        node={"app_name": "pipeline", "header": "", "footer": "", "template": _template(help_text())},
    )


def known(key: str) -> bool:
    """Whether the dotted ``key`` is a setting every option of its section has (the top level, or ``model.*``)."""
    schema, *path = key.split(".")
    node: type | None = {f.name: f.type for f in dataclasses.fields(Settings)}.get(schema)
    node = (
        OPTIONS["model"]["model"] if schema == "model" else _NESTED.get(node, node) if isinstance(node, str) else node
    )
    for name in path:
        if not dataclasses.is_dataclass(node):
            return False
        types = {f.name: f.type for f in dataclasses.fields(node)}
        if name not in types:
            return False
        node = _NESTED.get(types[name], types[name]) if isinstance(types[name], str) else types[name]
    return bool(path)


register()
