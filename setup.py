"""Builds loldu._C with torch.utils.cpp_extension against the torch that is installed in the current
environment, which is why it must be installed with --no-build-isolation (docs/install.md):

    pip install --no-build-isolation .        # or -e . for an editable install

What is built, printed as "loldu setup: ..." lines (shown by `pip install -v`) when the build runs (the
probes belong to the build_ext command: a command that builds nothing, such as `setup.py --version`,
runs none of them); the sources are the groups of cpp/sources.txt:
- a CUDA extension when that torch has CUDA and a CUDA toolkit of the same major version is found
  (CUDA_HOME / CUDA_PATH, else the toolkit of the `nvcc` on PATH, else /usr/local/cuda, /usr/local/cuda-*);
- a CPU extension otherwise (torch without CUDA, no nvcc, or nvcc of another CUDA major version), with a
  notice saying why. LOLDU_FORCE_CPU=1 builds the CPU extension; LOLDU_FORCE_CUDA=1 turns every
  reason for a CPU build into an error;
- nothing with LOLDU_NO_EXTENSION=1: the Python package alone, its ops on the pure-PyTorch reference path.

GPU architectures: TORCH_CUDA_ARCH_LIST when set (checked against what nvcc can compile); else the
visible GPUs' (torch's own default); else, with no GPU visible, the architectures the installed torch was
built for (torch.cuda.get_arch_list()) that nvcc supports, the newest also as PTX.
"""
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext as setuptools_build_ext
from setuptools.command.build_py import build_py as setuptools_build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
CPP = "cpp"

# LOLDU_NO_EXTENSION=1: the Python package alone (no compiler, no torch needed to build); the ops then
# run on the pure-PyTorch reference path (python/loldu/_backend.py).
NO_EXTENSION = os.environ.get("LOLDU_NO_EXTENSION", "0") == "1"

if not NO_EXTENSION:
    try:
        import torch
    except ImportError as e:
        sys.exit(
            f"loldu setup: error: torch is not importable here ({e}).\n"
            "loldu compiles against the torch of the environment it is installed into, so it is built without "
            "pip's isolated build environment (which has no torch): install torch first, then\n"
            "    pip install --no-build-isolation .\n"
            "(an isolated build would compile against a different torch than the one that later imports loldu; "
            "see docs/install.md)."
        )


def notice(msg: str) -> None:
    print(f"loldu setup: {msg}", file=sys.stderr, flush=True)


class CudaUnavailable(Exception):
    """Why the CUDA extension cannot be built here (a CPU build follows, unless LOLDU_FORCE_CUDA=1)."""


class BadSetting(Exception):
    """An environment variable asks for something that cannot be built: always an error."""


def nvcc_release(nvcc: str) -> tuple[int, int]:
    """(major, minor) of `nvcc --version`."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise CudaUnavailable(f"{nvcc} --version failed ({e})") from e
    m = re.search(r"release (\d+)\.(\d+)", out)
    if m is None:
        raise CudaUnavailable(f"cannot read the CUDA release from `{nvcc} --version`: {out.strip()[:200]!r}")
    return int(m.group(1)), int(m.group(2))


def toolkit_root_of(nvcc_on_path: str) -> str | None:
    """The toolkit that `nvcc` on PATH belongs to: the parent of bin/ of its real path, or, for a wrapper
    script (e.g. /usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc), the bin/ folder nvcc reports
    in a dry run (its _HERE_ line)."""
    real = os.path.realpath(nvcc_on_path)
    root = os.path.dirname(os.path.dirname(real))
    if is_toolkit(root):
        return root
    try:
        dry = subprocess.run([nvcc_on_path, "-dryrun", "-c", os.path.join(ROOT, "loldu-probe.cu")],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ _HERE_=(.+)$", dry.stdout + dry.stderr, flags=re.M)
    if m is None:
        return None
    root = os.path.dirname(os.path.realpath(m.group(1).strip()))
    return root if is_toolkit(root) else None


def is_toolkit(root: str) -> bool:
    return os.access(os.path.join(root, "bin", "nvcc"), os.X_OK) and os.path.isfile(
        os.path.join(root, "include", "cuda_runtime.h"))


def find_cuda_home(torch_major: int) -> tuple[str, tuple[int, int]]:
    """The toolkit to build with and its nvcc release. An explicit CUDA_HOME / CUDA_PATH is used as is;
    otherwise the first toolkit found whose CUDA major version is torch's."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root:
            if not is_toolkit(root):
                raise BadSetting(f"{var}={root} is not a CUDA toolkit (no bin/nvcc and include/cuda_runtime.h)")
            release = nvcc_release(os.path.join(root, "bin", "nvcc"))
            if release[0] != torch_major:
                raise CudaUnavailable(
                    f"{var}={root} holds nvcc {release[0]}.{release[1]}, but torch {torch.__version__} was built "
                    f"with CUDA {torch.version.cuda}: the CUDA major versions must match (point {var} at a "
                    f"CUDA {torch_major}.x toolkit)")
            return root, release
    candidates = []
    on_path = shutil.which("nvcc")
    if on_path:
        root = toolkit_root_of(on_path)
        if root:
            candidates.append(root)
    candidates += [p for p in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True) if is_toolkit(p)]
    seen, found = set(), []
    for root in candidates:
        real = os.path.realpath(root)
        if real in seen:
            continue
        seen.add(real)
        try:
            release = nvcc_release(os.path.join(root, "bin", "nvcc"))
        except CudaUnavailable:
            continue
        if release[0] == torch_major:
            return root, release
        notice(f"skipping the CUDA toolkit {root}: nvcc {release[0]}.{release[1]}, torch needs CUDA {torch_major}.x")
        found.append(f"{root} (nvcc {release[0]}.{release[1]})")
    if not found:
        raise CudaUnavailable("no CUDA toolkit found (no nvcc on PATH, no CUDA_HOME, nothing in /usr/local/cuda*)")
    raise CudaUnavailable(
        f"torch {torch.__version__} was built with CUDA {torch.version.cuda}, but the toolkits found are "
        f"{', '.join(found)}: nvcc of another CUDA major version cannot build against it "
        f"(set CUDA_HOME to a CUDA {torch_major}.x toolkit)")


def nvcc_gpu_codes(nvcc: str) -> set[str]:
    """The sm_XX targets this nvcc can compile for (`nvcc --list-gpu-code`), empty when it cannot say."""
    try:
        out = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    return set(re.findall(r"\bsm_\w+", out))


def arch_to_sm(arch: str) -> str | None:
    """'9.0' -> 'sm_90', '9.0a' -> 'sm_90a', '12.0+PTX' -> 'sm_120'; None for torch's named families
    ('Hopper', 'Ampere+Tegra'), which torch expands and checks itself."""
    if re.fullmatch(r"[A-Za-z][A-Za-z+]*", arch.strip()):
        return None
    m = re.fullmatch(r"(\d+)\.(\d+)([a-z]?)(\+PTX)?", arch.strip())
    if m is None:
        raise BadSetting(f"TORCH_CUDA_ARCH_LIST entry {arch!r} is not of the form 8.6, 9.0a or 9.0+PTX")
    return f"sm_{m.group(1)}{m.group(2)}{m.group(3)}"


def choose_arch_list(nvcc: str) -> None:
    """Sets TORCH_CUDA_ARCH_LIST when it is unset and no GPU is visible (torch's own default needs a GPU)."""
    supported = nvcc_gpu_codes(nvcc)
    given = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if given and given != "native":
        entries = [a for a in re.split(r"[;\s]+", given) if a]
        sms = {a: arch_to_sm(a) for a in entries}
        # --list-gpu-code names the base targets (sm_90); sm_90a is compiled where sm_90 is.
        bad = [a for a, sm in sms.items() if supported and sm is not None and re.sub(r"[a-z]$", "", sm) not in supported]
        if bad:
            raise BadSetting(
                f"TORCH_CUDA_ARCH_LIST={given!r}: {nvcc} cannot compile for {', '.join(bad)} "
                f"(it supports {', '.join(sorted(supported, key=lambda s: int(re.sub(r'[^0-9]', '', s))))})")
        notice(f"GPU architectures from TORCH_CUDA_ARCH_LIST: {given}")
        return
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        notice(f"GPU architectures: those of the {torch.cuda.device_count()} visible GPU(s) "
               f"(TORCH_CUDA_ARCH_LIST={given or 'unset'})")
        return
    built_for = torch.cuda.get_arch_list()
    if not built_for and hasattr(torch._C, "_cuda_getArchFlags"):
        # Older torch lists its architectures only when a GPU is visible; the flags are there regardless.
        built_for = (torch._C._cuda_getArchFlags() or "").split()
    torch_sms = [a for a in built_for if re.fullmatch(r"sm_\d+", a)]
    archs = []
    for sm in torch_sms:
        if supported and sm not in supported:
            continue
        digits = sm[len("sm_"):]
        archs.append((int(digits[:-1]), int(digits[-1])))
    archs = sorted(set(archs))
    if archs:
        listed = [f"{a}.{b}" for a, b in archs]
        listed[-1] += "+PTX"
        source = f"the architectures torch {torch.__version__} was built for that nvcc supports"
    else:
        listed = ["9.0+PTX"]
        source = "torch reports no architectures it was built for; the fallback"
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(listed)
    notice(f"no GPU visible and TORCH_CUDA_ARCH_LIST={given or 'unset'}: building for {source}: "
           f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} (set TORCH_CUDA_ARCH_LIST, e.g. to 9.0, "
           "to build for those GPUs only)")


def plan_cuda() -> tuple[str, tuple[int, int]] | None:
    """The toolkit to build the CUDA extension with, or None (with the notice saying why) for a CPU build."""
    if os.environ.get("LOLDU_FORCE_CPU", "0") == "1":
        if os.environ.get("LOLDU_FORCE_CUDA", "0") == "1":
            sys.exit("loldu setup: error: LOLDU_FORCE_CPU=1 and LOLDU_FORCE_CUDA=1 contradict each other")
        notice("LOLDU_FORCE_CPU=1: building the CPU extension")
        return None
    try:
        if torch.version.cuda is None:
            raise CudaUnavailable(f"torch {torch.__version__} is a build without CUDA")
        torch_major = int(torch.version.cuda.split(".")[0])
        home, release = find_cuda_home(torch_major)
        choose_arch_list(os.path.join(home, "bin", "nvcc"))
    except BadSetting as e:
        sys.exit(f"loldu setup: error: {e}")
    except CudaUnavailable as e:
        if os.environ.get("LOLDU_FORCE_CUDA", "0") == "1":
            sys.exit(f"loldu setup: error: LOLDU_FORCE_CUDA=1 but the CUDA extension cannot be built: {e}")
        notice(f"building the CPU extension: {e}")
        return None
    return home, release


def check_compiler() -> None:
    """torch.utils.cpp_extension compiles with $CXX, else c++: say so plainly when there is none."""
    cxx = os.environ.get("CXX") or "c++"
    words = shlex.split(cxx)
    if not words or shutil.which(words[0]) is None:
        sys.exit(
            f"loldu setup: error: no C++ compiler: {cxx!r} is not on PATH (install g++ or clang++, or set CXX).\n"
            "Without a compiler, install the Python package alone; its ops then run on the slower pure-PyTorch "
            "reference path:\n"
            "    LOLDU_NO_EXTENSION=1 pip install --no-build-isolation .")


def read_sources(*groups: str) -> list[str]:
    """The sources of these groups in cpp/sources.txt (the list the JIT build and CMake read too)."""
    with open(os.path.join(ROOT, CPP, "sources.txt")) as f:
        entries = [line.split() for line in f if line.strip() and not line.startswith("#")]
    return [path for group, path in entries if group in groups]


def extension():
    """(torch.utils.cpp_extension, the Extension to build), after the probes and their notices."""
    cuda = plan_cuda()
    check_compiler()
    sources = read_sources("ops")
    include_dirs = [os.path.join(ROOT, "cpp", "include"), os.path.join(ROOT, "cpp")]
    cxx = ["-O3"]
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported: set it first.
    if cuda is not None:
        os.environ["CUDA_HOME"] = cuda[0]
    from torch.utils import cpp_extension

    if cuda is None:
        return cpp_extension, cpp_extension.CppExtension(
            "loldu._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx})
    home, (major, minor) = cuda
    cpp_extension.CUDA_HOME = home
    notice(f"building the CUDA extension: torch {torch.__version__} (CUDA {torch.version.cuda}), "
           f"nvcc {major}.{minor} from CUDA_HOME={home}")
    return cpp_extension, cpp_extension.CUDAExtension(
        "loldu._C",
        sources + read_sources("cuda"),
        include_dirs=include_dirs,
        define_macros=[("LOLDU_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
    )


class build_ext(setuptools_build_ext):
    """Builds loldu._C with torch's BuildExtension. The probes (CUDA toolkit, GPU architectures, C++
    compiler) and their notices run when the command is first created, i.e. when a build runs, and not
    when setup.py is merely read (`setup.py --version` prints the version alone). Until then the
    distribution carries a stand-in for the extension, so that it is known to have one."""

    _planned = None

    def __new__(cls, dist, *args, **kwargs):
        if cls._planned is None:
            cls._planned = extension()
        cpp_extension, ext = cls._planned
        dist.ext_modules[:] = [ext]
        return cpp_extension.BuildExtension.with_options(use_ninja=True)(dist, *args, **kwargs)


class build_py(setuptools_build_py):
    """The Python package alone: says so when it is built (LOLDU_NO_EXTENSION=1)."""

    def run(self):
        notice("LOLDU_NO_EXTENSION=1: installing the Python package without loldu._C (the ops run on the "
               "pure-PyTorch reference path)")
        super().run()


if NO_EXTENSION:
    setup(cmdclass={"build_py": build_py})
else:
    setup(ext_modules=[Extension("loldu._C", read_sources("ops"))], cmdclass={"build_ext": build_ext})
