"""Remote code: the export of a model no native transformers class reproduces (MLA, MoE with its
routing bias, cross-layer KV sharing, value residual, soft-capped logits, memory layers, ...).

The directory carries `configuration_generalmodel.py` and `modeling_generalmodel.py` (this
package's `remote_code/`) and the zoo's own modules (`models/decoder.py` and what it imports),
copied flat with their `models.` imports made relative: transformers runs the platform's own
model code, so there is no second implementation to keep in sync. `config.json` names them in
`auto_map`; loading needs `trust_remote_code=True`. The weights are our state dict under
`model.`, the head written even when tied (the decoder ties it again when it is built)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch

from generalmodel.errors import UserError
from generalmodel.interop.adapter import HfAdapter, common_config

HERE = Path(__file__).resolve().parent
CODE = ("configuration_generalmodel.py", "modeling_generalmodel.py")
ZOO_IMPORT = re.compile(r"^(\s*)from models\.(\w+) import", flags=re.M)


def code_files() -> dict[str, str]:
    """The remote code: file name → source. The zoo's modules are `models/decoder.py`,
    `models/moeut.py` (a family with its own model class) and every module of `models/` they
    import, followed transitively, each with its imports made relative."""
    import models

    zoo = Path(models.__file__).resolve().parent
    files = {name: (HERE / "remote_code" / name).read_text() for name in CODE}
    todo = ["decoder", "moeut"]
    while todo:
        module = todo.pop()
        if f"{module}.py" in files:
            continue
        source = (zoo / f"{module}.py").read_text()
        todo += [name for _, name in ZOO_IMPORT.findall(source)]
        flat = ZOO_IMPORT.sub(r"\1from .\2 import", source)
        if re.search(r"^\s*(from|import) models\b", flat, flags=re.M):
            raise RuntimeError(f"models/{module}.py imports the zoo in a way the flat copy cannot follow")
        files[f"{module}.py"] = flat
    return files


class RemoteCodeAdapter(HfAdapter):
    model_type = "generalmodel"
    architecture = "GeneralModelForCausalLM"
    shape = ("", "", "")
    described = "remote code runs every model of the zoo"

    def mismatches(self, cfg) -> list[str]:
        # The weights would load, but transformers' generate cannot run the thoughts: a Coconut
        # model would answer without them, silently worse. The native export keeps the field.
        thoughts = cfg.continuous_thoughts
        out = [f"continuous_thoughts={thoughts} (Coconut decoding, which generate does not do)"] if thoughts else []
        if cfg.name == "blt":
            out.append("a byte latent model (patches, an entropy model: caches transformers' generate does not keep)")
        if cfg.quiet_star_thoughts:
            out.append(
                f"quiet_star_thoughts={cfg.quiet_star_thoughts} (a thought at every token, which generate does not do)"
            )
        return out

    def config(self, cfg, special: dict[str, int | None], dtype: str) -> dict[str, Any]:
        return {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "auto_map": {
                "AutoConfig": "configuration_generalmodel.GeneralModelConfig",
                "AutoModelForCausalLM": "modeling_generalmodel.GeneralModelForCausalLM",
            },
            "zoo_config": dataclasses.asdict(cfg),
            **common_config(cfg, special, dtype),
            "tie_word_embeddings": False,  # the decoder ties its own head
        }

    def code_files(self) -> dict[str, str]:
        return code_files()

    def to_hf(self, cfg, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {f"model.{k}": v for k, v in state.items() if k != "head.weight"}
        # Tied: the native export holds no head, and safetensors keeps no shared tensors: a copy.
        out["model.head.weight"] = state["embed.weight"].clone() if cfg.tie_embeddings else state["head.weight"]
        return out

    def from_hf(self, cfg, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        state = {k.removeprefix("model."): v for k, v in hf.items() if k.startswith("model.")}
        if cfg.tie_embeddings:
            state["head.weight"] = state["embed.weight"]
        return state

    def model_config(self, config: dict[str, Any], where: str):
        from models.registry import REGISTRY

        fields = dict(config["zoo_config"])
        spec = REGISTRY.get(fields.get("name"))
        if spec is None:
            raise UserError(f"{where}: zoo_config.name={fields.get('name')!r}; known: {', '.join(REGISTRY)}")
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
        return spec.config_cls(**fields)
