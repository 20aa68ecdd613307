"""Shared port settings."""

# Emit Python objects as Python objects: Holoscan would otherwise turn a dict of numpy
# arrays into a C++ TensorMap (and fails on bool arrays).
PYOBJECT = "PyObject"
