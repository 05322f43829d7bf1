"""Deployment kernels, installed as ``twla.kernels``; they import nothing else of twla.

From the source tree's root (``python -m ...``, pytest, a notebook), this folder is also
importable as a top-level ``kernels``, the name of a distribution that transformers imports.
Imported under that name, it hands the import over to the installed distribution (or fails as
if the folder were not there), so it never hides it.
"""

if __name__ == "kernels":
    import importlib
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = sys.path[:]
    del sys.modules[__name__]
    sys.path[:] = [p for p in _path if os.path.abspath(p or os.curdir) != _root]
    try:
        importlib.import_module("kernels")
    finally:
        sys.path[:] = _path
