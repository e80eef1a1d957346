"""Building a config: a YAML preset (`configs/*.yaml`) plus dotted overrides (`{"data.seq_len": 512}`).

Unknown keys and invalid values raise `ConfigError` naming the key, the value and what is allowed
(pydantic alone says 'extra inputs are not permitted' and does not list the valid names).
`model.preset: NAME` expands into a registered preset's fields; `model.name` picks the member
of the model union whose fields the dotted keys are checked against.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ValidationError

from generalmodel.config.sections import _DEFAULT_MODEL, Config, ConfigError
from models import PRESETS


def load_config(
    preset: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
    cls: type[BaseModel] = Config,
) -> BaseModel:
    """Build a config from an optional YAML preset plus {dotted.key: value} overrides."""
    tree: dict[str, Any] = {}
    if preset is not None:
        tree = read_preset(Path(preset))
    # The preset first: it names the model family whose fields the other model.* keys are.
    for key, value in sorted((overrides or {}).items(), key=lambda kv: kv[0] != "model.preset"):
        if key == "model.preset":  # not a field: expands into fields below
            tree.setdefault("model", {})["preset"] = value
            continue
        _set_dotted(tree, key, value, cls)
    given: frozenset[str] = frozenset()
    if isinstance(tree.get("model"), dict):
        _expand_preset(tree["model"])
        given = frozenset(tree["model"])
        tree["model"].setdefault("name", _DEFAULT_MODEL().name)  # the union's discriminator
    _check_keys(tree, cls, prefix="")
    try:
        cfg = cls.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_explain(e, source=str(preset) if preset else None)) from None
    if isinstance(cfg, Config):
        cfg._model_keys = given
    return cfg


def _expand_preset(model: dict[str, Any]) -> None:
    """`model.preset: NAME` → the registered preset's fields, under the ones given beside it."""
    if "preset" not in model:
        return
    name = model.pop("preset")
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r} (model.preset); presets: {', '.join(PRESETS)}")
    fields = dataclasses.asdict(PRESETS[name])
    if "name" in model and model["name"] != fields["name"]:
        raise ConfigError(f"model.preset {name!r} is a {fields['name']!r} model, but model.name is {model['name']!r}")
    for key, value in fields.items():
        model.setdefault(key, value)


def read_preset(path: Path) -> dict[str, Any]:
    presets = sorted(p.name for p in Path("configs").glob("*.yaml")) if Path("configs").is_dir() else []
    hint = f"; presets in configs/: {', '.join(presets)}" if presets else ""
    return read_mapping(path, "config preset", ConfigError, hint)


def read_mapping(path: Path, what: str, error: type[ConfigError], hint: str = "") -> dict[str, Any]:
    """A YAML file holding a mapping; `error` names the file and what is wrong with it."""
    if not path.is_file():
        raise error(f"{what} {str(path)!r} does not exist{hint}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise error(f"{what} {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise error(f"{what} {str(path)!r} must be a mapping, got {type(tree).__name__}")
    return tree


def _is_section(cls: Any) -> bool:
    return isinstance(cls, type) and (issubclass(cls, BaseModel) or dataclasses.is_dataclass(cls))


def field_types(cls: type) -> dict[str, Any]:
    """Field name → annotation, for pydantic models and dataclasses (the model configs)."""
    if issubclass(cls, BaseModel):
        return {name: f.annotation for name, f in cls.model_fields.items()}
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def section_class(annotation: Any, node: Any = None) -> type | None:
    """The section class behind a field annotation, if any: through Optional, and through a
    discriminated union of model configs, picking the member named by `node["name"]`."""
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if _is_section(annotation):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if _is_section(a)]
        if len(members) > 1:  # the model union: members differ by their `name` default
            by_name = {m.__dataclass_fields__["name"].default: m for m in members}
            name = node.get("name") if isinstance(node, dict) else None
            preset = node.get("preset") if isinstance(node, dict) else None
            if name is None and isinstance(preset, str) and preset in PRESETS:
                name = PRESETS[preset].name  # model.preset: NAME, expanded later
            if name is None:
                return _DEFAULT_MODEL
            if name not in by_name:
                raise ConfigError(
                    f"unknown model {name!r} (model.name); registered models: {', '.join(sorted(by_name))}"
                )
            return by_name[name]
        return members[0] if members else None
    return None


def _set_dotted(tree: dict[str, Any], key: str, value: Any, cls: type) -> None:
    parts = key.split(".")
    node, model = tree, cls
    for i, part in enumerate(parts):
        fields = field_types(model)
        if part not in fields:
            where = ".".join(parts[:i]) or "the config"
            raise ConfigError(
                f"unknown key {key!r}: {where} has no {part!r}; valid keys: "
                + ", ".join(".".join(parts[:i] + [f]) for f in fields)
            )
        if i == len(parts) - 1:
            node[part] = value
            return
        if i == len(parts) - 2 and typing.get_origin(fields[part]) is dict:
            # one entry of a mapping field (mixture.weights.web=0.7): over its default's entries
            entries = node.get(part)
            if not isinstance(entries, dict):
                entries = node[part] = dict(_default(model, part) or {})
            entries[parts[-1]] = value
            return
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])} must be a mapping")
        sub = section_class(fields[part], child)
        if sub is None:
            raise ConfigError(f"unknown key {key!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node, model = child, sub


def _default(model: type, name: str) -> Any:
    if issubclass(model, BaseModel):
        return model.model_fields[name].get_default(call_default_factory=True)
    field = model.__dataclass_fields__[name]
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def _check_keys(tree: dict[str, Any], model: type, prefix: str) -> None:
    """Unknown keys in a preset, reported with the valid names (pydantic only says 'extra')."""
    fields = field_types(model)
    for key, value in tree.items():
        if key not in fields:
            where = prefix.rstrip(".") or "the config"
            raise ConfigError(
                f"unknown key {prefix + key!r} ({where} has no {key!r}); valid keys: "
                + ", ".join(prefix + f for f in fields)
            )
        if isinstance(value, dict):
            sub = section_class(fields[key], value)
            if sub is not None:
                _check_keys(value, sub, prefix + key + ".")


def _explain(error: ValidationError, source: str | None) -> str:
    lines = []
    for err in error.errors():
        key = ".".join(str(p) for p in err["loc"])
        value = err.get("input")
        if not key:  # a check across the whole config: its message says what is wrong
            lines.append(err["msg"].removeprefix("Value error, "))
            continue
        if isinstance(value, dict):  # a whole section (a model config's own check): name it only
            lines.append(f"{key}: {err['msg']}")
            continue
        shown = "<missing>" if err["type"] == "missing" else repr(value)
        lines.append(f"{key} = {shown}: {err['msg']}")
    where = f" (preset {source})" if source else ""
    return "invalid config" + where + ":\n  " + "\n  ".join(lines)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}: the dotted names the command line uses."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def dump_config(cfg: BaseModel) -> dict[str, Any]:
    """The resolved config as plain data, secrets masked: what goes into manifests and runs."""
    return cfg.model_dump(mode="json")
