"""Masked data modeling: the encoder plus prediction heads applied to masked positions only.

Text head: vocabulary logits for hidden text tokens (SentencePiece ids).
Image head: visual-token logits for hidden patches (BEiT v2 / k-means ids), or, with
`visual_target: pixels`, a regression of the patch's normalised pixels (MAE-style).
Logits are computed for the masked positions alone, through `kernels.dispatch.masked_token_loss`
(chunked on GPU, never a [tokens, vocab] matrix for unmasked tokens).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import dispatch
from megatron_style.config import ModelConfig
from megatron_style.batch import LANGUAGE, TARGET_STREAMS, VISION, PackedBatch
from megatron_style.model.init import init_rule
from megatron_style.model.transformer import MultiwayTransformer
from megatron_style.parallel.layers import ColumnParallelLinear
from megatron_style.parallel.mappings import TPGroup, tp_size


class MDMOutput(NamedTuple):
    # A NamedTuple rather than a dataclass: DeepSpeed ZeRO-3 hooks the tensors of a module's
    # output to gather parameters again for backward, and sees only inside tuples, lists,
    # dicts and NamedTuples (megatron_style/train/zero3.py).
    loss: torch.Tensor   # scalar: mean over every masked target of the batch
    # [len(TARGET_STREAMS), 3] detached: (loss sum, target count, correct count) per stream,
    # for per-stream loss and masked-token accuracy (pixel targets count no "correct").
    stats: torch.Tensor

    def stream_metrics(self) -> dict[str, float]:
        out = {}
        s = self.stats.double().cpu()
        for i, name in enumerate(TARGET_STREAMS):
            n = float(s[i, 1])
            if n > 0:
                out[f"loss/{name}"] = float(s[i, 0]) / n
                out[f"acc/{name}"] = float(s[i, 2]) / n
        return out


class MaskedDataModel(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: Optional[TPGroup] = None):
        super().__init__()
        self.cfg, self.tp = cfg, tp
        self.beit3 = MultiwayTransformer(cfg, tp)
        D, rule = cfg.dim, init_rule(cfg)
        init = dict(init_std=rule.std, init_cut=rule.cut)
        self.text_head = ColumnParallelLinear(D, cfg.text_vocab_size, tp=tp, **init)
        if cfg.visual_target == "tokens":
            self.image_head = ColumnParallelLinear(D, cfg.visual_vocab_size, tp=tp, **init)
        else:
            # A regression head is small: replicated, not split across ranks.
            self.image_head = ColumnParallelLinear(D, cfg.patch_dim, tp=None, **init)

    def forward(self, b: PackedBatch) -> MDMOutput:
        h = self.beit3.encode(b, final_norm=False)
        losses, preds, streams, targets = [], [], [], []
        if b.image_targets.shape[0]:
            hi = self.beit3.norm_by_modality(h.index_select(0, b.image_target_pos), VISION)
            if self.cfg.visual_target == "tokens":
                loss, pred = self._token_loss(hi, self.image_head, b.image_targets)
                preds.append((pred == b.image_targets).float())
            else:
                p = self.image_head(hi).float()
                loss = F.mse_loss(p, b.image_targets.float(), reduction="none").mean(-1)
                preds.append(torch.zeros_like(loss))
            losses.append(loss)
            streams.append(b.image_target_stream)
        if b.text_targets.shape[0]:
            ht = self.beit3.norm_by_modality(h.index_select(0, b.text_target_pos), LANGUAGE)
            loss, pred = self._token_loss(ht, self.text_head, b.text_targets)
            preds.append((pred == b.text_targets).float())
            losses.append(loss)
            streams.append(b.text_target_stream)
        if not losses:
            raise ValueError("batch has no masked targets: nothing to learn from")
        loss = torch.cat(losses)
        stream = torch.cat(streams)
        stats = torch.zeros(len(TARGET_STREAMS), 3, dtype=torch.float32, device=loss.device)
        stats.index_add_(0, stream, torch.stack(
            [loss.detach().float(), torch.ones_like(loss, dtype=torch.float32), torch.cat(preds)], 1))
        # Parameters not used by this batch (a head, an expert) still join the graph, so
        # every rank reduces the same set of gradients.
        return MDMOutput(loss=loss.mean() + self._unused_zero(b), stats=stats)

    def _token_loss(self, h: torch.Tensor, head: ColumnParallelLinear, targets: torch.Tensor):
        if tp_size(head.tp) == 1:
            return dispatch.masked_token_loss(h, head.weight, head.bias, targets)
        from megatron_style.parallel.cross_entropy import vocab_parallel_masked_loss
        return vocab_parallel_masked_loss(h, head, targets)

    def _unused_zero(self, b: PackedBatch) -> torch.Tensor:
        params = []
        if not b.image_targets.shape[0]:
            params += [*self.image_head.parameters(), *self.beit3.final_norm[VISION].parameters()]
        if not b.text_targets.shape[0]:
            params += [*self.text_head.parameters(), *self.beit3.final_norm[LANGUAGE].parameters()]
        return sum((p.sum() * 0.0 for p in params), torch.zeros((), device=b.text_ids.device))
