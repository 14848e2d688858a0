"""Task `version_buffer`: snapshot a client's buffer folder into the DVC cache; its DVC hash names that
version (the `buffer.<client>` tag of every adapter it fed: lineage from adapter back to data).

The hash is the one `dvc add` would write (md5 of the folder's `.dir` listing); the files land in the
repository's DVC cache, so `dvc` can check that version out or push it. A run folder is git-ignored, where
`dvc add` refuses to write a `.dvc` file, hence the DVC data API. One DVC operation at a time per process.
The task takes the buffer task's result (its folder is `data.root`), so it runs after that write wherever it
runs. The lock lives with `store`, a plain module function: a process pool pickles a task's function by value
with the globals it names, and a lock cannot be pickled, while a module function travels by reference.
"""

import threading
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.buffer import ClientData

_one_at_a_time = threading.Lock()


@task(name="version_buffer", retries=1, cache_policy=NO_CACHE, task_run_name="version-buffer-{client}-round-{round}")
def version_buffer(repo: str, data: ClientData, client: str, round: int) -> str:
    """Store the buffer folder `data` was read from in the cache of the DVC repository `repo`; returns its hash."""
    return store(repo, data.root)


def store(repo: str, root: str) -> str:
    """The folder `root` into the cache of the DVC repository `repo`, one DVC operation at a time per process;
    returns the folder's DVC hash."""
    from dvc.fs import LocalFileSystem
    from dvc.repo import Repo
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.transfer import transfer

    with _one_at_a_time:
        dvc = Repo(repo)
        try:
            cache = dvc.cache.local
            staging, _, obj = build(cache, str(Path(root).resolve()), LocalFileSystem(), "md5")
            result = transfer(staging, cache, {obj.hash_info}, shallow=False, hardlink=False)
            if result.failed:
                raise RuntimeError(f"{root}: {len(result.failed)} objects did not reach the DVC cache {cache.path}")
            return obj.hash_info.value
        finally:
            dvc.close()


def in_cache(repo: str, digest: str) -> bool:
    """Whether the DVC cache of `repo` holds that version (the folder listing and every file in it)."""
    from dvc.repo import Repo
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree

    dvc = Repo(repo)
    try:
        cache = dvc.cache.local
        if not cache.exists(digest):
            return False
        return all(cache.exists(entry.value) for _, _, entry in Tree.load(cache, HashInfo("md5", digest)))
    finally:
        dvc.close()


def push(repo: str, digest: str, remote: str | None = None) -> int:
    """Send a buffer version (its listing and every file) from the cache to a DVC remote (the default one:
    `make serve` makes bucket `dvc` of its object store the default); returns how many objects moved. The
    buffer's owner decides when: the flow only versions into the local cache."""
    return _move(repo, digest, remote, "push")


def pull(repo: str, digest: str, remote: str | None = None) -> int:
    """Fetch a buffer version from a DVC remote into the cache (what `dvc pull` does for tracked outputs)."""
    return _move(repo, digest, remote, "pull")


def _move(repo: str, digest: str, remote: str | None, direction: str) -> int:
    """Move the folder listing and every file it names (DVC transfers a listing's files only when they are
    named too); pulling fetches the listing first to learn them."""
    from dvc.repo import Repo
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree

    with _one_at_a_time:
        dvc = Repo(repo)
        try:
            move = dvc.cloud.push if direction == "push" else dvc.cloud.pull
            listing = HashInfo("md5", digest)
            moved = 0
            if direction == "pull":
                moved += _checked(move([listing], remote=remote), repo, direction, digest)
            ids = {listing, *(entry for _, _, entry in Tree.load(dvc.cache.local, listing))}
            return moved + _checked(move(ids, remote=remote), repo, direction, digest)
        finally:
            dvc.close()


def _checked(result, repo: str, direction: str, digest: str) -> int:
    if result.failed:
        raise RuntimeError(f"{repo}: {direction} of buffer version {digest}: {len(result.failed)} objects failed")
    return len(result.transferred)
