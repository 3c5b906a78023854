"""Shipping: a run's local directories reach workers on every node.

A run reads local directories on the controller's machine: source models given as paths, the
embedded zoo, lm-eval task dirs. A worker on another node may not have them, or may have
*other* files at the same path (another version of a fine-tune). So the controller describes
each directory by a :class:`DirManifest` (file names, sizes and a sampled fingerprint of each
file's content), and every worker, before it loads anything, makes each directory local
(:func:`localize`):

- ``auto`` (the default): the directory at the same path on the worker's node is used when its
  manifest matches the controller's (shared storage, an image or a volume that holds the
  models); otherwise the worker fetches the files from the controller, once per node, into
  ``$EVOMERGE_CACHE/shipped/`` (node-local; workers on one node share it under a file lock);
- ``always``: always the node's fetched copy (benchmarks, or storage that must not be read);
- ``never``: the same path must hold the same files on every node; a worker where it does not
  fails to start with one line naming its node, the model (or task dir) and the path.

Why this way: shared storage is what most clusters have and costs nothing, so a worker uses it
when it holds the right files; where it does not, the controller's copy is the only one known
to be right, and pulling it on demand in chunks (:class:`FileServer`, served by an actor on the
controller's node) keeps nothing in Ray's object store beyond the chunks in flight, where
putting whole models would hold every source in the head's memory for the whole run. Hub
sources (``hf:``) are not shipped: each node fetches them into its own Hugging Face cache.

The fingerprint samples each file (its size and 16 blocks of 64 KiB at fixed offsets) rather
than hashing it whole: two versions of a model differ in nearly every block, and a full hash
would read every source once more on every node. Task YAMLs name their data files by absolute
path; in a fetched task dir, paths that point into the controller's copy are rewritten to the
fetched copy.
"""

from __future__ import annotations

import fcntl
import fnmatch
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

from evomerge.errors import EvomergeError

Mode = Literal["auto", "always", "never"]
CHUNK = 32 * 2**20  # bytes per fetched piece
_SAMPLES = 16
_SAMPLE_BYTES = 64 * 2**10
# the files of a model dir a worker reads (as fetched from the Hub), at its top level only
MODEL_PATTERNS = ("*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.py", "*.jinja")
_REWRITTEN = (".yaml", ".yml")
SHIPPED = "shipped"


class SourceUnavailable(EvomergeError):
    """A worker cannot have one of the run's directories as the controller has it."""


@dataclass(frozen=True)
class DirManifest:
    """A directory as the controller has it: ``files`` are (relative path, size, fingerprint)."""

    kind: Literal["model", "tasks"]
    name: str  # the model's name, or "task dir <i>"
    path: str  # where it is on the controller
    files: tuple[tuple[str, int, str], ...]

    @property
    def digest(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        for rel, size, fp in self.files:
            h.update(f"{rel}\0{size}\0{fp}\n".encode())
        return h.hexdigest()

    @property
    def size(self) -> int:
        return sum(size for _, size, _ in self.files)


def fingerprint(path: Path, size: Optional[int] = None) -> str:
    """A sampled fingerprint of a file: its size and 16 blocks of 64 KiB at evenly spaced offsets."""
    size = path.stat().st_size if size is None else size
    h = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as f:
        if size <= _SAMPLES * _SAMPLE_BYTES:
            h.update(f.read())
        else:
            step = (size - _SAMPLE_BYTES) // (_SAMPLES - 1)
            for i in range(_SAMPLES):
                h.update(os.pread(f.fileno(), _SAMPLE_BYTES, i * step))
    return h.hexdigest()


def _listing(root: Path, kind: str) -> list[str]:
    """The relative paths of the files shipped for a directory (sorted)."""
    if kind == "model":
        return sorted(p.name for p in root.iterdir()
                      if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in MODEL_PATTERNS))
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))


def manifest(path: str | Path, kind: Literal["model", "tasks"], name: str) -> DirManifest:
    root = Path(path)
    files = []
    for rel in _listing(root, kind):
        size = (root / rel).stat().st_size
        files.append((rel, size, fingerprint(root / rel, size)))
    return DirManifest(kind=kind, name=name, path=str(path), files=tuple(files))


def matches(man: DirManifest, path: str | Path) -> bool:
    """Whether ``path`` on this machine holds the manifest's files, with the same content."""
    root = Path(path)
    try:
        return root.is_dir() and manifest(root, man.kind, man.name).files == man.files
    except OSError:
        return False


def run_manifests(model_dirs: dict[str, str], task_paths: tuple[str, ...]) -> tuple[DirManifest, ...]:
    """The manifests of a run's local directories that exist here (Hub sources are not shipped)."""
    out = []
    for name, path in model_dirs.items():
        if not str(path).startswith("hf:") and Path(path).is_dir():
            out.append(manifest(path, "model", name))
    for i, path in enumerate(task_paths):
        if Path(path).is_dir():
            out.append(manifest(path, "tasks", f"task dir {i}"))
    return tuple(out)


class FileServer:
    """Serves the manifests' files in pieces (run inside an actor on the controller's node).

    The files are opened when the server starts, so they stay readable for the whole run even
    if their directory is renamed or removed later.
    """

    def __init__(self, manifests: tuple[DirManifest, ...]) -> None:
        self._fds: dict[tuple[str, str], int] = {}
        for man in manifests:
            for rel, _, _ in man.files:
                self._fds[(man.path, rel)] = os.open(Path(man.path) / rel, os.O_RDONLY)

    def read(self, path: str, rel: str, offset: int, length: int) -> bytes:
        return os.pread(self._fds[(path, rel)], length, offset)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


Fetch = Callable[[str, str, int, int], bytes]  # (controller path, relative file, offset, length) -> bytes
# None: nothing can be fetched (a local run's workers share the controller's machine)


def node_cache() -> Path:
    """Where fetched directories live on this node: ``$EVOMERGE_CACHE/shipped`` (``~/.cache/evomerge``)."""
    configured = os.environ.get("EVOMERGE_CACHE")
    return (Path(configured) if configured else Path.home() / ".cache" / "evomerge") / SHIPPED


def localize(manifests: tuple[DirManifest, ...], fetch: Optional[Fetch], mode: Mode, node: str,
             cache: Optional[Path] = None) -> tuple[dict[str, str], list[str]]:
    """Each manifest's directory on this node: ``{controller path: local path}``, and one line per
    directory that was fetched (for the controller to report). Raises :class:`SourceUnavailable`
    (``never``) naming the node, the directory and the path."""
    cache = cache or node_cache()
    where: dict[str, str] = {}
    notes: list[str] = []
    for man in manifests:
        if mode != "always" and matches(man, man.path):
            where[man.path] = man.path
            continue
        state = "holds other files than the controller's" if Path(man.path).is_dir() else "is missing"
        what = f"model {man.name!r}" if man.kind == "model" else man.name
        if mode == "never":
            raise SourceUnavailable(
                f"node {node}: {what} at {man.path} {state}; local sources must be at the same path with the same "
                "files on every node (shared storage), or let workers fetch them: dispatch.ship_sources: auto")
        if fetch is None:
            raise SourceUnavailable(f"node {node}: {what} at {man.path} {state} (it changed since the run started?)")
        local, fetched = _fetched_copy(man, fetch, cache)
        where[man.path] = str(local)
        if fetched:
            reason = "holds other files" if Path(man.path).is_dir() else "is missing"
            notes.append(f"node {node}: fetched {man.name} ({man.size / 2**20:.1f} MiB) from the controller "
                         f"into {local} ({man.path} {reason} there)" if mode == "auto" else
                         f"node {node}: fetched {man.name} ({man.size / 2**20:.1f} MiB) into {local}")
    return where, notes


def _fetched_copy(man: DirManifest, fetch: Fetch, cache: Path) -> tuple[Path, bool]:
    """The node's fetched copy of a directory, fetching it if no worker here has yet; True if fetched now."""
    target = cache / man.kind / f"{Path(man.path).name}-{man.digest[:16]}"
    if target.is_dir():
        return target, False
    cache.joinpath(man.kind).mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker on this node may be fetching it now
        if target.is_dir():
            return target, False
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            for rel, size, fp in man.files:
                dest = partial / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                with open(dest, "wb") as out:
                    for offset in range(0, size, CHUNK):
                        out.write(fetch(man.path, rel, offset, min(CHUNK, size - offset)))
                if fingerprint(dest) != fp:
                    raise SourceUnavailable(f"{man.name}: {rel} changed on the controller while it was fetched")
            if man.kind == "tasks":
                _rewrite_paths(partial, man.path, target)
            os.replace(partial, target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return target, True


def _rewrite_paths(root: Path, old: str, new: Path) -> None:
    """In the task YAMLs of a fetched task dir, paths into the controller's copy now name this copy."""
    prefix = old.rstrip(os.sep) + os.sep
    for path in root.rglob("*"):
        if path.suffix in _REWRITTEN and path.is_file():
            text = path.read_text(encoding="utf-8")
            if prefix in text:
                path.write_text(text.replace(prefix, str(new) + os.sep), encoding="utf-8")


