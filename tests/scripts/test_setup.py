"""scripts/setup.sh's choice of build and of what to do with an existing .venv, on a copy
of the script in a scratch checkout (`--plan`: nothing is installed), with a stand-in
`nvidia-smi` for a GPU machine; and its GPU smoke check (`--check`) against this repo's
CPU venv, which must not pass for a GPU build."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    (tmp_path / "scripts").mkdir()
    for name in ("pyproject.toml", "scripts/setup.sh"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def stamp(checkout: Path, flavor: str, current: bool = True) -> None:
    """The stamp a finished set-up leaves: the build and a hash of what it installed from."""
    data = b"" if not current else (checkout / "pyproject.toml").read_bytes() + (
        checkout / "scripts" / "setup.sh").read_bytes()
    (checkout / ".venv").mkdir(exist_ok=True)
    (checkout / ".venv" / ".thinkbatch-setup").write_text(
        f"{flavor} {hashlib.sha256(data).hexdigest()[:16]}\n")


def setup(checkout: Path, *args: str, gpu: str | None = None,
          flavor: str | None = None) -> subprocess.CompletedProcess:
    """Run the copy; `gpu`: a stand-in nvidia-smi first on PATH ("ok" lists a GPU,
    "broken" fails as with no driver loaded); without it, PATH has no nvidia-smi."""
    bin_dir = checkout / "fake-bin"
    bin_dir.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "THINKBATCH_FLAVOR"}
    # No Python to make a venv with: were the script to install after all, it fails at once.
    env.update(PATH=f"{bin_dir}:/usr/bin:/bin", PYTHON="/bin/false")
    smi = bin_dir / "nvidia-smi"
    smi.unlink(missing_ok=True)
    if gpu:
        smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200'\n" if gpu == "ok" else
                       "#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
        smi.chmod(0o755)
    if flavor:
        env["THINKBATCH_FLAVOR"] = flavor
    return subprocess.run(["bash", str(checkout / "scripts" / "setup.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=300)


def plan(checkout: Path, **kw: str) -> str:
    r = setup(checkout, "--plan", **kw)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_a_cpu_venv_on_a_gpu_machine_is_made_anew(checkout: Path) -> None:
    stamp(checkout, "cpu")
    assert plan(checkout, gpu="ok") == "setup: gpu build; .venv: recreate (stamp: cpu build)"
    assert plan(checkout, flavor="gpu") == "setup: gpu build; .venv: recreate (stamp: cpu build)"
    stamp(checkout, "gpu")
    assert plan(checkout) == "setup: cpu build; .venv: recreate (stamp: gpu build)"
    # --plan changed nothing
    assert (checkout / ".venv" / ".thinkbatch-setup").read_text().startswith("gpu ")


def test_the_same_build_is_kept_or_updated(checkout: Path) -> None:
    assert plan(checkout) == "setup: cpu build; .venv: create"
    stamp(checkout, "cpu")
    assert plan(checkout) == "setup: cpu build; .venv: none (stamp: cpu build)"
    assert plan(checkout, gpu="broken") == "setup: cpu build; .venv: none (stamp: cpu build)"
    stamp(checkout, "gpu", current=False)  # pyproject.toml or setup.sh changed since
    assert plan(checkout, gpu="ok") == "setup: gpu build; .venv: update (stamp: gpu build)"


def test_a_venv_without_a_stamp_is_made_anew(checkout: Path) -> None:
    """An interrupted first set-up: which build it holds is unknown."""
    (checkout / ".venv" / "bin").mkdir(parents=True)
    assert plan(checkout, gpu="ok") == "setup: gpu build; .venv: recreate"


def test_an_unknown_build_or_option_is_refused(checkout: Path) -> None:
    r = setup(checkout, "--plan", flavor="tpu")
    assert r.returncode == 2 and "THINKBATCH_FLAVOR must be cpu or gpu" in r.stderr
    r = setup(checkout, "--install-everything")
    assert r.returncode == 2 and "usage" in r.stderr


def test_the_gpu_smoke_check_refuses_a_cpu_torch(checkout: Path) -> None:
    """This repo's venv has the CPU build: as a GPU build it must fail the check. The
    scratch .venv runs code with this repo's venv and refuses anything else (pip)."""
    python = checkout / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\n[ "$1" = -c ] && exec {ROOT / ".venv/bin/python"} "$@"\n'
                      'echo "refused: python $*" >&2; exit 97\n')
    python.chmod(0o755)
    r = setup(checkout, "--check", flavor="gpu")
    assert r.returncode == 1, r.stderr
    assert "setup: the gpu build has torch 2.13.0+cpu (CUDA None), which sees no GPU" in r.stderr
