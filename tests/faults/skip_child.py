"""Child of tests/faults/test_nonfinite_skip.py, started on 2 ranks by the deepspeed launcher.

For each configuration "stage:precision[:variant]" (variants: check / nocheck =
bf16.check_grad_overflow true / false; fp32acc = fp32 gradient accumulation, DeepSpeed's
BF16_Optimizer; static = fp16 with a static loss scale) it builds the real engine
(engine.build_engine from a PretrainConfig, tiny MaskedDataModel, synthetic batches) and runs
SCHEDULE: vetoed steps (a finite loss vetoed anyway, NaN loss on every rank, NaN loss on rank
0 only) between normal steps. Around every step each rank snapshots every tensor it holds:
the module's weights (ZeRO-3: gathered), the optimizer's fp32 masters (its partition), and
the Adam state of each master (exp_avg, exp_avg_sq, step). A reference engine then takes only
the normal steps, on the same batches: vetoed steps that leave nothing behind (no weights,
moments, counters or gradients) end in the same bits. Rank 0 writes what every rank found to
the JSON file named by --out; the test asserts on it.

    deepspeed --num_gpus 2 tests/faults/skip_child.py --out r.json --configs 1:bf16:nocheck,3:fp32
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_style.config import load_config  # noqa: E402
from megatron_style.data.synthetic_loader import SyntheticLoader  # noqa: E402
from megatron_style.model.pretraining import MaskedDataModel  # noqa: E402
from megatron_style.train import engine as engine_lib  # noqa: E402
from megatron_style.train.distributed import init_distributed, read_env  # noqa: E402

# Step kinds: "normal"; "nan_all" (NaN loss on every rank); "nan_one" (NaN loss on rank 0,
# finite on the others: the ranks agreed to veto); "veto_finite" (finite loss everywhere,
# vetoed anyway: DeepSpeed sees nothing wrong and runs its whole update path). The very first
# step is a veto too: a vetoed step before any update must not break what DeepSpeed sets up
# on its first step.
SCHEDULE = ["veto_finite", "normal", "nan_all", "normal", "nan_one", "normal", "veto_finite", "normal"]
MAX_NAMES = 12  # names listed per failed check


def config_overrides(stage: int, precision: str, variant: str) -> list[str]:
    # lr 0.02 and Adam eps 1e-12: every half-precision weight (LayerNorm gains near 1.0
    # included) moves by about lr at a normal step, however small its gradient (with the
    # default eps 1e-6 a gradient below ~1e-7 moves a weight by less than its rounding), so
    # "unchanged" means "not updated".
    o = ["model.preset=tiny", "data.source=synthetic", "data.micro_batch_size=4",
         "data.synthetic_text_len=12", f"parallel.zero_stage={stage}",
         f"parallel.precision={precision}", "optim.lr=0.02", "optim.eps=1e-12"]
    if variant == "fp32acc":  # ZeRO-1 bf16 with fp32 gradient accumulation: BF16_Optimizer
        o.append("parallel.deepspeed.data_types.grad_accum_dtype=fp32")
    if variant == "static":  # fp16 with a static loss scale: DeepSpeed still skips overflows
        o.append("parallel.deepspeed.fp16.loss_scale=1024")
    if variant in ("check", "nocheck"):
        o.append(f"parallel.deepspeed.bf16.check_grad_overflow={str(variant == 'check').lower()}")
    return o


# ---- what a rank holds ----------------------------------------------------------------------
def masters(outer, base) -> list[torch.Tensor]:
    """The fp32 master tensors the wrapped optimizer steps (this rank's partition)."""
    for attr in ("fp32_partitioned_groups_flat",      # ZeRO-3
                 "single_partition_of_fp32_groups",   # ZeRO-1/2
                 "fp32_groups_flat_partition",        # BF16_Optimizer (ZeRO-1, fp32 grad accum)
                 "fp32_groups_flat"):                 # FP16_Optimizer (fused, ZeRO-0)
        found = getattr(outer, attr, None)
        if found:
            return list(found)
    found = getattr(outer, "fp32_groups", None)       # FP16_UnfusedOptimizer (ZeRO-0 bf16/fp16)
    if found:
        return [t for group in found for t in group]
    return [p for g in base.param_groups for p in g["params"]]  # ZeRO-0 fp32: the weights


def snapshot(engine, stage: int) -> dict[str, torch.Tensor]:
    import deepspeed

    named = list(engine.module.named_parameters())
    out: dict[str, torch.Tensor] = {}
    if stage == 3:
        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            for n, p in named:
                out[f"weight:{n}"] = p.detach().clone()
    else:
        for n, p in named:
            out[f"weight:{n}"] = p.detach().clone()
    outer = engine.optimizer
    base = engine_lib.base_optimizer(outer)
    for i, m in enumerate(masters(outer, base)):
        out[f"master:{i}"] = m.detach().clone()
        for k, v in base.state.get(m, {}).items():
            out[f"state:{i}:{k}"] = v.detach().clone() if torch.is_tensor(v) else torch.tensor(v)
    return out


_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
        torch.float64: torch.int64}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype in _INT:
        return torch.equal(a.view(_INT[a.dtype]), b.view(_INT[a.dtype]))
    return torch.equal(a, b)


def compare_veto(before, after) -> dict:
    keys = sorted(set(before) | set(after))
    changed = [k for k in keys if k not in before or k not in after or not same_bits(before[k], after[k])]
    return {"compared": len(keys), "changed": changed[:MAX_NAMES], "n_changed": len(changed)}


def compare_normal(before, after) -> dict:
    weights = [k for k in after if k.startswith("weight:")]
    unchanged = [k for k in weights if same_bits(before[k], after[k])]
    nonfinite = [k for k, v in after.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    bad_counter = []
    for k, v in after.items():
        if k.endswith(":step"):
            prev = float(before[k]) if k in before else 0.0
            if float(v) != prev + 1:
                bad_counter.append(f"{k}: {prev} -> {float(v)}")
    masters_unchanged = [k for k in after if k.startswith("master:") and k in before
                         and same_bits(before[k], after[k])]
    no_state = [k for k in after if k.startswith("master:")
                and f"state:{k.split(':')[1]}:exp_avg" not in after]
    return {"weights": len(weights), "tensors": len(after), "unchanged": unchanged[:MAX_NAMES],
            "n_unchanged": len(unchanged), "nonfinite": nonfinite[:MAX_NAMES],
            "bad_step_counter": bad_counter[:MAX_NAMES], "masters_unchanged": masters_unchanged,
            "no_state": no_state}


# ---- steps -------------------------------------------------------------------------------
def prepare(b, device, dtype):
    b = b.to(device)
    b.images = b.images.to(dtype)
    if b.image_targets.dtype.is_floating_point:
        b.image_targets = b.image_targets.to(dtype)
    return b


def take_step(engine, batch, kind: str, rank: int) -> float:
    out = engine(batch)
    loss = out.loss
    if kind == "nan_all" or (kind == "nan_one" and rank == 0):
        loss = loss * float("nan")
    engine.backward(loss)
    with engine_lib.skip_update(engine, kind != "normal"):
        engine.step()
    return float(loss.detach().float())


def unlinked_state(engine) -> list[str]:
    """Weights whose DeepSpeed fragment mapping holds no exp_avg (this rank's fragments only:
    safe_get_full_optimizer_state would be a collective)."""
    return [n for n, p in engine.module.named_parameters()
            if getattr(p, "_hp_mapping", None) is not None
            and "exp_avg" not in (p._hp_mapping.optim_fragment or {})]


def build(cfg, device):
    torch.manual_seed(cfg.seed)
    model = MaskedDataModel(cfg.model)
    engine, _ = engine_lib.build_engine(model, cfg, device)
    return engine


def loss_scale(engine) -> float:
    o = engine.optimizer
    for attr in ("cur_scale", "loss_scale"):
        v = getattr(o, attr, None)
        if isinstance(v, (int, float)):
            return float(v)
    cfg = getattr(o, "loss_scale_config", None)
    return float(getattr(cfg, "cur_scale", 1.0)) if cfg is not None else 1.0


def destroy(engine) -> None:
    try:
        engine.destroy()
    except Exception:  # noqa: BLE001 - best effort between configurations
        pass


def run_config(name: str, device, rank: int) -> dict:
    stage_s, precision, *rest = name.split(":")
    stage, variant = int(stage_s), (rest[0] if rest else "")
    cfg = load_config(None, config_overrides(stage, precision, variant))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    loader = SyntheticLoader(cfg, rank, dist.get_world_size())
    batches = [prepare(loader.batch(i), device, dtype) for i in range(len(SCHEDULE))]
    t0 = time.perf_counter()
    res: dict = {"steps": []}

    engine = build(cfg, device)
    res["wrapper"] = type(engine.optimizer).__name__
    before = snapshot(engine, stage)
    for i, kind in enumerate(SCHEDULE):
        loss = take_step(engine, batches[i], kind, rank)
        after = snapshot(engine, stage)
        found = compare_normal(before, after) if kind == "normal" else compare_veto(before, after)
        res["steps"].append({"step": i + 1, "kind": kind, "loss": loss if math.isfinite(loss) else str(loss),
                             "applied": bool(engine.was_step_applied()),
                             "loss_scale": loss_scale(engine), **found})
        before = after
    res["skipped_steps"] = int(engine.skipped_steps)
    res["global_steps"] = int(engine.global_steps)
    res["tensors"] = {kind: sum(k.startswith(kind) for k in before)
                      for kind in ("weight:", "master:", "state:")}
    final, unlinked = before, unlinked_state(engine)
    destroy(engine)
    del engine
    gc.collect()

    # fp16's dynamic loss scaler lowers its scale at every overflow the run had and the
    # reference did not: gradients scaled by another power of two round apart (underflow), so
    # the bit-exact comparison is made with a static scale there (variant "static").
    res["reference"] = None
    if precision != "fp16" or variant == "static":
        # The reference takes the normal steps only, on the same batches.
        ref = build(cfg, device)
        for i, kind in enumerate(SCHEDULE):
            if kind == "normal":
                take_step(ref, batches[i], "normal", rank)
        ref_state = snapshot(ref, stage)
        keys = sorted(set(final) | set(ref_state))
        diff = [k for k in keys if k not in final or k not in ref_state
                or not same_bits(final[k], ref_state[k])]
        # DeepSpeed links each weight to its Adam state on its first update (ZeRO-1/2):
        # vetoed steps before it must leave the same links as a run without them.
        res["reference"] = {"compared": len(keys), "differ": diff[:MAX_NAMES], "n_differ": len(diff),
                            "unlinked_run": unlinked[:MAX_NAMES],
                            "unlinked_reference": unlinked_state(ref)[:MAX_NAMES]}
        destroy(ref)
        del ref
        gc.collect()
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--configs", required=True, help="comma-separated stage:precision[:variant]")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)
    args = p.parse_args()
    device = init_distributed(read_env())
    rank = dist.get_rank()
    results: dict = {}
    for name in args.configs.split(","):
        try:
            results[name] = run_config(name, device, rank)
        except Exception:  # noqa: BLE001 - reported per configuration
            results[name] = {"error": traceback.format_exc()[-3000:]}
        dist.barrier()
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"ranks": gathered}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
