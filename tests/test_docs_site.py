"""The documentation site (mkdocs.yml, docs/) and the README that points into it.

The site builds with ``mkdocs build --strict`` (a broken link, a missing anchor or a page left out
of the nav fails it); the README stays a front door; and the commands the getting-started page
tells a newcomer to run (``evomerge validate``, ``evomerge run ... --dry-run``) run, as does the
README's example of pointing evomerge at one's own Hub models.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_MAX_LINES = 250


def _mkdocs() -> list[str]:
    """The venv's mkdocs (installed with the `test` extra), next to this interpreter."""
    script = Path(sys.executable).parent / "mkdocs"
    return [str(script)] if script.exists() else [sys.executable, "-m", "mkdocs"]


def _offline_env(tmp: Path) -> dict[str, str]:
    """No Hub, an empty Hub cache and a private evomerge cache: the commands must need none."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp / "hf"), HF_HUB_CACHE=str(tmp / "hf" / "hub"),
               EVOMERGE_CACHE=str(tmp / "evomerge-cache"), NO_MKDOCS_2_WARNING="1")
    return env


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("docs-site")
    out = tmp / "site"
    done = subprocess.run([*_mkdocs(), "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                          env=_offline_env(tmp), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    return out


def test_the_site_builds_strict(site):
    assert (site / "index.html").exists()
    for page in DOCS.rglob("*.md"):
        rel = page.relative_to(DOCS).with_suffix("")
        html = site / (rel.parent if rel.name in ("index", "README") else rel) / "index.html"
        assert html.exists(), f"{page.relative_to(ROOT)} was not built ({html} missing)"


def _nav_files(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [f for item in nav for f in _nav_files(item)]
    if isinstance(nav, dict):
        return [f for value in nav.values() for f in _nav_files(value)]
    return []


def test_every_page_is_in_the_nav():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["site_name"] == "evomerge" and config["docs_dir"] == "docs"
    assert config["theme"]["name"] == "material"
    nav = _nav_files(config["nav"])
    assert len(nav) == len(set(nav)), "a page is in the nav twice"
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert pages - set(nav) == set(), "pages missing from mkdocs.yml's nav"
    assert set(nav) - pages == set(), "nav entries with no page"
    assert nav[0] == "index.md"


def test_the_readme_is_a_front_door_that_links_into_the_docs(site):
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES}: "\
        "the manual is docs/)"
    links = re.findall(r"\]\((docs/[^)\s]+)\)", text)
    pages = {link.split("#")[0] for link in links}
    assert {"docs/index.md", "docs/measured.md", "docs/configuration.md"} <= pages, pages
    assert len(pages) >= 10, f"the README links to only {sorted(pages)}"
    for link in links:
        path, _, anchor = link.partition("#")
        assert (ROOT / path).is_file(), f"README links to {path}, which does not exist"
        if anchor and path.endswith(".md"):
            rel = Path(path).relative_to("docs").with_suffix("")
            html = (site / (rel.parent if rel.name == "index" else rel) / "index.html").read_text()
            assert f'id="{anchor}"' in html, f"README links to {link}: no such anchor on the built page"


def _bash_commands(markdown: str) -> list[str]:
    """Commands of the ```bash blocks, continuation lines joined."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", markdown, flags=re.S | re.M):
        current = ""
        for line in block.splitlines():
            current += line.rstrip()
            if current.endswith("\\"):
                current = current[:-1] + " "
                continue
            if current.strip():
                commands.append(current.strip())
            current = ""
    return commands


def _cheap_evomerge_command(command: str) -> list[str] | None:
    """``evomerge validate ...`` / ``evomerge run ... --dry-run`` as argv for this interpreter, else None."""
    words = shlex.split(command, comments=True)
    if not words or Path(words[0]).name != "evomerge" or len(words) < 2:
        return None
    if words[1] == "validate" or (words[1] == "run" and "--dry-run" in words):
        return [sys.executable, "-m", "evomerge.cli", *words[1:]]
    return None


def _run(argv: list[str], tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ROOT, env=_offline_env(tmp), capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)


def test_the_getting_started_checks_run(tmp_path):
    commands = [c for c in map(_cheap_evomerge_command, _bash_commands((DOCS / "index.md").read_text())) if c]
    assert len(commands) >= 2, "docs/index.md shows no `evomerge validate` / `run --dry-run` command"
    for argv in commands:
        done = _run(argv, tmp_path)
        shown = " ".join(["evomerge", *argv[3:]])
        assert done.returncode == 0, f"{shown} (from docs/index.md) exited {done.returncode}:\n{done.stdout}\n{done.stderr}"


def test_the_readme_example_of_ones_own_models_validates(tmp_path):
    blocks = re.findall(r"^```yaml\n(.*?)^```", README.read_text(), flags=re.S | re.M)
    mine = [b for b in blocks if "hf:" in b]
    assert len(mine) == 1, "README.md: one YAML example with Hub (hf:) sources"
    experiment = yaml.safe_load(mine[0])
    assert all(m["path"].startswith("hf:") for m in experiment["models"])
    path = tmp_path / "my_merge.yaml"
    path.write_text(mine[0])
    done = _run([sys.executable, "-m", "evomerge.cli", "validate", str(path)], tmp_path)
    assert done.returncode == 0, f"evomerge validate of README's example:\n{done.stdout}\n{done.stderr}"
