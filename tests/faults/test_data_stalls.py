"""A stalled data source must not hang a run: a shard command that never writes, or writes half
a tar and then stalls, is given up after data.read_timeout_s (killed, counted) and the next
shard is read; a worker stuck where no read timeout reaches (a shard on a hung file system,
here a FIFO nobody writes) ends the run after data.loader_timeout_s with an error naming it.
Both run in a child with a hard time limit, so that a regression fails instead of hanging."""
import os
import tarfile

import pytest

from tests.data.streaming_helpers import run_measured, write_text_shards

pytestmark = pytest.mark.faults

#: Generous for a loaded 2-core machine: the timeouts themselves are 3 s.
END_WITHIN_S = 60
MARKER = "987.25"  # the stalled commands' `sleep` argument, to find leftovers


def leftover_sleeps():
    found = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if MARKER.encode() in f.read():
                    found.append(pid)
        except OSError:
            continue
    return found


STALLED_IN_CHILD = """
import json
from tests.data.streaming_helpers import StandInProcessor, key_of, make_cfg
from megatron_style.data.bad_data import BadDataCounter
from megatron_style.data.loader import good_samples
from megatron_style.data.streams import ShardStream
from megatron_style.data.tar_samples import ReadLimits
urls = {urls!r}
cfg = make_cfg(text=urls, read_timeout_s=3, loader_timeout_s=10)
bad = BadDataCounter()
stream = ShardStream("text", urls, 0, 1, 0, 1, False, bad, epochs=1,
                     limits=ReadLimits.from_config(cfg.data))
keys = [key_of(s.source) for s in good_samples("text", iter(stream), StandInProcessor(cfg), bad)]
print("RESULT " + json.dumps({{"keys": sorted(keys), "bad": bad.as_dict()}}))
"""


def test_a_stalled_shard_command_is_given_up_and_the_next_shard_is_read(tmp_path):
    half, whole = write_text_shards(str(tmp_path), [4, 3])
    with tarfile.open(half) as t:
        cut = t.getmember("t000_0002.txt").offset_data + 5  # inside the third sample
    urls = [f"pipe:sleep {MARKER}",
            f"pipe:head -c {cut} {half}; sleep {MARKER}",
            whole]
    m = run_measured(STALLED_IN_CHILD.format(urls=urls), timeout=END_WITHIN_S)
    print(f"two stalled shards (3 s timeout): child ended in {m['seconds']:.1f} s, {m['result']}")
    assert m["rc"] == 0, (m["rc"], m["err"])
    assert m["result"] == {"keys": ["t000_0000", "t000_0001", "t001_0000", "t001_0001",
                                    "t001_0002"],
                           "bad": {"truncated_tar": 1, "unreadable_shard": 1}}
    assert not leftover_sleeps()  # the commands were killed with their children


LOADER_IN_CHILD = """
import json, os, time
from tests.data.streaming_helpers import StandInProcessor, make_cfg
from megatron_style.data.loader import build_train_loader
good, fifo = {good!r}, {fifo!r}
cfg = make_cfg(text=[good, fifo], num_workers=1, read_timeout_s=1, loader_timeout_s=3,
               micro_batch_size=2, shuffle_buffer=1)
loader = build_train_loader(cfg, 0, 1, StandInProcessor(cfg))
t0, batches, error = time.monotonic(), 0, None
try:
    for batch in loader:
        batches += 1
except RuntimeError as e:
    error = str(e)
waited = time.monotonic() - t0
try:  # let the stuck worker go (opening the FIFO's other end), so that it ends at once
    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
except OSError:
    pass
print("RESULT " + json.dumps({{"batches": batches, "error": error, "seconds": waited}}))
"""


@pytest.mark.multiproc
def test_a_worker_stuck_on_a_hung_file_ends_the_run_naming_the_timeout(tmp_path):
    (good,) = write_text_shards(str(tmp_path), [6])
    fifo = str(tmp_path / "hung.tar")
    os.mkfifo(fifo)  # opening it for reading blocks until someone writes: a hung mount
    m = run_measured(LOADER_IN_CHILD.format(good=good, fifo=fifo), timeout=END_WITHIN_S)
    print(f"stuck worker: {m['result']}, child ended in {m['seconds']:.1f} s")
    assert m["rc"] == 0, (m["rc"], m["err"])
    r = m["result"]
    assert r["error"] and "data.loader_timeout_s=3" in r["error"], r
    assert r["seconds"] < END_WITHIN_S
