"""A stopped build: SIGTERM or Ctrl-C removes its temporary folder; a build killed outright (SIGKILL) takes its
image workers with it, and the next build into the same --out removes the temporary folder it left, but never the
one of a build that is still running."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from shards.__main__ import main as shards_main
from shards.build import BuildOptions, build
from shards.errors import InputError
from shards.outdir import OWNER
from shards.procs import process_start
from shards.synth import synthesize
from tests.testutil import other_process

REPO = Path(__file__).resolve().parents[2]
OPTIONS = ["--min-user-interactions", "3", "--image-size", "32", "--samples-per-shard", "2", "--no-progress"]

_SLOW_BUILD = """
import sys, time
import shards.build as build
from shards.__main__ import main

def slowly(real):
    def call(*args):
        time.sleep(0.3)
        return real(*args)
    return call

if sys.argv[1] == "images":  # the workers (forked: they inherit this) take their time over each image
    build.reencode_file = slowly(build.reencode_file)
else:  # the writing of the sequence shards takes its time
    build.schema.encode_seq = slowly(build.schema.encode_seq)
sys.exit(main(["build", "--input", sys.argv[2], "--out", sys.argv[3], *sys.argv[4:]]))
"""


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("src")
    (src,) = synthesize(out, domains=["books"], users_per_domain=16, items_per_domain=24, n_topics=2)
    return src


def start_build(slow: str, src: Path, out: Path, *more: str) -> subprocess.Popen:
    """The build, its output into ``out``'s sibling ``build.log`` (not a pipe: an orphaned worker would hold it)."""
    argv = [sys.executable, "-c", textwrap.dedent(_SLOW_BUILD), slow, str(src), str(out), *OPTIONS, *more]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with open(out.parent / "build.log", "w") as log:
        return subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen, sig: int, out: Path) -> str:
    proc.send_signal(sig)
    proc.wait(timeout=30)
    return (out.parent / "build.log").read_text()


def temp_folders(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.tmp-*"))


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        assert proc.poll() is None, f"the build ended before {what}"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    pytest.fail(f"no {what} after {timeout} s")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stopped_build_removes_its_temporary_folder(source: Path, tmp_path: Path, sig: signal.Signals) -> None:
    out = tmp_path / "books"
    proc = start_build("writing", source, out)
    wait_for(lambda: [t for t in temp_folders(out) if list(t.glob("seqs-*.tar"))], proc, "sequence shard")
    err = stop(proc, sig, out)
    assert proc.returncode == (143 if sig == signal.SIGTERM else 130), err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: "), err[-2000:]
    assert temp_folders(out) == [] and not out.exists()


def test_a_killed_build_takes_its_workers_along_and_the_next_build_cleans_up(
    source: Path, tmp_path: Path, caplog
) -> None:
    out = tmp_path / "books"
    proc = start_build("images", source, out, "--workers", "2")
    parent = psutil.Process(proc.pid)
    workers = wait_for(lambda: parent.children() if len(parent.children()) >= 2 else None, proc, "image workers")
    stop(proc, signal.SIGKILL, out)
    _, alive = psutil.wait_procs(workers, timeout=5)
    for orphan in alive:
        orphan.kill()
    assert not alive, f"workers {[p.pid for p in alive]} outlived their killed build"

    proc = start_build("writing", source, out)
    wait_for(lambda: [t for t in temp_folders(out) if list(t.glob("seqs-*.tar"))], proc, "sequence shard")
    stop(proc, signal.SIGKILL, out)
    (left,) = temp_folders(out)
    assert json.loads((left / OWNER).read_text())["pid"] == proc.pid  # its pid file names the dead build
    with caplog.at_level(logging.WARNING, logger="shards.outdir"):
        assert shards_main(["build", "--input", str(source), "--out", str(out), *OPTIONS]) == 0
    assert temp_folders(out) == [] and (out / "manifest.json").is_file()
    assert any(f"removing {left}, left by a writer that is no longer running" in r.getMessage() for r in caplog.records)


def test_the_temporary_folder_of_a_running_build_is_never_removed(source: Path, tmp_path: Path, caplog) -> None:
    out = tmp_path / "books"
    opts = BuildOptions(min_user_interactions=3, image_size=32, samples_per_shard=4)
    with other_process() as live:
        running = tmp_path / f".books.tmp-{live.pid}"
        running.mkdir()
        holder = {"host": socket.gethostname(), "pid": live.pid, "started": process_start(live.pid),
                  "since": "2025-01-02 03:04:05 +0000", "command": "python -m shards build ..."}  # fmt: skip
        (running / OWNER).write_text(json.dumps(holder))
        with pytest.raises(InputError, match=rf"{out} is being written by another process \(host .*, pid {live.pid}"):
            build(source, out, opts, progress=False)
        assert (running / OWNER).is_file() and not out.exists()
        (running / OWNER).unlink()  # a writer that cannot be told: warned about, with how to remove it
        with caplog.at_level(logging.WARNING, logger="shards.outdir"):
            build(source, out, opts, progress=False)
        assert running.is_dir() and (out / "manifest.json").is_file()
        assert any(f"remove it: rm -r '{running}'" in r.getMessage() for r in caplog.records)
