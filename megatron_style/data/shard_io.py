"""Opening one shard as a stream of bytes: a local file, or the output of a command.

Remote shards are read through a command's standard output, as webdataset does, but with our
own process handling, because a data source must never hang or crash a run:

  - every read waits at most `read_timeout_s` for the next byte; a command silent that long
    (a stalled transfer, a `pipe:` that never writes) is killed with its whole process group
    and the read raises ShardTimeout;
  - a command that fails (exit status other than 0) raises OSError naming the status and the
    end of its stderr, at the end of its data or when the shard is closed;
  - a command is started without a shell unless the URL is `pipe:` (whose point is a shell
    command): a URL's characters never reach a shell.

URL schemes (`SCHEMES`): `pipe:CMD` runs CMD in a shell; http(s):// runs curl; s3:// runs the
AWS CLI; gs:// runs the Google Cloud CLI. shards.py checks at start-up that the tool is
installed. A local path is opened as a file (a stalled network file system is caught by the
loader's timeout, data.loader_timeout_s, not here: select() cannot time out a regular file).
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import tempfile
import time
from typing import Optional, Union

#: URL prefix -> (program it needs, what to install). pipe: needs whatever its command runs.
SCHEMES: dict[str, tuple[str, str]] = {
    "http://": ("curl", "curl (e.g. apt-get install curl)"),
    "https://": ("curl", "curl (e.g. apt-get install curl)"),
    "s3://": ("aws", "the AWS CLI (pip install awscli) with credentials configured"),
    "gs://": ("gcloud", "the Google Cloud CLI (gcloud storage), logged in"),
}
PIPE = "pipe:"
#: A command killed by SIGPIPE stopped because we closed its output early: not a failure.
_SIGPIPE_STATUSES = (-signal.SIGPIPE, 128 + signal.SIGPIPE)


class ShardTimeout(OSError):
    """A shard's command sent no data for read_timeout_s seconds."""


def command_for(url: str) -> Optional[Union[str, list[str]]]:
    """The command whose standard output is the shard `url` (a str: run by a shell), or None
    for a local path."""
    if url.startswith(PIPE):
        return url[len(PIPE):]
    if url.startswith(("http://", "https://")):
        # -f: an HTTP error is a non-zero exit, not an error page read as a tar.
        return ["curl", "--fail", "--silent", "--show-error", "--location",
                "--connect-timeout", "30", url]
    if url.startswith("s3://"):
        return ["aws", "s3", "cp", "--only-show-errors", url, "-"]
    if url.startswith("gs://"):
        return ["gcloud", "storage", "cat", url]
    return None


def open_shard(url: str, read_timeout_s: float):
    """A binary stream of the shard's bytes with read(n) and close(check); see module doc."""
    cmd = command_for(url)
    if cmd is None:
        return LocalFile(open(url, "rb"))
    return CommandStream(url, cmd, read_timeout_s)


class LocalFile:
    """A local file with CommandStream's close signature."""

    def __init__(self, f) -> None:
        self.f = f

    def read(self, n: int = -1) -> bytes:
        return self.f.read(n)

    def close(self, check: bool = True) -> None:
        self.f.close()


class CommandStream:
    """The standard output of a command, read with a timeout per wait."""

    def __init__(self, url: str, cmd: Union[str, list[str]], read_timeout_s: float) -> None:
        self.url, self.timeout = url, read_timeout_s
        # stderr goes to a file: a pipe nobody reads could fill up and block the command.
        self._err = tempfile.TemporaryFile()
        # A new session makes the command a process-group leader: a shell's children (the
        # `sleep` of `pipe:...; sleep 1000`) are killed with it.
        self.proc = subprocess.Popen(cmd, shell=isinstance(cmd, str), stdout=subprocess.PIPE,
                                     stderr=self._err, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        self._fd = self.proc.stdout.fileno()
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        self._eof = False
        self._checked = False
        self._stalled: Optional[ShardTimeout] = None

    def read(self, n: int = -1) -> bytes:
        """Up to n bytes (all until the end with n < 0); fewer only at the end of the data. At
        the end, a command that failed raises OSError (once its last bytes have been returned:
        a reader that stops at the tar's end meets the failure in close())."""
        if self._stalled is not None:
            raise self._stalled
        chunks, got = [], 0
        while (n < 0 or got < n) and not self._eof:
            try:
                chunk = self._read_some(1 << 20 if n < 0 else min(n - got, 1 << 20))
            except ShardTimeout as e:
                if not chunks:
                    raise
                self._stalled = e  # hand out what came before the stall, raise on the next read
                break
            if not chunk:
                self._eof = True
                break
            chunks.append(chunk)
            got += len(chunk)
        if self._eof and not chunks:
            self._check_exit()  # a failed command must not pass for a short shard
        return b"".join(chunks)

    def _read_some(self, n: int) -> bytes:
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise ShardTimeout(f"{self.url}: no data for {self.timeout:g} s "
                                   "(data.read_timeout_s); the command was killed")
            if self._poll.poll(left * 1000):
                return os.read(self._fd, n)

    def _check_exit(self) -> None:
        """Wait for the command (it has closed its output) and raise on a failure status."""
        if self._checked:
            return
        self._checked = True
        try:
            status = self.proc.wait(self.timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return  # its data was all there; a command that lingers is not a bad shard
        if status != 0 and status not in _SIGPIPE_STATUSES:
            raise OSError(f"{self.url}: the command exited with status {status}"
                          f"{self._stderr_tail()}")

    def _stderr_tail(self, n: int = 400) -> str:
        try:
            self._err.seek(max(0, self._err.seek(0, os.SEEK_END) - n))
            tail = self._err.read().decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            return ""
        return f": {tail}" if tail else ""

    def close(self, check: bool = True) -> None:
        """Close our end. `check` (the shard was read to its end): wait for the command and
        raise OSError on a failure status; otherwise (given up early) kill it quietly."""
        try:
            self.proc.stdout.close()  # a command still writing gets SIGPIPE and ends
            if check:
                self._check_exit()
            else:
                self.kill()
        finally:
            if self.proc.returncode is None:
                self.kill()
            self._err.close()

    def kill(self) -> None:
        """End the command and everything it started; reap it."""
        self._checked = True
        if self.proc.returncode is None:  # not reaped yet, so its process group id is still its own
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def __del__(self) -> None:  # a stream dropped without close() must not leave a process
        try:
            if self.proc.returncode is None:
                self.kill()
        except Exception:
            pass
