"""Exceptions and warnings raised by diffdask.

Every error says what is wrong and how to fix it. Each class also derives from the
built-in exception a Python user would expect (``ValueError``, ``FileNotFoundError``,
...), so ``except ValueError`` keeps working around diffdask calls.
"""

from __future__ import annotations


class DiffdaskError(Exception):
    """Base class of every error diffdask raises on purpose."""


class SchemaError(DiffdaskError, ValueError):
    """A frame stack does not follow the schema (variables, dims, dtypes, shapes)."""


class GeometryError(DiffdaskError, ValueError):
    """Detector geometry is missing, inconsistent or unphysical."""


class ParameterError(DiffdaskError, ValueError):
    """A function argument is out of its valid range or of the wrong kind."""


class StoreNotFoundError(DiffdaskError, FileNotFoundError):
    """A path or URL given as a data store does not exist."""


class StoreFormatError(DiffdaskError, ValueError):
    """A path exists but is not a store diffdask can read (not Zarr, not HDF5, corrupt)."""


class IncompleteStoreError(DiffdaskError, RuntimeError):
    """A store was written by a job that did not finish; re-run the job to complete it."""


class StoreExistsError(DiffdaskError, FileExistsError):
    """A write would replace data that is already in a store."""


class BackendError(DiffdaskError, RuntimeError):
    """A requested compute backend (CuPy, CUDA) is not available here."""


class ClusterError(DiffdaskError, RuntimeError):
    """A Dask cluster could not be reached or started."""


class NonFinitePixelsWarning(UserWarning):
    """Frames hold NaN or inf pixels; diffdask treats them as masked and never propagates them."""
