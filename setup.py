"""fastattn: fused attention kernels for PyTorch.

Builds the pure-Python package (Triton kernels are compiled at run time). The CUDA C++ extension
fastattn._C is added here once csrc/ exists (issue 5).
"""
import subprocess
import sys

import setuptools
from setuptools import find_packages, setup
from setuptools.command.develop import develop


class OfflineDevelop(develop):
    """`pip install -e .` without a pyproject.toml runs `setup.py develop` on pip < 25; setuptools >= 80 turns
    that into a nested `pip install -e . --use-pep517` *with* build isolation, which needs an index and fails
    on an offline GPU machine. Run the nested install without isolation, with the build tools already here."""

    def run(self):
        if int(setuptools.__version__.split(".")[0]) < 80:
            return super().run()
        cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--use-pep517", "--no-deps", "-e", "."]
        for flag, value in (("--prefix", getattr(self, "prefix", None)), ("--target", self.install_dir)):
            if value:
                cmd += [flag, value]
        if getattr(self, "user", False):
            cmd.append("--user")
        subprocess.check_call(cmd)


setup(
    name="fastattn",
    version="0.1.0",
    description="Fused attention, softmax and LayerNorm kernels (Triton, CUDA C++) for PyTorch",
    packages=find_packages(include=["fastattn", "fastattn.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "triton>=3.6", "numpy", "tqdm"],
    cmdclass={"develop": OfflineDevelop},
)
