"""Does the model read the image? Held-out captions with their content words hidden, shown once
with their own image and once with the image of another held-out scene.

Colours, shapes, sizes and relations are drawn independently of the rest of the caption (see
scenes.py), so from the text alone a hidden content word can only be guessed; with the true image
it can be read off. A model that uses the image scores clearly higher on the true pairs than on
the swapped ones; one that ignores it scores the same on both.

The swapped image comes from the held-out scene whose content words differ most from the
caption's (preferring the same number of shapes, so the image differs in content, not in
layout), and both samples carry identical text, masks and targets, so the only difference between
the two measurements is the image. Images are shown whole: no crop, no flip, no hidden patches.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from megatron_style.data.demo.scenes import Scene
from megatron_style.data.demo.render import render
from megatron_style.data.demo.source import DemoSource
from megatron_style.batch import Sample

if TYPE_CHECKING:
    from megatron_style.config import PretrainConfig
    from megatron_style.data.text_tokenizer import TextTokenizer

#: candidates searched for each swapped partner (the held-out set is searched in order from i)
PARTNER_WINDOW = 64


def caption_tokens(tok: "TextTokenizer", scene: Scene, max_len: int) -> tuple[list[int], list[str]]:
    """<s> caption </s> ids, tokenized word by word, and the role of each id (content role,
    or "" for function words and specials)."""
    ids, roles = [tok.bos_id], [""]
    for word, role in scene.words:
        pieces = tok.encode(word)
        ids += pieces
        roles += [role] * len(pieces)
    ids.append(tok.eos_id)
    roles.append("")
    if len(ids) > max_len:
        raise ValueError(f"demo caption needs {len(ids)} tokens, model.max_text_len is {max_len}")
    return ids, roles


def _differences(a: list[tuple[str, str]], b: list[tuple[str, str]]) -> tuple[bool, int]:
    if len(a) != len(b):
        return False, len(a)
    return True, sum(x != y for x, y in zip(a, b))


def choose_partners(scenes: list[Scene]) -> list[int]:
    n = len(scenes)
    if n < 2:
        raise ValueError(f"the swapped-image evaluation needs at least 2 held-out pairs, got {n}")
    contents = [s.content() for s in scenes]
    partners = []
    for i in range(n):
        best, best_score = -1, (False, -1)
        for off in range(1, min(n, PARTNER_WINDOW + 1)):
            j = (i + off) % n
            score = _differences(contents[i], contents[j])
            if score > best_score:
                best, best_score = j, score
        partners.append(best)
    return partners


def caption_eval_samples(cfg: "PretrainConfig", text_tokenizer: "TextTokenizer", n: int,
                         seed: int) -> tuple[list[Sample], list[Sample]]:
    """(true_samples, swapped_samples): n held-out pairs with every content-word token of the
    caption hidden (`text_mask`, `text_targets` set), with their own image and with another's."""
    from megatron_style.data.processor import SampleProcessor

    proc = SampleProcessor(cfg, text_tokenizer)
    src = DemoSource(cfg.model.img_size, seed)
    scenes = [src.eval_scene(i) for i in range(n)]
    views = [proc.image_views(render(s), None, "pair", f"demo/eval/{i}", train=False)
             for i, s in enumerate(scenes)]
    P = cfg.model.num_patches
    true, swapped = [], []
    for i, j in enumerate(choose_partners(scenes)):
        ids, roles = caption_tokens(text_tokenizer, scenes[i], cfg.model.max_text_len)
        targets = torch.tensor(ids, dtype=torch.long)
        mask = torch.tensor([bool(r) for r in roles])
        text = targets.masked_fill(mask, text_tokenizer.mask_id)
        for out, k, name in ((true, i, f"demo/eval/{i}"), (swapped, j, f"demo/eval/{i}+image{j}")):
            image, tok_image = views[k]
            out.append(Sample(image=image.clone(), image_mask=torch.zeros(P, dtype=torch.bool),
                              text=text.clone(), text_mask=mask.clone(),
                              text_targets=targets.clone(),
                              tokenizer_image=None if tok_image is None else tok_image.clone(),
                              source=name))
    return true, swapped
