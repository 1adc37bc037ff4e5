"""Start-up allocator settings: applied by mallopt on glibc, never over the user's own MALLOC_* variables."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

CODE = "import json; from hepreg.runs.allocator import tune; print(json.dumps(tune()))"


def _applied(**env: str) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "HEPREG_MALLOPT"}
    out = subprocess.run([sys.executable, "-c", CODE], env={**base, **env}, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_tune_applies_the_makefile_settings_unless_given():
    from hepreg.runs.allocator import SETTINGS

    assert set(_applied()) == set(SETTINGS)
    assert set(_applied(MALLOC_TOP_PAD_="0")) == set(SETTINGS) - {"MALLOC_TOP_PAD_"}
    assert _applied(HEPREG_MALLOPT="0") == {}


def test_allocator_env_matches_the_makefile():
    from hepreg.runs.allocator import ENV

    makefile = (__import__("pathlib").Path(__file__).resolve().parents[1] / "Makefile").read_text()
    for name, value in ENV.items():
        assert f"export {name} = {value}" in makefile
