"""The wheel carries what an installed thinkbatch needs: `pip install .` (an image or a venv
without the checkout) must find presets by name, not only a source checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
LOAD = """
import sys
import thinkbatch.schemas
from thinkbatch.schemas.job_file import find_preset, load_job
target = sys.argv[1]
assert thinkbatch.schemas.__file__.startswith(target), thinkbatch.schemas.__file__
assert str(find_preset("kimi-k2-thinking")).startswith(target)
job = load_job(inline={"preset": "kimi-k2-thinking", "input": {"path": "x"},
                       "output": {"path": "o"}})
print(job.engine.model, job.engine.decode_context_parallel_size)
"""


def _build_wheel(tmp_path: Path) -> Path:
    """From a copy of the sources, so the build leaves no build/ or egg-info in the repo."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "assets", "tests", "benchmarks", "build", "*.egg-info", "__pycache__"))
    subprocess.run([*PIP, "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, timeout=120)
    [wheel] = (tmp_path / "dist").glob("thinkbatch-*.whl")
    return wheel


def test_wheel_ships_presets_and_templates_and_loads_a_preset(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = [p.relative_to(ROOT).as_posix() for pattern in (
        "deployments/presets/*.yaml", "deployments/work-pools/*.json", "deployments/prefect.yaml")
        for p in ROOT.glob(pattern)]
    assert "deployments/presets/kimi-k2-thinking.yaml" in shipped
    assert {f"thinkbatch/{p}" for p in shipped} <= names
    assert "deployments/presets/cpu-miniature.yaml" in shipped
    # The miniature kit (miniature/) serves a checkout's demos, tests and benchmarks only.
    assert not [n for n in names if "tiny" in n or n.startswith("miniature/")], names

    target = tmp_path / "site"
    subprocess.run([*PIP, "install", "--no-deps", "--no-index", "--target", str(target),
                    str(wheel)], check=True, timeout=120)
    out = subprocess.run([sys.executable, "-c", LOAD, str(target)], cwd=tmp_path,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["moonshotai/Kimi-K2-Thinking", "8"]
