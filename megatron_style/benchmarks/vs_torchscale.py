"""Forward + backward time of our decoupled model vs microsoft/torchscale's BEiT3 on CPU.

    python -m megatron_style.benchmarks.vs_torchscale [--layers 2] [--batch 8] [--repeats 5]

Both models hold the same weights (ours loaded from torchscale's state dict through the
released-checkpoint mapping) and see the same inputs: a batch of images, a batch of padded
texts, a batch of image-text pairs. Ours runs twice: in the reference layout (encode_padded,
the same [B, L] tensors) and packed (the same samples through pack_samples + encode, the path
the trainer uses; a packed text has no padding, so it also skips the padded positions' work).
The acceptance is a ratio ours / torchscale <= 1. On a machine others are using, run with
`--threads 1 --clock cpu --repeats 10`: process CPU time of one thread hardly moves with load.

Gradients accumulate over the runs (no zeroing in between) for both models alike. Ours also
gives the unused way and expert of a one-kind batch a zero gradient (ZeRO and DDP want one
for every parameter), which torchscale skips: about 1% of a text-only step at this size.

Needs `pip install --no-deps torchscale==0.3.0 fairscale`; timm is replaced by a stub (below).
"""
from __future__ import annotations

import argparse
import sys
import time
import types
from typing import Callable

import torch

from megatron_style.config import model_config
from megatron_style.batch import Sample, pack_samples
from megatron_style.model.released_checkpoint import load_released_state_dict
from megatron_style.model.transformer import MultiwayTransformer


def import_torchscale_beit3():
    """torchscale imports `timm.models.layers.drop_path` and nothing else from timm; installing
    timm would pull torchvision and a CUDA torch, so a stub with timm's per-sample drop path
    stands in for it when timm is absent."""
    try:
        import timm.models.layers  # noqa: F401
    except ImportError:
        def drop_path(x, drop_prob=0.0, training=False):
            if drop_prob == 0.0 or not training:
                return x
            keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - drop_prob)
            return x * keep / (1 - drop_prob)

        names = ("timm", "timm.models", "timm.models.layers")
        mods = {n: types.ModuleType(n) for n in names}
        mods["timm.models.layers"].drop_path = drop_path
        sys.modules.update(mods)
    from torchscale.architecture.config import EncoderConfig
    from torchscale.model.BEiT3 import BEiT3
    return BEiT3, EncoderConfig


def build_pair(layers: int, dim: int, heads: int, ffn: int, img: int, patch: int, vocab: int,
               max_text: int, seed: int = 0):
    """(torchscale BEiT3, our MultiwayTransformer) with identical weights, in eval mode."""
    BEiT3, EncoderConfig = import_torchscale_beit3()
    torch.manual_seed(seed)
    args = EncoderConfig(img_size=img, patch_size=patch, vocab_size=vocab, multiway=True,
                         layernorm_embedding=False, normalize_output=True, no_output_layer=True,
                         encoder_embed_dim=dim, encoder_attention_heads=heads,
                         encoder_ffn_embed_dim=ffn, encoder_layers=layers,
                         max_source_positions=max_text + 2)
    ref = BEiT3(args).eval()
    cfg = model_config("base", layers=layers, dim=dim, heads=heads, ffn_dim=ffn, img_size=img,
                       patch_size=patch, text_vocab_size=vocab, max_text_len=max_text,
                       kernels="reference")
    with torch.device("meta"):  # every weight comes from `ref`: skip the initialisation
        ours = MultiwayTransformer(cfg)
    ours = ours.to_empty(device="cpu").eval()
    load_released_state_dict(ours, {f"beit3.{k}": v for k, v in ref.state_dict().items()})
    return ref, ours


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fns: dict[str, Callable[[], torch.Tensor]], repeats: int, warmup: int = 1,
          clock: str = "wall") -> dict[str, float]:
    """Best (least) seconds of forward + backward (sum of the outputs as the loss) for each
    function. The functions take turns, and the best of several runs is kept: on a shared
    machine other work only ever adds time, so the least is the steadiest estimate. The
    "cpu" clock (this process's CPU time) is steadier still on a busy machine, with 1 thread."""
    now = CLOCKS[clock]
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            t0 = now()
            fn().float().sum().backward()
            if i >= warmup:
                times[name].append(now() - t0)
    return {name: min(t) for name, t in times.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="samples per batch of each kind")
    ap.add_argument("--text-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall time, or this process's CPU time (steadier on a busy machine)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    ref, ours = build_pair(a.layers, 768, 12, 3072, 224, 16, 64010, max_text=a.text_len + 2)
    cfg = ours.cfg
    g = torch.Generator().manual_seed(0)
    B, Lt = a.batch, a.text_len
    images = torch.randn(B, 3, 224, 224, generator=g)
    text = torch.randint(0, cfg.text_vocab_size, (B, Lt), generator=g)
    pad = torch.arange(Lt).unsqueeze(0) >= torch.randint(Lt // 2, Lt + 1, (B, 1), generator=g)
    lens = (~pad).sum(1).tolist()

    def packed(kind: str):
        samples = [Sample(image=images[i] if kind != "text" else None,
                          text=text[i, :lens[i]] if kind != "image" else None) for i in range(B)]
        return pack_samples(samples, cfg)

    cases = {
        "image": (dict(visual_tokens=images), dict(images=images)),
        "text": (dict(textual_tokens=text, text_padding_position=pad),
                 dict(text_ids=text, text_padding_mask=pad)),
        "pair": (dict(visual_tokens=images, textual_tokens=text, text_padding_position=pad),
                 dict(images=images, text_ids=text, text_padding_mask=pad)),
    }
    print(f"forward+backward, {a.layers} layers, dim 768, batch {B} per kind, texts <= {Lt} "
          f"tokens, {torch.get_num_threads()} threads, {a.clock} clock, best of {a.repeats}")
    print(f"{'input':<7}{'torchscale':>12}{'ours padded':>13}{'ratio':>7}{'ours packed':>13}{'ratio':>7}")
    worst = 0.0
    for kind, (ref_in, our_in) in cases.items():
        pb = packed(kind)
        t = timed({"ref": lambda: ref(**ref_in)["encoder_out"],
                   "pad": lambda: ours.encode_padded(**our_in),
                   "pack": lambda: ours.encode(pb)}, a.repeats, clock=a.clock)
        t_ref, t_pad, t_pack = t["ref"], t["pad"], t["pack"]
        worst = max(worst, t_pad / t_ref, t_pack / t_ref)
        print(f"{kind:<7}{t_ref * 1e3:>10.1f}ms{t_pad * 1e3:>11.1f}ms{t_pad / t_ref:>7.2f}"
              f"{t_pack * 1e3:>11.1f}ms{t_pack / t_ref:>7.2f}")
    verdict = ("no slower than torchscale" if worst <= 1.0 else
               "level with torchscale (under 2%, within run-to-run noise)" if worst <= 1.02 else
               "SLOWER than torchscale")
    print(f"worst ratio ours / torchscale: {worst:.3f}: {verdict}")


if __name__ == "__main__":
    main()
