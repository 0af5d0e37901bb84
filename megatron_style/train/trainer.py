"""The training loop: batches in, DeepSpeed steps, metrics, guards, checkpoints, preemption.

One step = the batch plan's accumulation of micro-batches on every data-parallel rank
(train/batch_plan.py: the global batch over the ranks at hand):
    batch (CPU, packed by the loader) -> device -> visual targets (frozen tokenizer, on device)
    -> model (masked data modeling loss) -> engine.backward -> engine.step
Before the step's last engine.step() the ranks exchange one small tensor (non-finite flag,
loss, preemption flag), so every rank takes the same decision: apply the update, or skip it.
"""
from __future__ import annotations

import math
import os
import time
import uuid
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_style.checkpoint.rank_state import rng_state
from megatron_style.checkpoint.resume import load_loader_states, resume_engine, saved_global_batch
from megatron_style.checkpoint.save import CheckpointWriter, on_rank0
from megatron_style.config import PretrainConfig, dump_yaml
from megatron_style.config.objective import model_heads
from megatron_style.batch import TARGET_STREAMS, PackedBatch
from megatron_style.data.batch_loader import BatchLoader
from megatron_style.model.pretraining import MaskedDataModel, objective_metrics
from megatron_style.parallel.random import seed_data_parallel_rank
from megatron_style.train.batch_plan import plan_batch
from megatron_style.train.engine import (base_optimizer, build_engine, set_learning_rate,
                                         skip_update)
from megatron_style.train.guards import (INJECT_NAN_ENV, LossGuard, TooManyNonFinite,
                                         inject_nan_losses)
from megatron_style.train.kernel_check import check_kernels
from megatron_style.train.metrics import MetricsLogger, device_peak_tflops, peak_memory_gib
from megatron_style.train.profiling import StepProfiler
from megatron_style.train.stages import Freezer, Stage, StagePlan

from megatron_style.train.exit_codes import NONFINITE as EXIT_NONFINITE
from megatron_style.train.exit_codes import OK as EXIT_OK
from megatron_style.train.exit_codes import PREEMPTED as EXIT_PREEMPTED
from megatron_style.train.exit_codes import STOPPED as EXIT_STOPPED
from megatron_style.train.signals import StopRequest
from megatron_style.train.step_stats import (Accumulator, flops_function, itm_flops_function,
                                             loss_record)
from megatron_style.train.watchdog import Watchdog


class Trainer:
    def __init__(self, cfg: PretrainConfig, device: torch.device,
                 stop: Optional[StopRequest] = None, watchdog: Optional[Watchdog] = None):
        self.cfg = cfg
        self.device = device
        # SIGUSR1 / SIGTERM: finish the step, save, exit 75 (train/signals.py). The entry
        # point installs the handlers before start-up; a Trainer built elsewhere does it here.
        self.stop = stop if stop is not None else StopRequest().install()
        self.watchdog = watchdog if watchdog is not None else Watchdog(0)
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self._setup_parallel()
        # Same seed everywhere for the weights (DeepSpeed also broadcasts them), then a
        # per-data-parallel-rank seed for drop path and other randomness of the step.
        torch.manual_seed(cfg.seed)
        self.plan = StagePlan(cfg)
        self.model = MaskedDataModel(cfg.model, self.tp, heads=model_heads(cfg))
        # ITC pools every data-parallel rank's pairs as negatives; under tensor parallelism the
        # tensor ranks of a replica hold the same pairs, so the data-parallel group, never the
        # world (model/contrastive.py).
        self.model.contrastive_group = self.dp_group if self.dp_group is not None else dist.group.WORLD
        if self.tp is not None:
            # Saved with every checkpoint: how tensor-parallel slices merge, so a TP run can
            # resume on another number of data-parallel ranks (checkpoint/universal.py).
            from megatron_style.checkpoint.universal import universal_checkpoint_info
            self.model.universal_checkpoint_info = universal_checkpoint_info(self.model)
        # What init_from loaded, ignored, resized and left to model.init (logged at start-up).
        self.init_report: list[str] = []
        if cfg.checkpoint.init_from:
            from megatron_style.checkpoint.model_files import load_model_file
            self.init_report = load_model_file(self.model, cfg.checkpoint.init_from)
        seed_data_parallel_rank(cfg.seed, self.dp_rank)
        if cfg.parallel.activation_checkpointing:
            self.model.beit3.checkpoint_fn = _checkpoint_block
        # The accumulation is fixed when the engine is built, so the global batch is settled
        # first: the recipe's, or the one the checkpoint to resume from was trained with.
        saved, saved_at = saved_global_batch(cfg.checkpoint.resume, cfg.checkpoint.dir)
        self.batch, self.batch_note = plan_batch(cfg, self.dp_world, saved, saved_at)
        self.engine, self.optimizer = build_engine(self.model, cfg, device, self.mpu,
                                                   grad_accum=self.batch.grad_accum)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
            cfg.parallel.precision]
        # Frozen parameters of a stage: no gradient, no update, no decay (train/stages.py).
        self.freezer = Freezer(self.model, self.optimizer)
        self.visual_tokenizer = self._build_visual_tokenizer()
        # The loader of the stage the run starts in (its stream weights); resume() replaces
        # it with the checkpoint's stage, train() at every stage boundary.
        self.stage: Stage = self.plan.at(0)
        self.loader = self._build_loader(self.plan.data_config(self.stage))
        self.guard = LossGuard(cfg.guards)
        self.step = 0
        self.run_id = ""
        # The step whose state a checkpoint holds (resumed from or written): a stop exits 75
        # ("run again to continue") only when nothing would be lost.
        self.saved_step: Optional[int] = None
        self.writer: Optional[CheckpointWriter] = None
        self._flops_fn = flops_function(self.model)
        self._itm_flops_fn = itm_flops_function(self.model)

    # ---- setup ----------------------------------------------------------------------------
    def _setup_parallel(self) -> None:
        if self.cfg.parallel.tensor > 1:
            from megatron_style.parallel.state import build_parallel_state
            ps = build_parallel_state(self.cfg.parallel.tensor)
            self.tp, self.mpu = ps.tp_group, ps
            self.dp_rank, self.dp_world, self.dp_group = ps.dp_rank, ps.dp_size, ps.dp_group
        else:
            self.tp, self.mpu = None, None
            self.dp_rank, self.dp_world, self.dp_group = self.rank, self.world, None

    def _build_visual_tokenizer(self):
        if self.cfg.data.source == "synthetic":
            return None  # synthetic batches carry their targets
        from megatron_style.data.build_tokenizers import build_visual_tokenizer
        tok = build_visual_tokenizer(self.cfg)
        return tok.to(self.device).eval().requires_grad_(False)

    def _build_loader(self, cfg: PretrainConfig) -> BatchLoader:
        """The loader of one stage: `cfg` is the run's config with the stage's stream weights
        and data seed (StagePlan.data_config)."""
        if cfg.data.source == "synthetic":
            from megatron_style.data.synthetic_loader import SyntheticLoader
            return SyntheticLoader(cfg, self.dp_rank, self.dp_world)
        from megatron_style.data.loader import build_train_loader
        from megatron_style.data.processor import SampleProcessor
        from megatron_style.data.build_tokenizers import build_text_tokenizer
        if not hasattr(self, "text_tokenizer"):
            self.text_tokenizer = build_text_tokenizer(self.cfg)
        processor = SampleProcessor(cfg, self.text_tokenizer)
        return build_train_loader(cfg, self.dp_rank, self.dp_world, processor)

    def _enter_stage(self, stage: Stage, loader_state: Optional[dict] = None) -> None:
        """Make `stage` the current one: its frozen units, and (when it is another stage than
        the loader's) a loader with its stream weights, starting at its streams' beginning.
        Each stage reads its streams from their start with its own shuffle (StagePlan), so
        that a stage boundary needs no position carried between loaders of different mixes:
        a run resumed at a boundary starts the next stage's loader exactly as the straight
        run did."""
        if stage.index > 0 and self.step == stage.start:
            # The objectives change here: a loss level of the last stage is no reference.
            # (Also when a run resumes exactly here, whose guard holds the last stage's.)
            self.guard.new_window()
        if stage.index != self.stage.index:
            self.loader = self._build_loader(self.plan.data_config(stage))
            if len(self.plan.stages) > 1:
                self._log(f"after step {self.step}: "
                          f"{self.plan.describe().splitlines()[stage.index]}")
        self.stage = stage
        self.freezer.apply(stage)

    def weights(self) -> tuple[float, float, float]:
        o = self.stage.objective
        return (o.mdm, o.itc, o.itm)

    # ---- batches --------------------------------------------------------------------------
    def prepare(self, batch: PackedBatch) -> PackedBatch:
        """Move to the device, cast images to the training precision, fill visual targets."""
        b = batch.to(self.device, non_blocking=True)
        if b.image_targets_pending:
            with torch.no_grad():
                b = b.with_image_targets(self.visual_tokenizer(b.images, b.tokenizer_images))
        b.images = b.images.to(self.dtype)
        if b.image_targets.dtype.is_floating_point:
            b.image_targets = b.image_targets.to(self.dtype)
        return b

    def prepare_views(self, batch: PackedBatch):
        """(the dual-encoder views of a CPU batch's pairs (ITC, ITM), the same on the device).
        Built on the CPU: they are index arithmetic with a few host reads, which cost no device
        sync there (batch/views.py)."""
        from megatron_style.batch.views import dual_encoder_views
        cpu = dual_encoder_views(batch, self.cfg.model)
        return cpu, self.views_to_device(cpu)

    def views_to_device(self, v):
        images = v.images.to(self.device, non_blocking=True)
        images.images = images.images.to(self.dtype)
        return v._replace(images=images, texts=v.texts.to(self.device, non_blocking=True),
                          pairs=v.pairs.to(self.device))

    # ---- checkpoints ----------------------------------------------------------------------
    def resume(self) -> Optional[str]:
        """Collective. Load the newest checkpoint every rank can load (checkpoint/resume.py);
        returns its path, or None when starting from scratch."""
        ck = self.cfg.checkpoint
        self.watchdog.beat("resuming")
        found = resume_engine(self.engine, ck.resume, ck.dir, self._log)
        if found is not None:
            client, rank_state = found.client, found.rank_state
            self.step = int(client["step"])
            self.guard.load_state_dict(client["guard"])
            stage = self.plan.at(self.step)
            self._enter_stage(stage)
            if stage.index > 0 and self.step == stage.start:
                # Saved at a stage boundary: its loader position is the previous stage's; the
                # new stage's loader starts at its beginning, as in the uninterrupted run.
                pass
            elif rank_state is not None and not self.loader.layout_changed(rank_state["loader"]):
                self.loader.load_state_dict(rank_state["loader"])
            else:
                # Another number of ranks or loader workers: the readers own other shards now,
                # so continue from where all the old ranks' readers stood (data/reshard.py).
                where = self.loader.load_resharded(load_loader_states(found.tag_dir))
                self._log(f"checkpoint {found.tag_dir} was written with another data layout "
                          f"(ranks or data.num_workers): the data position is carried over: {where}")
            self.run_id = found.run_id
        else:
            self._enter_stage(self.plan.at(0))
        if not self.run_id:  # a new run (or one from before run ids): rank 0 names it
            self.run_id = on_rank0(lambda: uuid.uuid4().hex[:12])
        self.saved_step = self.step
        self.writer = CheckpointWriter(self.engine, ck.dir, ck.keep_last, self.run_id,
                                       ck.init_from, self._log,
                                       global_batch=self.batch.global_batch)
        return found.tag_dir if found is not None else None

    def save(self) -> Optional[str]:
        """Collective. Write a checkpoint of the current step; returns its path, or None when
        checkpoint.save is false. Raises CheckpointError on every rank when any rank could not
        write its part (the previous checkpoints stay as they are)."""
        if not self.cfg.checkpoint.save:
            return None
        self.watchdog.beat(f"saving the checkpoint of step {self.step}")
        client = {"step": self.step, "guard": self.guard.state_dict(), "run_id": self.run_id,
                  "config": dump_yaml(self.cfg), "world_size": self.world}
        path = self.writer.save(self.step, client,
                                {"rng": rng_state(), "loader": self.loader.state_dict()})
        self.saved_step = self.step
        self.watchdog.beat()
        return path

    def _stop_now(self, why: str) -> int:
        """Collective. Save on a stop request; the exit status says whether a checkpoint
        holds the current state (75: run again to continue) or not (4)."""
        path = self.save()
        sig = self.stop.describe()
        if path is not None or self.saved_step == self.step:
            where = path or "the checkpoint resumed from"
            self._log(f"stop requested ({why}): checkpoint {where} holds step {self.step}; "
                      f"exiting with status {EXIT_PREEMPTED} (resume by running the same command)")
            return EXIT_PREEMPTED
        self._log(f"stop requested ({why}) at step {self.step}: no checkpoint written "
                  f"(checkpoint.save is false); exiting with status {EXIT_STOPPED}; the steps "
                  f"since {self.saved_step} are lost (signal {sig})")
        return EXIT_STOPPED

    # ---- the loop -------------------------------------------------------------------------
    def train(self) -> int:
        cfg = self.cfg
        resumed = self.resume()
        self.metrics = MetricsLogger(cfg.logging, self.rank == 0, cfg.steps, self.step)
        self._print_startup(resumed)
        # Collective: the Triton kernels prove themselves on this device before a step trusts them.
        self.kernel_paths = check_kernels(cfg, self.device, self.tp, self._log, self.metrics, self.step)
        if self.step >= cfg.steps:
            self._log(f"the checkpoint is already at step {self.step} of {cfg.steps}: nothing to train")
            self.metrics.close()
            return EXIT_OK
        if self._agree_flag(self.stop.requested):  # a signal during start-up
            code = self._stop_now(f"{self.stop.describe()} during start-up")
            self.metrics.close()
            return code
        inject_nan_losses(self.engine.module, os.environ.get(INJECT_NAN_ENV, ""), lambda: self.step + 1)
        it = iter(self.loader)
        acc = Accumulator(self.device)
        t_last, steps_since = time.perf_counter(), 0
        exit_code = EXIT_OK
        peak = device_peak_tflops(self.device, cfg.logging.peak_tflops)
        gas = self.batch.grad_accum
        last = min(cfg.steps, cfg.stop_at_step) if cfg.stop_at_step else cfg.steps
        lg = cfg.logging
        prof = StepProfiler(lg.profile_at_step, lg.profile_steps, lg.profile_ranks, lg.dir,
                            self.rank, self.device, self.step + 1,
                            self._log if self.rank == 0 else print)
        try:
            while self.step < last:
                self.watchdog.beat(f"step {self.step + 1}")
                prof.step_begins(self.step + 1)
                stage = self.plan.at(self.step)
                if stage.index != self.stage.index:
                    self._enter_stage(stage)
                    it = iter(self.loader)
                lr = self.plan.learning_rate(self.step)
                set_learning_rate(base_optimizer(self.optimizer), lr)
                weights = self.weights()
                sources: list[str] = []
                # finite-loss sum, micro-batches, non-finite ones: agreed on once per step
                step_loss = torch.zeros(3, dtype=torch.float64, device=self.device)
                pooled = None
                if weights[1] > 0 and gas > 1 and self.stage.objective.itc_batch == "step":
                    pooled = self._pool_step(it, gas, prof, itm=weights[2] > 0)
                for micro in range(gas):
                    with prof.range("data"):
                        if pooled is not None:
                            cpu_batch, b, cpu_views, views = pooled.batches[micro]
                        else:
                            cpu_batch = next(it)
                            b = self.prepare(cpu_batch)
                            cpu_views, views = (self.prepare_views(cpu_batch) if weights[1] > 0
                                                else (None, None))
                        sources.extend(cpu_batch.sources)
                    with prof.range("forward"):
                        out = self.engine(b, weights=weights, views=views,
                                          pool=pooled.pool(micro) if pooled is not None else None)
                    loss = out.loss
                    step_loss += loss_record(loss)  # on the device: no host sync per micro-batch
                    acc.add(out, cpu_batch, self._flops_fn, cpu_views, weights, self._itm_flops_fn)  # no GPU sync
                    with prof.range("backward"):
                        self.engine.backward(loss if out.backward_loss is None else out.backward_loss)
                    last_micro = micro == gas - 1
                    if last_micro:
                        decision = self._agree(step_loss)
                    # A non-finite loss on any rank: every rank vetoes the whole update
                    # (engine.py: no weight, master, moment or counter moves).
                    with prof.range("optimizer"), \
                            skip_update(self.engine, skip=last_micro and decision["bad"]):
                        self.engine.step()
                self.step += 1
                prof.step_done(self.step)
                steps_since += 1
                if steps_since == 1 and not hasattr(self, "_first_step_reported"):
                    self._first_step_reported = True
                    self._report_first_step(acc)
                spike = self.guard.check(self.step, decision["loss"], not decision["bad"])
                if decision["bad"]:
                    self._log(f"step {self.step}: non-finite loss on {int(decision['bad_ranks'])} "
                              f"rank(s); update skipped ({self.guard.skipped_total} so far)")
                if spike:
                    self._report_spike(spike, sources)
                if self.step % cfg.logging.every_steps == 0 or self.step == cfg.steps:
                    now = time.perf_counter()
                    self._log_metrics(acc, now - t_last, steps_since, lr, peak, decision)
                    acc = Accumulator(self.device)
                    t_last, steps_since = now, 0
                if (cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0
                        and not decision["preempt"]):   # a preempted job saves first
                    self._validate()
                self.metrics.advance()
                if decision["preempt"]:
                    exit_code = self._stop_now(self.stop.describe())
                    break
                if self.step % cfg.checkpoint.every_steps == 0 and self.step < last:
                    self.save()
            else:
                path = self.save()
                done = "finished" if self.step >= cfg.steps else "stopped (stop_at_step) after"
                self._log(f"{done} {self.step} of {cfg.steps} steps; checkpoint "
                          f"{path or 'none (checkpoint.save is false)'}")
        except TooManyNonFinite as e:
            self._log(f"ERROR: {e}")
            path = self.save()
            self._log(f"the last good state: checkpoint {path or 'none (checkpoint.save is false)'}")
            exit_code = EXIT_NONFINITE
        finally:
            prof.close()
            self.metrics.close()
        return exit_code

    def _pool_step(self, it, gas: int, prof, itm: bool) -> "_PooledStep":
        """Collective. The step's micro-batches read ahead, and pass 1 of ITC over the whole
        step (objective.itc_batch: step; model/contrastive_step.py): every micro-batch's pair
        features without gradient, gathered over the contrastive group, and with ITM the
        step's views too (its negatives are drawn from the whole step)."""
        from megatron_style.model.contrastive_step import micro_seed, step_features
        batches = []
        with prof.range("data"):
            for _ in range(gas):
                cpu_batch = next(it)
                batches.append((cpu_batch, self.prepare(cpu_batch), *self.prepare_views(cpu_batch)))
        model = self.engine.module  # called as a module: ZeRO-3 gathers around its forward
        seeds = tuple(micro_seed(self.cfg.seed, self.step, k, self.dp_rank) for k in range(gas))
        with prof.range("itc step features"), torch.no_grad():
            feats = [model(b, views=views, pair_features_seed=seed)
                     for (_, b, _, views), seed in zip(batches, seeds)]
            step = step_features(feats, model.contrastive_group, seeds,
                                 views=[(v.images, v.texts) for _, _, _, v in batches] if itm else None)
        return _PooledStep(batches, step)

    def _validate(self) -> None:
        """Collective: the held-out set's numbers at this step (train/validation.py), into the
        metrics; the training data order and random state are left as they were."""
        if not hasattr(self, "validator"):
            from megatron_style.train.validation import Validator
            self.validator = Validator(self)
        self.watchdog.beat(f"validation at step {self.step}")
        self.validator.run(self.step)

    def _report_first_step(self, acc: Accumulator) -> None:
        """Tokens and FLOPs of one whole step, measured on the first one (all ranks)."""
        t = acc.counts.clone().to(self.device)
        dist.all_reduce(t, group=self.dp_group)
        samples, tokens, flops = (float(x) for x in t)
        self._log(f"per step: {samples:.0f} samples, {tokens:,.0f} tokens"
                  + (f", {flops / 1e12:.4g} TFLOP (model FLOPs, forward + backward)" if flops else ""))

    def _agree(self, step_loss: torch.Tensor) -> dict[str, Any]:
        """One all-reduce so all ranks agree on: any non-finite loss, the mean loss, preemption.
        The step's one host-device synchronisation is reading its result."""
        stop = torch.tensor([float(self.stop.requested)], dtype=torch.float64, device=self.device)
        t = torch.cat([step_loss, stop])
        dist.all_reduce(t)
        t = t.cpu()
        good_micro = t[1] - t[2]
        return {"bad": bool(t[2] > 0), "bad_ranks": float(t[2]),
                "loss": float(t[0] / good_micro) if good_micro > 0 else float("nan"),
                "preempt": bool(t[3] > 0)}

    def _agree_flag(self, flag: bool) -> bool:
        """Collective: whether any rank has `flag` set."""
        t = torch.tensor([float(flag)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def _report_spike(self, message: str, sources: list[str]) -> None:
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, sources[:64])
        if self.rank == 0:
            flat = [s for part in gathered for s in part]
            shards = sorted({s.rsplit("/", 1)[0] for s in flat})
            self._log(f"WARNING: {message}; batch sources (shards): {', '.join(shards[:20])}"
                      f"{' ...' if len(shards) > 20 else ''}")
            self.metrics.add_text("guards/loss_spike", f"{message}\n\n" + "\n".join(flat[:200]), self.step)

    def _log_metrics(self, acc: Accumulator, elapsed: float, steps: int, lr: float,
                     peak: Optional[float], decision: dict[str, Any]) -> None:
        totals = acc.reduce(self.dp_group)
        scalars: dict[str, float] = {"loss": decision["loss"], "lr": lr}
        for i, name in enumerate(TARGET_STREAMS):
            n = float(totals["stats"][i, 1])
            if n > 0:
                scalars[f"loss/{name}"] = float(totals["stats"][i, 0]) / n
                scalars[f"acc/{name}"] = float(totals["stats"][i, 2]) / n
        scalars.update(objective_metrics(totals["objective_stats"]))
        if float(totals["objective_stats"][3]) > 0:   # ITC ran in this interval
            scalars["itc/scale"] = float(totals["scale"])
        if len(self.plan.stages) > 1:
            scalars["stage"] = float(self.stage.index)
        gn = self.engine.get_global_grad_norm()
        if gn is not None and math.isfinite(float(gn)):
            scalars["grad_norm"] = float(gn)
        if self.cfg.parallel.precision == "fp16":
            scalars["loss_scale"] = float(getattr(self.optimizer, "cur_scale", getattr(self.optimizer, "loss_scale", 0.0)))
        scalars["throughput/samples_per_s"] = totals["samples"] / elapsed
        scalars["throughput/tokens_per_s"] = totals["tokens"] / elapsed
        scalars["time/step_s"] = elapsed / max(1, steps)
        scalars["time/eta_s"] = scalars["time/step_s"] * (self.cfg.steps - self.step)
        if totals["flops"] > 0:
            # Model FLOPs (6 x params used per token + attention). batch_flops counts this
            # tensor rank's share, so the data-parallel sum covers one rank per replica.
            tflops_per_device = totals["flops"] / elapsed / 1e12 / self.dp_world
            scalars["perf/tflops_per_device"] = tflops_per_device
            if peak:
                scalars["perf/mfu"] = tflops_per_device / peak
        scalars["memory/peak_gib"] = peak_memory_gib(self.device)
        scalars["guards/skipped_steps"] = float(self.guard.skipped_total)
        bad = self.loader.bad_sample_counts()
        for reason, n in bad.items():
            scalars[f"data/skipped/{reason}"] = float(n)
        self.metrics.log_step(self.step, scalars)

    def _global_parameter_count(self) -> int:
        """Parameters of the whole model: split ones summed over the tensor-parallel group,
        replicated ones once (collective over the TP group)."""
        def numel(p) -> int:  # ZeRO-3 leaves an empty placeholder; ds_numel is the real size
            return getattr(p, "ds_numel", p.numel())

        params = list(self.model.parameters())
        split = sum(numel(p) for p in params if getattr(p, "tensor_model_parallel", False))
        replicated = sum(numel(p) for p in params if not getattr(p, "tensor_model_parallel", False))
        if self.tp is not None and self.tp.size > 1:
            t = torch.tensor([split], dtype=torch.float64, device=self.device)
            dist.all_reduce(t, group=self.tp.group)
            split = int(t.item())
        return split + replicated

    def _print_startup(self, resumed: Optional[str]) -> None:
        n_params = self._global_parameter_count()  # collective: every rank takes part
        if self.rank != 0:
            return
        lines = [
            f"megatron_style pretraining: {self.world} rank(s) ({self.dp_world} data-parallel x "
            f"{self.world // self.dp_world} tensor-parallel), device {self.device}, "
            f"{self.cfg.parallel.precision}, ZeRO-{self.cfg.parallel.zero_stage}",
            f"model: {n_params / 1e6:.1f}M parameters ({self.cfg.model.layers} layers, dim "
            f"{self.cfg.model.dim}, {self.cfg.model.attention} attention, {self.cfg.model.vl_layers} VL layers)",
            self.batch.describe(),
        ]
        if self.batch_note:
            lines.append(self.batch_note)
        if len(self.plan.stages) > 1:
            lines += self.plan.describe().splitlines()
        elif self.cfg.objective.active() != ("mdm",):
            o = self.cfg.objective
            lines.append("objective: " + ", ".join(f"{n} x {getattr(o, n):g}" for n in o.active()))
        lines += [self._itc_batch_line(st) for st in self.plan.stages if st.objective.itc > 0]
        lines += self.init_report
        lines.append(f"resumed from {resumed} at step {self.step}" if resumed else "starting from scratch")
        for line in lines:
            self._log(line)

    def _itc_batch_line(self, stage: Stage) -> str:
        """How many pairs each ITC query is ranked against in `stage`."""
        pairs = self.plan.data_config(stage).data.stream_counts()["pair"]
        gas = self.batch.grad_accum
        where = f"stage {stage.index + 1} '{stage.name}': " if len(self.plan.stages) > 1 else ""
        if stage.objective.itc_batch == "step" and gas > 1:
            return (f"ITC: {where}{pairs * self.dp_world * gas} pairs per contrastive batch, every "
                    f"pair of the step ({pairs} x {gas} micro-batches x {self.dp_world} "
                    "data-parallel rank(s); objective.itc_batch=step)")
        more = (f"; objective.itc_batch=step would pool the step's {gas} micro-batches"
                if gas > 1 else "")
        return (f"ITC: {where}{pairs * self.dp_world} pairs per contrastive batch ({pairs} per "
                f"micro-batch x {self.dp_world} data-parallel rank(s){more})")

    def _log(self, msg: str) -> None:
        if self.rank == 0:
            (self.metrics.info if hasattr(self, "metrics") else print)(msg)


def _checkpoint_block(block, x, layout):
    return torch.utils.checkpoint.checkpoint(block, x, layout, use_reentrant=False)


class _PooledStep:
    """A step whose ITC negatives are all of its pairs: its micro-batches, read ahead as
    (CPU batch, device batch, CPU views, device views), and pass 1's StepFeatures."""

    def __init__(self, batches: list, step) -> None:
        self.batches, self.step = batches, step

    def pool(self, micro: int):
        from megatron_style.model.contrastive_step import StepPool
        return StepPool(self.step, micro)
