"""The configuration reference is generated from the models, and every field is described."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import config_reference  # noqa: E402


def test_every_config_field_has_a_description():
    assert config_reference.undescribed() == []


def test_the_reference_is_current():
    """docs/configuration.md is what tools/config_reference.py writes from today's models."""
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "config_reference.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_reference_names_every_field_with_its_default_and_bounds():
    from evomerge.config import DispatchConfig

    text = config_reference.reference()
    assert len(DispatchConfig.model_fields) > 10
    for name in DispatchConfig.model_fields:
        assert f"| `{name}` |" in text
    assert "| `head_timeout` | number | `30` | > `0`, ≤ `3600` |" in text
