"""Build script: only builds the cffi extension (borg and pynacl keep setup.py this small)."""
from setuptools import setup

setup(cffi_modules=["csrc/build_ffi.py:ffibuilder"])
