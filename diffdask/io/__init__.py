"""Reading and writing frame stacks: Zarr v3 stores, HDF5/CXI files."""

from diffdask.io.hdf5 import open_hdf5
from diffdask.io.location import Location
from diffdask.io.writer import ingest_hdf5, save_frames, save_results
from diffdask.io.zarr_store import list_results, open_frames, open_results, store_info, verify_store

__all__ = [
    "Location",
    "ingest_hdf5",
    "list_results",
    "open_frames",
    "open_hdf5",
    "open_results",
    "save_frames",
    "save_results",
    "store_info",
    "verify_store",
]
