"""The package's build backend: scikit-build-core, told which torch to build against.

Every hook is scikit-build-core's; the builds get ``cmake.define.TRAINSCOPE_TORCH_PYTHON``, the
interpreter whose torch CMake links (torch_requirement.py says how it is found), unless the caller
set it. Not installed: pyproject.toml loads it from this folder (``backend-path``).
"""

from __future__ import annotations

from scikit_build_core import build as _scikit_build

from torch_requirement import target_torch

_TORCH_PYTHON = "cmake.define.TRAINSCOPE_TORCH_PYTHON"


def _with_torch(config_settings):
    settings = dict(config_settings or {})
    settings.setdefault(_TORCH_PYTHON, target_torch().python)
    return settings


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    return _scikit_build.build_wheel(wheel_directory, _with_torch(config_settings), metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    return _scikit_build.build_editable(wheel_directory, _with_torch(config_settings), metadata_directory)


build_sdist = _scikit_build.build_sdist
get_requires_for_build_sdist = _scikit_build.get_requires_for_build_sdist
get_requires_for_build_wheel = _scikit_build.get_requires_for_build_wheel
get_requires_for_build_editable = _scikit_build.get_requires_for_build_editable
# Optional hooks: offered when scikit-build-core offers them.
for _hook in ("prepare_metadata_for_build_wheel", "prepare_metadata_for_build_editable"):
    if hasattr(_scikit_build, _hook):
        globals()[_hook] = getattr(_scikit_build, _hook)
