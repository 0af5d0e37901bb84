"""How a from-scratch model draws its weights (`model.init`), as numbers the layers take.

    beit   BEiT-3 section 2.3 and its footnote, "the BEiT initialization algorithm" (BEiT's and
           BEiT v2's pretraining code, unilm's BEiT-3 wrapper): every weight matrix, embedding
           table, position table and learned token trunc-normal with std 0.02 cut at +-1 std,
           i.e. drawn in [-0.02, 0.02]; then the output matrices of layer l = 1..L (attention's
           out_proj and the fc2 of every FFN expert, V, L and VL, in both attention layouts)
           divided by sqrt(2 l). Biases zero, LayerNorms one / zero.
    subln  torchscale's Sub-LN rule (Magneto, arXiv 2210.06423, which reports it trains BEiT-3
           better): cut at +-2 std, then fc1, fc2, v_proj and out_proj multiplied by
           sqrt(log 2N) for N layers.

Each tensor-parallel layer draws its full matrix with these numbers and keeps its slice
(parallel/layers.py), so a TP model starts from the weights of the one-process model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_style.config import ModelConfig


@dataclass(frozen=True)
class InitRule:
    std: float
    cut: float            # truncation of the normal, in units of std
    inner_scale: float    # multiplies v_proj and fc1 (1 for beit)
    kind: str
    layers: int

    def output_scale(self, index: int) -> float:
        """Multiplies out_proj and fc2 of the layer with 0-based `index`."""
        if self.kind == "beit":
            return 1.0 / math.sqrt(2.0 * (index + 1))
        return self.inner_scale


def init_rule(cfg: ModelConfig) -> InitRule:
    if cfg.init == "beit":
        return InitRule(cfg.init_std, 1.0, 1.0, "beit", cfg.layers)
    scale = math.sqrt(math.log(2 * cfg.layers))
    return InitRule(cfg.init_std, 2.0, scale, "subln", cfg.layers)


def truncated_std_factor(cut: float) -> float:
    """std of a standard normal truncated to [-cut, cut]: 0.5396 at 1, 0.8796 at 2."""
    phi = math.exp(-cut * cut / 2) / math.sqrt(2 * math.pi)
    mass = math.erf(cut / math.sqrt(2))
    return math.sqrt(1 - 2 * cut * phi / mass)
