"""Shard specs (brace pattern, directory, listing file, list) and the start-up path checks."""
import os

import pytest

from megatron_style.config import ConfigError
from megatron_style.data.loader import check_data_paths
from megatron_style.data.shards import resolve_shards
from streaming_helpers import make_cfg, write_pair_shards


@pytest.fixture
def shards(tmp_path):
    return write_pair_shards(str(tmp_path / "pairs"), [1, 1, 1])


def test_brace_pattern_directory_listing_and_list(tmp_path, shards):
    folder = os.path.dirname(shards[0])
    assert resolve_shards(os.path.join(folder, "pairs-{00000..00002}.tar")) == shards
    assert resolve_shards(folder) == shards
    assert resolve_shards(os.path.join(folder, "pairs-*.tar")) == shards
    listing = tmp_path / "train.txt"
    listing.write_text("# two shards, one relative\npairs/pairs-00001.tar\n\n" + shards[2] + "\n")
    assert resolve_shards(str(listing)) == shards[1:]
    assert resolve_shards([shards[0], str(listing)]) == shards


def test_pattern_matching_nothing_names_the_pattern(tmp_path):
    pattern = str(tmp_path / "nothing-{000..009}.tar")
    with pytest.raises(ConfigError, match="data.pair.shards.*nothing-\\{000..009\\}.tar.*matches no"):
        resolve_shards(pattern, "data.pair.shards")
    with pytest.raises(ConfigError, match="matches no"):
        resolve_shards(str(tmp_path / "*.tar"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ConfigError, match="has no .tar"):
        resolve_shards(str(tmp_path / "empty"))


def test_partly_missing_pattern_is_an_error(shards):
    folder = os.path.dirname(shards[0])
    with pytest.raises(ConfigError, match="2 of the 5 shards.*pairs-00003.tar"):
        resolve_shards(os.path.join(folder, "pairs-{00000..00004}.tar"))


def test_check_data_paths_fails_at_start_up_for_a_missing_path(tmp_path, shards):
    assert check_data_paths(make_cfg(pair=shards)) == {"pair": shards}
    missing = str(tmp_path / "no-such-dir" / "x-{0..3}.tar")
    with pytest.raises(ConfigError, match="data.image.shards.*no-such-dir"):
        check_data_paths(make_cfg(pair=shards, image=[missing]))
    cfg = make_cfg(pair=shards)
    cfg.data.tokenizer.text_model = str(tmp_path / "missing.model")
    with pytest.raises(ConfigError, match="text_model.*missing.model.*does not exist"):
        check_data_paths(cfg)
    # the demo needs no shards
    assert check_data_paths(make_cfg("demo")) == {}
