"""The one command line of every job: `[POSITIONAL] [--config PRESET.yaml] [--section.key=value ...]`.

    --config PATH        a YAML preset; the dotted overrides apply on top of it
    --a.b=value          also `--a.b value`; a bare `--a.b` means true; values are YAML scalars/lists
    --print-config       print the resolved config as YAML (secrets masked) and exit
    -h, --help           every field the job reads, with its type, default and description

A job declares its config class (a pydantic model: `Config` for the run jobs, a small class of its
own for the others) and the sections of it that it reads (`sections=`: its --help shows those
only) and calls `run_job(main, cls, __doc__, sections=...)`: a user error becomes one line on
stderr and exit code 2, a run that failed for good one line and exit code 1.

Why our own thin layer and not a CLI library: the run config's `model` section is a union of
dataclasses discriminated by `model.name`, expanded from `model.preset`, and checked key by key
with messages that list the valid keys. pydantic-settings' CLI source offers no `--model.*` options
for that union at all, and jsonargparse silently builds the wrong member (a `--model.n_layers`
override turned the default llama into a gpt2; `--model.name=gpt2` kept llama's defaults). What
is left here is argv splitting (~40 lines) and the help text; the rules live in the config classes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml
from pydantic import BaseModel, SecretStr
from pydantic_core import PydanticUndefined

from generalmodel import RunFailed, UserError
from generalmodel.config import Config, ConfigError, dump_config, field_types, load_config, section_class

EXIT_RUN_FAILED = 1  # the run started and failed for good (generalmodel.RunFailed)
EXIT_USER_ERROR = 2  # bad config or input (generalmodel.UserError), found before or while running
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT), as shells report it
# The sections of the run `Config` each kind of job reads (what its --help shows).
RUN_SECTIONS = ("model", "data", "optim", "train", "storage", "ray", "parallel", "tracking")
DATA_SECTIONS = ("data", "storage", "ray")
USAGE = "[--config PRESET.yaml] [--section.key=value ...] [--print-config] [--help]"


@dataclass
class CommandLine:
    """argv, split: the preset, the dotted overrides (YAML-parsed, and as typed) and the flags."""

    preset: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, str] = field(default_factory=dict)
    print_config: bool = False


def split_args(argv: list[str], positional: tuple[str, ...] = ()) -> CommandLine:
    """`--a.b=value`, `--a.b value`, a bare `--a.b` (true); leading bare words fill `positional`
    (e.g. `sweep FILE`, `cluster up`). `config` is the preset, whether named or positional."""
    line, i = CommandLine(), 0
    words = list(positional)
    while i < len(argv) and not argv[i].startswith("--") and words:
        line.raw[words.pop(0)] = argv[i]
        i += 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--print-config":
            line.print_config = True
            i += 1
            continue
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: usage: {_usage(positional)}")
        key, eq, value = arg[2:].partition("=")
        if not eq:  # `--key value`, or a bare boolean flag when the next token is another option
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            else:
                value = "true"
        line.raw[key] = value
        i += 1
    line.preset = line.raw.pop("config", None)
    line.overrides = {k: parse_value(v) for k, v in line.raw.items()}
    return line


def parse_value(text: str) -> Any:
    """YAML scalars and lists (`3e-4`, `true`, `null`, `[1, 2]`); anything unparsable stays a string.
    (YAML 1.1 reads '3e-4' as a string; pydantic coerces numeric strings for float fields.) Text
    with a line break is a string as typed: YAML would fold its blank lines (a prompt's paragraphs)."""
    if "\n" in text:
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_args(
    argv: list[str] | None = None,
    cls: type[BaseModel] | None = None,
    description: str = "",
    positional: tuple[str, ...] = (),
    sections: tuple[str, ...] | None = None,
) -> BaseModel:
    """The config `cls` (default: the run `Config`) from argv; handles --help (showing `sections`
    of it, default all) and --print-config."""
    cls = cls or Config
    argv = list(sys.argv[1:] if argv is None else argv)
    exit_on_help(argv, cls, description, positional, sections)
    line = split_args(argv, positional)
    cfg = load_config(line.preset, line.overrides, cls)
    if line.print_config:
        print_config(cfg)
    return cfg


def exit_on_help(
    argv: list[str],
    cls: type,
    description: str,
    positional: tuple[str, ...] = (),
    sections: tuple[str, ...] | None = None,
) -> None:
    if "-h" in argv or "--help" in argv:
        print(help_text(cls, description, positional, sections))
        raise SystemExit(0)


def print_config(cfg: BaseModel) -> None:
    print(yaml.safe_dump(dump_config(cfg), sort_keys=False), end="")
    raise SystemExit(0)


def _usage(positional: tuple[str, ...]) -> str:
    return " ".join([*(w.upper() for w in positional if w != "config"), USAGE])


def help_text(
    cls: type, description: str = "", positional: tuple[str, ...] = (), sections: tuple[str, ...] | None = None
) -> str:
    """Every field of `cls`, section by section, with its type, default and description; only the
    top-level `sections` named (and plain fields) when given."""
    unknown = set(sections or ()) - set(field_types(cls))
    assert not unknown, f"{cls.__name__} has no sections {sorted(unknown)}"
    lines = [description.strip(), ""] if description else []
    lines += [f"usage: {_usage(positional)}", ""]
    if "config" not in field_types(cls):
        lines.append("  --config PATH   a YAML preset; the options below apply on top of it")
    lines.append("  --print-config  print the resolved config as YAML and exit")

    def walk(model: type, prefix: str) -> None:
        for name, annotation in field_types(model).items():
            sub = section_class(annotation)
            if sub is not None and not prefix and sections is not None and name not in sections:
                continue
            if sub is not None:
                lines.extend(["", f"{prefix}{name}: {_section_doc(sub)}"])
                walk(sub, f"{prefix}{name}.")
                continue
            default, doc = _default_and_doc(model, name)
            shown = "***" if isinstance(default, SecretStr) else repr(default)
            shown = "required" if default is PydanticUndefined else f"default {shown}"
            lines.append(f"  --{prefix}{name} ({_type_name(annotation)}, {shown})")
            if doc:
                lines.append(f"      {doc}")

    walk(cls, "")
    return "\n".join(lines)


def _section_doc(sub: type) -> str:
    if dataclasses.is_dataclass(sub):  # the model union: its default member's fields are shown
        from models import REGISTRY

        return f"model.name picks one of: {', '.join(sorted(REGISTRY))}; the fields of {sub().name!r}:"
    return next(iter((sub.__doc__ or "").strip().splitlines()), "")


def _default_and_doc(model: type, name: str) -> tuple[Any, str | None]:
    if dataclasses.is_dataclass(model):  # a subclass that changes a default keeps its base's help
        helps = (
            c.__dataclass_fields__[name].metadata.get("help")
            for c in model.__mro__
            if name in getattr(c, "__dataclass_fields__", {})
        )
        return model.__dataclass_fields__[name].default, next((h for h in helps if h), None)
    f = model.model_fields[name]
    default = f.default_factory() if f.default_factory is not None else f.default
    return default, f.description


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


# ---------------------------------------------------------------------------------------------
# Running a job


def setup_logging(level: int = logging.INFO) -> None:
    """The jobs' one logging setup: time, logger, message."""
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


@contextlib.contextmanager
def clean_exit() -> Iterator[None]:
    """`error: <message>` on stderr without a traceback: exit 2 for a UserError, 1 for RunFailed,
    130 for Ctrl-C."""
    try:
        yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_RUN_FAILED) from None
    except KeyboardInterrupt:  # unpublished work was removed and the local Ray stopped on the way out
        print("interrupted: nothing unfinished was published", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None


def run_job(
    main: Callable[[Any], Any],
    cls: type[BaseModel] | None,
    description: str,
    positional: tuple[str, ...] = (),
    sections: tuple[str, ...] | None = None,
) -> None:
    """A job's `__main__`: logging, its config from argv (`sections`: what its --help shows),
    `main(cfg)`, user errors as exit code 2."""
    setup_logging()
    with clean_exit():
        main(parse_args(sys.argv[1:], cls, description, positional, sections))
