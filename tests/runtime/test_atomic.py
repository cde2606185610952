"""The one atomic writer of the runtime (`perfusion_runtime.files.atomic`) and its users."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from perfusion_runtime.files.atomic import (
    FileError,
    check_target,
    file_sha256,
    open_regular,
    write_atomically,
    write_json_atomically,
)


@pytest.fixture
def umask_022() -> object:
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_honour_the_umask_not_0600(tmp_path: Path, umask_022: object) -> None:
    path = tmp_path / "a.bin"
    write_atomically(path, b"one")
    assert path.read_bytes() == b"one" and mode_of(path) == 0o644
    write_json_atomically(tmp_path / "deep" / "b.json", {"b": 1, "a": [1, 2]})
    assert mode_of(tmp_path / "deep" / "b.json") == 0o644
    assert (tmp_path / "deep" / "b.json").read_text() == \
        '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "deep"]  # no temp left


def test_cinv_cache_file_honours_the_umask(tmp_path: Path, umask_022: object) -> None:
    """The C⁻¹ cache was written through mkstemp, mode 0600, whatever the umask."""
    from perfusion_runtime.method.covariance import cinv_for
    from perfusion_runtime.method.tiny import tiny_pipeline

    pipe = tiny_pipeline()
    captions = tmp_path / "captions.txt"
    captions.write_text("a photo of a dog\na red cube on a table\n")
    cinv, fingerprint = cinv_for(pipe, tmp_path / "cache", captions)
    written = tmp_path / "cache" / "cinv" / f"{fingerprint}.safetensors"
    assert mode_of(written) == 0o644
    again, _ = cinv_for(pipe, tmp_path / "cache", captions)  # read back from the cache
    assert torch.equal(cinv, again)


def test_a_link_at_the_final_name_is_replaced_never_written_through(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"keep me")
    link = tmp_path / "file"
    link.symlink_to(target)
    write_atomically(link, b"new")
    assert target.read_bytes() == b"keep me"
    assert not link.is_symlink() and link.read_bytes() == b"new"


def test_check_target_refuses_a_link_and_a_folder(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    (tmp_path / "folder").mkdir()
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        with pytest.raises(FileError, match="refusing to replace the symbolic link"):
            check_target(fd, "link", tmp_path / "link")
        with pytest.raises(FileError, match="not a regular file"):
            check_target(fd, "folder", tmp_path / "folder")
        check_target(fd, "missing", tmp_path / "missing")  # a new name is fine
    finally:
        os.close(fd)


def test_errors_name_the_path_and_leave_no_temp_file(tmp_path: Path) -> None:
    with pytest.raises(FileError, match="cannot create a file in") as missing:
        write_atomically(tmp_path / "no" / "such" / "x", b"x")
    assert missing.value.path == tmp_path / "no" / "such" / "x"
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "inside").write_bytes(b"")
    with pytest.raises(FileError, match="cannot save: "):
        write_atomically(tmp_path / "taken", b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_reads_never_follow_a_link_unless_asked(tmp_path: Path) -> None:
    (tmp_path / "real").write_bytes(b"data")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert file_sha256(tmp_path / "link") is None
    assert file_sha256(tmp_path / "real") is not None
    with open_regular(tmp_path / "link", follow_links=True) as handle:
        assert handle.read() == b"data"
    (tmp_path / "folder").mkdir()
    with pytest.raises(OSError, match="not a regular file \\(it is a directory\\)"):
        open_regular(tmp_path / "folder", follow_links=True)
