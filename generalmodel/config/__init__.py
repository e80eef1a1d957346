"""The typed config tree and its command line.

A run's config is one pydantic tree (`Config`): defaults in the classes, a YAML preset from
`configs/` on top (`--config configs/x.yaml`), dotted overrides on top of that
(`--data.seq_len=512` or `--data.seq_len 512`, a bare `--data.overwrite` means true).
Unknown keys and invalid values raise `ConfigError` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from generalmodel import UserError


class ConfigError(UserError):
    """A bad preset, key or value."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(Section):
    """Where datasets and checkpoints live. Credentials default to the standard AWS env vars."""

    root: str = Field(
        ".generalmodel/store",
        description="The embedded default store: relative dataset/checkpoint names live under it "
        "(a local path, file:// or s3://bucket/prefix).",
    )
    endpoint_url: str | None = Field(
        None,
        description="S3 endpoint of an S3-compatible server, e.g. http://127.0.0.1:7480 "
        "(default: $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL, else AWS).",
    )
    region: str | None = Field(
        None, description="S3 region (default: $AWS_REGION / $AWS_DEFAULT_REGION, else us-east-1)."
    )
    access_key_id: SecretStr | None = Field(
        None, description="S3 access key (default: $AWS_ACCESS_KEY_ID). Never logged."
    )
    secret_access_key: SecretStr | None = Field(
        None, description="S3 secret key (default: $AWS_SECRET_ACCESS_KEY). Never logged."
    )
    connect_timeout_s: float = Field(5.0, gt=0, description="S3 connect timeout in seconds.")
    request_timeout_s: float = Field(60.0, gt=0, description="S3 request timeout in seconds.")

    def resolved(self) -> StorageConfig:
        """A copy with env-var defaults filled in, so that Ray tasks on other nodes (which do
        not share the driver's environment) see the same endpoint and credentials."""
        env = os.environ
        return self.model_copy(
            update={
                "endpoint_url": self.endpoint_url
                or env.get("AWS_ENDPOINT_URL_S3")
                or env.get("AWS_ENDPOINT_URL"),
                "region": self.region
                or env.get("AWS_REGION")
                or env.get("AWS_DEFAULT_REGION")
                or "us-east-1",
                "access_key_id": self.access_key_id or _secret(env.get("AWS_ACCESS_KEY_ID")),
                "secret_access_key": self.secret_access_key
                or _secret(env.get("AWS_SECRET_ACCESS_KEY")),
            }
        )


def _secret(value: str | None) -> SecretStr | None:
    return SecretStr(value) if value else None


# Special tokens of every tokenizer the platform trains, in id order after nothing: ids 0, 1, 2.
SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


class DataConfig(Section):
    """Corpus preparation: source → tokenizer → packed Parquet shards + manifest."""

    source: str = Field(
        "sotu",
        description="The corpus: 'sotu' (built in), a local file/dir/glob or s3:// prefix of "
        ".txt/.jsonl/.parquet files, a datasets.save_to_disk dir, or 'hf:OWNER/NAME' (online).",
    )
    text_field: str = Field("text", description="Text column of .jsonl/.parquet/HF sources.")
    hf_config: str = Field("default", description="Config (subset) of an hf: source.")
    hf_split: str = Field("train", description="Split of an hf: source or a saved DatasetDict.")
    output: str | None = Field(
        None,
        description="Dataset URI to write (default: <storage.root>/datasets/<source name>); "
        "relative paths live under storage.root.",
    )
    overwrite: bool = Field(False, description="Replace an existing dataset at data.output.")
    tokenizer: str | None = Field(
        None, description="Reuse this tokenizer.json (path or URI) instead of training one."
    )
    vocab_size: int = Field(8192, description="BPE vocabulary size, special tokens included.")
    seq_len: int = Field(256, gt=0, description="Tokens per training example (rows hold seq_len+1).")
    val_fraction: float = Field(
        0.02, ge=0, lt=1, description="Fraction of documents (by content hash) in the val split."
    )
    tokenizer_sample_mb: float = Field(
        64.0, gt=0, description="Text (MB) the tokenizer is trained on: a deterministic sample."
    )
    shard_input_mb: float = Field(
        64.0,
        gt=0,
        description="Upper bound on the raw text (MB) behind one output shard; small corpora "
        "use smaller shards so that every CPU gets work.",
    )

    @field_validator("vocab_size")
    @classmethod
    def _vocab_holds_bytes(cls, v: int) -> int:
        if v < MIN_VOCAB_SIZE:
            raise ValueError(
                f"must be at least {MIN_VOCAB_SIZE} (256 byte tokens + the special tokens)"
            )
        if v > 2**32:
            raise ValueError("must fit in uint32")
        return v


class RayConfig(Section):
    """How jobs reach Ray."""

    address: str | None = Field(
        None,
        description="Ray cluster address ('auto', ray://host:10001, host:6379); "
        "default: $RAY_ADDRESS, else a local cluster started for this job.",
    )
    num_cpus: int | None = Field(
        None, gt=0, description="CPUs of the local cluster started when no address is given."
    )


class Config(Section):
    """The whole run config."""

    data: DataConfig = DataConfig()
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()


# ---------------------------------------------------------------------------------------------
# Loading: preset + overrides


def load_config(
    preset: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
    cls: type[BaseModel] = Config,
) -> BaseModel:
    """Build a config from an optional YAML preset plus {dotted.key: value} overrides."""
    tree: dict[str, Any] = {}
    if preset is not None:
        tree = _read_preset(Path(preset))
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value, cls)
    _check_keys(tree, cls, prefix="")
    try:
        return cls.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_explain(e, source=str(preset) if preset else None)) from None


def _read_preset(path: Path) -> dict[str, Any]:
    if not path.is_file():
        presets = sorted(p.name for p in Path("configs").glob("*.yaml")) if Path("configs").is_dir() else []
        hint = f"; presets in configs/: {', '.join(presets)}" if presets else ""
        raise ConfigError(f"config preset {str(path)!r} does not exist{hint}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config preset {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config preset {str(path)!r} must be a mapping of sections, got {type(tree).__name__}")
    return tree


def _section_class(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel class behind a field annotation (through Optional), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _section_class(arg)
            if found is not None:
                return found
    return None


def _set_dotted(tree: dict[str, Any], key: str, value: Any, cls: type[BaseModel]) -> None:
    parts = key.split(".")
    node, model = tree, cls
    for i, part in enumerate(parts):
        if part not in model.model_fields:
            where = ".".join(parts[:i]) or "the config"
            raise ConfigError(
                f"unknown key {key!r}: {where} has no {part!r}; valid keys: "
                + ", ".join(".".join(parts[:i] + [f]) for f in model.model_fields)
            )
        if i == len(parts) - 1:
            node[part] = value
            return
        sub = _section_class(model.model_fields[part].annotation)
        if sub is None:
            raise ConfigError(f"unknown key {key!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])} must be a mapping")
        model = sub


def _check_keys(tree: dict[str, Any], model: type[BaseModel], prefix: str) -> None:
    """Unknown keys in a preset, reported with the valid names (pydantic only says 'extra')."""
    for key, value in tree.items():
        if key not in model.model_fields:
            where = prefix.rstrip(".") or "the config"
            raise ConfigError(
                f"unknown key {prefix + key!r} ({where} has no {key!r}); valid keys: "
                + ", ".join(prefix + f for f in model.model_fields)
            )
        sub = _section_class(model.model_fields[key].annotation)
        if sub is not None and isinstance(value, dict):
            _check_keys(value, sub, prefix + key + ".")


def _explain(error: ValidationError, source: str | None) -> str:
    lines = []
    for err in error.errors():
        key = ".".join(str(p) for p in err["loc"])
        value = err.get("input")
        shown = "<missing>" if err["type"] == "missing" else repr(value)
        lines.append(f"{key} = {shown}: {err['msg']}")
    where = f" (preset {source})" if source else ""
    return "invalid config" + where + ":\n  " + "\n  ".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(
    argv: list[str] | None = None, cls: type[BaseModel] = Config, description: str = ""
) -> BaseModel:
    """`--config PRESET.yaml` plus `--a.b=value` overrides; `--help` lists every field."""
    argv = list(sys.argv[1:] if argv is None else argv)
    preset: str | None = None
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(help_text(cls, description))
            raise SystemExit(0)
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: use --config PRESET.yaml and --section.key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            # `--key value`, or a bare boolean flag when the next token is another option.
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            else:
                value = "true"
        if key == "config":
            preset = value
        else:
            overrides[key] = _parse_value(value)
        i += 1
    return load_config(preset, overrides, cls)


def _parse_value(text: str) -> Any:
    """YAML scalars (`3e-4`, `true`, `null`, `[1, 2]`); anything unparsable stays a string."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads '3e-4' as a string; pydantic coerces numeric strings for float fields.
    return value


def help_text(cls: type[BaseModel], description: str = "") -> str:
    lines = [description.strip(), ""] if description else []
    lines += [
        "usage: [--config PRESET.yaml] [--section.key=value ...]",
        "",
        "  --config PATH   a YAML preset (see configs/); overrides below apply on top of it",
    ]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            sub = _section_class(field.annotation)
            if sub is not None:
                lines.append("")
                lines.append(f"{prefix}{name}: {(sub.__doc__ or '').strip()}")
                walk(sub, f"{prefix}{name}.")
                continue
            default = field.default
            shown = "***" if isinstance(default, SecretStr) else repr(default)
            kind = _type_name(field.annotation)
            lines.append(f"  --{prefix}{name} ({kind}, default {shown})")
            if field.description:
                lines.append(f"      {field.description}")

    walk(cls, "")
    return "\n".join(lines)


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def dump_config(cfg: BaseModel) -> dict[str, Any]:
    """The resolved config as plain data, secrets masked: what goes into manifests and runs."""
    return cfg.model_dump(mode="json")
