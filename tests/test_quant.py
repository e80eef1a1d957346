"""torchao quantization of a loaded model (`--quant`, generalmodel/infer/quant.py) on CPU: int8
weight-only and int8 dynamic replace the blocks' linear weights (not the embedding, the MoE router
or the experts), stay close to the float model and decode batched == one at a time; what needs a
card is a clear error on CPU."""

import pytest
import torch

from generalmodel import UserError
from generalmodel.infer import SamplingParams, generate
from generalmodel.infer.engine import generate_batch
from generalmodel.infer.quant import check_quant, quantize
from models import PRESETS, build_model

pytest.importorskip("torchao")


def tiny(name="llama-tiny"):
    from dataclasses import replace

    torch.manual_seed(0)
    return build_model(replace(PRESETS[name], vocab_size=256)).eval()


@pytest.mark.parametrize("kind", ["int8-weight", "int8-dynamic"])
@pytest.mark.parametrize("name", ["llama-tiny", "deepseek-tiny"])
def test_int8_on_cpu_is_close_to_the_float_model_and_decodes_batched(kind, name):
    from torchao.utils import TorchAOBaseTensor

    model = tiny(name)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).log_softmax(-1)
        quantize(model, kind)
        out = model(ids).log_softmax(-1)
    linears = {n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantized = {n for n, w in linears.items() if isinstance(w, TorchAOBaseTensor)}
    assert "blocks.0.attn.out_proj" in quantized and any(".mlp." in n for n in quantized)
    assert not any(n.endswith("router") for n in quantized) and "head" not in quantized  # tied head: the embedding
    assert not isinstance(model.embed.weight, TorchAOBaseTensor)
    # a small change of the next-token distribution, not a different model
    kl = (ref.exp() * (ref - out)).sum(-1).mean()
    assert 0 < kl < 1e-2, kl
    prompts = [ids[0, :7].tolist(), ids[1].tolist()]
    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    batched = [r.tokens for r in generate_batch(model, prompts, greedy)]
    assert batched == [list(generate(model, p, greedy)) for p in prompts]


@pytest.mark.parametrize(
    "kind, message",
    [
        ("fp8-weight", "--quant=fp8-weight needs a CUDA card"),
        ("fp8-dynamic", "--quant=fp8-dynamic needs a CUDA card"),
        ("int4-weight", "--quant=int4-weight needs a CUDA card"),
        ("int3", "unknown quantization 'int3'; expected one of none, int8-weight"),
    ],
)
def test_what_needs_a_card_is_a_clear_error_on_cpu(kind, message):
    with pytest.raises(UserError, match=message):
        check_quant(kind, "cpu")
    with pytest.raises(UserError, match=message):
        quantize(tiny(), kind)
