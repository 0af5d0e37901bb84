"""Does the model use the image? Masked caption-word accuracy on held-out image-caption pairs,
once with the true image and once with the image swapped for another pair's.

The demo's captions name colours, shapes, sizes and relations that only the image can tell;
the masked words are those. A model that learned to look gets them right with the true image
and wrong with a swapped one: the gap between the two accuracies is the measure.

With ITC heads (objective.itc), the same held-out pairs also give zero-shot retrieval:
each image ranked against the 256 captions and each caption against the 256 images, R@1/5/10
(train/retrieval_eval.py).

    beit3-evaluate runs/demo/checkpoints [--samples 256]
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import torch

from megatron_style.files import write_json
from megatron_style.config import PretrainConfig
from megatron_style.batch import S_PAIR_TEXT, PackedBatch, Sample, pack_samples


@torch.no_grad()
def masked_caption_accuracy(forward: Callable[[PackedBatch], torch.Tensor], samples: Sequence[Sample],
                            cfg: PretrainConfig, prepare: Callable[[PackedBatch], PackedBatch],
                            batch_size: int = 32) -> tuple[float, int]:
    """(accuracy on the masked caption tokens, number of masked tokens)."""
    correct = total = 0.0
    for i in range(0, len(samples), batch_size):
        b = prepare(pack_samples(samples[i:i + batch_size], cfg.model))
        stats = forward(b)
        correct += float(stats[S_PAIR_TEXT, 2])
        total += float(stats[S_PAIR_TEXT, 1])
    return (correct / total if total else float("nan")), int(total)


def caption_gap(forward, cfg: PretrainConfig, text_tokenizer, prepare, n: int, seed: int = 1234) -> dict:
    from megatron_style.data.demo import caption_eval_samples

    true_samples, swapped_samples = caption_eval_samples(cfg, text_tokenizer, n, seed)
    acc_true, tokens = masked_caption_accuracy(forward, true_samples, cfg, prepare)
    acc_swapped, _ = masked_caption_accuracy(forward, swapped_samples, cfg, prepare)
    return {"pairs": len(true_samples), "masked_tokens": tokens, "acc_true_image": acc_true,
            "acc_swapped_image": acc_swapped, "gap_points": 100.0 * (acc_true - acc_swapped)}


def demo_retrieval(model, cfg: PretrainConfig, text_tokenizer, prepare, n: int,
                   seed: int = 1234) -> dict:
    """Recall@1/5/10 both ways over the n held-out demo pairs of caption_gap (same seed: the
    same scenes), images and whole captions."""
    from megatron_style.data.demo import caption_eval_samples
    from megatron_style.model.retrieval import retrieval_recall
    from megatron_style.train.retrieval_eval import pair_features, unmasked_pairs
    true_samples, _ = caption_eval_samples(cfg, text_tokenizer, n, seed)
    return retrieval_recall(*pair_features(model, unmasked_pairs(true_samples), cfg, prepare))


def evaluate_trainer(trainer) -> Optional[dict]:
    """End-of-run evaluation inside the training job (all ranks run the forward passes, which
    ZeRO-3 needs; rank 0 reports)."""
    cfg = trainer.cfg
    if cfg.data.eval_samples == 0:
        return None
    module = trainer.engine.module
    module.eval()
    try:
        result = caption_gap(lambda b: trainer.engine(b).stats, cfg, trainer.text_tokenizer,
                             trainer.prepare, cfg.data.eval_samples)
        if hasattr(module, "itc"):
            # The ITC heads are called outside the module's forward: under ZeRO-3 their
            # parameters are gathered for it explicitly.
            from megatron_style.train.validation import root_parameters_gathered
            with root_parameters_gathered(module):
                recall = demo_retrieval(module, cfg, trainer.text_tokenizer, trainer.prepare,
                                        cfg.data.eval_samples)
            result["retrieval"] = recall
    finally:
        module.train()
    if trainer.rank == 0:
        print(format_result(result), flush=True)
        if "retrieval" in result:
            from megatron_style.train.retrieval_eval import format_retrieval
            print(format_retrieval(result["retrieval"]), flush=True)
        os.makedirs(cfg.logging.dir, exist_ok=True)
        write_json(os.path.join(cfg.logging.dir, "eval.json"), {"step": trainer.step, **result})
        from torch.utils.tensorboard import SummaryWriter
        with SummaryWriter(cfg.logging.dir) as w:
            w.add_scalar("eval/acc_true_image", result["acc_true_image"], trainer.step)
            w.add_scalar("eval/acc_swapped_image", result["acc_swapped_image"], trainer.step)
            w.add_scalar("eval/gap_points", result["gap_points"], trainer.step)
            for k, v in result.get("retrieval", {}).items():
                if k != "candidates":
                    w.add_scalar(f"eval/retrieval_{k}", v, trainer.step)
    return result


def format_result(r: dict) -> str:
    return (f"masked caption-word accuracy on {r['pairs']} held-out pairs ({r['masked_tokens']} "
            f"masked tokens): true image {100 * r['acc_true_image']:.1f}%, swapped image "
            f"{100 * r['acc_swapped_image']:.1f}%, gap {r['gap_points']:.1f} points")
