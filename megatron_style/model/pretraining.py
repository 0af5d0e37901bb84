"""Pretraining: the encoder, masked data modeling heads, and optionally ITC and ITM heads.

forward(batch, weights=(mdm, itc, itm)) returns the weighted sum of the active objectives:
  MDM  the masked batch as packed (BEiT-3's objective), heads applied to masked positions only;
  ITC  the batch's pairs encoded apart (batch.dual_encoder_views), model/contrastive.py;
  ITM  the pairs and hard negatives on the fusion path, model/matching.py.

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
    # [OBJECTIVE_STATS] detached, additive over data-parallel ranks: ITC (loss sum over local
    # pairs, image->text correct, text->image correct, pairs), ITM (loss sum, correct, samples);
    # zeros for an objective that did not run. None from models without those heads.
    objective_stats: Optional[torch.Tensor] = None
    # Detached scalar: ITC's temperature multiplier exp(logit_scale) (clamped), or None.
    scale: Optional[torch.Tensor] = None
    # What to backpropagate when it differs from `loss`: with ITC pooled over the step
    # (model/contrastive_step.py), ITC's term times the accumulation, since the caller
    # averages the micro-batches' gradients and ITC's shares must add up. None: `loss`.
    backward_loss: Optional[torch.Tensor] = None

    def stream_metrics(self) -> dict[str, float]:
        out = {}
        s = self.stats.double().cpu()
        for i, name in enumerate(TARGET_STREAMS):
            n = float(s[i, 1])
            if n > 0:
                out[f"loss/{name}"] = float(s[i, 0]) / n
                out[f"acc/{name}"] = float(s[i, 2]) / n
        return out


#: Length of MDMOutput.objective_stats: ITC's 4 numbers, then ITM's 3.
OBJECTIVE_STATS = 7
MDM_ONLY = (1.0, 0.0, 0.0)


def objective_metrics(s: torch.Tensor) -> dict[str, float]:
    """Loss and accuracy per objective from `objective_stats` summed over steps and ranks."""
    s = s.double().cpu()
    out = {}
    if float(s[3]) > 0:
        n = float(s[3])
        out.update({"loss/itc": float(s[0]) / n, "acc/itc_i2t": float(s[1]) / n,
                    "acc/itc_t2i": float(s[2]) / n})
    if float(s[6]) > 0:
        out.update({"loss/itm": float(s[4]) / float(s[6]), "acc/itm": float(s[5]) / float(s[6])})
    return out


class MaskedDataModel(nn.Module):
    """`heads`: the optional objectives' heads to build, "itc" (ContrastiveHeads at `itc`, the
    released retrieval layout) and "itm" (MatchingHead at `itm`); config.objective.model_heads
    says which a run needs. `contrastive_group`: the data-parallel group whose pairs are pooled
    as ITC negatives and ITM candidates (set by the trainer; None: this process's pairs)."""

    def __init__(self, cfg: ModelConfig, tp: Optional[TPGroup] = None,
                 heads: tuple[str, ...] = ()):
        super().__init__()
        unknown = set(heads) - {"itc", "itm"}
        if unknown:
            raise ValueError(f"unknown heads {sorted(unknown)}; MaskedDataModel builds itc, itm")
        self.cfg, self.tp = cfg, tp
        self.contrastive_group = None
        self.beit3 = MultiwayTransformer(cfg, tp)
        D, rule = cfg.dim, init_rule(cfg)
        init = dict(init_std=rule.std, init_cut=rule.cut)
        self.text_head = ColumnParallelLinear(D, cfg.text_vocab_size, tp=tp, **init)
        if cfg.visual_target == "tokens":
            self.image_head = ColumnParallelLinear(D, cfg.visual_vocab_size, tp=tp, **init)
        else:
            # A regression head is small: replicated, not split across ranks.
            self.image_head = ColumnParallelLinear(D, cfg.patch_dim, tp=None, **init)
        if "itc" in heads:
            from megatron_style.model.contrastive import ContrastiveHeads
            self.itc = ContrastiveHeads(cfg)
        if "itm" in heads:
            from megatron_style.model.matching import MatchingHead
            self.itm = MatchingHead(cfg)

    @property
    def heads(self) -> tuple[str, ...]:
        return tuple(h for h in ("itc", "itm") if hasattr(self, h))

    def forward(self, b: PackedBatch, weights: tuple[float, float, float] = MDM_ONLY,
                views=None, pool=None, pair_features_seed: Optional[int] = None):
        """`weights`: (mdm, itc, itm); an objective with weight 0 is not computed. `views`:
        batch.dual_encoder_views(b) when the caller built them already (the trainer does, on
        the CPU before the batch moves, to keep their host syncs off the device). `pool`: a
        contrastive_step.StepPool when ITC's negatives are the whole step's pairs.

        With `pair_features_seed`, only the [n, 2D] ITC features of `views` under that seed
        (contrastive_step.pair_features; pass 1 of a pooled step). It is a mode of forward
        rather than a method because ZeRO-3 gathers the root module's own parameters (position
        tables, norms, heads) around its forward only (train/zero3.py)."""
        if pair_features_seed is not None:
            from megatron_style.model.contrastive_step import pair_features
            return pair_features(self, views, pair_features_seed)
        w_mdm, w_itc, w_itm = weights
        if (w_itc > 0 and not hasattr(self, "itc")) or (w_itm > 0 and not hasattr(self, "itm")):
            raise ValueError(f"objective weights {weights} need heads this model was built "
                             f"without (it has {self.heads or 'none'}); build it with "
                             "heads=config.objective.model_heads(cfg)")
        dev = b.text_ids.device
        total = torch.zeros((), device=dev)
        unused: list[nn.Parameter] = []
        if w_mdm > 0:
            out = self._mdm(b)
            total = total + w_mdm * out.loss
            stats = out.stats
        else:
            stats = torch.zeros(len(TARGET_STREAMS), 3, dtype=torch.float32, device=dev)
            unused += [*self.image_head.parameters(), *self.text_head.parameters()]
            if w_itc == 0:
                unused += [*self.beit3.final_norm.parameters()]
        if not self.heads:
            return MDMOutput(loss=total + self._zero(unused, dev), stats=stats)
        obj = torch.zeros(OBJECTIVE_STATS, dtype=torch.float32, device=dev)
        scale = None
        if w_itc > 0:
            from megatron_style.batch.views import dual_encoder_views
            from megatron_style.model.contrastive import contrastive_loss
            from megatron_style.model.contrastive_step import pair_features, step_contrastive_loss
            if views is None:
                views = dual_encoder_views(b, self.cfg)
            seed = pool.step.seeds[pool.micro] if pool is not None else None
            features = pair_features(self, views, seed)
            img, txt = features[:, :self.cfg.dim], features[:, self.cfg.dim:]
            if pool is None:
                itc = contrastive_loss(img, txt, self.itc.logit_scale, self.contrastive_group)
            else:
                itc = step_contrastive_loss(img, txt, self.itc.logit_scale,
                                            self.contrastive_group, pool)
                extra = (pool.step.micro_batches - 1) * w_itc * itc.loss
            total = total + w_itc * itc.loss
            obj[:4] = itc.stats
            scale = itc.scale
            if w_itm > 0:
                from megatron_style.model.matching import matching_loss
                D = img.shape[1]
                g = itc.gathered
                itm = matching_loss(self.beit3, self.itm, views.images, views.texts,
                                    img.detach(), txt.detach(), g[:, :D], g[:, D:], itc.offset,
                                    self.contrastive_group, self.cfg,
                                    # negatives drawn from the ITC logits, as VLMo does (the
                                    # scale as a tensor: no host sync)
                                    sim_scale=itc.scale,
                                    candidates=self._step_candidates(pool))
                total = total + w_itm * itm.loss
                obj[4:] = itm.stats
        else:
            unused += [*self.itc.parameters()] if hasattr(self, "itc") else []
        if w_itm == 0 and hasattr(self, "itm"):
            unused += [*self.itm.parameters()]
        loss = total + self._zero(unused, dev)
        return MDMOutput(loss=loss, stats=stats, objective_stats=obj,
                         scale=scale if scale is not None else torch.zeros((), device=dev),
                         backward_loss=loss + extra if pool is not None and w_itc > 0 else None)

    @staticmethod
    def _step_candidates(pool):
        """ITM's candidates over a pooled step: the step's views pass 1 gathered."""
        if pool is None:
            return None
        if pool.step.views is None:
            raise ValueError("ITM over a pooled step needs the step's views: pass them to "
                             "contrastive_step.step_features (views=...)")
        return pool.step.views

    @staticmethod
    def _zero(params, dev) -> torch.Tensor:
        """Parameters an objective of this step did not use still join the graph (times 0),
        so every rank reduces the same set of gradients (DeepSpeed waits for each)."""
        return sum((p.sum() * 0.0 for p in params), torch.zeros((), device=dev))

    def _mdm(self, b: PackedBatch) -> MDMOutput:
        h = self.beit3.encode(b, final_norm=False)
        losses, preds, streams = [], [], []
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
