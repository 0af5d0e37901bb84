import pytest

from megatron_style.config import load_config


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """One cache directory per test session: the demo tokenizers are trained once (~2 s)."""
    return str(tmp_path_factory.mktemp("demo_cache"))


@pytest.fixture
def tiny_pretrain(demo_cache):
    def make(*overrides):
        return load_config(None, ["model.preset=tiny", "model.kernels=reference",
                                  f"data.tokenizer.cache_dir={demo_cache}", *overrides])
    return make


@pytest.fixture(scope="session")
def demo_text_tok(demo_cache):
    from megatron_style.data.demo.cache import demo_text_tokenizer
    cfg = load_config(None, ["model.preset=tiny", f"data.tokenizer.cache_dir={demo_cache}"])
    return demo_text_tokenizer(cfg)
