"""Atomic writes (equiv.files): folders, long names and read-only files refused by the
target's name, never the temporary file's; root included."""

from __future__ import annotations

import errno
import os

import pytest

from equiv.files import atomic_path, name_max, read_only, temporary_name


def write(path, text: str) -> None:
    with atomic_path(path) as temp, open(temp, "w") as file:
        file.write(text)


def test_a_folder_as_target_is_refused_by_its_name(tmp_path):
    # Before: IsADirectoryError "'.dir.json.a0bd….tmp' -> 'dir.json'", after the write.
    folder = tmp_path / "dir.json"
    folder.mkdir()
    with pytest.raises(IsADirectoryError) as info:
        write(folder, "{}")
    assert str(info.value) == f"cannot write {folder}: it is a folder; give a file name in it"
    assert os.listdir(tmp_path) == ["dir.json"] and os.listdir(folder) == []
    write(folder / "report.json", "{}")  # the twin: a file in it is written
    assert (folder / "report.json").read_text() == "{}"


@pytest.mark.parametrize("spare", [0, 10])
def test_a_long_name_the_file_system_allows_is_written(spare, tmp_path):
    # Before, the temporary name (18 bytes longer) failed with ENAMETOOLONG for any
    # name over 237 bytes, though an ordinary write to it succeeds.
    path = tmp_path / ("x" * (name_max(tmp_path) - spare - 5) + ".json")
    write(path, "whole")
    assert path.read_text() == "whole"
    assert os.listdir(tmp_path) == [path.name]


def test_a_name_longer_than_the_file_system_allows_is_refused_by_its_name(tmp_path):
    limit = name_max(tmp_path)
    path = tmp_path / ("x" * (limit - 4) + ".json")  # one byte too many
    with pytest.raises(OSError) as info:
        write(path, "whole")
    assert info.value.errno == errno.ENAMETOOLONG
    assert str(info.value) == (
        f"[Errno {errno.ENAMETOOLONG}] cannot write {path}: its name is longer than the "
        f"{limit} bytes the file system allows; give a shorter one"
    )
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["a.json", "x" * 250 + ".json", "é" * 125 + ".json"])
def test_a_temporary_name_is_hidden_beside_the_target_and_fits(name, tmp_path):
    temp = temporary_name(tmp_path / name)
    assert os.path.dirname(temp) == str(tmp_path)
    base = os.path.basename(temp)
    assert base.startswith(".") and base.endswith(".tmp") and base != f".{name}.tmp"
    assert len(os.fsencode(base)) <= name_max(tmp_path)
    assert name.startswith(base[1:].rsplit(".", 2)[0])  # the target's name, or its start
    if len(os.fsencode(f".{name}.0123456789ab.tmp")) <= name_max(tmp_path):
        assert base.rsplit(".", 2)[0] == f".{name}"  # a name with room is kept whole


def test_a_read_only_file_is_refused_even_as_root(tmp_path):
    # Before, os.access decided, and as root (the CI's user) it allows every write:
    # a file made read-only with chmod a-w was replaced.
    path = tmp_path / "report.json"
    write(path, "old")
    path.chmod(0o444)
    with pytest.raises(PermissionError) as info:
        write(path, "new")
    assert str(info.value) == f"cannot write {path}: the file is read-only"
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["report.json"]
    path.chmod(0o644)  # the twin: a writable file is replaced and keeps its mode
    write(path, "new")
    assert path.read_text() == "new" and path.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize(
    ("mode", "expected"),
    [(0o444, True), (0o400, True), (0o000, True), (0o644, False), (0o200, False)],
    ids=lambda value: None if isinstance(value, bool) else oct(value),
)
def test_read_only_means_no_write_permission_bit(mode, expected, tmp_path):
    path = tmp_path / "file"
    path.write_text("")
    path.chmod(mode)
    assert read_only(path) is expected
