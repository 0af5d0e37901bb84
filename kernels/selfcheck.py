"""The kernels prove themselves on the device they run on: each Triton kernel the model calls
through dispatch is run, forward and backward, beside its PyTorch reference on small inputs
shaped like the run's, and their outputs and input gradients are compared.

    beit3-kernel-check                                  # this machine's device, the giant's shapes
    beit3-kernel-check --dtype bf16 fp16 --head-dim 64 --heads 12 --dim 768 --ffn-dim 3072
    beit3-kernel-check --device cpu                     # the tiny model's shapes, interpreter

Invariants:
- The Triton module and the reference module are called directly, never through dispatch's
  mode, so the global mode and `dispatch.disable` do not change what is checked.
- Inputs come from a private generator: the check never moves the global RNG, so a run that
  checks its kernels draws the same numbers as one that does not.
- Max error is measured per compared tensor (each output and each input gradient) and allowed
  TOL[dtype] x the reference tensor's largest magnitude, plus ATOL[dtype] (so a tensor the
  reference makes exactly zero, an empty expert's gradient, must come out (almost) zero).
  A result reports its worst tensor: the largest error / tolerance.
- A cached result is reused only when its whole key matches: kernel, dtype, shape class,
  device name and compute capability, torch and triton versions, and a hash of the kernel's
  sources and of this file (an edited kernel or check is checked again). The cache is a JSON
  file replaced atomically; one that cannot be read is ignored. Errors and skips are never
  cached: they can be passing conditions (memory, a missing install).
- `PERTURB_ENV` (tests only) perturbs the Triton side of the named kernels so that the whole
  failure path of a run can be exercised; a perturbed check neither reads nor writes the cache.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch

from kernels.attention import reference as attention_ref
from kernels.cross_entropy import reference as ce_ref
from kernels.layernorm import reference as ln_ref
from kernels.routed_ffn import reference as ffn_ref

# Bump when what is checked changes in a way the source hash would not show.
CHECK_VERSION = "1"

# The kernels the model calls through dispatch (add_layer_norm is not used by the model).
KERNELS = ("varlen_attention", "grouped_linear", "grouped_layer_norm", "layer_norm",
           "masked_token_loss")

# Allowed max error relative to the reference's largest magnitude: the same numbers as the
# kernel tests (tests/kernels/conftest.py TOL; a test keeps the two equal). The kernels
# accumulate in fp32 but round inputs, probabilities and outputs to the input dtype.
TOL = {torch.float32: 5e-5, torch.float16: 8e-3, torch.bfloat16: 4e-2}
# Absolute floor, for tensors the reference makes (nearly) zero.
ATOL = {torch.float32: 1e-6, torch.float16: 1e-5, torch.bfloat16: 1e-4}

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CACHE_ENV = "MEGATRON_STYLE_KERNEL_CHECK_CACHE"
DEFAULT_CACHE = os.path.join("~", ".cache", "megatron_style", "kernel_check.json")
#: Tests only: comma-separated kernels whose Triton result is perturbed ("name" perturbs the
#: output, "name:grad" the first input gradient), so that the failure path can be exercised.
PERTURB_ENV = "BEIT3_KERNEL_CHECK_PERTURB"

_HERE = os.path.dirname(os.path.abspath(__file__))
# Sources whose text decides a kernel's result (besides triton_support.py and this file).
_SOURCES = {
    "varlen_attention": ("attention/triton_attention.py", "attention/reference.py"),
    "grouped_linear": ("routed_ffn/triton_grouped.py", "routed_ffn/reference.py"),
    "grouped_layer_norm": ("routed_ffn/triton_grouped.py", "layernorm/triton_layernorm.py",
                           "routed_ffn/reference.py"),
    "layer_norm": ("layernorm/triton_layernorm.py", "layernorm/reference.py"),
    "masked_token_loss": ("cross_entropy/triton_cross_entropy.py", "cross_entropy/reference.py"),
}


@dataclass(frozen=True)
class Shapes:
    """The sizes of a run that the kernels see (per tensor-parallel rank): a "shape class".
    Defaults: the paper's giant (kernels/ cannot read the model presets; a test keeps these
    equal to megatron_style's). `seq_len` is the longest sample (an image: CLS + patches),
    `tokens` the rows of one grouped-FFN case."""

    head_dim: int = 88
    heads: int = 16
    dim: int = 1408
    ffn_dim: int = 6144
    experts: int = 3
    vocab: int = 64010
    seq_len: int = 257
    tokens: int = 514

    def __post_init__(self):
        if not 1 <= self.experts <= 3:
            raise ValueError(f"experts must be 1..3, got {self.experts}")
        for k, v in asdict(self).items():
            if v < 1:
                raise ValueError(f"{k} must be >= 1, got {v}")

    def name(self) -> str:
        return (f"hd{self.head_dim}-h{self.heads}-d{self.dim}-f{self.ffn_dim}-e{self.experts}-"
                f"v{self.vocab}-s{self.seq_len}-t{self.tokens}")

    def seq_lens(self) -> list[int]:
        """Ragged samples for the varlen batch: a short one, the longest, a one-token sample
        in the middle of the stream, and one of about half the longest."""
        L = self.seq_len
        return [min(7, L), L, 1, min(L, L // 2 + 3)]

    def counts(self, with_empty: bool) -> tuple[int, ...]:
        """Rows per expert, ragged (no multiple of a tile); with_empty: one expert has none."""
        n, e = self.tokens, self.experts
        if e == 1:
            return (n,)
        if with_empty:  # the first expert empty with two, the middle one with three
            return (0, n) if e == 2 else (n - n // 3, 0, n // 3)
        a = min(n, n * 5 // 8 + 1)
        if e == 2:
            return (a, n - a)
        b = min(n - a, (n - a) // 2 + 1)
        return (a, b, n - a - b)

    def masked_rows(self) -> int:
        return max(3, self.tokens // 4)


TINY = Shapes(head_dim=16, heads=4, dim=64, ffn_dim=256, experts=3, vocab=1000, seq_len=17,
              tokens=34)


@dataclass
class Result:
    """One kernel's check. status: passed | failed | error | skipped. For passed / failed,
    max_error and tolerance are those of the worst compared tensor (`worst`)."""

    kernel: str
    dtype: str
    shapes: str
    status: str
    max_error: Optional[float] = None
    tolerance: Optional[float] = None
    worst: str = ""
    detail: str = ""
    seconds: float = 0.0
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "passed"

    @property
    def bad(self) -> bool:
        """Failed or raised: the kernel must not be trusted here."""
        return self.status in ("failed", "error")

    def describe(self) -> str:
        if self.status in ("passed", "failed"):
            rel = "<=" if self.ok else ">"
            return (f"{self.status}: max error {self.max_error:.3g} {rel} tolerance "
                    f"{self.tolerance:.3g} in {self.worst}")
        return f"{self.status}: {self.detail}"

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("cached")
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Result":
        return cls(**{**d, "cached": True})


@dataclass
class _Case:
    name: str
    probe: tuple           # the call's tensors in the dispatch protocol's order (why_unsupported)
    run: Callable          # run(module, dtype) -> {tensor name: tensor}
    ref_dtype: Optional[torch.dtype] = torch.float32   # None: the check's own dtype


# ---- the cases ----------------------------------------------------------------------------

def _rand(g, *shape, scale=1.0, shift=0.0):
    return torch.randn(*shape, generator=g) * scale + shift


def _leaves(ts, dt):
    return [None if t is None else t.detach().to(dt).requires_grad_() for t in ts]


def _attention_cases(s: Shapes, dtype, device, g) -> list[_Case]:
    lens = s.seq_lens()
    T, H, D = sum(lens), s.heads, s.head_dim
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    # q, k, v as views of one fused [T, 3, H, D] tensor, as the model makes them.
    qkv = _rand(g, T, 3, H, D).to(device=device, dtype=dtype)
    do = _rand(g, T, H, D).to(device=device, dtype=dtype)

    def run(mod, dt):
        (leaf,) = _leaves([qkv], dt)
        q, k, v = leaf.unbind(1)
        o = mod.varlen_attention(q, k, v, cu, max(lens), None)
        o.backward(do.to(dt))
        return {"out": o, "dq": leaf.grad[:, 0], "dk": leaf.grad[:, 1], "dv": leaf.grad[:, 2]}

    q, k, v = qkv.unbind(1)
    return [_Case(f"lens {lens}", (q, k, v), run)]


def _grouped_linear_cases(s: Shapes, dtype, device, g) -> list[_Case]:
    cases = []
    # fc1 (dim -> ffn, GELU, bias) with an empty expert; fc2 (ffn -> dim, no bias as under
    # tensor parallelism) with every expert used.
    for name, k, n, act, bias, empty in (("fc1", s.dim, s.ffn_dim, "gelu", True, True),
                                         ("fc2", s.ffn_dim, s.dim, None, False, False)):
        counts = s.counts(empty)
        rows = sum(counts)
        x = _rand(g, rows, k).to(device=device, dtype=dtype)
        ws = [(_rand(g, n, k) / k ** 0.5).to(device=device, dtype=dtype) for _ in counts]
        bs = [_rand(g, n).to(device=device, dtype=dtype) if bias else None for _ in counts]
        dy = _rand(g, rows, n).to(device=device, dtype=dtype)

        def run(mod, dt, x=x, ws=ws, bs=bs, dy=dy, counts=counts, act=act):
            leaves = _leaves([x, *ws, *bs], dt)
            xl, wl, bl = leaves[0], leaves[1:1 + len(ws)], leaves[1 + len(ws):]
            y = mod.grouped_linear(xl, counts, wl, bl, act)
            y.backward(dy.to(dt))
            out = {"out": y, "dx": xl.grad}
            out.update({f"dW{e}": w.grad for e, w in enumerate(wl)})
            out.update({f"db{e}": b.grad for e, b in enumerate(bl) if b is not None})
            return out

        cases.append(_Case(f"{name} counts {list(counts)}", (x, *ws, *[b for b in bs if b is not None]), run))
    return cases


def _norm_inputs(g, rows, width, groups, dtype, device):
    x = _rand(g, rows, width, scale=2.0, shift=0.5).to(device=device, dtype=dtype)
    ws = [_rand(g, width).to(device=device, dtype=dtype) for _ in range(groups)]
    bs = [_rand(g, width).to(device=device, dtype=dtype) for _ in range(groups)]
    dy = _rand(g, rows, width).to(device=device, dtype=dtype)
    return x, ws, bs, dy


def _grouped_layer_norm_cases(s: Shapes, dtype, device, g) -> list[_Case]:
    cases = []
    # The FFN's inner norm (width ffn_dim) with an empty expert; the block norms (width dim).
    for name, width, empty in (("ffn_norm", s.ffn_dim, True), ("norm", s.dim, False)):
        counts = s.counts(empty)
        x, ws, bs, dy = _norm_inputs(g, sum(counts), width, len(counts), dtype, device)

        def run(mod, dt, x=x, ws=ws, bs=bs, dy=dy, counts=counts):
            leaves = _leaves([x, *ws, *bs], dt)
            n = len(ws)
            y = mod.grouped_layer_norm(leaves[0], counts, leaves[1:1 + n], leaves[1 + n:], 1e-5)
            y.backward(dy.to(dt))
            out = {"out": y, "dx": leaves[0].grad}
            out.update({f"dw{e}": t.grad for e, t in enumerate(leaves[1:1 + n])})
            out.update({f"db{e}": t.grad for e, t in enumerate(leaves[1 + n:])})
            return out

        cases.append(_Case(f"{name} counts {list(counts)}", (x, *ws, *bs), run))
    return cases


def _layer_norm_cases(s: Shapes, dtype, device, g) -> list[_Case]:
    x, (w,), (b,), dy = _norm_inputs(g, s.tokens + 3, s.dim, 1, dtype, device)

    def run(mod, dt):
        xl, wl, bl = _leaves([x, w, b], dt)
        y = mod.layer_norm(xl, wl, bl, 1e-5)
        y.backward(dy.to(dt))
        return {"out": y, "dx": xl.grad, "dw": wl.grad, "db": bl.grad}

    return [_Case(f"rows {s.tokens + 3} x {s.dim}", (x, w, b), run)]


def _masked_token_loss_cases(s: Shapes, dtype, device, g) -> list[_Case]:
    M, D, V = s.masked_rows(), s.dim, s.vocab
    h = _rand(g, M, D).to(device=device, dtype=dtype)
    w = _rand(g, V, D, scale=2.0 / D ** 0.5).to(device=device, dtype=dtype)
    b = _rand(g, V, scale=0.1).to(device=device, dtype=dtype)
    t = torch.randint(0, V, (M,), generator=g)
    t[1] = -100  # an ignored row: loss 0, no gradient
    t = t.to(device)
    dloss = torch.rand(M, generator=g).to(device) + 0.5

    def run(mod, dt):
        hl, wl, bl = _leaves([h, w, b], dt)
        loss, am = mod.masked_token_loss(hl, wl, bl, t)
        loss.backward(dloss)
        # Near-ties in half precision may pick either index: compare the (fp32) logit at each
        # row's argmax instead of the index, so only a pick far from the best one fails.
        logits = torch.nn.functional.linear(h.float(), w.float(), b.float())
        picked = logits.gather(1, am.view(-1, 1)).squeeze(1)
        return {"loss": loss, "dhidden": hl.grad, "dweight": wl.grad, "dbias": bl.grad,
                "argmax logit": picked}

    # The reference sees the same inputs in the same dtype, as in the kernel tests: the
    # kernel rounds each chunk's logits to the input dtype exactly as F.linear does.
    return [_Case(f"M {M} x V {V}", (h, w, b, t), run, ref_dtype=None)]


_CASES = {
    "varlen_attention": (_attention_cases, attention_ref),
    "grouped_linear": (_grouped_linear_cases, ffn_ref),
    "grouped_layer_norm": (_grouped_layer_norm_cases, ffn_ref),
    "layer_norm": (_layer_norm_cases, ln_ref),
    "masked_token_loss": (_masked_token_loss_cases, ce_ref),
}


# ---- running and comparing ----------------------------------------------------------------

def _perturbations() -> dict[str, str]:
    """kernel -> "out" | "grad" from PERTURB_ENV."""
    out = {}
    for item in os.environ.get(PERTURB_ENV, "").split(","):
        item = item.strip()
        if item:
            name, _, what = item.partition(":")
            out[name] = "grad" if what == "grad" else "out"
    return out


def _perturb(results: dict, what: str) -> dict:
    names = list(results)
    key = names[1] if what == "grad" and len(names) > 1 else names[0]
    t = results[key].detach()
    return {**results, key: t.float() * 1.25 + 0.01}


def _compare(got: dict, ref: dict, dtype) -> tuple[float, float, str, float]:
    """(max error, tolerance, tensor name, error / tolerance) of the worst tensor."""
    worst = (0.0, ATOL[dtype], "", -1.0)
    for name, e in ref.items():
        a = got[name]
        if a is None or e is None or tuple(a.shape) != tuple(e.shape):
            shape = lambda t: None if t is None else tuple(t.shape)  # noqa: E731
            return float("inf"), 0.0, f"{name} (shape {shape(a)}, expected {shape(e)})", float("inf")
        if not e.numel():
            continue
        a, e = a.detach().float(), e.detach().float()
        err = (a - e).abs().max().item()
        tol = TOL[dtype] * e.abs().max().item() + ATOL[dtype]
        ratio = float("inf") if err != err else err / tol
        if ratio > worst[3]:
            worst = (err, tol, name, ratio)
    return worst


@contextlib.contextmanager
def _exact_fp32(device: torch.device) -> Iterator[None]:
    """fp32 matmuls in IEEE fp32 while checking: a TF32 reference would be off by ~1e-3."""
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.cuda.device(device):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _triton(kernel: str):
    from kernels import dispatch

    return dispatch.triton_module(kernel)


def check_kernel(kernel: str, shapes: Shapes, dtype: torch.dtype, device) -> Result:
    """Run one kernel's cases (Triton and reference, forward and backward) and compare."""
    device = torch.device(device)
    dname = dtype_name(dtype)
    res = Result(kernel, dname, shapes.name(), "skipped")
    t0 = time.perf_counter()
    mod = _triton(kernel)
    if isinstance(mod, Exception):
        res.detail = f"Triton is not importable: {type(mod).__name__}: {mod}"
        return res
    build, ref_mod = _CASES[kernel]
    perturb = _perturbations().get(kernel)
    worst = (0.0, ATOL[dtype], "", -1.0)
    try:
        with _exact_fp32(device), torch.enable_grad():
            g = torch.Generator().manual_seed(20220822)  # private: the global RNG stays put
            for case in build(shapes, dtype, device, g):
                problem = mod.why_unsupported(kernel, *case.probe)
                if problem:
                    res.detail = f"unsupported ({case.name}): {problem}"
                    return res
                got = case.run(mod, dtype)
                if perturb:
                    got = _perturb(got, perturb)
                ref = case.run(ref_mod, case.ref_dtype or dtype)
                err, tol, name, ratio = _compare(got, ref, dtype)
                if ratio > worst[3]:
                    worst = (err, tol, f"{name} ({case.name})", ratio)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    except Exception as e:  # noqa: BLE001 - any exception means "do not trust this kernel here"
        res.status = "error"
        res.detail = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        res.seconds = time.perf_counter() - t0
        return res
    err, tol, name, ratio = worst
    res.status = "passed" if ratio <= 1.0 else "failed"
    res.max_error, res.tolerance, res.worst = err, tol, name
    res.seconds = time.perf_counter() - t0
    return res


# ---- the cache ----------------------------------------------------------------------------

def triton_version() -> str:
    try:
        import triton
    except Exception:  # noqa: BLE001 - a broken install reads as "none"
        return "none"
    return str(getattr(triton, "__version__", "unknown"))


def device_facts(device) -> dict[str, str]:
    """What about the device and the installed stack decides a kernel's numbers."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        cap = f"sm_{major}{minor}"
    else:
        interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        name, cap = device.type, "interpreter" if interp else "-"
    return {"device": name, "capability": cap, "torch": torch.__version__,
            "triton": triton_version()}


_source_hashes: dict[str, str] = {}


def source_hash(kernel: str) -> str:
    """Hash of the kernel's sources, triton_support.py, this file and CHECK_VERSION."""
    if kernel not in _source_hashes:
        h = hashlib.sha256(CHECK_VERSION.encode())
        for rel in (*_SOURCES[kernel], "triton_support.py", "selfcheck.py"):
            with open(os.path.join(_HERE, rel), "rb") as f:
                h.update(rel.encode() + b"\0" + f.read())
        _source_hashes[kernel] = h.hexdigest()[:16]
    return _source_hashes[kernel]


def cache_key(kernel: str, dtype: torch.dtype, shapes: Shapes, device) -> str:
    f = device_facts(device)
    return "|".join([kernel, dtype_name(dtype), shapes.name(), f["device"], f["capability"],
                     f"torch {f['torch']}", f"triton {f['triton']}", source_hash(kernel)])


def default_cache_path() -> str:
    return os.path.expanduser(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def _read_cache(path: str) -> dict:
    """The cache's entries; {} when the file is missing, unreadable or not ours."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        entries = data["entries"]
        return entries if isinstance(entries, dict) else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _write_cache(path: str, new: dict) -> None:
    """Merge `new` into the file (temp file + os.replace: readers see the old or the new file,
    never half of one). Ranks sharing a file may overwrite each other's fresh entries: they are
    then checked again next time, nothing worse. A cache that cannot be written is skipped."""
    try:
        folder = os.path.dirname(path) or "."
        os.makedirs(folder, exist_ok=True)
        entries = {**_read_cache(path), **new}
        fd, tmp = tempfile.mkstemp(prefix=".kernel_check.", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"version": 1, "entries": entries}, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass


def run_checks(shapes: Shapes, dtypes: Sequence[torch.dtype], device,
               kernels: Sequence[str] = KERNELS, cache_path: Optional[str] = None,
               use_cache: bool = True) -> list[Result]:
    """Check `kernels` in each dtype on `device`; results in that order. Cached results (same
    key) are reused without running anything; new passed / failed results are cached."""
    for k in kernels:
        if k not in _CASES:
            raise ValueError(f"no self-check for {k!r}; kernels: {list(KERNELS)}")
    use_cache = use_cache and not _perturbations()
    path = cache_path or default_cache_path()
    cached = _read_cache(path) if use_cache else {}
    out, fresh = [], {}
    for dtype in dtypes:
        for k in kernels:
            key = cache_key(k, dtype, shapes, device)
            hit = cached.get(key)
            if isinstance(hit, dict):
                try:
                    out.append(Result.from_json(hit))
                    continue
                except TypeError:
                    pass  # an entry of another layout: check again
            r = check_kernel(k, shapes, dtype, device)
            out.append(r)
            if r.status in ("passed", "failed"):
                fresh[key] = r.to_json()
    if use_cache and fresh:
        _write_cache(path, fresh)
    if torch.device(device).type == "cuda" and len(out) > sum(r.cached for r in out):
        torch.cuda.empty_cache()  # the check's blocks back to the device, not kept for the run
    return out


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def table(results: Sequence[Result]) -> str:
    head = ("kernel", "dtype", "shape class", "result", "max error", "tolerance", "time", "note")
    rows = [head]
    for r in results:
        num = lambda x: "-" if x is None else f"{x:.3g}"  # noqa: E731
        note = r.worst if r.status in ("passed", "failed") else r.detail
        rows.append((r.kernel, r.dtype, r.shapes, r.status, num(r.max_error), num(r.tolerance),
                     "cached" if r.cached else f"{r.seconds:.2f} s", note))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1]
                     for row in rows)
