"""Resume: stop after k batches, save the state, continue in a new process; the result must be
the uninterrupted run's sequence (so nothing repeated, nothing skipped)."""
import json
import os
import subprocess
import sys

import pytest

from megatron_style.data.loader import build_train_loader
from streaming_helpers import (StandInProcessor, batch_record, key_of, make_cfg,
                               write_pair_shards, write_text_shards)

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    # 4 readers (2 ranks x 2 workers); 11 batches of 1 + 1 + 1 stay inside one epoch of pairs
    return {"image": write_pair_shards(str(d / "img"), [5, 5, 5, 5], prefix="img"),
            "text": write_text_shards(str(d / "txt"), [4, 4, 4, 4]),
            "pair": write_pair_shards(str(d / "pair"), [3] * 8)}


def take(loader, n):
    it = iter(loader)
    return [batch_record(next(it)) for _ in range(n)]


def resume_in_new_process(tmp_path, cfg_kwargs, state, batches, rank=0, world=1):
    state_file, spec_file, out = (str(tmp_path / n) for n in ("state.json", "spec.json", "out.json"))
    with open(state_file, "w") as f:
        json.dump(state, f)
    with open(spec_file, "w") as f:
        json.dump({"cfg": cfg_kwargs, "state": state_file, "batches": batches, "out": out,
                   "rank": rank, "world": world}, f)
    subprocess.run([sys.executable, os.path.join(HERE, "resume_child.py"), spec_file], check=True,
                   timeout=120)
    with open(out) as f:
        return json.load(f)


@pytest.mark.parametrize("resampled", [False, True], ids=["epochs", "resampled"])
def test_resume_in_a_new_process_continues_exactly(tmp_path, data, resampled):
    kw = dict(image=data["image"], text=data["text"], pair=data["pair"], num_workers=2,
              micro_batch_size=3, shuffle_buffer=3, resampled=resampled)
    cfg = make_cfg(**kw)
    total, k = 11, 4
    whole = take(build_train_loader(cfg, 1, 2, StandInProcessor(cfg)), total)
    first = build_train_loader(cfg, 1, 2, StandInProcessor(cfg))
    head = take(first, k)  # the workers have prefetched more than this by now
    out = resume_in_new_process(tmp_path, kw, first.state_dict(), total - k, rank=1, world=2)
    assert head + out["records"] == whole
    assert out["state"]["consumed"] == total
    if not resampled:  # within one epoch: no pair is seen twice
        pairs = [key_of(s) for rec in whole for s in rec[0] if "/pairs-" in s]
        assert len(pairs) == total and len(set(pairs)) == total


def test_resume_twice_and_from_a_fresh_iterator(data):
    cfg = make_cfg(pair=data["pair"], text=data["text"], num_workers=2, micro_batch_size=2,
                   shuffle_buffer=4)
    whole = take(build_train_loader(cfg, 0, 1, StandInProcessor(cfg)), 9)
    loader = build_train_loader(cfg, 0, 1, StandInProcessor(cfg))
    got = take(loader, 2) + take(loader, 3)  # a new iter() continues after what was taken
    again = build_train_loader(cfg, 0, 1, StandInProcessor(cfg))
    again.load_state_dict(loader.state_dict())
    assert got + take(again, 4) == whole


def test_state_from_other_settings_is_refused(data):
    cfg = make_cfg(pair=data["pair"], num_workers=2)
    state = build_train_loader(cfg, 0, 1, StandInProcessor(cfg)).state_dict()
    other = make_cfg(pair=data["pair"], num_workers=1)
    with pytest.raises(ValueError, match="num_workers: saved 2, now 1"):
        build_train_loader(other, 0, 1, StandInProcessor(other)).load_state_dict(state)
    with pytest.raises(ValueError, match="dp_rank"):
        build_train_loader(cfg, 1, 2, StandInProcessor(cfg)).load_state_dict(state)
