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

Our own jobs read `data/export/` (`export_dir`); `hf/` loads in transformers.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from generalmodel import UserError
from generalmodel.storage import EXPORT_FILES

log = logging.getLogger(__name__)

EXPORT_SUBDIR = "data/export"  # where MLflow puts the data_path of a loader_module flavor
HF_SUBDIR = "hf"
PARAMS: dict[str, Any] = {
    "max_new_tokens": 64,
    "temperature": 0.8,
    "top_p": 1.0,
    "top_k": 0,
    "seed": 0,
    "chat": False,
}
EXAMPLE_PROMPTS = ["Fellow citizens,"]


def export_dir(directory: str) -> str:
    """Where the native export files of a downloaded model directory are: its `data/export/` (an MLflow
    model saved by `save`) or the directory itself (a plain export)."""
    for candidate in (os.path.join(directory, EXPORT_SUBDIR), directory):
        if all(os.path.exists(os.path.join(candidate, name)) for name in EXPORT_FILES):
            return candidate
    raise UserError(f"{directory} holds no exported model ({', '.join(EXPORT_FILES)}, or an MLflow model with them)")


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
    from generalmodel.infer.sampling import read_export
    from generalmodel.interop.hf import ExportError, write_hf

    cfg, state, tokenizer_json = read_export(os.path.join(path, EXPORT_SUBDIR))
    try:
        write_hf(cfg, state, tokenizer_json, os.path.join(path, HF_SUBDIR), dtype)
    except ExportError as e:
        log.info("no transformers export: %s", e)
        return str(e)
    return None


class GeneralModelPyfunc:
    """What `mlflow.pyfunc.load_model` returns the predictions of: our model and sampler."""

    def __init__(self, directory: str):
        from generalmodel.infer.sampling import load_model

        self.model, self.tokenizer = load_model(directory)

    def predict(self, model_input, params: dict[str, Any] | None = None) -> list[str]:
        from generalmodel.infer.sampling import SamplingParams, sample_chat, sample_text

        p = PARAMS | (params or {})
        sampling = SamplingParams(
            max_new_tokens=p["max_new_tokens"],
            temperature=p["temperature"],
            top_p=p["top_p"],
            top_k=p["top_k"] or None,
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
