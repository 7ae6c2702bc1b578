"""Pure-Python install. ``csrc/`` is compiled on first use of a cuda/cpu-backend op, or here
only when asked explicitly with ``IFK_BUILD_EXT=1`` (never because a GPU happens to be present)."""

import importlib.util
import os
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _extensions():
    """The csrc extensions as setuptools Extensions, when IFK_BUILD_EXT=1."""
    if os.environ.get("IFK_BUILD_EXT", "0") != "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    spec = importlib.util.spec_from_file_location("_csrc", ROOT / "triton_kernels" / "_csrc.py")
    csrc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(csrc)
    exts = []
    for name, (sources, cuda) in csrc.EXTENSIONS.items():
        kind = CUDAExtension if cuda else CppExtension
        flags = csrc.compile_flags(cuda)
        exts.append(kind(
            name=f"triton_kernels._ext_{name}",
            sources=[f"csrc/{s}" for s in sources],
            extra_compile_args=flags,
            extra_link_args=[] if cuda else ["-fopenmp"],
            py_limited_api=False,
        ))
    return exts, {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


class BuildPyWithSources(build_py):
    """Ship csrc/ inside the installed package (triton_kernels/csrc) for the first-use build."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "triton_kernels" / "csrc"
        for src in (ROOT / "csrc").rglob("*"):
            if src.is_file() and src.suffix in (".cu", ".cpp", ".h", ".cuh"):
                dest = target / src.relative_to(ROOT / "csrc")
                dest.parent.mkdir(parents=True, exist_ok=True)
                self.copy_file(str(src), str(dest))


# pyiface.integrations: transformers' kernel hooks on inner-state mixers (5.15 is the first release with
# them), resolved by the kernels package; peft's LoRA layers.
HF = ["transformers>=5.15", "kernels", "peft>=0.13"]
ext_modules, cmdclass = _extensions()
cmdclass["build_py"] = BuildPyWithSources

setup(
    name="iface-kernels",
    version="0.1.0",
    description="Triton kernels behind vLLM-style model interfaces: multimodal scatter, multi-LoRA, Mamba",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["pyiface", "pyiface.*", "triton_kernels", "triton_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.5", "triton>=3.1", "numpy"],
    extras_require={
        "hf": HF,
        "test": ["pytest>=8", "pytest-benchmark", "hypothesis", *HF],
        "bench": ["matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
