"""Every advertised remote scheme is read for real, or refused at start-up with what to do:
http(s):// through curl (a local HTTP server here), s3:// and gs:// through their CLIs (stand-ins
on PATH that check the exact command and serve local files: no network here), pipe:; a missing
CLI or an unsupported scheme (hf://, ais://) is a ConfigError naming it."""
import functools
import http.server
import os
import threading

import pytest

from megatron_style.config import ConfigError
from megatron_style.data.bad_data import BadDataCounter
from megatron_style.data.loader import good_samples
from megatron_style.data.shards import check_data_paths
from megatron_style.data.streams import ShardStream
from tests.data.streaming_helpers import (StandInProcessor, key_of, make_cfg,
                                                    write_text_shards)

pytestmark = pytest.mark.faults


def read_all(urls):
    bad = BadDataCounter()
    cfg = make_cfg(text=urls)
    stream = ShardStream("text", urls, 0, 1, 0, 1, False, bad, epochs=1)
    keys = [key_of(s.source) for s in good_samples("text", iter(stream), StandInProcessor(cfg), bad)]
    return sorted(keys), bad.as_dict()


def keys_of(sizes, first=0):
    return sorted(f"t{k:03d}_{j:04d}" for k, n in enumerate(sizes) if k >= first
                  for j in range(n))


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A folder of shards behind http://127.0.0.1:PORT/ (no proxy in between)."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    shards = write_text_shards(str(tmp_path / "www"), [2, 3])
    handler = functools.partial(_QuietHandler, directory=str(tmp_path / "www"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", shards
    server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_http_shards_are_read_with_curl_and_a_404_is_counted(served):
    base, shards = served
    names = [os.path.basename(s) for s in shards]
    urls = [f"{base}/{names[0]}", f"{base}/missing.tar", f"{base}/{names[1]}"]
    check_data_paths(make_cfg(text=urls))
    assert read_all(urls) == (keys_of([2, 3]), {"unreadable_shard": 1})


FAKE_AWS = """#!/bin/sh
# stand-in for: aws s3 cp --only-show-errors s3://BUCKET/KEY -
[ "$1 $2 $3 $5" = "s3 cp --only-show-errors -" ] || { echo "unexpected: $*" >&2; exit 2; }
exec cat "$FAKE_CLOUD/${4#s3://}"
"""
FAKE_GCLOUD = """#!/bin/sh
# stand-in for: gcloud storage cat gs://BUCKET/KEY
[ "$1 $2" = "storage cat" ] || { echo "unexpected: $*" >&2; exit 2; }
exec cat "$FAKE_CLOUD/${3#gs://}"
"""


def fake_tools(folder, **scripts):
    os.makedirs(folder, exist_ok=True)
    for name, text in scripts.items():
        path = os.path.join(folder, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o755)
    return folder


def test_s3_and_gs_shards_are_read_through_their_clis(tmp_path, monkeypatch):
    write_text_shards(str(tmp_path / "cloud" / "bucket"), [2, 3, 1])
    bin_dir = fake_tools(str(tmp_path / "bin"), aws=FAKE_AWS, gcloud=FAKE_GCLOUD)
    monkeypatch.setenv("PATH", bin_dir + os.pathsep + os.environ["PATH"])
    monkeypatch.setenv("FAKE_CLOUD", str(tmp_path / "cloud"))
    urls = ["s3://bucket/texts-{00000..00001}.tar", "gs://bucket/texts-00002.tar",
            "s3://bucket/no-such-key.tar"]
    found = check_data_paths(make_cfg(text=urls))["text"]
    assert len(found) == 4
    assert read_all(found) == (keys_of([2, 3, 1]), {"unreadable_shard": 1})


@pytest.mark.parametrize("url,tool", [("s3://bucket/a.tar", "aws"), ("gs://bucket/a.tar", "gcloud"),
                                      ("https://example.org/a.tar", "curl")])
def test_a_scheme_whose_tool_is_missing_stops_start_up_naming_it(tmp_path, monkeypatch, url, tool):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on it
    with pytest.raises(ConfigError, match=rf"data.text.shards: .*read with '{tool}', which is "
                                          r"not on PATH; install .*or give the shard as a pipe:"):
        check_data_paths(make_cfg(text=[url]))


@pytest.mark.parametrize("url", ["hf://datasets/x/y/a.tar", "ais://bucket/a.tar", "ftp://h/a.tar"])
def test_unsupported_schemes_are_refused_with_what_to_use(url):
    with pytest.raises(ConfigError, match=r"is not supported; use one of pipe:, http://, "
                                          r"https://, s3://, gs://, or a pipe: command"):
        check_data_paths(make_cfg(text=[url]))
