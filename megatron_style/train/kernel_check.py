"""Before the first step every rank checks, on its own device, the Triton kernels the run is
about to use (kernels/selfcheck.py: forward and backward against the PyTorch reference, with
the run's dtype and the model's sizes per tensor-parallel rank), and the ranks agree on what
to do with the outcome:

    model.kernels=auto     a kernel that fails (or raises) is disabled on every rank: dispatch
                           runs its PyTorch reference. One WARNING line names the kernel, the
                           error against the tolerance (or the exception), the device and the
                           Triton version; the run goes on.
    model.kernels=triton   such a kernel, or one that cannot run here, stops the run: a
                           ConfigError with that line, exit status 2, on every rank.

Invariants: every rank takes the same path (one all-reduce, MAX of a failed flag per kernel
over the default group, even when only one rank's device failed); a run that uses no Triton
kernel (auto on CPU or in fp32) runs nothing and says so in one line; the check never moves
the global RNG. Results are cached per device and software stack (selfcheck.run_checks).
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

from kernels import dispatch, selfcheck
from megatron_style.config import ConfigError, ModelConfig, PretrainConfig
from megatron_style.parallel.mappings import TPGroup, tp_size

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def triton_in_use(mode: str, device: torch.device, precision: str) -> bool:
    """Whether dispatch would send any of the run's work to Triton (see kernels/dispatch.py)."""
    return mode == "triton" or (mode == "auto" and device.type == "cuda"
                                and _DTYPES[precision] in dispatch.AUTO_DTYPES)


def used_kernels(tp: int) -> tuple[str, ...]:
    """The kernels the model calls through dispatch. Under tensor parallelism the loss is the
    vocabulary-parallel one (parallel/cross_entropy.py), not the masked-token kernel."""
    return tuple(k for k in selfcheck.KERNELS if tp == 1 or k != "masked_token_loss")


def check_shapes(model: ModelConfig, tp: int) -> selfcheck.Shapes:
    """The model's sizes as one tensor-parallel rank's kernels see them."""
    return selfcheck.Shapes(
        head_dim=model.head_dim, heads=max(1, model.heads // tp), dim=model.dim,
        ffn_dim=-(-model.ffn_dim // tp), experts=3 if model.vl_layers else 2,
        vocab=-(-max(model.text_vocab_size, model.visual_vocab_size) // tp),
        seq_len=model.image_tokens, tokens=2 * model.image_tokens)


def check_kernels(cfg: PretrainConfig, device: torch.device, tp: Optional[TPGroup],
                  log: Callable[[str], None], metrics=None, step: int = 0) -> dict[str, str]:
    """Collective (when anything runs). Check, agree, disable or stop; log the start-up line and
    record kernels/<name> (1 Triton, 0 reference) in TensorBoard. Returns kernel -> path."""
    mode, precision = cfg.model.kernels, cfg.parallel.precision
    kernels = used_kernels(tp_size(tp))
    if not triton_in_use(mode, device, precision):
        log(f"kernels: PyTorch reference throughout (model.kernels={mode}, {device.type}, "
            f"{precision}): no Triton kernel in use, nothing to self-check")
        return _record(metrics, {k: "reference" for k in kernels}, step, None)
    if not cfg.model.kernel_check:
        paths = {k: "triton" for k in kernels} if mode == "triton" else {
            k: "triton" if dispatch.triton_available(k) else "reference" for k in kernels}
        log("kernels: " + ", ".join(f"{k} {p}" for k, p in paths.items())
            + " (not self-checked: model.kernel_check=false)")
        return _record(metrics, paths, step, None)
    t0 = time.perf_counter()
    shapes = check_shapes(cfg.model, tp_size(tp))
    results = selfcheck.run_checks(shapes, [_DTYPES[precision]], device, kernels)
    paths = agree(results, mode, device, log)
    cached = sum(r.cached for r in results)
    notes = {r.kernel: "" if paths[r.kernel] == "triton" else f" ({r.status})" for r in results}
    log(f"kernels: self-check {time.perf_counter() - t0:.1f} s on {device}, {precision}, shape class "
        f"{shapes.name()}{f' ({cached} of {len(results)} cached)' if cached else ''}: "
        + ", ".join(f"{k} {p}{notes[k]}" for k, p in paths.items()))
    return _record(metrics, paths, step, results)


def failure_line(r: selfcheck.Result, device: torch.device) -> str:
    """One line: which kernel, by how much or why, on which device and Triton version."""
    f = selfcheck.device_facts(device)
    return (f"{r.kernel} ({r.dtype}) self-check on {device} ({f['device']}, {f['capability']}, "
            f"triton {f['triton']}) {r.describe()}")


def agree(results: list[selfcheck.Result], mode: str, device: torch.device,
          log: Callable[[str], None]) -> dict[str, str]:
    """Collective over the default group (when one exists): the same decision on every rank.
    auto: disable each kernel that went wrong on any rank; triton: raise ConfigError."""
    # Forced Triton on a kernel that cannot run here would fail at its first call: stop now.
    local = [r.bad or (mode == "triton" and r.status == "skipped") for r in results]
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    flags = torch.tensor([float(b) for b in local], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    failed = [bool(f > 0) for f in flags.tolist()]
    paths = {r.kernel: "triton" if mode == "triton" or r.ok else "reference" for r in results}
    if not any(failed):
        return paths
    # Only the failing ranks know their error sizes: gather them, so that every rank states
    # (and, under `triton`, raises) the same line.
    mine = {r.kernel: failure_line(r, device) for r, bad in zip(results, local) if bad}
    gathered: list = [mine]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
    lines = []
    for r, bad in zip(results, failed):
        if not bad:
            continue
        ranks = [i for i, g in enumerate(gathered) if r.kernel in g]
        line = gathered[ranks[0]][r.kernel]
        if world > 1:
            line += f" [on rank {', '.join(map(str, ranks))} of {world}]"
        lines.append(line)
        paths[r.kernel] = "reference"
        if mode != "triton":
            dispatch.disable(r.kernel, line)
            log(f"WARNING: kernel {line}; {r.kernel} falls back to the PyTorch reference")
    if mode == "triton":
        raise ConfigError(f"model.kernels: {'; '.join(lines)}. model.kernels=triton forces the "
                          "Triton kernels, so the run stops; model.kernels=auto falls back to "
                          "the PyTorch reference for a kernel that fails")
    return paths


def _record(metrics, paths: dict[str, str], step: int, results) -> dict[str, str]:
    """kernels/<name> scalars (1 Triton, 0 reference) and the check's table as text, in
    TensorBoard (rank 0's logger only). Not in metrics.jsonl, whose rows are training steps and validations."""
    writer = getattr(metrics, "writer", None) if metrics is not None and metrics.enabled else None
    if writer is not None:
        for k, p in paths.items():
            writer.add_scalar(f"kernels/{k}", 1.0 if p == "triton" else 0.0, step)
        if results:
            metrics.add_text("kernels/self_check", "```\n" + selfcheck.table(results) + "\n```", step)
    return paths
