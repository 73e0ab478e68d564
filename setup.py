"""Builds loldu._C with torch.utils.cpp_extension: a CUDA extension when the installed torch has
CUDA and nvcc is found, a CPU extension otherwise. Build with --no-build-isolation so the
extension compiles against the torch that is installed."""
import glob
import os

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
CPP = os.path.join("cpp")


def extension():
    sources = [os.path.join(CPP, f) for f in ("ldu.cpp", "adapter_linear.cpp", "ops.cpp")]
    include_dirs = [os.path.join(ROOT, "cpp", "include"), os.path.join(ROOT, "cpp")]
    cxx = ["-O3"]
    import torch

    want_cuda = os.environ.get("LOLDU_FORCE_CPU", "0") != "1"
    if want_cuda and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None:
        sources += sorted(glob.glob(os.path.join(CPP, "cuda", "*.cu")))
        sources += [os.path.join(CPP, "cuda", "ops_cuda.cpp")]
        return cpp_extension.CUDAExtension(
            "loldu._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("LOLDU_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
        )
    return cpp_extension.CppExtension("loldu._C", sources, include_dirs=include_dirs,
                                      extra_compile_args={"cxx": cxx})


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
