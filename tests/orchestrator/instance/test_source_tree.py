"""source_tree.repack: GitHub's archive is checked and re-packed, and a hostile or broken one is refused."""

from __future__ import annotations

import io
import re
import tarfile

import pytest

from orchestrator.instance.source_tree import SourceTreeError, repack

TOP = "acme-cnn-0123456"


def archive(*members: tuple[str, bytes | str | None, str], gz: bool = True) -> bytes:
    """A tarball of (name, content, kind): kind 'file' (bytes), 'dir', 'sym' or 'hard' (content: the link target)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz" if gz else "w") as tar:
        for name, content, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                data = content if isinstance(content, bytes) else b""
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
                continue
            if kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, str(content)
            elif kind == "hard":
                info.type, info.linkname = tarfile.LNKTYPE, str(content)
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            tar.addfile(info)
    return out.getvalue()


def project(*extra: tuple[str, bytes | str | None, str]) -> bytes:
    return archive(
        (f"{TOP}/", None, "dir"),
        (f"{TOP}/MLproject", b"name: cnn\n", "file"),
        (f"{TOP}/remote/", None, "dir"),
        (f"{TOP}/remote/train.py", b"print('hi')\n", "file"),
        *extra,
    )


def unpacked(tar: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(tar)) as packed:
        return {member.name: member for member in packed.getmembers()}


def test_repack_strips_the_top_folder_and_normalises_members() -> None:
    tree = repack(project((f"{TOP}/link", "remote/train.py", "sym")))
    members = unpacked(tree.tar)
    assert set(members) == {"MLproject", "remote", "remote/train.py", "link"}
    assert tree.files == 2
    assert tree.size == len(b"name: cnn\n") + len(b"print('hi')\n")
    assert all(m.uid == 0 and m.mtime == 0 for m in members.values())
    assert members["link"].linkname == "remote/train.py"
    with tarfile.open(fileobj=io.BytesIO(tree.tar)) as packed:
        handle = packed.extractfile("remote/train.py")
        assert handle is not None and handle.read() == b"print('hi')\n"


def test_repack_is_deterministic() -> None:
    assert repack(project()).tar == repack(project()).tar


@pytest.mark.parametrize(
    "member",
    [
        (f"{TOP}/../evil", b"x", "file"),
        (f"{TOP}/remote/../../evil", b"x", "file"),
        ("/etc/evil", b"x", "file"),
        (f"{TOP}/a\\..\\b", b"x", "file"),
    ],
)
def test_path_traversal_is_refused(member: tuple[str, bytes, str]) -> None:
    with pytest.raises(SourceTreeError, match=r"climbs out|absolute|outside the archive|top-level entries"):
        repack(project(member))


@pytest.mark.parametrize("target", ["../../etc/passwd", "/etc/passwd", "../remote/../../x", "../.."])
def test_symlink_out_of_the_tree_is_refused(target: str) -> None:
    with pytest.raises(SourceTreeError, match="outside the repository"):
        repack(project((f"{TOP}/remote/link", target, "sym")))


def test_symlink_out_through_another_link_is_refused() -> None:
    # Lexically b stays inside (a/a/../.. is "."), but a is the folder itself: b resolves to the tree's parent.
    with pytest.raises(SourceTreeError, match=re.escape("'b' is a link to 'a/a/a/../../..', outside the repository")):
        repack(project((f"{TOP}/a", ".", "sym"), (f"{TOP}/b", "a/a/a/../../..", "sym")))


def test_link_cycles_are_refused() -> None:
    with pytest.raises(SourceTreeError, match="outside the repository"):
        repack(project((f"{TOP}/a", "b/x", "sym"), (f"{TOP}/b", "a/y", "sym")))


def test_symlink_inside_the_tree_is_kept() -> None:
    members = unpacked(repack(project((f"{TOP}/remote/up", "../MLproject", "sym"))).tar)
    assert members["remote/up"].linkname == "../MLproject"


def test_hard_link_out_of_the_tree_is_refused() -> None:
    with pytest.raises(SourceTreeError, match=r"climbs out|outside the archive"):
        repack(project((f"{TOP}/remote/hard", "../etc/passwd", "hard")))


def test_special_files_are_refused() -> None:
    with pytest.raises(SourceTreeError, match="special file"):
        repack(project((f"{TOP}/pipe", None, "fifo")))


def test_size_bound() -> None:
    big = project((f"{TOP}/weights.bin", b"\0" * 4096, "file"))
    assert repack(big, max_bytes=8192).files == 3
    with pytest.raises(SourceTreeError, match="exceed 0 MiB unpacked: keep data and models out"):
        repack(big, max_bytes=4096)


def test_missing_mlproject_is_refused() -> None:
    with pytest.raises(SourceTreeError, match="no MLproject file at the repository's root"):
        repack(archive((f"{TOP}/", None, "dir"), (f"{TOP}/sub/MLproject", b"x", "file")))


def test_more_than_one_top_folder_is_refused() -> None:
    with pytest.raises(SourceTreeError, match="2 top-level entries"):
        repack(project(("other/MLproject", b"x", "file")))


@pytest.mark.parametrize("data", [b"", b"not a tar at all", project()[:100]], ids=["empty", "text", "truncated"])
def test_unreadable_archives_are_refused(data: bytes) -> None:
    with pytest.raises(SourceTreeError, match=r"not a readable tar|empty"):
        repack(data)
