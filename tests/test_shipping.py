"""Shipping a run's local directories to workers (evomerge.shipping), without Ray: the file server
is the real one, called in-process, as the worker's fetch calls it through its actor."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from evomerge.shipping import (FileServer, SourceUnavailable, fingerprint, localize, manifest, matches,
                               run_manifests)


def _model(path: Path, seed: int, size: int = 3 * 2**20) -> Path:
    """A model dir: a config, a tokenizer, a 'weights' file of ``size`` bytes, and a file not shipped."""
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "tokenizer.json").write_text("{}")
    (path / "model.safetensors").write_bytes(bytes((seed + i) % 251 for i in range(size)))
    (path / "optimizer.pt").write_bytes(b"not a source file")
    return path


def _tasks(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "t.jsonl").write_text('{"q": 1}\n')
    (path / "t.yaml").write_text(f"task: t\ndataset_kwargs:\n  data_files:\n    test: {path}/t.jsonl\n")
    return path


class Server:
    """The controller's file server and a count of the pieces workers fetched."""

    def __init__(self, manifests) -> None:
        self.server = FileServer(manifests)
        self.pieces = 0

    def __call__(self, path, rel, offset, length):
        self.pieces += 1
        return self.server.read(path, rel, offset, length)


def test_a_manifest_names_the_files_a_worker_reads_and_tells_other_content_apart(tmp_path):
    a = _model(tmp_path / "a", seed=1)
    man = manifest(a, "model", "a")
    assert [rel for rel, _, _ in man.files] == ["config.json", "model.safetensors", "tokenizer.json"]
    assert matches(man, a)
    b = _model(tmp_path / "b", seed=2)  # another fine-tune at the same size: every block differs
    assert not matches(man, b)
    small = tmp_path / "a" / "config.json"
    before = fingerprint(small)
    small.write_text('{"model_type": "llamb"}')  # one byte of a small file: hashed whole
    assert fingerprint(small) != before and not matches(man, a)
    assert not matches(man, tmp_path / "missing")
    hub = run_manifests({"a": str(b), "h": "hf:org/name", "gone": str(tmp_path / "gone")}, (str(tmp_path / "x"),))
    assert [m.name for m in hub] == ["a"]  # Hub sources and dirs not here are not shipped


def test_auto_uses_the_same_path_when_it_holds_the_same_files_else_fetches_once_per_node(tmp_path):
    src = _model(tmp_path / "controller" / "expert", seed=3)
    mans = run_manifests({"expert": str(src)}, ())
    fetch = Server(mans)
    cache = tmp_path / "node-cache"
    where, notes = localize(mans, fetch, "auto", "10.0.0.7 (abcd1234)", cache)
    assert where == {str(src): str(src)} and notes == [] and fetch.pieces == 0

    moved = tmp_path / "elsewhere"
    os.rename(src.parent, moved)  # this node has no such path: the server still has the files open
    where, notes = localize(mans, fetch, "auto", "10.0.0.7 (abcd1234)", cache)
    local = Path(where[str(src)])
    assert local.parent == cache / "model" and local.name.startswith("expert-")
    assert (local / "model.safetensors").read_bytes() == (moved / "expert" / "model.safetensors").read_bytes()
    assert not (local / "optimizer.pt").exists()
    assert fetch.pieces == 3 + 0  # three files, each smaller than one piece
    assert notes == [f"node 10.0.0.7 (abcd1234): fetched expert (3.0 MiB) from the controller into {local} "
                     f"({src} is missing there)"]
    again, notes = localize(mans, fetch, "auto", "10.0.0.7 (abcd1234)", cache)  # a second worker on the node
    assert again == where and notes == [] and fetch.pieces == 3

    _model(src, seed=4)  # other files at the same path (another version): not used
    where, _ = localize(mans, fetch, "auto", "n", cache)
    assert where[str(src)] == str(local)


def test_always_fetches_and_never_names_the_node_the_model_and_the_path(tmp_path):
    src = _model(tmp_path / "expert", seed=5)
    mans = run_manifests({"expert": str(src)}, ())
    server = Server(mans)
    where, _ = localize(mans, server, "always", "n", tmp_path / "cache")
    assert where[str(src)] != str(src) and server.pieces == 3
    assert localize(mans, server, "never", "n", tmp_path / "cache")[0] == {str(src): str(src)}
    shutil.rmtree(src)
    with pytest.raises(SourceUnavailable) as err:
        localize(mans, server, "never", "10.0.0.9 (ffee0011)", tmp_path / "cache")
    assert str(err.value) == (f"node 10.0.0.9 (ffee0011): model 'expert' at {src} is missing; local sources must be at "
                              "the same path with the same files on every node (shared storage), or let workers "
                              "fetch them: dispatch.ship_sources: auto")
    _model(src, seed=6)
    with pytest.raises(SourceUnavailable, match="holds other files than the controller's"):
        localize(mans, server, "never", "n", tmp_path / "cache")
    assert server.pieces == 3  # never fetches


def test_a_fetched_task_dir_names_its_own_data(tmp_path):
    tasks = _tasks(tmp_path / "tasks")
    mans = run_manifests({}, (str(tasks),))
    where, _ = localize(mans, Server(mans), "always", "n", tmp_path / "cache")
    local = Path(where[str(tasks)])
    assert f"test: {local}/t.jsonl" in (local / "t.yaml").read_text()
    assert (local / "t.jsonl").read_text() == '{"q": 1}\n'


def test_a_file_changed_while_it_is_fetched_is_refused(tmp_path):
    src = _model(tmp_path / "expert", seed=7)
    mans = run_manifests({"expert": str(src)}, ())
    with open(src / "config.json", "w") as f:  # the same file (the server's open one), other bytes
        f.write('{"model_type": "gemma"}')
    with pytest.raises(SourceUnavailable, match="changed on the controller while it was fetched"):
        localize(mans, Server(mans), "always", "n", tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache" / "model").iterdir() if p.is_dir()]  # nothing half-written to use
