"""Compile every kernel for a GPU without having one: registers, spills, shared memory.

    python -m megatron_style.benchmarks.compile_report [--arch 90] [--quick] [--only attn]

Triton compiles ahead of time for a named target (ptxas ships with Triton), so on a CPU-only
machine this catches GPU-only compile errors the interpreter cannot see, and shows whether
the autotune configs fit Hopper: a config that spills registers or needs more shared memory
than the SM has (228 KiB on H100) is a bad candidate. Arguments mimic a real launch at the
giant's shapes, including Triton's specialisation of ints divisible by 16.

Must run without TRITON_INTERPRET (kernels defined under the interpreter cannot be compiled).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch

_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
           torch.int32: "i32", torch.int64: "i64"}


@dataclass
class Ptr:
    dtype: torch.dtype


@dataclass
class Spec:
    """One kernel launch: runtime args (Ptr, int or float) and constexprs; configs come from
    the kernel's autotuner unless given."""

    name: str
    kernel: Any
    args: dict
    constexprs: dict
    configs: list = field(default_factory=list)  # [(constexprs, num_warps, num_stages)]


def _jit_fn(kernel):
    """The JITFunction under autotune / heuristics wrappers, and the heuristics to apply."""
    from triton.runtime.autotuner import Autotuner, Heuristics
    heuristics = {}
    fn = kernel
    while isinstance(fn, (Autotuner, Heuristics)):
        if isinstance(fn, Heuristics):
            heuristics.update(fn.values)
        fn = fn.fn
    return fn, heuristics


def _configs(spec: Spec):
    if spec.configs:
        return spec.configs
    return [(dict(c.kwargs), c.num_warps, c.num_stages) for c in spec.kernel.configs]


def _ptxas_info(ptx: str, arch: int) -> tuple[int, int]:
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(arch)
    path = getattr(ptxas, "path", None) or ptxas[0]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        out = subprocess.run([path, "-v", f"--gpu-name=sm_{arch}a" if arch == 90 else f"--gpu-name=sm_{arch}",
                              f.name, "-o", os.devnull], capture_output=True, text=True).stderr
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return int(regs.group(1)) if regs else -1, int(spill.group(1)) if spill else -1


def compile_spec(spec: Spec, arch: int, quick: bool):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, heuristics = _jit_fn(spec.kernel)
    dont = set(getattr(fn, "do_not_specialize", ()) or ())
    rows = []
    for cfg, warps, stages in _configs(spec)[: 1 if quick else None]:
        consts = dict(spec.constexprs, **cfg)
        sig, attrs, values = {}, {}, dict(spec.args)
        values.update(consts)
        for name, h in heuristics.items():
            consts[name] = values[name] = h(values)
        for i, name in enumerate(fn.arg_names):
            if name in consts:
                sig[name] = "constexpr"
                continue
            v = spec.args[name]
            if isinstance(v, Ptr):
                sig[name] = "*" + _DTYPES[v.dtype]
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif isinstance(v, float):
                sig[name] = "fp32"
            elif v == 1 and name not in dont:
                sig[name] = "constexpr"  # Triton specialises ints equal to 1
                consts[name] = 1
            else:
                sig[name] = "i32"
                if name not in dont and v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn, sig, constexprs={k: consts[k] for k in consts if k in fn.arg_names},
                        attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options=dict(num_warps=warps, num_stages=stages))
        regs, spill = _ptxas_info(k.asm["ptx"], arch)
        ptx = k.asm["ptx"]
        mma = "wgmma" if "wgmma.mma_async" in ptx else ("mma" if "mma.sync" in ptx else "-")
        rows.append((spec.name, ", ".join(f"{a}={b}" for a, b in cfg.items()), warps, stages, regs,
                     spill, k.metadata.shared // 1024, mma))
    return rows


def giant_specs() -> list[Spec]:
    """Launches at the giant's shapes: 16 heads x 88, hidden 1408, FFN 6144, bf16."""
    from kernels.attention import triton_attention as ta
    from kernels.cross_entropy import triton_cross_entropy as tc
    from kernels.layernorm import triton_layernorm as tln
    from kernels.routed_ffn import triton_grouped as tg

    bf, f32, i32 = Ptr(torch.bfloat16), Ptr(torch.float32), Ptr(torch.int32)
    T, H, D = 32 * 257, 16, 88
    head = ta._head_args(D, torch.bfloat16)
    tok = 3 * H * D  # q, k, v sliced from a fused [T, 3, H, D]
    specs = [
        Spec("attn fwd", ta._attn_fwd,
             dict(Q=bf, K=bf, V=bf, O=bf, LSE=f32, CU=i32, scale_log2=0.15, T=T, stride_qt=tok,
                  stride_kt=tok, stride_vt=tok, stride_ot=H * D), head),
        Spec("attn bwd dk dv", ta._attn_bwd_dkdv,
             dict(Q=bf, K=bf, V=bf, DO=bf, DK=bf, DV=bf, LSE=f32, DELTA=f32, CU=i32, scale_log2=0.15,
                  scale=0.1, T=T, stride_qt=tok, stride_kt=tok, stride_vt=tok, stride_dt=H * D,
                  stride_dkt=H * D, stride_dvt=H * D), head),
        Spec("attn bwd dq", ta._attn_bwd_dq,
             dict(Q=bf, K=bf, V=bf, DO=bf, DQ=bf, LSE=f32, DELTA=f32, CU=i32, scale_log2=0.15,
                  scale=0.1, T=T, stride_qt=tok, stride_kt=tok, stride_vt=tok, stride_dt=H * D,
                  stride_dqt=H * D), head),
    ]
    mm = dict(A=bf, B0=bf, B1=bf, B2=bf, BIAS0=bf, BIAS1=bf, BIAS2=bf, C=bf, Z=bf, c0=5000, c1=3000,
              c2=224)
    specs += [
        Spec("fc1 + GELU (grouped)", tg._grouped_mm,
             dict(mm, N_OUT=6144, K=1408, stride_am=1408, stride_w=1408, stride_cm=6144),
             dict(W_T=True, HAS_BIAS=True, GELU=True, PREC="tf32")),
        Spec("fc2 (grouped)", tg._grouped_mm,
             dict(mm, N_OUT=1408, K=6144, stride_am=6144, stride_w=6144, stride_cm=1408),
             dict(W_T=True, HAS_BIAS=False, GELU=False, PREC="tf32")),
        Spec("fc1 dX (grouped)", tg._grouped_mm,
             dict(mm, N_OUT=1408, K=6144, stride_am=6144, stride_w=1408, stride_cm=1408),
             dict(W_T=False, HAS_BIAS=False, GELU=False, PREC="tf32")),
        Spec("dW fc1 (grouped)", tg._grouped_wgrad,
             dict(DZ=bf, X=bf, DW0=bf, DW1=bf, DW2=bf, DB0=bf, DB1=bf, DB2=bf, c0=5000, c1=3000, c2=224,
                  N_OUT=6144, K=1408, stride_dzm=6144, stride_xm=1408),
             dict(HAS_BIAS=True, PREC="tf32")),
    ]
    for dim in (1408, 6144):
        plan = tln._Plan((T,), dim, torch.device("cpu"))
        lnc = [({}, plan.num_warps, 1)]
        common = dict(ROWS_PER_CHUNK=plan.rows, BLOCK_R=plan.block_r, BLOCK_D=plan.block_d)
        specs += [
            Spec(f"LN fwd + residual, D={dim}", tln._ln_fwd,
                 dict(X=bf, R=bf, S=bf, Y=bf, W0=bf, W1=bf, W2=bf, B0=bf, B1=bf, B2=bf, MEAN=f32,
                      RSTD=f32, N=T, D=dim, t1=100, t2=200, r1=5000, r2=7000, eps=1e-5,
                      stride_x=dim, stride_r=dim, stride_s=dim, stride_y=dim),
                 dict(common, HAS_RES=True), lnc),
            Spec(f"LN bwd, D={dim}", tln._ln_bwd,
                 dict(S=bf, DY=bf, DS=bf, DX=bf, DR=bf, W0=bf, W1=bf, W2=bf, MEAN=f32, RSTD=f32,
                      DW_PART=f32, DB_PART=f32, N=T, D=dim, t1=100, t2=200, r1=5000, r2=7000,
                      stride_s=dim, stride_dy=dim, stride_ds=dim, stride_dx=dim, stride_dr=dim),
                 dict(common, HAS_DS=True, HAS_DR=True), lnc),
        ]
    specs += [
        Spec("CE chunk fwd", tc._chunk_fwd,
             dict(LOGITS=bf, TARGETS=Ptr(torch.int64), RUN_MAX=f32, RUN_SUM=f32, TGT=f32, BEST=f32,
                  BEST_IDX=Ptr(torch.int64), v0=8192, C=8192, stride_l=8192),
             dict(BLOCK_V=4096), [({}, 8, 1)]),
        Spec("CE chunk bwd", tc._chunk_bwd,
             dict(LOGITS=bf, TARGETS=Ptr(torch.int64), LSE=f32, DLOSS=f32, v0=8192, C=8192,
                  stride_l=8192, ignore_index=-100),
             dict(BLOCK_V=4096), [({}, 8, 1)]),
    ]
    return specs


def report(arch: int = 90, quick: bool = False, only: str = "") -> str:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled for a GPU")
    lines = [f"| kernel | config | warps | stages | registers | spill bytes | shared KiB | MMA |",
             "|---|---|---|---|---|---|---|---|"]
    for spec in giant_specs():
        if only and only not in spec.name:
            continue
        for row in compile_spec(spec, arch, quick):
            lines.append("| " + " | ".join(str(x) for x in row) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100), 80 (A100)")
    p.add_argument("--quick", action="store_true", help="first autotune config of each kernel only")
    p.add_argument("--only", default="", help="kernels whose name contains this, e.g. 'attn'")
    a = p.parse_args(argv)
    print(report(a.arch, a.quick, a.only))


if __name__ == "__main__":
    sys.exit(main())
