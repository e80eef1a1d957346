"""Model references and the MLflow registry: the one parser of `models:/` and `runs:/` references,
looking a registered version up, and downloading the model a reference names.

A model reference is `models:/NAME/VERSION`, `models:/NAME/latest` (the highest version),
`models:/NAME@ALIAS`, `runs:/RUN_ID`, the URI of an export directory (model.safetensors +
model_config.json + tokenizer.json; local or s3://), or a local transformers directory. What a
downloaded directory holds is read by `generalmodel.infer.export`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from generalmodel.config import Config, StorageConfig
from generalmodel.errors import UserError
from generalmodel.infer.export import EXPORT_SUBDIR, is_adapter, merge_adapter, read_adapter
from generalmodel.storage import download_export
from generalmodel.tracking.store import tracking_uri

MODELS, RUNS = "models:/", "runs:/"


@dataclass(frozen=True)
class ModelRef:
    """A parsed reference. `kind`: "registered" (name + version or alias), "run" (run_id) or "uri"."""

    text: str
    kind: str
    name: str = ""
    version: str = ""  # a number or "latest"; empty with an alias
    alias: str = ""
    run_id: str = ""

    @classmethod
    def parse(cls, reference: str) -> ModelRef:
        if reference.startswith(RUNS):
            run_id = reference[len(RUNS) :].split("/")[0]
            if not run_id:
                raise UserError(f"model reference {reference!r}: runs:/ needs a run id (runs:/RUN_ID)")
            return cls(reference, "run", run_id=run_id)
        if not reference.startswith(MODELS):
            return cls(reference, "uri")
        name, _, version = reference[len(MODELS) :].partition("/")
        name, _, alias = name.partition("@")
        if not name or (alias and version) or not (alias or version):
            raise UserError(
                f"model reference {reference!r}: expected models:/NAME/VERSION, models:/NAME/latest or "
                "models:/NAME@ALIAS"
            )
        return cls(reference, "registered", name=name, version=version, alias=alias)

    @property
    def in_mlflow(self) -> bool:
        return self.kind != "uri"

    @property
    def display_name(self) -> str:
        """What a server calls the model: the registered NAME, else the reference itself."""
        return self.name if self.kind == "registered" else self.text


def model_version(client, reference: str):
    """The registry's ModelVersion of a `models:/` reference (LookupError for a name without versions)."""
    ref = ModelRef.parse(reference)
    if ref.kind != "registered":
        raise UserError(f"{reference!r} is not a registered model (models:/NAME/VERSION or models:/NAME@ALIAS)")
    if ref.alias:
        return client.get_model_version_by_alias(ref.name, ref.alias)
    if ref.version == "latest":
        versions = client.search_model_versions(f"name = '{ref.name}'")
        if not versions:
            raise LookupError(f"registered model {ref.name!r} has no version")
        return max(versions, key=lambda v: int(v.version))
    return client.get_model_version(ref.name, ref.version)


def artifact_uri(reference: str, uri: str | None) -> str:
    """The artifact URI of a `models:/` or `runs:/` model; a UserError when MLflow has no such model."""
    from mlflow.tracking import MlflowClient

    ref = ModelRef.parse(reference)
    if ref.kind == "run":
        return f"{RUNS}{ref.run_id}/model"
    try:
        client = MlflowClient(uri)
        mv = model_version(client, reference)
        return client.get_model_version_download_uri(mv.name, mv.version)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot find {reference} in MLflow ({uri}): {e}") from None


def is_registered(reference: str, uri: str | None = None) -> bool:
    """Whether MLflow at `uri` (default: the local store) has the `models:/` model `reference`."""
    from mlflow.tracking import MlflowClient

    try:
        model_version(MlflowClient(uri or tracking_uri(Config())), reference)
    except Exception:
        return False
    return True


def model_tags(reference: str, uri: str | None) -> dict[str, str]:
    """What a model reference points at: for a registered model its name, version and the run
    that produced it (`model_name`, `model_version`, `run_id`); for runs:/ID the run; else nothing."""
    ref = ModelRef.parse(reference)
    if ref.kind == "run":
        return {"run_id": ref.run_id}
    if ref.kind != "registered":
        return {}
    from mlflow.tracking import MlflowClient

    mv = model_version(MlflowClient(uri), reference)
    return {"model_name": mv.name, "model_version": str(mv.version), "run_id": mv.run_id or ""}


def lineage_tags(reference: str, uri: str | None) -> dict[str, str]:
    """Tags for a run initialised from `reference`: init_from, and init_model_name,
    init_model_version, init_run_id when MLflow knows them."""
    return {"init_from": reference, **{f"init_{k}": v for k, v in model_tags(reference, uri).items()}}


def download_model(reference: str, uri: str | None, storage: StorageConfig, _seen: tuple[str, ...] = ()) -> str:
    """A local directory holding the model of `reference` (read it with
    `generalmodel.infer.export.load_model` / `read_export`). From MLflow only the native export is
    downloaded (not the transformers copy beside it). An adapter (train.adapter) comes merged into
    the base model it names, which is downloaded the same way (an adapter of an adapter too)."""
    return with_base(_download(reference, uri, storage), uri, storage, (*_seen, reference))


def with_base(directory: str, uri: str | None, storage: StorageConfig, _seen: tuple[str, ...] = ()) -> str:
    """A downloaded model directory as a reader loads it: an adapter merged into the base it names
    (downloaded by `download_model`), anything else as it is."""
    if not is_adapter(directory):
        return directory
    base = read_adapter(directory)[0]["base"]
    if base in _seen:
        raise UserError(f"adapter {_seen[-1]} names a base that leads back to itself: {' -> '.join((*_seen, base))}")
    return merge_adapter(directory, download_model(base, uri, storage, _seen))


def pinned(reference: str, uri: str | None) -> str:
    """A registered reference as models:/NAME/VERSION (what latest or an alias resolves to now); any
    other reference as it is."""
    ref = ModelRef.parse(reference)
    if ref.kind != "registered":
        return reference
    from mlflow.tracking import MlflowClient

    mv = model_version(MlflowClient(uri), reference)
    return f"{MODELS}{mv.name}/{mv.version}"


def load_experts(base: str, references: list[str], uri: str | None, storage: StorageConfig, mix, temperature: float):
    """Two-pass inference (generalmodel.infer.experts.Experts) over the adapters `references`, each
    an SVF adapter of the model `base` (checked: the base each names resolves to the same version)."""
    from generalmodel.infer.experts import Experts

    adapters = {}
    for reference in references:
        directory = _download(reference, uri, storage)
        if not is_adapter(directory):
            raise UserError(f"expert {reference} is not an adapter (a version trained with train.adapter=svf)")
        named = read_adapter(directory)[0]["base"]
        if pinned(named, uri) != pinned(base, uri):
            raise UserError(f"expert {reference} adapts {named}, not the model {base}: experts must share their base")
        name = ModelRef.parse(reference).display_name
        adapters[reference if name in adapters else name] = directory
    return Experts(download_model(base, uri, storage), adapters, mix, temperature)


def _download(reference: str, uri: str | None, storage: StorageConfig) -> str:
    ref = ModelRef.parse(reference)
    if ref.in_mlflow:
        import mlflow

        if uri:
            mlflow.set_tracking_uri(uri)
        location = artifact_uri(reference, uri)
        try:
            return mlflow.artifacts.download_artifacts(f"{location}/{EXPORT_SUBDIR}")
        except Exception:  # a model registered before the MLflow flavor: the export files at its root
            pass
        try:
            return mlflow.artifacts.download_artifacts(location)
        except Exception as e:
            raise UserError(f"cannot load {reference} from MLflow ({uri}): {e}") from None
    if os.path.isdir(reference):
        from generalmodel.interop.hf import is_hf_directory

        if is_hf_directory(reference):
            return reference
    return download_export(reference, storage)
