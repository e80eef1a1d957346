"""The registered model as an MLflow model: a `python_function` flavor over our sampler, so
`mlflow models serve -m models:/NAME/N --env-manager local` answers

    POST /invocations {"dataframe_records": [{"prompt": "Fellow citizens,"}],
                       "params": {"max_new_tokens": 32, "temperature": 0.0}}
    → {"predictions": ["..."]}    (the completion of each prompt, without the prompt)

With `"params": {"chat": true}` each prompt is a user's message and the prediction the assistant's
reply in the chat format (generalmodel.data.chat; for SFT/DPO models).

and `mlflow.pyfunc.load_model("models:/NAME/N").predict(["Fellow citizens,"])` does the same in
Python. The model directory (`save`):

    MLmodel, requirements.txt, python_env.yaml, input_example.json, ...   (MLflow's)
    data/export/  model.safetensors, model_config.json, tokenizer.json      (our native export)
    hf/       config.json, model.safetensors, tokenizer*.json, ...           (when transformers has the architecture)
    code/     generalmodel/, models/                                         (the code that trained it)

Our own jobs read `data/export/` (`generalmodel.infer.export.export_dir`); `hf/` loads in transformers.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from generalmodel.errors import UserError
from generalmodel.infer.engine import SamplingParams
from generalmodel.infer.export import (
    EXPORT_SUBDIR,
    HF_SUBDIR,
    is_adapter,
    load_model,
    read_export,
)
from generalmodel.infer.sampling import sample_chat, sample_text

log = logging.getLogger(__name__)

_DEFAULTS = SamplingParams()
# The request params of the flavor's signature: SamplingParams' defaults (MLflow needs a typed
# value, so no top_k is 0), and whether the prompts are chat messages.
PARAMS: dict[str, Any] = {
    "max_new_tokens": _DEFAULTS.max_new_tokens,
    "temperature": _DEFAULTS.temperature,
    "top_p": _DEFAULTS.top_p,
    "top_k": _DEFAULTS.top_k or 0,
    "min_p": _DEFAULTS.min_p,
    "seed": _DEFAULTS.seed,
    "chat": False,
}
EXAMPLE_PROMPTS = ["Fellow citizens,"]


def save(export: str, path: str, hf_dtype: str = "float32") -> str | None:
    """An MLflow pyfunc model directory at `path` for the native export in `export`; with the
    transformers directory under hf/ when the architecture has one. Returns why hf/ is missing,
    or None."""
    import mlflow
    import pandas as pd
    import torch
    from mlflow.models import infer_signature

    import generalmodel
    import models

    # MLflow copies data_path to data/<its name>: a link named "export" gives data/export without
    # a second copy of the weights.
    staged = os.path.join(os.path.dirname(path), os.path.basename(EXPORT_SUBDIR))
    os.symlink(os.path.abspath(export), staged)
    try:
        example = pd.DataFrame({"prompt": EXAMPLE_PROMPTS})
        mlflow.pyfunc.save_model(
            path,
            loader_module=__name__,
            data_path=staged,
            code_paths=[os.path.dirname(generalmodel.__file__), os.path.dirname(models.__file__)],
            signature=infer_signature(example, ["a completion"], params=PARAMS),
            input_example=(example, PARAMS),
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                f"mlflow=={mlflow.__version__}",
                "safetensors",
                "tokenizers",
                "pydantic>=2",
                "pyyaml",
                "pyarrow",
                "numpy",
                "pandas",
            ],
        )
    finally:
        os.remove(staged)
    return _add_hf(path, hf_dtype)


def _add_hf(path: str, dtype: str) -> str | None:
    from generalmodel.interop.hf import ExportError, write_hf

    if is_adapter(path):
        return "an adapter (train.adapter): jobs/export.py writes the merged model of its reference"
    cfg, state, tokenizer_json, _ = read_export(os.path.join(path, EXPORT_SUBDIR))
    try:
        write_hf(cfg, state, tokenizer_json, os.path.join(path, HF_SUBDIR), dtype)
    except ExportError as e:
        log.info("no transformers export: %s", e)
        return str(e)
    return None


class GeneralModelPyfunc:
    """What `mlflow.pyfunc.load_model` returns the predictions of: our model and sampler."""

    def __init__(self, directory: str):
        if is_adapter(directory):  # merged into its base, from the registry MLflow loads this model from
            import mlflow

            from generalmodel.config import StorageConfig
            from generalmodel.tracking.registry import with_base

            directory = with_base(directory, mlflow.get_tracking_uri(), StorageConfig().resolved(), ("this model",))
        self.model, self.tokenizer = load_model(directory)

    def predict(self, model_input, params: dict[str, Any] | None = None) -> list[str]:
        p = PARAMS | (params or {})
        sampling = SamplingParams(
            max_new_tokens=p["max_new_tokens"],
            temperature=p["temperature"],
            top_p=p["top_p"],
            top_k=p["top_k"] or None,
            min_p=p["min_p"],
            seed=p["seed"],
        )
        if p["chat"]:
            return [
                "".join(sample_chat(self.model, self.tokenizer, [{"role": "user", "content": prompt}], sampling))
                for prompt in _prompts(model_input)
            ]
        return ["".join(sample_text(self.model, self.tokenizer, prompt, sampling)) for prompt in _prompts(model_input)]


def _prompts(model_input) -> list[str]:
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if "prompt" not in model_input.columns:
            raise UserError(f"the input needs a 'prompt' column; it has {list(model_input.columns)}")
        return [str(p) for p in model_input["prompt"]]
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, dict):
        return [
            str(p)
            for p in ([model_input["prompt"]] if isinstance(model_input["prompt"], str) else model_input["prompt"])
        ]
    return [str(p) for p in model_input]


def _load_pyfunc(data_path: str) -> GeneralModelPyfunc:
    """MLflow's entry point for the `loader_module` flavor: `data_path` is the model's data/export/."""
    return GeneralModelPyfunc(data_path)
