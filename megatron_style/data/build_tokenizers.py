"""The run's tokenizers, built from its config: the files it names, or for demo data the
demo's own (trained on first use and cached by data/demo/cache.py). The only code outside
data/demo/ that knows the demo exists; the tokenizer modules themselves do not."""
from __future__ import annotations

import os

from megatron_style.config import ConfigError, PretrainConfig
from megatron_style.data.demo.cache import demo_kmeans_tokenizer, demo_text_tokenizer
from megatron_style.data.text_tokenizer import TextTokenizer, check_vocab
from megatron_style.data.visual_tokenizers import (VQKD_PATCH_SIZE, KMeansTokenizer, PixelTargets,
                                                   VisualTokenizer, load_vqkd)


def build_text_tokenizer(cfg: PretrainConfig) -> TextTokenizer:
    """The run's text tokenizer: `data.tokenizer.text_model` if given, else (demo data) the
    demo's small SentencePiece model, trained on first use and cached."""
    tc = cfg.data.tokenizer
    if tc.text_model:
        path = os.path.expanduser(tc.text_model)
        if not os.path.isfile(path):
            raise ConfigError(f"data.tokenizer.text_model: {tc.text_model!r} does not exist; give "
                              "a SentencePiece .model/.spm file or leave it empty for demo data")
        tok = TextTokenizer(path, scheme=tc.text_id_scheme)
    elif cfg.data.source != "shards":  # demo (and synthetic, which needs only the sizes)
        tok = demo_text_tokenizer(cfg)
    else:
        raise ConfigError("data.tokenizer.text_model: required with data.source 'shards'; give a "
                          "SentencePiece model (e.g. the released beit3.spm) or train one with "
                          "beit3-train-tokenizer text")
    check_vocab(tok, cfg.model.text_vocab_size)
    return tok


def build_visual_tokenizer(cfg: PretrainConfig) -> VisualTokenizer:
    """The run's visual tokenizer, frozen, on the CPU (the trainer moves it to its device)."""
    tc, m = cfg.data.tokenizer, cfg.model  # their agreement: config/checks.py
    if tc.visual == "pixels":
        return PixelTargets(m.patch_size, m.img_size).freeze()
    if tc.visual == "vqkd":
        tok = load_vqkd(tc.visual_model, grid=m.grid, model_img_size=m.img_size)
        if tok.patch_size != VQKD_PATCH_SIZE:
            raise ConfigError(f"data.tokenizer.visual_model: VQ-KD patch size {tok.patch_size}, "
                              f"only {VQKD_PATCH_SIZE} (BEiT v2's) is supported")
    elif tc.visual_model:
        tok = KMeansTokenizer.load(tc.visual_model)
        if tok.patch_size != m.patch_size or tok.input_size != m.img_size:
            raise ConfigError(
                f"data.tokenizer.visual_model: the k-means tokenizer {tc.visual_model!r} was "
                f"trained for patch {tok.patch_size} at {tok.input_size}px, the model uses patch "
                f"{m.patch_size} at {m.img_size}px; train one for these sizes")
    elif cfg.data.source != "shards":
        tok = demo_kmeans_tokenizer(cfg)
    else:  # train/preflight.py says so before start-up; this is for callers without it
        raise ConfigError("data.tokenizer.visual_model: visual: kmeans with data.source shards "
                          "needs a trained k-means tokenizer (beit3-train-tokenizer kmeans)")
    if tok.vocab_size > m.visual_vocab_size:
        raise ConfigError(f"model.visual_vocab_size: the visual tokenizer has {tok.vocab_size} "
                          f"codes, more than model.visual_vocab_size={m.visual_vocab_size}; "
                          f"raise it to {tok.vocab_size}")
    return tok.freeze()
