"""The embedded demo data: coloured shapes with captions that describe them, generated on the
fly, so that a full pretraining run needs no download (see scenes.py for the design)."""
from megatron_style.data.demo.cache import demo_kmeans_tokenizer, demo_text_tokenizer
from megatron_style.data.demo.evaluation import caption_eval_samples
from megatron_style.data.demo.scenes import Scene, Shape
from megatron_style.data.demo.source import EVAL_START, DemoSource

__all__ = ["DemoSource", "EVAL_START", "Scene", "Shape", "caption_eval_samples",
           "demo_text_tokenizer", "demo_kmeans_tokenizer"]
