"""The wheel `make wheel` builds, installed as a user would: into a fresh virtual environment that
sees the project's torch but not its editable install, imported from another directory.

`make test` builds the wheel first; run alone, the test skips when dist/ holds none.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import venv
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
DIST = ROOT / "dist"


def _newest_wheel() -> Path | None:
    wheels = sorted(DIST.glob("trainscope-*.whl"), key=lambda p: p.stat().st_mtime)
    return wheels[-1] if wheels else None


pytestmark = pytest.mark.skipif(_newest_wheel() is None, reason="no wheel in dist/ (make wheel builds one)")


def _torch_site() -> str:
    """The site-packages folder holding this interpreter's torch (and numpy)."""
    return str(Path(torch.__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv with the wheel installed (no dependencies resolved: the project's torch is
    reached through a .pth entry, whose folder's own .pth files, the editable install's among them,
    are not processed)."""
    env_dir = tmp_path_factory.mktemp("wheel-venv")
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "project_torch.pth").write_text(_torch_site() + "\n")
    wheel = _newest_wheel()
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   env=_clean_env())
    return python, site, wheel


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "TRAINSCOPE_OPS_LIBRARY")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _run(python, code: str, cwd) -> str:
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=cwd, env=_clean_env(),
                          timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def test_the_wheel_imports_from_its_own_install_and_measures(installed, tmp_path):
    python, site, _ = installed
    out = _run(python, (
        "import json, torch, trainscope\n"
        "g = torch.tensor([3.0, 4.0])\n"
        "print(json.dumps({'file': trainscope.__file__, 'library': trainscope.library_path,\n"
        "                  'grad_norm': float(trainscope.grad_norm([g])),\n"
        "                  'hist': trainscope.grad_hist1d([g], nbins=4, maxval=5.0).tolist()}))\n"), tmp_path)
    got = json.loads(out.strip().splitlines()[-1])
    assert Path(got["file"]).resolve().is_relative_to(site.resolve()), got
    assert Path(got["library"]).resolve().is_relative_to(site.resolve()), got
    assert got["grad_norm"] == 5.0
    assert got["hist"] == [0, 0, 0, 2]


def test_build_info_from_the_command_line(installed, tmp_path):
    python, _, _ = installed
    proc = subprocess.run([python, "-m", "trainscope.info"], capture_output=True, text=True, cwd=tmp_path,
                          env=_clean_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["trainscope"] == "0.1.0"
    assert info["torch_running"] == torch.__version__
    assert info["torch_built_against"].split(".")[:2] == torch.__version__.split(".")[:2]
    assert isinstance(info["cuda"], bool)
    if info["cuda"]:
        assert info["cuda_version"] and info["cuda_architectures"]
    assert "RuntimeWarning" not in proc.stderr


def test_the_wheel_pins_the_torch_it_was_built_against(installed, tmp_path):
    python, _, _ = installed
    out = _run(python, "import importlib.metadata as m; print('\\n'.join(m.requires('trainscope')))", tmp_path)
    major, minor = torch.__version__.split(".")[:2]
    assert f"torch=={major}.{minor}.*" in out.split()
    assert "numpy" in out.split()


@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf")
def test_the_libraries_hold_no_path_of_the_build_machine(installed):
    _, site, _ = installed
    for lib in sorted((site / "trainscope").glob("*.so")):
        dyn = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
        paths = [line.split("[", 1)[1].rstrip("]") for line in dyn.splitlines() if "RUNPATH" in line or "RPATH" in line]
        for entry in ":".join(paths).split(":"):
            assert entry == "" or entry.startswith("$ORIGIN"), f"{lib.name}: {entry} in {paths}"


def test_a_different_torch_gets_a_clear_error(installed, tmp_path):
    """The op library is refused, with what to do, when the running torch is another minor version."""
    python, site, _ = installed
    info = site / "trainscope" / "trainscope_build_info.json"
    recorded = json.loads(info.read_text())
    try:
        info.write_text(json.dumps(dict(recorded, torch="1.0.0")))
        proc = subprocess.run([python, "-c", "import trainscope"], capture_output=True, text=True, cwd=tmp_path,
                              env=_clean_env(), timeout=300)
    finally:
        info.write_text(json.dumps(recorded))
    assert proc.returncode != 0
    assert "built against torch 1.0.0" in proc.stderr and "reinstall trainscope" in proc.stderr, proc.stderr

