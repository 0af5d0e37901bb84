"""Periodic validation while training: a fixed held-out set, fixed masks, every eval.every_steps.

    validator = Validator(trainer)        # once (collective): builds the held-out set
    validator.run(step)                   # collective: numbers of the current weights

The held-out set is at most eval.samples samples of each stream the run trains on (any stage
giving it a weight > 0):
  * data.source demo: the demo's held-out range (indices from EVAL_START on, which training
    never reaches): images, sentences and pairs generated there;
  * data.source shards: the first eval.samples readable samples of eval.<stream>_shards, in
    shard order; bad samples are skipped and counted, never fatal. A stream without
    eval shards is not validated;
  * data.source synthetic: nothing (synthetic batches have no held-out meaning).
Samples are processed as training processes them (tokenized, masked) but without augmentation:
the whole image, no flip, no jitter. Masks come from a numpy Generator seeded by
(eval.seed, stream, index), so the set, its masks and therefore the numbers of the same weights
are the same at every validation, in a resumed run or not.

Numbers: masked-token loss and accuracy per target stream (`val/loss/<stream>`,
`val/acc/<stream>`, streams as in MDMOutput.stats), and, when the model has ITC heads,
zero-shot retrieval over the held-out pairs (`val/retrieval/i2t_r1` ... `t2i_r10`,
`mean_recall`, `candidates`). Rank 0 writes them to TensorBoard and as a metrics.jsonl row of
their own at the step.

Leaving training as it was: the model runs in eval mode (no drop path) without gradients, every
module's train/eval flag is put back as it was, the Python, numpy, torch CPU and CUDA random
states are saved before and restored after, and the training loader is never touched: a run
trains bit-identically with validation on or off.

Under ZeRO-3 every rank must run the same forwards (they gather parameters): every rank
evaluates the whole (bounded) set, and the ranks agree on the number of samples per stream
before the first validation, so a shard one rank could not read cannot make their forward
counts differ. The retrieval features come from the encoder and the ITC heads called directly
(train/retrieval_eval.py), outside the root module's forward whose ZeRO-3 hooks gather the
parameters outside the blocks: those are gathered around them (root_parameters_gathered).
"""
from __future__ import annotations

import time
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from megatron_style.batch import TARGET_STREAMS, PackedBatch, Sample, pack_samples
from megatron_style.checkpoint.rank_state import rng_state, set_rng_state
from megatron_style.config import STREAMS, ConfigError, PretrainConfig
from megatron_style.data.errors import BadSample
from megatron_style.data.raw import RawSample

Log = Callable[[str], None]


# ---- the held-out set ----------------------------------------------------------------------
def validated_streams(cfg: PretrainConfig) -> tuple[str, ...]:
    """The streams a run validates: those it trains on in some stage and, with shards, that
    have eval shards. Synthetic data: none."""
    if cfg.data.source == "synthetic":
        return ()
    from megatron_style.train.stages import StagePlan
    trained = [s for s in STREAMS if any(st.streams[s] > 0 for st in StagePlan(cfg).stages)]
    if cfg.data.source == "shards":
        return tuple(s for s in trained if _has_shards(getattr(cfg.eval, f"{s}_shards")))
    return tuple(trained)


def _has_shards(spec) -> bool:
    entries = [spec] if isinstance(spec, str) else list(spec or [])
    return any(isinstance(e, str) and e.strip() for e in entries)


def mask_rng(seed: int, stream: str, index: int) -> np.random.Generator:
    """The generator of held-out sample `index` of `stream`: a function of these alone, so a
    sample's masks never depend on what was read (or validated) before it."""
    return np.random.default_rng([int(seed), STREAMS.index(stream), int(index)])


def held_out_sample(proc, raw: RawSample, rng: np.random.Generator) -> Sample:
    """`raw` through the run's SampleProcessor as training would process it, but with the
    evaluation view of the image (whole, unflipped, no jitter); masks and text corruption are
    drawn from `rng`. Raises BadSample as the processor does."""
    return proc(raw, rng, train=False)


def _demo_raw(cfg: PretrainConfig, stream: str) -> Iterator[RawSample]:
    """The demo's held-out samples of `stream`: indices EVAL_START, EVAL_START + 1, ...
    (DemoSource: every index from EVAL_START on is outside what training reads). Pairs are
    DemoSource.eval_sample(i); images and sentences come from the same range of their kind."""
    from megatron_style.data.demo import EVAL_START, DemoSource
    src = DemoSource.from_config(cfg)
    i = 0
    while True:
        yield src.eval_sample(i) if stream == "pair" else src.sample(stream, EVAL_START + i)
        i += 1


def shard_raw(spec, stream: str, key: str, data, bad) -> Iterator[RawSample]:
    """The samples of the shards `spec` names (data.<stream>.shards' syntax; `key` names it
    in errors), in shard and tar order, as RawSamples of `stream`'s kind; unreadable shards and
    bad samples are counted in `bad` and skipped. `data`: the DataConfig (read limits, how
    many missing shards are tolerated). Raises ConfigError when `spec` names no shard."""
    from megatron_style.data.shards import resolve_shards
    from megatron_style.data.tar_samples import ReadLimits, read_shard, to_raw
    urls = resolve_shards(spec, key, data.max_missing_shards_fraction)
    limits = ReadLimits.from_config(data)
    for url in urls:
        for sample in read_shard(url, bad, limits):
            try:
                yield to_raw(stream, sample, limits)
            except BadSample as e:
                bad.add(e.reason, str(e))


def held_out_stream(cfg: PretrainConfig, text_tokenizer, stream: str, n: int, seed: int,
                    shards=None, key: str = "") -> tuple[list[Sample], dict[str, int]]:
    """(the first `n` usable held-out samples of `stream`, processed and masked as
    held_out_sample does with mask_rng(seed, stream, i); bad-sample counts by reason): from
    `shards` when given, else the demo's held-out range. ConfigError naming `key` (default
    eval.<stream>_shards) when `shards` names no shard."""
    from megatron_style.data.bad_data import BadDataCounter
    from megatron_style.data.processor import SampleProcessor
    proc = SampleProcessor(cfg, text_tokenizer)
    bad = BadDataCounter(where=f"held-out {stream}")
    raws = _demo_raw(cfg, stream) if shards is None else \
        shard_raw(shards, stream, key or f"eval.{stream}_shards", cfg.data, bad)
    samples: list[Sample] = []
    try:
        for raw in raws:
            try:
                samples.append(held_out_sample(proc, raw, mask_rng(seed, stream, len(samples))))
            except BadSample as e:
                bad.add(e.reason, str(e))
            if len(samples) >= n:
                break  # before the next read: no shard opened beyond what is needed
    finally:
        raws.close()  # ends a shard command still running
    return samples, bad.as_dict()


def build_held_out(cfg: PretrainConfig, text_tokenizer, log: Log = print
                   ) -> tuple[dict[str, list[Sample]], dict[str, dict[str, int]]]:
    """({stream: masked held-out Samples}, {stream: bad-sample counts by reason}) for the
    streams validated_streams(cfg) names, at most eval.samples each. A stream whose eval
    shards cannot be resolved is left out with a warning (a mistyped pattern must not end a
    run hours in; the warning says what is wrong)."""
    out: dict[str, list[Sample]] = {}
    skipped: dict[str, dict[str, int]] = {}
    for stream in validated_streams(cfg):
        shards = getattr(cfg.eval, f"{stream}_shards") if cfg.data.source == "shards" else None
        try:
            samples, skipped[stream] = held_out_stream(cfg, text_tokenizer, stream,
                                                       cfg.eval.samples, cfg.eval.seed, shards)
        except ConfigError as e:
            log(f"WARNING: the {stream} stream is not validated: {e}")
            continue
        if samples:
            out[stream] = samples
    return out, skipped


def pack_in_batches(samples: list[Sample], cfg: PretrainConfig, size: int) -> list[PackedBatch]:
    return [pack_samples(samples[i:i + size], cfg.model) for i in range(0, len(samples), size)]


# ---- the validator -------------------------------------------------------------------------
class Validator:
    """Built once by the trainer, on every rank (collective: the ranks agree on the set's
    size); run(step) on every rank returns the same numbers everywhere and rank 0 logs them."""

    def __init__(self, trainer):
        self.trainer = trainer
        cfg = trainer.cfg
        self.cfg = cfg
        self.batches: dict[str, list[PackedBatch]] = {}
        self.pairs: list[Sample] = []
        self.counts: dict[str, int] = {}
        if cfg.data.source == "synthetic":
            trainer._log("validation (eval.every_steps) needs data.source demo or shards: "
                         "synthetic data has no held-out set, nothing is validated")
            return
        t0 = time.perf_counter()
        samples, skipped = build_held_out(cfg, trainer.text_tokenizer, trainer._log)
        samples = self._agree_on_sizes(samples)
        size = cfg.data.micro_batch_size
        for stream, ss in samples.items():
            self.batches[stream] = pack_in_batches(ss, cfg, size)
            self.counts[stream] = len(ss)
        if hasattr(trainer.engine.module, "itc") and "pair" in samples:
            from megatron_style.train.retrieval_eval import unmasked_pairs
            self.pairs = unmasked_pairs(samples["pair"])
        what = ", ".join(f"{n} {s}" for s, n in self.counts.items()) or "no samples"
        bad = "; ".join(f"{s}: {c}" for s, c in skipped.items() if c)
        trainer._log(f"validation set: {what} (data.source {cfg.data.source}, eval.seed "
                     f"{cfg.eval.seed}){'; skipped ' + bad if bad else ''}; built in "
                     f"{time.perf_counter() - t0:.1f} s")
        if not self.batches:
            trainer._log("WARNING: validation has no held-out samples: nothing is validated")

    def _agree_on_sizes(self, samples: dict[str, list[Sample]]) -> dict[str, list[Sample]]:
        """Collective: every rank keeps the smallest count any rank read of each stream, so
        that all run the same number of forwards (ZeRO-3 gathers parameters in each)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return samples
        t = torch.tensor([len(samples.get(s, [])) for s in STREAMS], dtype=torch.float64,
                         device=self.trainer.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        n = {s: int(v) for s, v in zip(STREAMS, t.tolist())}
        return {s: ss[:n[s]] for s, ss in samples.items() if n[s] > 0}

    def run(self, step: int) -> dict[str, float]:
        """Collective. The held-out numbers of the current weights, logged at `step`."""
        if not self.batches:
            return {}
        t0 = time.perf_counter()
        tr = self.trainer
        module = tr.engine.module
        # Each module's own flag, not module.train() afterwards: a unit that training keeps in
        # eval mode stays so.
        modes = [(m, m.training) for m in module.modules()]
        saved_rng = rng_state()
        module.eval()
        try:
            with torch.no_grad():
                scalars = self._numbers(module)
        finally:
            for m, mode in modes:
                m.training = mode
            set_rng_state(saved_rng)
        if tr.rank == 0:
            _log_scalars(tr.metrics, step, scalars)
            tr._log(summary_line(step, scalars, self.counts, time.perf_counter() - t0))
        return scalars

    def _numbers(self, module) -> dict[str, float]:
        tr = self.trainer
        stats = torch.zeros(len(TARGET_STREAMS), 3, dtype=torch.float64, device=tr.device)
        for stream, batches in self.batches.items():
            for cpu in batches:
                tr.watchdog.beat()  # many forwards: show the watchdog they progress
                stats += tr.engine(tr.prepare(cpu)).stats.double()
        s = stats.cpu()
        scalars: dict[str, float] = {}
        pixels = self.cfg.model.visual_target != "tokens"
        for i, name in enumerate(TARGET_STREAMS):
            n = float(s[i, 1])
            if n > 0:
                scalars[f"val/loss/{name}"] = float(s[i, 0]) / n
                if not (pixels and name in ("image", "pair_image")):  # regression: no "correct"
                    scalars[f"val/acc/{name}"] = float(s[i, 2]) / n
        if self.pairs:
            from megatron_style.model.retrieval import retrieval_recall
            from megatron_style.train.retrieval_eval import pair_features
            tr.watchdog.beat()
            with root_parameters_gathered(module):
                feats = pair_features(module, self.pairs, self.cfg, tr.prepare,
                                      batch_size=self.cfg.data.micro_batch_size)
            for k, v in retrieval_recall(*feats).items():
                scalars[f"val/retrieval/{k}"] = float(v)
        return scalars


def root_parameters_gathered(module):
    """Collective under ZeRO-3: the parameters outside the transformer blocks gathered whole
    for the duration. pair_features calls the encoder and the ITC heads directly rather than
    through the root module's forward, whose hooks gather those parameters (train/zero3.py
    registers them as the root's); the blocks still gather their own in their forwards.
    Below ZeRO-3 (no partitioned parameter) this does nothing."""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters
    in_blocks = {id(p) for p in module.beit3.layers.parameters()}
    return GatheredParameters([p for p in module.parameters() if id(p) not in in_blocks],
                              modifier_rank=None)


def _log_scalars(metrics, step: int, scalars: dict[str, float]) -> None:
    """TensorBoard scalars and one metrics.jsonl row at `step`. Not MetricsLogger.log_step:
    that also prints a training progress line (and resets the progress bar's postfix), which
    a row without training numbers would blank."""
    if metrics is None or not metrics.enabled or not scalars:
        return
    from megatron_style.train.metrics import json_line
    for k, v in scalars.items():
        metrics.writer.add_scalar(k, v, step)
    metrics.writer.flush()
    metrics.jsonl.write(json_line({"step": step, **scalars}) + "\n")


def summary_line(step: int, s: dict[str, float], counts: dict[str, int], seconds: float) -> str:
    parts = []
    for name in TARGET_STREAMS:
        if f"val/loss/{name}" in s:
            acc = s.get(f"val/acc/{name}")
            parts.append(f"{name} {s[f'val/loss/{name}']:.4g}"
                         + (f" ({100 * acc:.1f}%)" if acc is not None else ""))
    if "val/retrieval/i2t_r1" in s:
        r = {k.split("/")[-1]: v for k, v in s.items() if k.startswith("val/retrieval/")}
        parts.append(f"retrieval over {int(r['candidates'])} pairs i2t R@1/5/10 "
                     f"{r['i2t_r1']:.1f}/{r['i2t_r5']:.1f}/{r['i2t_r10']:.1f}, t2i "
                     f"{r['t2i_r1']:.1f}/{r['t2i_r5']:.1f}/{r['t2i_r10']:.1f}")
    n = ", ".join(f"{v} {k}" for k, v in counts.items())
    return f"validation at step {step} ({n}; {seconds:.1f} s): loss (acc) " + " | ".join(parts)
