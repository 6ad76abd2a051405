"""The torch that trainscope is built against, for the package build (never installed).

trainscope's libraries link LibTorch, whose ABI changes between minor versions: an extension
built against one torch loads only with that torch. So the build uses the torch already installed
in the environment being installed into, and the wheel requires that torch's minor version
(``torch==2.11.*``). Under pip's build isolation the build runs in a throwaway environment without
torch; the environment being installed into is then the one pip itself runs in, found as the
nearest ancestor process that is a Python interpreter with torch. ``TRAINSCOPE_TORCH_PYTHON``
names the interpreter explicitly.

Also a dynamic-metadata provider: ``dynamic_metadata`` gives the ``dependencies``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Iterator, Optional

_QUERY = (
    "import json, sys, torch, torch.utils; "
    "print(json.dumps({'python': sys.executable, 'version': torch.__version__, "
    "'cuda': torch.version.cuda, 'cmake_prefix_path': torch.utils.cmake_prefix_path}))"
)


@dataclass(frozen=True)
class TargetTorch:
    python: str            # the interpreter whose torch the build uses
    version: str           # torch.__version__, e.g. "2.11.0+cu130"
    cuda: Optional[str]    # torch.version.cuda (None for a CPU build of torch)
    cmake_prefix_path: str

    @property
    def requirement(self) -> str:
        """``torch==X.Y.*``: the minor version the libraries are built against."""
        major, minor = re.match(r"(\d+)\.(\d+)", self.version).groups()
        return f"torch=={major}.{minor}.*"


def _clean_env() -> dict:
    """The environment of a child interpreter that must see its own site-packages, not this
    build's: no PYTHONPATH/PYTHONHOME overrides, and no PATH entries of this build environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONNOUSERSITE")}
    prefix = os.path.realpath(sys.prefix)
    if prefix != os.path.realpath(sys.base_prefix):
        env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                      if not os.path.realpath(p).startswith(prefix + os.sep))
    return env


def _proc(pid: int, name: str) -> bytes:
    with open(f"/proc/{pid}/{name}", "rb") as f:
        return f.read()


def _interpreter_of(pid: int) -> Optional[str]:
    """The path a process ran its Python interpreter as (argv[0] resolved the way its shell did),
    or None when it is no Python. argv[0], not /proc/<pid>/exe: a virtual environment's python is
    a link whose own path decides which site-packages it sees."""
    try:
        argv0 = _proc(pid, "cmdline").split(b"\0")[0].decode()
    except (OSError, UnicodeDecodeError, IndexError):
        return None
    if not re.fullmatch(r"python[\d.]*", os.path.basename(argv0)):
        return None
    if os.sep in argv0:
        return argv0 if os.path.isabs(argv0) else os.path.join(os.readlink(f"/proc/{pid}/cwd"), argv0)
    try:  # a bare name: looked up on that process's PATH
        environ = dict(e.split(b"=", 1) for e in _proc(pid, "environ").split(b"\0") if b"=" in e)
        path = environ.get(b"PATH", b"").decode()
    except (OSError, UnicodeDecodeError, ValueError):
        path = None
    return shutil.which(argv0, path=path)


def _parent_of(pid: int) -> int:
    try:
        stat = _proc(pid, "stat").decode()
        return int(stat[stat.rindex(")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _candidates() -> Iterator[str]:
    named = os.environ.get("TRAINSCOPE_TORCH_PYTHON")
    if named:
        yield named
        return
    yield sys.executable  # without build isolation torch is right here
    if sys.platform.startswith("linux"):
        pid = os.getppid()
        for _ in range(8):  # pip, and whatever started the backend in between
            if pid <= 1:
                break
            exe = _interpreter_of(pid)
            if exe:
                yield exe
            pid = _parent_of(pid)
    for var in ("VIRTUAL_ENV", "CONDA_PREFIX"):
        if os.environ.get(var):
            yield os.path.join(os.environ[var], "bin", "python")


_found: Optional[TargetTorch] = None


def target_torch() -> TargetTorch:
    """The torch to build against (see the module docstring); an error saying what to do when
    there is none."""
    global _found
    if _found is not None:
        return _found
    tried = []
    for python in dict.fromkeys(_candidates()):
        try:
            out = subprocess.run([python, "-c", _QUERY], capture_output=True, text=True, timeout=300,
                                 env=_clean_env(), check=True).stdout
            info = json.loads(out.strip().splitlines()[-1])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            tried.append(python)
            continue
        _found = TargetTorch(python=info["python"], version=info["version"], cuda=info["cuda"],
                             cmake_prefix_path=info["cmake_prefix_path"])
        return _found
    raise RuntimeError(
        "trainscope is built against the torch of the environment it is installed into, and found none "
        f"(interpreters tried: {', '.join(tried) or 'none'}). Install torch first (pip install torch), then "
        "trainscope; or build with --no-build-isolation from that environment; or set "
        "TRAINSCOPE_TORCH_PYTHON to the Python interpreter whose torch to use.")


# -- dynamic-metadata provider -------------------------------------------------------------------


def dynamic_metadata(settings, project) -> dict:
    """``dependencies``: the torch minor version built against, and numpy."""
    return {"dependencies": [target_torch().requirement, "numpy"]}


def dynamic_wheel(settings) -> dict:
    """The dependencies depend on the environment the wheel is built in, not on the sources."""
    return {"dependencies": True}
