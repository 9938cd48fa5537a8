"""Build hook: compiles the private cffi module ``kvmio._native`` from <linux/kvm.h>."""

from setuptools import setup

setup(cffi_modules=["src/kvmio/_native_build.py:ffibuilder"])
