"""Where a source model's files are: a local directory or a Hugging Face Hub repo.

A source ``path`` in an experiment is a directory, ``zoo:<name>`` (the embedded
zoo, resolved by the controller) or ``hf:<org>/<name>[@<revision>]``. Hub models
are fetched where they are used (on each worker's node, into its Hugging Face
cache; mount that cache as a volume so a node downloads a model once), and
``HF_HUB_OFFLINE=1`` makes that a cache lookup only. Planning (``run --dry-run``)
never downloads: it reads ``config.json`` from a local dir, from the Hub cache, or
from the file the experiment declares as the source's ``config``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from evomerge.errors import ConfigError

HF_PREFIX = "hf:"
_HF_ID = re.compile(r"^hf:([A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*)(?:@([A-Za-z0-9_./-]+))?$")
# what a worker needs of a Hub repo; not the .bin / .pth duplicates many repos also hold
HF_PATTERNS = ("*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.py")


def is_hub(path: str) -> bool:
    return path.startswith(HF_PREFIX)


def parse_hub(path: str) -> tuple[str, Optional[str]]:
    """``hf:org/name@rev`` -> (``org/name``, ``rev``); ConfigError on a malformed id."""
    m = _HF_ID.match(path)
    if m is None:
        raise ConfigError([f"{path!r} is not a Hugging Face model id; write hf:<org>/<name> or hf:<org>/<name>@<revision>"])
    return m.group(1), m.group(2)


def resolve_model_dir(path: str) -> Path:
    """A local directory holding the model's files (downloading a Hub model into the cache)."""
    if not is_hub(path):
        return Path(path)
    from huggingface_hub import snapshot_download

    repo, revision = parse_hub(path)
    try:
        return Path(snapshot_download(repo_id=repo, revision=revision, allow_patterns=list(HF_PATTERNS)))
    except Exception as exc:  # offline and not cached, gated, unknown repo, network
        raise ConfigError([f"model {path}: cannot get it from the Hugging Face Hub or its cache "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                           "log in (HF_TOKEN), check the id, or pre-fill the cache (HF_HOME)"]) from None


def cached_file(path: str, filename: str) -> Optional[Path]:
    """``filename`` of a local dir or of a Hub repo already in the cache; None if neither (no download)."""
    if not is_hub(path):
        file = Path(path) / filename
        return file if file.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    repo, revision = parse_hub(path)
    found = try_to_load_from_cache(repo_id=repo, filename=filename, revision=revision)
    return Path(found) if isinstance(found, str) else None


def cached_config(path: str) -> Optional[dict]:
    """``config.json`` of a local dir or a Hub model already in the cache; None if neither (no download)."""
    file = cached_file(path, "config.json")
    return json.loads(file.read_text()) if file is not None else None


def model_config(path: str, declared: Optional[str] = None, download: bool = True) -> dict:
    """A source's ``config.json``: local / cached, else the ``declared`` file, else (``download``) the Hub's."""
    cfg = cached_config(path)
    if cfg is not None:
        return cfg
    if declared is not None:
        return json.loads(Path(declared).read_text())
    if is_hub(path) and download:
        from huggingface_hub import hf_hub_download

        repo, revision = parse_hub(path)
        try:
            return json.loads(Path(hf_hub_download(repo_id=repo, filename="config.json", revision=revision)).read_text())
        except Exception as exc:
            raise ConfigError([f"model {path}: cannot read its config.json from the Hub ({type(exc).__name__})"]) from None
    where = "is not in the local Hugging Face cache" if is_hub(path) else "has no config.json"
    raise ConfigError([f"model {path} {where}; declare its architecture with `config: <path to config.json>` "
                       "on the model entry (planning never downloads)"])
