"""Finds the compiled ops: the installed extension loldu._C, else a JIT build of cpp/ with ninja,
else the pure-PyTorch reference path (with one warning). build_info() reports which is active.

Environment: LOLDU_BACKEND=pytorch forces the reference path, LOLDU_BACKEND=jit skips the installed
extension (the JIT build is then tried), LOLDU_NO_JIT=1 skips the JIT build."""
import importlib.util
import os
import warnings
from pathlib import Path

import torch

_REPO_CPP = Path(__file__).resolve().parents[2] / "cpp"


def _repo_sources(*groups: str) -> list:
    """The sources of these groups in cpp/sources.txt (the list setup.py and CMake read too)."""
    lines = (_REPO_CPP / "sources.txt").read_text().splitlines()
    entries = [line.split() for line in lines if line.strip() and not line.startswith("#")]
    return [str(_REPO_CPP.parent / path) for group, path in entries if group in groups]


def _jit_build():
    from torch.utils import cpp_extension

    sources = _repo_sources("ops")
    flags = ["-O3"]
    kwargs = {}
    if torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None:
        sources += _repo_sources("cuda")
        flags.append("-DLOLDU_WITH_CUDA=1")
        kwargs["extra_cuda_cflags"] = ["-O3", "-DLOLDU_WITH_CUDA=1"]
    return cpp_extension.load(
        name="loldu_jit",
        sources=sources,
        extra_include_paths=[str(_REPO_CPP / "include"), str(_REPO_CPP)],
        extra_cflags=flags,
        verbose=False,
        **kwargs,
    )


def _load():
    # LOLDU_BACKEND: "" (auto), "pytorch" (the reference path), "jit" (skip the installed _C).
    forced = os.environ.get("LOLDU_BACKEND", "")
    if forced not in ("", "pytorch", "jit"):
        raise ImportError(f"loldu: LOLDU_BACKEND={forced!r} is not one of '', 'pytorch', 'jit'")
    if forced == "pytorch":
        return "pytorch", None, "forced by LOLDU_BACKEND=pytorch"
    reason = "LOLDU_BACKEND=jit"
    if forced != "jit":
        try:
            from . import _C  # noqa: PLC0415

            return "compiled-" + _C.build_flavor(), _C, None
        except ImportError as e:
            reason = f"no compiled loldu._C ({e})"
            if importlib.util.find_spec(f"{__package__}._C") is None:
                # Python's message for a missing submodule of a package being imported blames a circular import.
                reason = f"no compiled loldu._C in {Path(__file__).parent} (installed without it, or its build failed)"
            elif "undefined symbol" in str(e):
                # The extension was compiled against another torch than this one (docs/install.md).
                reason += (f"; it was built against another torch than {torch.__version__}: reinstall loldu with "
                           "`pip install --no-build-isolation .` in this environment")
    if os.environ.get("LOLDU_NO_JIT", "") == "1":
        reason += "; LOLDU_NO_JIT=1 skips the JIT build"
    elif _REPO_CPP.is_dir():
        try:
            mod = _jit_build()
            return "jit-" + mod.build_flavor(), mod, None
        except Exception as e:  # noqa: BLE001 - any build failure means: fall back
            reason += f"; JIT build failed ({type(e).__name__}: {str(e)[:300]})"
    warnings.warn(
        f"loldu: C++ extension unavailable, using the slower pure-PyTorch path: {reason}",
        RuntimeWarning,
        stacklevel=3,
    )
    return "pytorch", None, reason


BACKEND, _MODULE, _REASON = _load()
# Whether compiled kernels implement the ops; without them the reference defines the same ops.
COMPILED = BACKEND != "pytorch"
if not COMPILED:
    from .reference import define_ops

    define_ops()


def build_info() -> dict:
    """Which implementation is active and against which torch.

    backend: 'compiled-cpu' | 'compiled-cuda' | 'jit-cpu' | 'jit-cuda' | 'pytorch'.
    """
    return {
        "backend": BACKEND,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "extension": getattr(_MODULE, "__file__", None),
        "reason": _REASON,
    }
