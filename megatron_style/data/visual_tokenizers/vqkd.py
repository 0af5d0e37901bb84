"""BEiT v2's VQ-KD visual tokenizer (arXiv 2208.06366), the image targets of BEiT-3.

Only the tokenizing half is built: a ViT-B/16 encoder (pre-LN blocks, LayerNorm eps 1e-6,
q/v biases without a k bias, exact GELU, mean-pooling variant: its final LayerNorm is
`fc_norm`, applied to the patch tokens), a task layer Linear-Tanh-Linear down to 32 dimensions,
and a codebook of 8192 x 32 vectors. A patch's token is the code with the highest cosine
similarity to its l2-normalised feature (the released codebook is kept l2-normalised by its
EMA updates, so this equals the reference's Euclidean nearest code). Inputs are in [0, 1] and
mapped to [-1, 1] first.

Checkpoint layout of the released files (`vqkd_encoder_base_decoder_*x768x12_{clip,dino}.pth`,
a dict with the weights under "model"):
    encoder.patch_embed.proj.{weight,bias}  encoder.cls_token  encoder.pos_embed
    encoder.blocks.N.norm1.{weight,bias}    encoder.blocks.N.attn.qkv.weight
    encoder.blocks.N.attn.{q_bias,v_bias}   encoder.blocks.N.attn.proj.{weight,bias}
    encoder.blocks.N.norm2.{weight,bias}    encoder.blocks.N.mlp.fc{1,2}.{weight,bias}
    encoder.fc_norm.{weight,bias}           encode_task_layer.{0,2}.{weight,bias}
    quantize.embedding.weight
plus the decoder, the decoder's task layer, EMA statistics and teacher weights, which
tokenizing does not use and are skipped. The encoder was trained at 224px (14 x 14 patches);
for another grid its position table is resized once at load time, exactly as BEiT v2's
`interpolate_pos_encoding` does at every forward: bicubic with scale_factor (g + 0.1) / 14
(not size=g: the sampling positions differ).

Under a run (`model_img_size` given) the tokenizer reads its own view of each image, the
`tokenizer_images` in [0, 1] resized with lanczos (data/transforms.py), as in BEiT v2, also
when its resolution is the model's.
"""
from __future__ import annotations

import math
import os
import re
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_style.data.visual_tokenizers.base import VisualTokenizer
from megatron_style.files import load_untrusted

VQKD_PATCH_SIZE = 16
LN_EPS = 1e-6
# Keys of the released files that tokenizing does not need.
_IGNORED = re.compile(r"^(decoder\.|decode_task_layer\.|teacher|scaling_layer|loss|"
                      r"quantize\.(cluster_size|embedding\.(cluster_size|embed_avg|initted)))")


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).view(B, N, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, layer_scale: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = _Mlp(dim, hidden)
        # Layer scale (`init_values` > 0 in BEiT's code) is off in the released tokenizers;
        # supported so that other VQ-KD checkpoints of the same code load too.
        if layer_scale:
            self.gamma_1 = nn.Parameter(torch.ones(dim))
            self.gamma_2 = nn.Parameter(torch.ones(dim))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn(self.norm1(x))
        x = x + (a if self.gamma_1 is None else self.gamma_1 * a)
        m = self.mlp(self.norm2(x))
        return x + (m if self.gamma_2 is None else self.gamma_2 * m)


class VQKDEncoder(nn.Module):
    def __init__(self, grid: int, patch: int, dim: int, depth: int, heads: int, hidden: int,
                 layer_scale: bool = False):
        super().__init__()
        self.patch_embed = _PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        self.blocks = nn.ModuleList(_Block(dim, heads, hidden, layer_scale) for _ in range(depth))
        self.fc_norm = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] in [-1, 1] -> [n, P, dim] patch features."""
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
        if x.shape[1] != self.pos_embed.shape[1]:
            raise ValueError(f"VQ-KD input has {x.shape[1] - 1} patches, its position table "
                             f"{self.pos_embed.shape[1] - 1}")
        x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.fc_norm(x[:, 1:])


class VQKDTokenizer(VisualTokenizer):
    def __init__(self, img_size: int = 224, patch_size: int = VQKD_PATCH_SIZE, dim: int = 768,
                 depth: int = 12, heads: int = 12, mlp_ratio: float = 4.0, code_dim: int = 32,
                 n_codes: int = 8192, layer_scale: bool = False, model_img_size: Optional[int] = None):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"VQ-KD input size {img_size} is not a multiple of its patch "
                             f"{patch_size}")
        if dim % heads:
            raise ValueError(f"VQ-KD width {dim} is not divisible by {heads} heads")
        self.input_size, self.patch_size = img_size, patch_size
        self.grid = img_size // patch_size
        self.vocab_size = n_codes
        # In a run, always its own (lanczos) view, as BEiT v2 prepares it; called alone
        # (model_img_size None), it may read the model's view at its resolution.
        self.needs_tokenizer_images = model_img_size is not None
        self.encoder = VQKDEncoder(self.grid, patch_size, dim, depth, heads,
                                   int(dim * mlp_ratio), layer_scale)
        self.encode_task_layer = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(),
                                               nn.Linear(dim, code_dim))
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(n_codes, code_dim)

    @torch.no_grad()
    def forward(self, images: torch.Tensor,
                tokenizer_images: Optional[torch.Tensor] = None) -> torch.Tensor:
        if tokenizer_images is images:
            # A caller passing the model's images for both: they are the model's view, [-1, 1].
            tokenizer_images = None
        if tokenizer_images is not None:
            x = tokenizer_images * 2.0 - 1.0  # [0, 1] -> [-1, 1]
        elif self.needs_tokenizer_images:
            raise ValueError(f"VQ-KD reads its own {self.input_size}px view of each image (as "
                             f"BEiT v2 prepares it), not the model's {images.shape[-1]}px one: "
                             "pass the batch's tokenizer_images")
        else:
            x = images  # the model's view is normalised to [-1, 1] already
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            raise ValueError(f"VQ-KD expects {self.input_size}x{self.input_size} images, got "
                             f"{tuple(x.shape[-2:])}")
        w = self.encode_task_layer[0].weight
        feats = self.encoder(x.to(w.dtype))
        # As in BEiT v2: the task layer and the code lookup in fp32 even under autocast, so
        # near-ties between codes are not decided by bf16 rounding.
        with torch.autocast(device_type=feats.device.type, enabled=False):
            l0, l2 = self.encode_task_layer[0], self.encode_task_layer[2]
            h = torch.tanh(F.linear(feats.float(), l0.weight.float(), l0.bias.float()))
            z = F.normalize(F.linear(h, l2.weight.float(), l2.bias.float()), dim=-1)
            codes = F.normalize(self.quantize.embedding.weight.float(), dim=-1)
            return (z @ codes.t()).argmax(-1)


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VQ-KD checkpoint {path!r} does not exist")
    # Weights-only, never a full pickle: the file is downloaded. BEiT v2's training
    # checkpoints also hold their argparse arguments, which megatron_style/files.py allows.
    obj = load_untrusted(path, "VQ-KD checkpoint")
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"{path!r} does not hold a state dict")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def expected_keys(depth: int, layer_scale: bool = False) -> list[str]:
    keys = ["encoder.patch_embed.proj.weight", "encoder.patch_embed.proj.bias",
            "encoder.cls_token", "encoder.pos_embed"]
    for i in range(depth):
        b = f"encoder.blocks.{i}."
        keys += [b + n for n in ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.q_bias",
                                 "attn.v_bias", "attn.proj.weight", "attn.proj.bias",
                                 "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                                 "mlp.fc2.weight", "mlp.fc2.bias")]
        if layer_scale:
            keys += [b + "gamma_1", b + "gamma_2"]
    keys += ["encoder.fc_norm.weight", "encoder.fc_norm.bias",
             "encode_task_layer.0.weight", "encode_task_layer.0.bias",
             "encode_task_layer.2.weight", "encode_task_layer.2.bias",
             "quantize.embedding.weight"]
    return keys


def load_vqkd(path: str, grid: Optional[int] = None, heads: Optional[int] = None,
              model_img_size: Optional[int] = None) -> VQKDTokenizer:
    """Build the tokenizer from a checkpoint in BEiT v2's layout. `grid`: patches per side the
    tokenizer must produce (the model's grid; default: the checkpoint's). `heads`: attention
    heads (not recorded in the weights; default width / 64, which is ViT-B's 12)."""
    sd = _read_state_dict(path)
    sd = {k: v for k, v in sd.items() if not _IGNORED.match(k)}
    # The non-mean-pooling variant names its final norm `norm`; on patch tokens it is the same.
    if "encoder.fc_norm.weight" not in sd and "encoder.norm.weight" in sd:
        sd["encoder.fc_norm.weight"] = sd.pop("encoder.norm.weight")
        sd["encoder.fc_norm.bias"] = sd.pop("encoder.norm.bias")
    for k in ("encoder.pos_embed", "encoder.patch_embed.proj.weight", "quantize.embedding.weight"):
        if k not in sd:
            raise KeyError(f"{path}: no {k!r}; not a VQ-KD checkpoint in BEiT v2's layout "
                           f"(expected keys such as {expected_keys(1)[:4]})")
    depth = 1 + max((int(m.group(1)) for k in sd
                     if (m := re.match(r"encoder\.blocks\.(\d+)\.", k))), default=-1)
    layer_scale = "encoder.blocks.0.gamma_1" in sd
    missing = [k for k in expected_keys(depth, layer_scale) if k not in sd]
    if depth == 0 or missing:
        raise KeyError(f"{path}: VQ-KD checkpoint is missing {len(missing) or 'all block'} keys, "
                       f"e.g. {missing[:5]}")
    unexpected = sorted(set(sd) - set(expected_keys(depth, layer_scale)))
    if unexpected:
        raise KeyError(f"{path}: unexpected keys for a VQ-KD tokenizer, e.g. {unexpected[:5]} "
                       "(relative position bias and other variants are not supported)")
    dim = sd["encoder.cls_token"].shape[-1]
    patch = sd["encoder.patch_embed.proj.weight"].shape[-1]
    n_codes, code_dim = sd["quantize.embedding.weight"].shape
    hidden = sd["encoder.blocks.0.mlp.fc1.weight"].shape[0]
    g0 = math.isqrt(sd["encoder.pos_embed"].shape[1] - 1)
    grid = grid or g0
    heads = heads or max(1, dim // 64)
    tok = VQKDTokenizer(img_size=grid * patch, patch_size=patch, dim=dim, depth=depth, heads=heads,
                        mlp_ratio=hidden / dim, code_dim=code_dim, n_codes=n_codes,
                        layer_scale=layer_scale, model_img_size=model_img_size)
    if grid != g0:
        sd["encoder.pos_embed"] = resize_pos_embed(sd["encoder.pos_embed"], grid)
    tok.load_state_dict(sd, strict=True)
    return tok.freeze()


def resize_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """[1, 1 + g0^2, D] -> [1, 1 + grid^2, D] as BEiT v2's `interpolate_pos_encoding`: the CLS
    row kept, the patch rows resized bicubically as an image with scale_factor (g + 0.1) / g0
    (DINO's 0.1 guards the floor of the output size). A scale factor, not a size: PyTorch then
    samples at positions scaled by g0 / (g + 0.1), where size=g would use g0 / g."""
    cls, patches = pos[:, :1], pos[:, 1:]
    g0 = math.isqrt(patches.shape[1])
    D = patches.shape[-1]
    img = patches.reshape(1, g0, g0, D).permute(0, 3, 1, 2).float()
    scale = (grid + 0.1) / g0
    img = F.interpolate(img, scale_factor=(scale, scale), mode="bicubic", align_corners=False)
    if tuple(img.shape[-2:]) != (grid, grid):  # cannot happen for g, g0 >= 1; said if it does
        raise ValueError(f"VQ-KD position table resized to {tuple(img.shape[-2:])}, not {grid}")
    return torch.cat([cls, img.permute(0, 2, 3, 1).reshape(1, grid * grid, D).to(pos.dtype)], 1)
