import pickle

import pytest
import sentencepiece as spm

from megatron_style.config import ConfigError
from megatron_style.data.errors import BadSample
from megatron_style.data.build_tokenizers import build_text_tokenizer
from megatron_style.data.text_tokenizer import TextTokenizer, check_vocab, train_sentencepiece

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a small red circle left of a large blue square",
    "pack my box with five dozen liquor jugs",
    "how vexingly quick daft zebras jump",
    "the five boxing wizards jump quickly",
] * 40


@pytest.fixture(scope="module")
def xlmr_layout_model(tmp_path_factory):
    proto = train_sentencepiece(CORPUS, vocab_size=60, model_type="unigram", hard_vocab_limit=False,
                                character_coverage=1.0)
    path = tmp_path_factory.mktemp("spm") / "xlmr_layout.model"
    path.write_bytes(proto)
    return str(path)


def test_xlmr_id_scheme(xlmr_layout_model):
    tok = TextTokenizer(xlmr_layout_model)
    sp = spm.SentencePieceProcessor(model_file=xlmr_layout_model)
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    assert tok.scheme == "xlmr"
    n = sp.get_piece_size()
    # HF XLMRobertaTokenizer: <s>=0 <pad>=1 </s>=2 <unk>=3, pieces + 1, <mask> = len(spm) + 1
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.mask_id == n + 1 and tok.vocab_size == n + 2
    text = "the lazy fox"
    assert tok.encode(text) == [p + 1 for p in sp.encode(text)]
    assert min(tok.encode(text)) >= 4          # ordinary pieces never collide with specials
    assert tok.encode("ΩΩ") .count(3) >= 1     # unseen characters -> <unk> = 3
    assert tok.decode(tok.encode(text)) == text
    ids = tok.encode_for_model(text, 64)
    assert ids[0] == 0 and ids[-1] == 2 and tok.decode(ids) == text
    assert tok.id_to_piece(tok.mask_id) == "<mask>" and tok.id_to_piece(1) == "<pad>"


def test_native_scheme_for_other_layouts(tmp_path):
    out = tmp_path / "other.model"
    import io
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=50,
                                   pad_id=0, unk_id=1, bos_id=2, eos_id=3, hard_vocab_limit=False,
                                   minloglevel=2)
    out.write_bytes(buf.getvalue())
    tok = TextTokenizer(str(out))
    sp = spm.SentencePieceProcessor(model_file=str(out))
    assert tok.scheme == "spm"
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.mask_id == sp.get_piece_size() and tok.vocab_size == sp.get_piece_size() + 1
    assert tok.encode("the dog") == sp.encode("the dog")
    with pytest.raises(ValueError, match="xlmr scheme needs 0/1/2"):
        TextTokenizer(str(out), scheme="xlmr")


def test_truncation_keeps_bos_and_eos(xlmr_layout_model):
    tok = TextTokenizer(xlmr_layout_model)
    long = " ".join(CORPUS[:20])
    ids = tok.encode_for_model(long, 16)
    assert len(ids) == 16 and ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert ids[1:15] == tok.encode(long)[:14]


def test_bad_text_raises_bad_sample(xlmr_layout_model):
    tok = TextTokenizer(xlmr_layout_model)
    for text, reason in (("", "empty_text"), ("   \n ", "empty_text"), (b"\xff\xfe abc", "bad_utf8"),
                         ("ab\udc80c", "bad_utf8"), (123, "bad_text")):
        with pytest.raises(BadSample) as e:
            tok.encode_for_model(text, 32, source="s.tar/7")
        assert e.value.reason == reason and e.value.source == "s.tar/7"
    assert tok.encode_for_model("fox".encode(), 32)[1:-1] == tok.encode("fox")


def test_pickles_for_spawned_workers(xlmr_layout_model):
    tok = TextTokenizer(xlmr_layout_model)
    tok2 = pickle.loads(pickle.dumps(tok))
    assert tok2.encode("quick zebras") == tok.encode("quick zebras") and tok2.mask_id == tok.mask_id


def test_vocab_must_fit_the_model(xlmr_layout_model, tiny_pretrain):
    tok = TextTokenizer(xlmr_layout_model)
    with pytest.raises(ConfigError, match="model.text_vocab_size"):
        check_vocab(tok, tok.vocab_size - 1)
    check_vocab(tok, tok.vocab_size)
    cfg = tiny_pretrain(f"data.tokenizer.text_model={xlmr_layout_model}", "model.text_vocab_size=20")
    with pytest.raises(ConfigError, match="raise model.text_vocab_size to at least"):
        build_text_tokenizer(cfg)
    assert build_text_tokenizer(tiny_pretrain(f"data.tokenizer.text_model={xlmr_layout_model}")).path


def test_missing_model_and_shards_without_model(tiny_pretrain, tmp_path):
    with pytest.raises(ConfigError, match="data.tokenizer.text_model"):
        build_text_tokenizer(tiny_pretrain(f"data.tokenizer.text_model={tmp_path}/nope.model"))
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        (tmp_path / "junk.model").write_bytes(b"not a model")
        TextTokenizer(str(tmp_path / "junk.model"))


def test_train_cli(tmp_path):
    from megatron_style.cli.train_tokenizer import main
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS))
    out = tmp_path / "cli.model"
    assert main(["text", "--input", str(corpus), "--vocab-size", "50", "--out", str(out),
                 "--soft-vocab-limit"]) == 0
    tok = TextTokenizer(str(out))
    assert tok.scheme == "xlmr" and tok.decode(tok.encode("the lazy dog")) == "the lazy dog"
    with pytest.raises(SystemExit):
        main(["text", "--input", str(tmp_path / "missing.txt"), "--out", str(out)])
