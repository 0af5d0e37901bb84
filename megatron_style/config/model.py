"""The model's section: sizes and options of the Multiway Transformer, and the named presets."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

from megatron_style.config.checks import check_model
from megatron_style.config.errors import check
from megatron_style.config.fields import bounded, check_bounds

AttentionLayout = Literal["shared", "decoupled"]

#: Sizes named once. `configs/model/*.yaml` are dumps of these (a test keeps them in sync).
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # For tests and the CPU demo: a forward pass in milliseconds. Shared attention and one
    # VL layer so that every code path of the giant is exercised.
    "tiny": dict(layers=2, dim=64, ffn_dim=256, heads=4, patch_size=8, img_size=32,
                 attention="shared", vl_layers=1, text_vocab_size=1000, visual_vocab_size=256,
                 max_text_len=64),
    # The released checkpoints (microsoft/unilm beit3): per-modality attention, no VL expert.
    "base": dict(layers=12, dim=768, ffn_dim=3072, heads=12, patch_size=16, img_size=224,
                 attention="decoupled", vl_layers=0, text_vocab_size=64010,
                 visual_vocab_size=8192, max_text_len=1022),
    "large": dict(layers=24, dim=1024, ffn_dim=4096, heads=16, patch_size=16, img_size=224,
                  attention="decoupled", vl_layers=0, text_vocab_size=64010,
                  visual_vocab_size=8192, max_text_len=1022),
    # The paper's 1.9B model (arXiv 2208.10442, Table 1): shared attention, VL experts on top.
    "giant": dict(layers=40, dim=1408, ffn_dim=6144, heads=16, patch_size=14, img_size=224,
                  attention="shared", vl_layers=3, text_vocab_size=64010,
                  visual_vocab_size=8192, max_text_len=1022),
}


@dataclass
class ModelConfig:
    """Sizes and options of the Multiway Transformer."""

    preset: Optional[str] = None
    layers: int = bounded(2, ge=1)
    dim: int = bounded(64, ge=1)
    ffn_dim: int = bounded(256, ge=1)
    heads: int = bounded(4, ge=1)
    patch_size: int = bounded(8, ge=1)
    img_size: int = bounded(32, ge=1)
    in_chans: int = bounded(3, ge=1)
    attention: AttentionLayout = "shared"
    vl_layers: int = bounded(0, ge=0)
    text_vocab_size: int = bounded(1000, ge=1)
    visual_vocab_size: int = bounded(256, ge=1)
    # Longest text (tokens). The text position table has max_text_len + 2 rows: positions count
    # from 2 as in fairseq, so that released checkpoints (1024 rows) load unchanged.
    max_text_len: int = bounded(64, ge=3, note="room for <s>, one token and </s>")
    drop_path: float = bounded(0.0, ge=0, lt=1)
    ln_eps: float = bounded(1e-5, gt=0)
    init_std: float = bounded(0.02, gt=0)
    # How a from-scratch run draws its weights (model/init.py). "beit": the paper's (BEiT-3
    # section 2.3, "the BEiT initialization algorithm"): every weight trunc-normal with std
    # init_std cut at +-1 std (so in [-0.02, 0.02]), then layer l's output matrices
    # (attention out_proj, every expert's fc2) divided by sqrt(2 l). "subln": torchscale's
    # Sub-LN (Magneto, arXiv 2210.06423) rule: cut at +-2 std, then fc1, fc2, v_proj and
    # out_proj multiplied by sqrt(log 2N). Weights loaded by checkpoint.init_from override it.
    init: Literal["beit", "subln"] = "beit"
    # What the image head predicts: visual-token ids ("tokens", BEiT) or normalised pixels of
    # each masked patch ("pixels", MAE-style regression).
    visual_target: Literal["tokens", "pixels"] = "tokens"
    # Kernel dispatch: "auto" uses Triton on CUDA when available, "reference" forces PyTorch.
    kernels: Literal["auto", "triton", "reference"] = "auto"
    # Before the first step, check the Triton kernels the run uses against their references on
    # each rank's device (train/kernel_check.py); false skips that and trusts them.
    kernel_check: bool = True

    @classmethod
    def expand(cls, data: dict[str, Any], key: str) -> dict[str, Any]:
        """The preset's sizes under the explicitly given ones (called by from_dict)."""
        preset = data.get("preset")
        if preset is None:
            return data
        check(isinstance(preset, str) and preset in MODEL_PRESETS, f"{key}.preset",
              f"unknown preset {preset!r}; choose one of {sorted(MODEL_PRESETS)}")
        return {**MODEL_PRESETS[preset], **data}

    # derived sizes -----------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def image_tokens(self) -> int:
        """Tokens per image in the stream: CLS + patches."""
        return self.num_patches + 1

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.in_chans

    def has_vl_expert(self, layer: int) -> bool:
        return layer >= self.layers - self.vl_layers

    def validate(self, key: str = "model") -> None:
        """Ranges and the rules between this section's fields (checks.py)."""
        check_bounds(self, key)
        check_model(self, key)
