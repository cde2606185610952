"""What makes repeated compilations (an editor's checks) fast: `compile_paths` pauses the
cyclic garbage collector while it runs (the slow tail of those checks) and leaves it as the
caller had it, also when compilations overlap in threads (`perfusion lsp` compiles in worker
threads); images are decoded once per content."""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from perfusion_dsl.compiler import compile_paths


@pytest.fixture
def collector() -> Iterator[None]:
    was = gc.isenabled()
    yield
    (gc.enable if was else gc.disable)()


def test_the_collector_is_paused_during_and_restored_after(tmp_path: Path,
                                                           collector: None) -> None:
    """A compilation of 6,000 images sets off 17 collections unpaused; paused, at most the
    one that the allocations made meanwhile start once it is back on."""
    (tmp_path / "a.concept").write_text('generate "{x|y|z}" x 50\n' * 40, "utf-8")
    runs: list[str] = []

    def record(phase: str, info: dict[str, int]) -> None:
        runs.append(phase)

    gc.callbacks.append(record)
    try:
        gc.enable()
        gc.collect()
        runs.clear()
        comp = compile_paths([tmp_path], root=tmp_path)
        assert len(comp.context.renders) == 6000 and runs.count("start") <= 1
        assert gc.isenabled()
        gc.disable()
        compile_paths([tmp_path], root=tmp_path)
        assert not gc.isenabled()  # the caller's choice is kept
    finally:
        gc.callbacks.remove(record)


def test_overlapping_compilations_in_threads_restore_it_once_all_end(
        tmp_path: Path, collector: None) -> None:
    (tmp_path / "a.concept").write_text('generate "{x|y|z}" x 50\n' * 40, "utf-8")
    gc.enable()
    during: list[bool] = []
    start = threading.Barrier(4)

    def work() -> None:
        start.wait()
        for _ in range(3):
            compile_paths([tmp_path], root=tmp_path)
            during.append(gc.isenabled())

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(during) == 12
    assert gc.isenabled()


def test_an_image_is_decoded_once_per_content_and_a_change_is_always_seen(
        tmp_path: Path) -> None:
    """Editor checks reuse what decoding found for the same bytes; a file rewritten with
    other bytes of the same size and the same modification time is decoded again."""
    from helpers import png_bytes

    from perfusion_dsl import images

    path = tmp_path / "a.png"
    good = png_bytes((10, 20, 30), size=16)
    path.write_bytes(good)
    stamp = path.stat().st_mtime_ns
    first = images.check_image(path, 10**6, 10**6)
    assert isinstance(first, images.ImageInfo)
    assert (first.digest, 10**6) in images._DECODED
    assert images.check_image(path, 10**6, 10**6) == first
    path.write_bytes(good[:40] + bytes(len(good) - 40))  # same size, no pixel data
    os.utime(path, ns=(stamp, stamp))
    again = images.check_image(path, 10**6, 10**6)
    assert isinstance(again, images.ImageProblem), again
