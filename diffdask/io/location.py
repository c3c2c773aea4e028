"""Where a store lives: local paths and fsspec URLs (``s3://``, ``gs://``, ``memory://``).

A `Location` is small and picklable, so write tasks re-open the store on the worker rather
than shipping an open store object through the graph.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec

from diffdask.errors import StoreNotFoundError

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


#: What botocore raises (through s3fs) when it finds no usable credentials; named, not imported,
#: so that local-only installations need no botocore.
_CREDENTIAL_ERRORS = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError")


@dataclass(frozen=True)
class Location:
    """A store path or URL with its fsspec storage options.

    Parameters
    ----------
    url : str
        Local path or fsspec URL.
    storage_options : mapping
        Options of the fsspec filesystem (credentials, ``endpoint_url``...).
    """

    url: str
    storage_options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, path_or_url: Any, storage_options: Mapping[str, Any] | None = None) -> Location:
        """Normalise a path (str or ``os.PathLike``) or URL into a Location."""
        if isinstance(path_or_url, Location):
            return path_or_url
        url = os.fspath(path_or_url)
        if "://" not in url:
            url = os.path.abspath(os.path.expanduser(url))
        return cls(url, dict(storage_options or {}))

    @property
    def is_local(self) -> bool:
        return "://" not in self.url or self.url.startswith("file://")

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        fs, _ = fsspec.core.url_to_fs(self.url, **self.storage_options)
        return fs

    @property
    def fs_path(self) -> str:
        _, path = fsspec.core.url_to_fs(self.url, **self.storage_options)
        return path

    def join(self, *parts: str) -> str:
        """fsspec path of an entry below this location."""
        return "/".join([self.fs_path.rstrip("/"), *parts])

    def exists(self) -> bool:
        """True when something exists here; object storage that refuses us is a clear error."""
        try:
            return bool(self.fs.exists(self.fs_path))
        except Exception as exc:
            if type(exc).__name__ in _CREDENTIAL_ERRORS or (isinstance(exc, PermissionError) and not self.is_local):
                raise StoreNotFoundError(
                    f"cannot read {self.url!r}: {exc}. Object storage needs credentials: set "
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or pass storage_options "
                    "key=/secret= (anon=True for a public bucket); check that they may read this bucket."
                ) from exc
            raise

    def require(self) -> None:
        """Raise `StoreNotFoundError` if nothing exists at this location."""
        if not self.exists():
            raise StoreNotFoundError(
                f"no file or store at {self.url!r}; check the path (relative paths are taken from "
                f"{os.getcwd()!r}) or, for object storage, the bucket name and credentials."
            )

    def is_hdf5_file(self) -> bool:
        """True when this location is a file that starts with the HDF5 signature."""
        fs, path = self.fs, self.fs_path
        if not fs.isfile(path):
            return False
        with fs.open(path, "rb") as f:
            return f.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE

    def stored_bytes(self, prefix: str = "") -> int:
        """Total size in bytes of the files below ``prefix`` (as stored, compressed)."""
        fs = self.fs
        root = self.join(prefix) if prefix else self.fs_path
        if not fs.exists(root):
            return 0
        return int(sum(info["size"] for info in fs.find(root, detail=True).values()))
