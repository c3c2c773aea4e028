"""The installed version of diffdask, read from the package metadata.

Its own module so that any module can stamp provenance without importing the package root
(which would put a cycle through ``diffdask/__init__.py``).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("diffdask")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"
