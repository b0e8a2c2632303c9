"""The commit's source tree as the instance receives it: GitHub's tarball checked and re-packed as a plain tar.

GitHub's archive (`/repos/{owner}/{repo}/tarball/{sha}`) holds one top folder (`owner-repo-<short sha>/`) and a pax
header with the commit id. What goes to the instance is that folder's content only, after checks that a hostile or
broken archive cannot pass: no absolute or climbing paths, no link leading out of the tree, no device or fifo, a
bounded size, and an MLproject at the root (`mlflow run` needs it there). Pure functions over bytes, tested with no
network and no SSH; `commit_tree` downloads the archive they check.
"""

from __future__ import annotations

import io
import logging
import posixpath
import tarfile
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from orchestrator.errors import OrchestratorError

if TYPE_CHECKING:
    from orchestrator.config.settings import Settings

log = logging.getLogger(__name__)

# Unpacked size at most: training code, not data (the data comes from data_uri). A bigger tree is refused, not cut.
MAX_TREE_BYTES = 256 * 1024 * 1024
MAX_MEMBERS = 100_000


class SourceTreeError(OrchestratorError):
    """The repository's archive cannot be shipped as it is: a retry will not change the commit's content."""


@dataclass(frozen=True)
class SourceTree:
    """The re-packed tree: a plain tar whose members are relative to the project root."""

    tar: bytes
    files: int
    size: int


def _relative(name: str, top: str) -> str:
    """The member's path below the archive's top folder; refuses anything that could land outside it."""
    if name.startswith("/") or "\\" in name:
        raise SourceTreeError(f"archive member {name!r} has an absolute or non-POSIX path: refusing the archive")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise SourceTreeError(f"archive member {name!r} climbs out of the tree ('..'): refusing the archive")
    if not parts or parts[0] != top:
        raise SourceTreeError(
            f"archive member {name!r} is outside the archive's top folder {top!r}: not a GitHub repository archive"
        )
    return "/".join(parts[1:])


# Links followed while resolving one link, as Linux's own bound (ELOOP): a cycle is refused, not followed forever.
MAX_LINK_HOPS = 40


def _escapes(link_path: str, links: dict[str, str]) -> bool:
    """Whether the link at `link_path` resolves outside the tree, following the archive's own links as the kernel
    would: a lexical check alone is fooled by a link through another link (`a -> .`, `b -> a/a/../..`)."""
    current = [part for part in posixpath.dirname(link_path).split("/") if part]
    todo = links[link_path].split("/")
    if links[link_path].startswith("/"):
        return True
    hops = 0
    while todo:
        part = todo.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if not current:
                return True
            current.pop()
            continue
        current.append(part)
        target = links.get("/".join(current))
        if target is not None:
            hops += 1
            if hops > MAX_LINK_HOPS or target.startswith("/"):
                return True
            current.pop()
            todo = target.split("/") + todo
    return False


def _top_folder(members: list[tarfile.TarInfo]) -> str:
    tops = {member.name.lstrip("./").split("/", 1)[0] for member in members}
    if len(tops) != 1:
        raise SourceTreeError(
            f"the archive has {len(tops)} top-level entries, not GitHub's one folder per commit: refusing it"
        )
    return tops.pop()


def repack(archive: bytes, *, max_bytes: int = MAX_TREE_BYTES) -> SourceTree:
    """Check GitHub's (gzipped) tarball and re-pack its content as a plain tar rooted at the project.

    Owners, times and modes are normalised (files 0644, or 0755 when executable; folders 0755), so what the
    instance unpacks depends on the commit only.
    """
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:*") as source:
            tar, files, size = _repack(source, max_bytes)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise SourceTreeError(f"the repository archive is not a readable tar ({exc}): refusing it") from None
    return SourceTree(tar, files, size)


def _repack(source: tarfile.TarFile, max_bytes: int) -> tuple[bytes, int, int]:
    members = source.getmembers()
    if len(members) > MAX_MEMBERS:
        raise SourceTreeError(f"the repository archive has {len(members)} entries (at most {MAX_MEMBERS}): refusing it")
    if not members:
        raise SourceTreeError("the repository archive is empty: the commit has no files")
    top = _top_folder(members)
    links = {_relative(m.name, top): m.linkname for m in members if m.issym()}
    out = io.BytesIO()
    size = files = 0
    has_mlproject = False
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as packed:
        for member in members:
            path = _relative(member.name, top)
            if not path:
                continue
            info = tarfile.TarInfo(path)
            info.mtime = 0
            if member.isdir():
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                packed.addfile(info)
            elif member.issym() or member.islnk():
                # A hard link's target is a path from the archive's root; a symbolic link's is from its folder.
                target = _relative(member.linkname, top) if member.islnk() else member.linkname
                if member.issym() and _escapes(path, links):
                    raise SourceTreeError(
                        f"{path!r} is a link to {member.linkname!r}, outside the repository: refusing the archive"
                    )
                info.type, info.linkname, info.mode = member.type, target, 0o777 if member.issym() else 0o644
                packed.addfile(info)
            elif member.isfile():
                size += member.size
                if size > max_bytes:
                    raise SourceTreeError(
                        f"the repository's files at this commit exceed {max_bytes // (1024 * 1024)} MiB unpacked: "
                        "keep data and models out of the repository (use data_uri for the data)"
                    )
                info.size = member.size
                info.mode = 0o755 if member.mode & 0o111 else 0o644
                packed.addfile(info, source.extractfile(member))
                files += 1
                has_mlproject = has_mlproject or path == "MLproject"
            else:
                raise SourceTreeError(f"{path!r} is a device, fifo or other special file: refusing the archive")
    if not has_mlproject:
        raise SourceTreeError(
            "the commit has no MLproject file at the repository's root: `mlflow run` needs one; add it and push"
        )
    return out.getvalue(), files, size


def commit_tree(s: Settings, git_sha: str) -> bytes:
    """The commit's tree, downloaded here with the GitHub connection's token and checked: the instance gets the
    files, never a credential. A repository or archive that cannot be used fails now, with no retry."""
    from airflow.sdk.exceptions import AirflowFailException

    from orchestrator.ci.github import GitHubClient
    from orchestrator.ci.github_protocol import GitHubCredentialsError, GitHubSourceError

    client = GitHubClient.from_connection(s.github.conn_id, s.github.api_url, s.github.repo)
    try:
        tree = repack(client.download_tarball(git_sha))
    except (GitHubSourceError, GitHubCredentialsError, SourceTreeError) as exc:
        raise AirflowFailException(f"cannot ship the source of commit {git_sha}: {exc}") from None
    log.info("Source tree of %s from %s: %d files, %d bytes", git_sha, s.github.repo, tree.files, tree.size)
    return tree.tar
