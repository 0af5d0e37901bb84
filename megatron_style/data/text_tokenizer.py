"""SentencePiece text tokenizer with the id scheme of the released BEiT-3 checkpoints.

The released checkpoints read `beit3.spm` through HuggingFace's XLMRobertaTokenizer, which puts
fairseq's four special tokens first and shifts every SentencePiece id by one:

    <s> = 0, <pad> = 1, </s> = 2, <unk> = 3, piece p -> p + 1, <mask> = len(spm) + 1

(pieces 1 and 2 of the .spm file, its own <s> and </s>, are never produced by encoding). This
scheme ("xlmr") needs a model laid out like XLM-R's (unk = 0, bos = 1, eos = 2), which is also
SentencePiece's default, so the models trained here use it too and one code path serves both.
Any other layout gets the "spm" scheme: the model's own ids, with <mask> (and <pad> when the
model has none) appended after its last piece.

Nothing here imports transformers; the mapping above is all of XLMRobertaTokenizer that
pretraining needs.
"""
from __future__ import annotations

import io
import os
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import sentencepiece as spm

from megatron_style.config import ConfigError
from megatron_style.data.errors import BadSample


SCHEMES = ("auto", "xlmr", "spm")
XLMR_BOS, XLMR_PAD, XLMR_EOS, XLMR_UNK = 0, 1, 2, 3
XLMR_OFFSET = 1
#: encode_for_model tokenizes at most this many characters per id it keeps (more only when
#: they give too few pieces): a 64 MiB caption costs a 2 KB tokenization, not 3.5 GiB and 20 s.
#: A piece is rarely longer than 16 characters, so 32 leaves every kept piece inside the cut.
CHARS_PER_ID_BOUND = 32
_SPACES = (" ", "\n", "\t", "\r")


class TextTokenizer:
    """`model`: a .model/.spm file path or the serialized model bytes."""

    def __init__(self, model: Union[str, bytes], scheme: str = "auto"):
        if scheme not in SCHEMES:
            raise ValueError(f"text id scheme {scheme!r} is not one of {SCHEMES}")
        if isinstance(model, (str, os.PathLike)):
            path = os.path.expanduser(str(model))
            if not os.path.isfile(path):
                raise FileNotFoundError(f"SentencePiece model {path!r} does not exist")
            with open(path, "rb") as f:
                proto = f.read()
            self.path = path
        else:
            proto, self.path = bytes(model), ""
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{self.path or 'model bytes'} is not a SentencePiece model: {e}") from None
        self._proto = proto
        n = self.sp.get_piece_size()
        xlmr_layout = (self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()) == (0, 1, 2)
        if scheme == "auto":
            scheme = "xlmr" if xlmr_layout else "spm"
        if scheme == "xlmr" and not xlmr_layout:
            raise ValueError(
                f"{self.path or 'this model'} has unk/bos/eos ids {self.sp.unk_id()}/"
                f"{self.sp.bos_id()}/{self.sp.eos_id()}; the xlmr scheme needs 0/1/2 "
                "(use scheme 'spm' or 'auto')")
        self.scheme = scheme
        if scheme == "xlmr":
            self.bos_id, self.pad_id, self.eos_id, self.unk_id = XLMR_BOS, XLMR_PAD, XLMR_EOS, XLMR_UNK
            self.mask_id = n + XLMR_OFFSET
            self.vocab_size = n + XLMR_OFFSET + 1
        else:
            for name in ("bos", "eos", "unk"):
                if getattr(self.sp, f"{name}_id")() < 0:
                    raise ValueError(f"{self.path or 'this model'} has no {name} piece; train it "
                                     f"with {name}_id >= 0")
            self.bos_id, self.eos_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
            self.mask_id = n
            self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else n + 1
            self.vocab_size = max(self.mask_id, self.pad_id) + 1

    # ---- pickling: loader workers started with spawn get the model bytes, not a C++ object
    def __getstate__(self):
        return {"proto": self._proto, "scheme": self.scheme, "path": self.path}

    def __setstate__(self, state):
        self.__init__(state["proto"], state["scheme"])
        self.path = state["path"]

    @property
    def special_ids(self) -> tuple[int, ...]:
        """Ids that are never masked: BOS, EOS, pad."""
        return (self.bos_id, self.eos_id, self.pad_id)

    @property
    def num_pieces(self) -> int:
        return self.sp.get_piece_size()

    def serialized(self) -> bytes:
        return self._proto

    def encode(self, text: Union[str, bytes], source: str = "") -> list[int]:
        """Ids of the text's pieces, without BOS/EOS. Bytes must be UTF-8 (BadSample if not)."""
        text = as_text(text, source)
        try:
            pieces = self.sp.encode(text, out_type=int)
        except Exception as e:  # MemoryError, or whatever SentencePiece raises on this text
            raise BadSample("bad_text", f"cannot tokenize: {type(e).__name__}: {e}",
                            source) from None
        ids = np.asarray(pieces, dtype=np.int64)
        if self.scheme == "xlmr":
            ids = np.where(ids == self.sp.unk_id(), XLMR_UNK, ids + XLMR_OFFSET)
        return ids.tolist()

    def encode_for_model(self, text: Union[str, bytes], max_len: int, source: str = "") -> list[int]:
        """BOS + pieces + EOS, at most `max_len` ids (pieces are cut, EOS kept).
        BadSample("empty_text") when the text has no piece (empty or only whitespace).
        Only the start of a long text is tokenized (`head_of`): the same ids as tokenizing it
        whole, since pieces never cross whitespace and the cut is at whitespace, with enough
        pieces before it (else a longer head is taken)."""
        if max_len < 3:
            raise ValueError(f"max_len={max_len}: needs room for BOS, one piece and EOS")
        if not isinstance(text, str):
            text = as_text(text, source)
        want, limit = max_len - 2, max_len * CHARS_PER_ID_BOUND
        while True:
            head, cut = head_of(text, limit)
            ids = self.encode(head, source)  # checks the head is valid Unicode
            if not cut or len(ids) > want:  # one piece beyond the kept ones: the cut cannot reach them
                break
            limit *= 4
        if not ids:
            raise BadSample("empty_text", "no token after tokenization", source)
        return [self.bos_id, *ids[:max_len - 2], self.eos_id]

    def piece_id(self, token_id: int) -> Optional[int]:
        """The SentencePiece id behind one of our ids, None for our added specials."""
        if self.scheme == "xlmr":
            if token_id == XLMR_UNK:
                return self.sp.unk_id()
            if token_id in (XLMR_BOS, XLMR_PAD, XLMR_EOS) or token_id == self.mask_id:
                return None
            return token_id - XLMR_OFFSET
        return token_id if token_id < self.num_pieces else None

    def id_to_piece(self, token_id: int) -> str:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is out of the vocabulary [0, {self.vocab_size})")
        named = {self.bos_id: "<s>", self.eos_id: "</s>", self.pad_id: "<pad>",
                 self.mask_id: "<mask>", self.unk_id: "<unk>"}
        if token_id in named:
            return named[token_id]
        return self.sp.id_to_piece(self.piece_id(token_id))

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of the ids. BOS/EOS/pad are dropped (kept as <s> etc. with skip_special=False);
        <mask> is written as "<mask>"."""
        pieces = []
        for i in ids:
            i = int(i)
            if skip_special and i in self.special_ids:
                continue
            pieces.append(self.id_to_piece(i))
        return self.sp.decode_pieces(pieces)

    def __repr__(self) -> str:
        return (f"TextTokenizer({self.path or '<bytes>'}, scheme={self.scheme}, "
                f"vocab_size={self.vocab_size})")


def head_of(text: str, limit: int) -> tuple[str, bool]:
    """(the text up to its last whitespace within `limit` characters, True) for a text longer
    than `limit`; (text, False) otherwise. Without whitespace in the second half of the limit
    (a long word, scripts written without spaces) the cut is at `limit`: only the pieces next
    to the cut could differ, and those are beyond the ones kept (tested on such runs)."""
    if len(text) <= limit:
        return text, False
    head = text[:limit]
    at = max(head.rfind(c) for c in _SPACES)
    return (head[:at] if at > limit // 2 else head), True


def as_text(text: Union[str, bytes], source: str = "") -> str:
    """A str that is valid Unicode; BadSample("bad_utf8") otherwise (invalid bytes, or lone
    surrogates left by a lenient decoder)."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        try:
            return bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadSample("bad_utf8", str(e), source) from None
    if not isinstance(text, str):
        raise BadSample("bad_text", f"expected str or bytes, got {type(text).__name__}", source)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadSample("bad_utf8", str(e), source) from None
    return text


def train_sentencepiece(sentences: Optional[Iterable[str]] = None, files: Sequence[str] = (),
                        vocab_size: int = 8000, model_type: str = "unigram",
                        character_coverage: float = 0.9995, max_sentences: int = 10_000_000,
                        hard_vocab_limit: bool = True, seed_sentencepiece_size: int = 1_000_000,
                        num_threads: int = 2) -> bytes:
    """Train a SentencePiece model with XLM-R's layout (unk 0, <s> 1, </s> 2, no pad piece)
    on text files (one sentence per line) or an iterable of sentences; returns the model bytes."""
    if (sentences is None) == (not files):
        raise ValueError("give either sentences or files to train a SentencePiece model on")
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"training text {f!r} does not exist")
    if vocab_size < 8:
        raise ValueError(f"vocab_size={vocab_size} is too small; use at least 8")
    out = io.BytesIO()
    kwargs = dict(model_writer=out, vocab_size=vocab_size, model_type=model_type,
                  character_coverage=character_coverage, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                  input_sentence_size=max_sentences, shuffle_input_sentence=True,
                  hard_vocab_limit=hard_vocab_limit, seed_sentencepiece_size=seed_sentencepiece_size,
                  num_threads=num_threads, minloglevel=2)
    if files:
        kwargs["input"] = ",".join(files)
    else:
        kwargs["sentence_iterator"] = iter(sentences)
    try:
        spm.SentencePieceTrainer.train(**kwargs)
    except RuntimeError as e:
        raise ValueError(f"SentencePiece training failed: {e}") from None
    return out.getvalue()


def check_vocab(tok: TextTokenizer, text_vocab_size: int, what: str = "") -> None:
    """The model's text embedding must hold every id the tokenizer produces (mask included)."""
    if tok.vocab_size > text_vocab_size:
        raise ConfigError(
            f"model.text_vocab_size: the text tokenizer {what or tok.path or ''} has "
            f"{tok.vocab_size} ids (with <mask>), more than model.text_vocab_size="
            f"{text_vocab_size}; raise model.text_vocab_size to at least {tok.vocab_size} or use "
            "a smaller tokenizer (data.tokenizer.text_model)")
