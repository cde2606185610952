"""`compile_paths` pauses the cyclic garbage collector while it runs (the slow tail of an
editor's checks) and leaves it as the caller had it, also when compilations overlap in
threads (`perfusion lsp` compiles in worker threads)."""

from __future__ import annotations

import gc
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
