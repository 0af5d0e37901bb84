"""Per-GPU memory of a training configuration, before launching it.

The parameter counts come from the real model built on the meta device at the requested
tensor-parallel degree (no memory used); the activation estimate uses that model's local
shapes (heads and FFN columns per rank, vocabulary rows per rank) and the token counts of a
packed micro-batch. DeepSpeed's bookkeeping, as read from its ZeRO code (0.19):

  parameters   2 bytes (bf16/fp16) or 4 (fp32) per local element; ZeRO-3 keeps 1/DP of them
               (plus the gathered working set of one or two layers while they run).
  gradients    same dtype as the parameters; ZeRO-2/3 keep 1/DP of them.
  optimizer    Adam: fp32 master copy + two fp32 moments = 12 bytes per element, 1/DP of them
               under ZeRO >= 1. Exceptions: ZeRO-3 in fp32 reuses the fp32 partition as the
               master (8 bytes); no ZeRO in fp32 is plain torch Adam (8 bytes).

Activations saved for backward per layer, for the GPU kernels (flash-style attention that
keeps q, k, v, its output and the log-sum-exp; LayerNorms that keep their input and
row statistics; linears that keep their input), T tokens, hidden D, FFN width F, t = TP size:
  replicated on every tensor rank:  4 x T x D      (attention-LN input and output, the
                                                    expert-sorted FFN input and its LN output)
  split across tensor ranks:        (5 + d) x T x D/t + 3 x T x F/t
        q, k, v, attention output, inner-LN output (+ d = 1 expert-sorted copy of the attention
        output with per-modality norms), fc1 output, GELU output, FFN inner-LN output
  fp32: LayerNorm row statistics (4 norms x 2 x T) and the attention log-sum-exp (heads/t x T).
With activation checkpointing each layer keeps only its input (T x D) and one layer at a time
is recomputed in backward.

Objectives beyond masked data modeling run forwards of their own through every layer, each
costed as above with its own T: ITC encodes the pairs' images and texts apart (two forwards,
pairs x image tokens and pairs x text tokens), ITM runs a fusion batch of three samples per
pair (the pair, a negative text, a negative image). Around the layers they add the views'
image copy, ITM's images gathered from every data-parallel rank plus its fusion batch's
images, the gathered ITC features and logits (fp32) and the heads' inputs; ITC pooled over
a step of k micro-batches also holds the other k - 1 micro-batches' inputs and the step's
features and logits, and ITM's gathered images are the whole step's. With
checkpointing, every forward keeps its layers' inputs and the largest one's layer is the
one recomputed at a time.

    beit3-memory-plan --preset giant --gpus 8 --tensor 2 --zero 1 2 3 \
        --images 16 --texts 16 --pairs 16 --text-len 64
    beit3-memory-plan --config configs/pretrain/vlmo_base.yaml --gpus 8    (MDM + ITC + ITM)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_style.config import MaskingConfig, ModelConfig
from megatron_style.model.pretraining import MaskedDataModel
from megatron_style.parallel.mappings import TPGroup

GIB = 1024 ** 3
PRECISION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class MicroBatch:
    images: int
    texts: int
    pairs: int
    text_len: int

    def tokens(self, cfg: ModelConfig) -> int:
        n = cfg.image_tokens
        return self.images * n + self.texts * self.text_len + self.pairs * (n + self.text_len)

    def masked(self, cfg: ModelConfig, m: MaskingConfig) -> tuple[int, int]:
        """(hidden patches, hidden text tokens) that reach the heads."""
        img = (round(m.image_ratio * cfg.num_patches) * self.images
               + round(m.pair_image_ratio * cfg.num_patches) * self.pairs)
        txt = (max(1, round(m.text_ratio * self.text_len)) * self.texts
               + max(1, round(m.pair_text_ratio * self.text_len)) * self.pairs)
        return img, txt

    def describe(self) -> str:
        return (f"{self.images} images + {self.texts} texts + {self.pairs} pairs "
                f"(text {self.text_len} tokens)")


@dataclass(frozen=True)
class Objectives:
    """Which objectives the planned run computes: for a recipe, every objective that any of
    its stages gives a weight > 0 (the heaviest stage sets the peak)."""

    mdm: bool = True
    itc: bool = False
    itm: bool = False
    # ITC pooled over a step of this many micro-batches (objective.itc_batch: step): their
    # inputs are on the device together, with the step's features and logits.
    step_pool: int = 1

    def __post_init__(self) -> None:
        if self.step_pool < 1:
            raise ValueError(f"objectives: step_pool {self.step_pool} must be >= 1")
        if not (self.mdm or self.itc or self.itm):
            raise ValueError("objectives: none of mdm, itc, itm is on; at least one is needed")
        if self.itm and not self.itc:
            raise ValueError("objectives: itm draws its negatives from ITC's similarities, so "
                             "it needs itc too")

    @classmethod
    def named(cls, names, step_pool: int = 1) -> "Objectives":
        names = set(names)
        unknown = names - {"mdm", "itc", "itm"}
        if unknown:
            raise ValueError(f"objectives {sorted(unknown)}: not known; use mdm, itc, itm")
        return cls(mdm="mdm" in names, itc="itc" in names, itm="itm" in names,
                   step_pool=step_pool if "itc" in names else 1)

    @property
    def heads(self) -> tuple[str, ...]:
        return tuple(h for h in ("itc", "itm") if getattr(self, h))

    def describe(self) -> str:
        text = " + ".join(n.upper() for n in ("mdm", "itc", "itm") if getattr(self, n))
        return text + (f" (ITC's negatives pooled over a step of {self.step_pool} "
                       "micro-batches)" if self.step_pool > 1 else "")

    def forwards(self, cfg: ModelConfig, mb: "MicroBatch") -> dict[str, int]:
        """Tokens of each forward through the layers, per micro-batch (pairs with text_len)."""
        n = cfg.image_tokens
        out = {}
        if self.mdm:
            out["MDM"] = mb.tokens(cfg)
        if self.itc and mb.pairs:
            out["ITC images"] = mb.pairs * n
            out["ITC texts"] = mb.pairs * mb.text_len
        if self.itm and mb.pairs:
            out["ITM"] = 3 * mb.pairs * (n + mb.text_len)
        return out


@dataclass(frozen=True)
class LocalShapes:
    """What one tensor rank holds, read from the meta-device model."""

    params: int                 # elements on this rank
    params_total: int           # elements of the whole model (TP=1)
    largest_layer: int          # elements of the biggest block on this rank
    dim: int
    attn_width: int             # local heads x head dim
    local_heads: int
    ffn_width: int              # local FFN columns
    layers: int
    decoupled: bool
    text_vocab: int             # local vocabulary rows of the text head
    visual_vocab: int           # local rows of the image head (0 for pixel regression)


def local_shapes(cfg: ModelConfig, tensor: int, tensor_rank: int = 0,
                 heads: tuple[str, ...] = ()) -> LocalShapes:
    """`heads`: the optional ITC / ITM heads the run's model holds (Objectives.heads)."""
    if not 0 <= tensor_rank < tensor:
        raise ValueError(f"tensor rank {tensor_rank} is not in [0, {tensor})")
    with torch.device("meta"):
        full = MaskedDataModel(cfg, None, heads=heads)
        m = full if tensor == 1 else MaskedDataModel(cfg, TPGroup(None, tensor_rank, tensor),
                                                     heads=heads)
    block = m.beit3.layers[0]
    return LocalShapes(
        params=sum(p.numel() for p in m.parameters()),
        params_total=sum(p.numel() for p in full.parameters()),
        largest_layer=max(sum(p.numel() for p in b.parameters()) for b in m.beit3.layers),
        dim=cfg.dim, attn_width=block.attn.local_heads * block.attn.head_dim,
        local_heads=block.attn.local_heads, ffn_width=block.ffn.experts[0].fc1.weight.shape[0],
        layers=cfg.layers, decoupled=cfg.attention == "decoupled",
        text_vocab=m.text_head.weight.shape[0],
        visual_vocab=m.image_head.weight.shape[0] if cfg.visual_target == "tokens" else 0)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes on one GPU."""

    zero: int
    params: int
    grads: int
    optimizer: int
    activations: int
    activations_checkpointed: int
    zero3_gathered: int         # transient: gathered weights of the running (+ prefetched) layer
    sp_saving: int              # what sequence parallelism would save without checkpointing
    sp_saving_checkpointed: int

    @property
    def model_states(self) -> int:
        return self.params + self.grads + self.optimizer


def activation_bytes(s: LocalShapes, cfg: ModelConfig, mb: MicroBatch, masking: MaskingConfig,
                     act_bytes: int, tensor: int, objectives: Objectives = Objectives(),
                     data_parallel: int = 1) -> dict[str, int]:
    """Bytes kept for backward: "layer" (one layer of every forward), "layer_max" (one layer
    of the largest forward), "block_input" (every forward's input of one layer), "edges"
    (outside the layers), "tokens" (through the layers, all forwards)."""
    D = s.dim

    def replicated(T: int) -> int:
        return 4 * T * D * act_bytes

    def layer(T: int) -> int:
        split = ((5 + int(s.decoupled)) * T * s.attn_width + 3 * T * s.ffn_width) * act_bytes
        fp32_stats = (4 * 2 * T + s.local_heads * T) * 4
        return replicated(T) + split + fp32_stats

    forwards = objectives.forwards(cfg, mb)
    image_bytes = cfg.in_chans * cfg.img_size ** 2 * act_bytes
    edges = 0
    if objectives.mdm:
        edges += (mb.images + mb.pairs) * image_bytes
        m_img, m_txt = mb.masked(cfg, masking)
        heads = 2 * (m_img + m_txt) * D * act_bytes
        if tensor > 1:   # vocab-parallel cross-entropy keeps exp(logits) of its rows, fp32
            heads += 4 * (m_img * s.visual_vocab + m_txt * s.text_vocab)
        else:            # the chunked kernel keeps one log-sum-exp per row
            heads += 4 * (m_img + m_txt)
        if cfg.visual_target == "pixels":
            heads += 4 * m_img * cfg.patch_dim
        edges += heads
    P, N = mb.pairs, mb.pairs * data_parallel
    if objectives.itc and P:
        edges += P * image_bytes                        # the image view's own copy
        edges += 2 * 2 * P * D * act_bytes              # both CLS states and projections
        edges += 2 * N * D * 4 + 2 * 2 * P * N * 4      # gathered features, logits + softmax
        k = objectives.step_pool
        if k > 1:  # the other micro-batches' inputs and views; the step's features, logits
            edges += (k - 1) * (mb.images + 2 * mb.pairs) * image_bytes
            edges += 2 * k * N * D * 4 + 2 * 2 * (k * P) * (k * N) * 4
    if objectives.itm and P:
        k = objectives.step_pool   # over a pooled step, the step's images of every rank
        edges += (k * N + 3 * P) * image_bytes          # gathered images, the fusion batch's
        edges += 2 * 3 * P * D * act_bytes + 3 * P * 2 * 4  # pooler in and out, logits
    return {"layer": sum(layer(T) for T in forwards.values()),
            "layer_max": max((layer(T) for T in forwards.values()), default=0),
            "replicated_layer": sum(replicated(T) for T in forwards.values()),
            "block_input": sum(forwards.values()) * D * act_bytes,
            "edges": edges, "tokens": sum(forwards.values()), "forwards": forwards}


def plan(cfg: ModelConfig, tensor: int, zero: int, data_parallel: int, mb: MicroBatch,
         precision: str = "bf16", masking: Optional[MaskingConfig] = None,
         tensor_rank: int = 0, shapes: Optional[LocalShapes] = None,
         objectives: Objectives = Objectives()) -> MemoryPlan:
    """`shapes` must hold `objectives.heads` (local_shapes(..., heads=objectives.heads))."""
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage {zero}: must be one of 0, 1, 2, 3")
    if precision not in PRECISION_BYTES:
        raise ValueError(f"precision {precision!r}: must be one of {sorted(PRECISION_BYTES)}")
    if data_parallel < 1:
        raise ValueError(f"data-parallel size {data_parallel}: must be >= 1")
    s = shapes or local_shapes(cfg, tensor, tensor_rank, heads=objectives.heads)
    masking = masking or MaskingConfig()
    pb = PRECISION_BYTES[precision]
    N, dp = s.params, data_parallel
    params = N * pb // (dp if zero == 3 else 1)
    grads = N * pb // (dp if zero >= 2 else 1)
    if zero == 0:
        opt = N * (8 if precision == "fp32" else 12)
    else:
        opt = N * (8 if (zero == 3 and precision == "fp32") else 12) // dp
    a = activation_bytes(s, cfg, mb, masking, pb, tensor, objectives, dp)
    L = s.layers
    full = L * a["layer"] + a["edges"]
    ckpt = L * a["block_input"] + a["layer_max"] + a["edges"]
    rep_saved = a["replicated_layer"] * (tensor - 1) // tensor
    inp_saved = a["block_input"] * (tensor - 1) // tensor
    rep_max = max((4 * T * s.dim * pb for T in a["forwards"].values()), default=0)
    return MemoryPlan(zero=zero, params=params, grads=grads, optimizer=opt, activations=full,
                      activations_checkpointed=ckpt,
                      zero3_gathered=2 * s.largest_layer * pb if zero == 3 and dp > 1 else 0,
                      sp_saving=L * rep_saved,
                      sp_saving_checkpointed=L * inp_saved + rep_max * (tensor - 1) // tensor)


def _gib(n: int) -> str:
    return f"{n / GIB:8.2f} GiB"


def format_plans(cfg: ModelConfig, plans: list[MemoryPlan], tensor: int, dp: int, mb: MicroBatch,
                 precision: str, shapes: LocalShapes, name: str,
                 objectives: Objectives = Objectives()) -> str:
    T = mb.tokens(cfg)
    forwards = objectives.forwards(cfg, mb)
    opt_name = "fp32 master + 2 moments" if not (precision == "fp32") else "Adam state"
    rows: list[tuple[str, list[str]]] = [
        (f"parameters ({precision})", [_gib(p.params) for p in plans]),
        (f"gradients ({precision})", [_gib(p.grads) for p in plans]),
        (f"optimizer ({opt_name})", [_gib(p.optimizer) for p in plans]),
        ("= model states", [_gib(p.model_states) for p in plans]),
        ("activations", [_gib(p.activations) for p in plans]),
        ("activations, checkpointing", [_gib(p.activations_checkpointed) for p in plans]),
        ("total", [_gib(p.model_states + p.activations) for p in plans]),
        ("total, checkpointing", [_gib(p.model_states + p.activations_checkpointed) for p in plans]),
    ]
    if any(p.zero == 3 for p in plans):
        rows.append(("ZeRO-3 gathered layers (transient)",
                     [_gib(p.zero3_gathered) if p.zero == 3 else "       -    " for p in plans]))
    width = max(len(r[0]) for r in rows) + 2
    lines = [
        f"{name}: {shapes.params_total / 1e6:,.1f}M parameters, {cfg.layers} layers, dim {cfg.dim}, "
        f"{cfg.attention} attention",
        f"GPUs: {tensor * dp} = tensor {tensor} x data {dp}; {precision}; micro-batch per GPU "
        f"group: {mb.describe()} = {T:,} tokens",
        f"objectives: {objectives.describe()}; tokens through the layers per micro-batch: "
        + ", ".join(f"{k} {v:,}" for k, v in forwards.items()),
        f"this GPU holds {shapes.params / 1e6:,.1f}M parameters (tensor rank 0, the largest "
        "vocabulary slice)",
        "",
        " " * width + "".join(f"{'ZeRO-' + str(p.zero):>13}" for p in plans),
    ]
    for label, cells in rows:
        lines.append(f"{label:<{width}}" + "".join(f"{c:>13}" for c in cells))
    if tensor > 1:
        p = plans[0]
        lines += ["", f"sequence parallelism (not built) would save {p.sp_saving / GIB:.2f} GiB of "
                  f"activations, {p.sp_saving_checkpointed / GIB:.2f} GiB with checkpointing"]
    lines += ["", "not counted: DeepSpeed communication buckets (reduce/allgather bucket sizes x 2 "
              "bytes), temporaries of the running layer, CUDA context (~0.5-1 GiB), allocator "
              "fragmentation"]
    return "\n".join(lines)
