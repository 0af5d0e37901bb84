"""The data section: streams and their shards, masking, tokenizers, and the limits that keep
bad data and stalled sources from ending a run."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from megatron_style.config.checks import check_data
from megatron_style.config.fields import bounded, check_bounds

StreamName = Literal["image", "text", "pair"]
STREAMS: tuple[str, ...] = ("image", "text", "pair")
#: PIL.Image.MAX_IMAGE_PIXELS: above it Pillow warns or refuses.
PILLOW_BOMB_PIXELS = 89_478_485


@dataclass
class StreamConfig:
    """One stream of samples: where its shards are and how much of each batch it gets."""

    # Brace pattern ("/data/laion/{00000..00999}.tar"), a directory of .tar files, a text file
    # listing shards one per line, or a list of any of these. Empty with source "demo".
    shards: Union[str, list[str]] = ""
    weight: float = bounded(1.0, ge=0)
    # Horizontal flip with probability 0.5 (BEiT's). null = the stream's default: on for
    # images, off for pairs, our one exception to BEiT's augmentation (a flip makes "left of"
    # in a caption false). A default rather than a value, so that a recipe naming a pair
    # stream's shards does not turn its flips on (DataConfig.flips).
    flip: Optional[bool] = None


@dataclass
class MaskingConfig:
    """Masked data modeling: what fraction of each stream is hidden (paper: 15 % of a text's
    tokens, 50 % of a pair's text tokens, 40 % of an image's patches, block-wise)."""

    text_ratio: float = bounded(0.15, gt=0, lt=1)
    pair_text_ratio: float = bounded(0.5, gt=0, lt=1)
    image_ratio: float = bounded(0.4, gt=0, lt=1)
    # Patches hidden in the image of a pair (0 = the pair's image is seen whole and only its
    # text is predicted). The paper describes the pair objective through the text alone (50 %
    # of a pair's text tokens); VL-BEiT, its predecessor with the same single objective,
    # recovers a pair's masked text from the image and the rest of the text. Hence 0; set
    # image_ratio's 0.4 here to mask pair images as image-only ones (docs/paper_recipe.md).
    pair_image_ratio: float = bounded(0.0, ge=0, lt=1, note="0 = pair images not masked")
    # What a hidden text token becomes: "bert" = BERT's 80 / 10 / 10 (<mask>, a random
    # ordinary token, unchanged; what unilm's and torchscale's MLM code and VLMo do), "mask" =
    # always <mask>. Every hidden token is predicted either way. BOS / EOS / pad never hidden.
    text_mode: Literal["bert", "mask"] = "bert"
    # BEiT block-wise masking: blocks of at least this many patches, aspect ratio in
    # [min_aspect, 1/min_aspect], never as tall or as wide as the grid (BEiT's rule).
    image_min_block: int = bounded(16, ge=1)
    image_min_aspect: float = bounded(0.3, gt=0, le=1)


@dataclass
class TokenizerConfig:
    # Text: a SentencePiece model file; empty = train one on the demo corpus (cached).
    text_model: str = ""
    # Visual: "kmeans" (fast patch k-means, trains on CPU), "vqkd" (BEiT v2's VQ-KD, needs
    # `visual_model`), or "pixels" (no tokenizer: MAE-style pixel regression targets).
    visual: Literal["kmeans", "vqkd", "pixels"] = "kmeans"
    visual_model: str = ""
    cache_dir: str = "~/.cache/megatron_style"
    # Text ids: "xlmr" = HF XLMRobertaTokenizer's fairseq scheme of the released beit3.spm
    # (<s>=0 <pad>=1 </s>=2 <unk>=3, pieces shifted by 1, <mask> last); "spm" = the model's own
    # ids with <mask> appended; "auto" = xlmr when the model is laid out like XLM-R's.
    text_id_scheme: Literal["auto", "xlmr", "spm"] = "auto"
    # Demo data only: size of the SentencePiece model and number of generated images the
    # k-means visual tokenizer is trained on (both trained at first use, then cached).
    demo_text_vocab_size: int = bounded(256, ge=64)
    demo_kmeans_images: int = bounded(1000, ge=1)


@dataclass
class DataConfig:
    # "demo": the procedural shapes-and-captions generator; "shards": webdataset tar shards;
    # "synthetic": random tensors with random targets (throughput and memory measurements).
    source: Literal["demo", "shards", "synthetic"] = "demo"
    # Text length of synthetic texts and pairs (tokens).
    synthetic_text_len: int = bounded(64, ge=1)
    image: StreamConfig = field(default_factory=StreamConfig)
    text: StreamConfig = field(default_factory=StreamConfig)
    pair: StreamConfig = field(default_factory=StreamConfig)
    # Samples per micro-batch on each rank, split over the streams by their weights.
    micro_batch_size: int = bounded(24, ge=1)
    # Samples per optimizer step over all data-parallel ranks (the paper: 6144 = 2048 images +
    # 2048 texts + 2048 pairs). Gradient accumulation is derived from it for the number of
    # ranks a run starts on: global / (micro_batch_size x data-parallel ranks), which must be
    # whole. 0 = not fixed: micro_batch_size x parallel.grad_accum x ranks; a resume on another
    # number of ranks then keeps the checkpoint's global batch (train/batch_plan.py).
    global_batch_size: int = bounded(0, ge=0, note="0 = micro x parallel.grad_accum x ranks")
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    num_workers: int = bounded(2, ge=0)
    # Samples are shuffled in windows of this many per loader worker and stream (1 or 0: in
    # shard order); the windows make the reader's position exactly resumable.
    shuffle_buffer: int = bounded(1000, ge=0)
    # Shards: false = epochs (every sample once per epoch, shard order reshuffled each epoch);
    # true = each loader worker draws shards at random with replacement, forever.
    resampled: bool = False
    # BEiT's augmentation (BEiT-3 Table 11, "the same image augmentation as in BEiT"):
    # random-resized crop of this area fraction (BEiT: 0.08 to 1), horizontal flip (per
    # stream, `flip`), colour jitter of brightness, contrast and saturation by this strength
    # (0.4; no hue, as BEiT's ColorJitter(0.4, 0.4, 0.4); 0 = off).
    crop_scale: list[float] = bounded([0.08, 1.0], gt=0, le=1)
    color_jitter: float = bounded(0.4, ge=0, le=1)
    # Held-out pairs for the end-of-run evaluation (demo only).
    eval_samples: int = bounded(256, ge=0)
    seed: int = 0
    # -- bad data and stalls (megatron_style/data/bad_data.py says what is skipped and why) --
    # A tar member claiming more bytes than this is skipped unread (member_too_large): one
    # member's read is bounded before it is made. 64 MiB passes every image that
    # max_image_pixels admits as JPEG/WebP and any real document (a long book is ~2 MB).
    max_member_bytes: int = bounded(64 * 2**20, ge=1024)
    # An image whose header says more pixels than this is skipped before decoding
    # (image_too_large). 64 Mpx admits 8K frames and 45-61 Mpx camera photos; decoded as RGB it
    # is ~0.2 GB per worker, where a 20 KB PNG may claim 13000^2 pixels (2.9 GB decoded). At
    # most Pillow's own bomb limit, so Pillow never warns on an admitted image.
    max_image_pixels: int = bounded(64_000_000, ge=1, le=PILLOW_BOMB_PIXELS,
                                    note="at most Pillow's decompression-bomb limit")
    # The run stops when more than this fraction of a stream's last bad_sample_window samples
    # (per loader worker) were bad: a broken data set stops with the counts rather than
    # spinning; a whole shard of bad samples (img2dataset writes 10000 a shard) does not.
    max_bad_fraction: float = bounded(0.5, gt=0, le=1, note="1 = never stop for bad data")
    bad_sample_window: int = bounded(100_000, ge=1)
    # Shards a brace pattern or listing names but that do not exist: up to this fraction of a
    # stream's shards, warn and count each as unreadable_shard when its turn comes (a few
    # failed downloads); above it, stop at start-up (a wrong range or an unmounted copy).
    max_missing_shards_fraction: float = bounded(0.01, ge=0, le=1,
                                                 note="0 = every shard must exist")
    # Resume from a checkpoint written with another shard list (a bad shard removed, shards
    # added): the position is carried over the way a resume on another number of ranks is
    # (data/reshard.py). Off, such a resume is refused so that a changed list is never silent.
    allow_shard_list_change: bool = False
    # A shard read from a command (pipe:, http(s)://, s3://, gs://) that sends no byte for this
    # long is given up: the command is killed, the shard counted, the reader goes on. 300 s
    # rides out network hiccups and throttling; a dead source costs minutes, not the run.
    read_timeout_s: float = bounded(300.0, gt=0)
    # No batch from the loader workers for this long stops the run with an error naming this
    # key (0 = wait forever). Above read_timeout_s, which handles single stalled shards (a batch
    # may meet one per stream), and below guards.stall_timeout_s, so that the cause is named.
    loader_timeout_s: float = bounded(1200.0, off=0, gt=0)

    def flips(self, stream: str) -> bool:
        """Whether images of `stream` are flipped at random (StreamConfig.flip)."""
        flip = getattr(self, stream).flip
        return stream != "pair" if flip is None else flip

    def stream_weights(self) -> dict[str, float]:
        return {s: getattr(self, s).weight for s in STREAMS}

    def stream_counts(self) -> dict[str, int]:
        """Samples of each stream in one micro-batch: micro_batch_size split by the weights
        (largest remainder, ties to the earlier stream), the same for every micro-batch."""
        w = self.stream_weights()
        total = sum(w.values())
        exact = {s: self.micro_batch_size * w[s] / total for s in STREAMS}
        counts = {s: int(exact[s]) for s in STREAMS}
        left = self.micro_batch_size - sum(counts.values())
        for s in sorted(STREAMS, key=lambda s: (-(exact[s] - counts[s]), STREAMS.index(s)))[:left]:
            counts[s] += 1
        return counts

    def validate(self, key: str = "data") -> None:
        """Ranges and the rules between this section's fields (checks.py)."""
        check_bounds(self, key)
        check_data(self, key)
