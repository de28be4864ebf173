"""Packaging. The C++ CPU kernel is compiled on first use (cached per machine), so installing needs no compiler
and no torch at build time; csrc/ ships inside the package as ``srpo_kernels/csrc``."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["srpo_kernels", "srpo_kernels.*", "srpo", "srpo.*"]) + ["srpo_kernels.csrc"],
    package_dir={"srpo_kernels.csrc": "csrc"},
    package_data={"srpo_kernels.csrc": ["*.cpp", "*.h"]},
)
