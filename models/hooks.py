"""Named hook points: identity modules at the places an interpretability tool reads or rewrites
(the residual stream, each sublayer's output, per-head attention outputs, the attention pattern,
MLA's latent, MoE routing). They hold no parameters, so state dicts, checkpoints and exports are
unchanged, and they do nothing unless a forward hook is registered on them
(`generalmodel.interp`). A hook point's name is its module path, e.g. `blocks.3.hook_resid_mid`.

The attention pattern exists only on the eager attention path (`attention.eager = True`): the
fused SDPA kernel used for training and sampling never materialises it.
"""

from __future__ import annotations

import torch
from torch import nn


class HookPoint(nn.Module):
    """Returns its input; a forward hook registered on it may read or replace the value."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x
