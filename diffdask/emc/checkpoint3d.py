"""Zarr checkpoints of a 3D EMC run: one group per finished iteration, resumable bit for bit.

Layout: root attrs ``kind = "diffdask-emc3d-checkpoint"``, the settings and data hashes of the
run and ``complete`` (the iterations whose group was fully written); group ``iter_NNN`` holds
`EMC3DIteration.to_dataset`. An iteration counts only once its number is in ``complete``, which
is written after its arrays, so a run killed while writing resumes from the previous one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr
import zarr

from diffdask.emc.result3d import EMC3DIteration, EMC3DResult
from diffdask.errors import ParameterError, StoreExistsError
from diffdask.io.location import Location

KIND = "diffdask-emc3d-checkpoint"


class Checkpoint:
    """The checkpoint store of one run (``settings`` and ``data`` are the run's hashes)."""

    def __init__(self, path: str, settings: str, data: str) -> None:
        self.path, self.settings, self.data = path, settings, data

    def exists(self) -> bool:
        return Location.of(self.path).exists()

    def _root(self, mode: str) -> Any:
        return zarr.open_group(self.path, mode=mode, zarr_format=3)

    def create(self) -> None:
        """Create the store, or check that the existing one is this run's."""
        if not self.exists():
            root = self._root("w-")
            root.attrs.update({"kind": KIND, "settings": self.settings, "data": self.data, "complete": []})
            return
        try:
            attrs = dict(self._root("r").attrs)
        except Exception as exc:  # zarr raises several types for a folder that is not a group
            raise StoreExistsError(
                f"{self.path!r} exists and is not a diffdask 3D EMC checkpoint; diffdask will not write into "
                "it. Choose a new path."
            ) from exc
        if attrs.get("kind") != KIND:
            raise StoreExistsError(
                f"{self.path!r} exists and is not a diffdask 3D EMC checkpoint; diffdask will not write into it. "
                "Choose a new path."
            )
        for key, mine in (("settings", self.settings), ("data", self.data)):
            if attrs.get(key) != mine:
                raise ParameterError(
                    f"the checkpoint {self.path!r} belongs to a run with other {key}"
                    f"{' (quaternions, β, blocks, …)' if key == 'settings' else ' (frames or detector)'}; "
                    "resume it with the same ones, or write to a new path."
                )

    def completed(self) -> list[int]:
        return sorted(int(i) for i in self._root("r").attrs.get("complete", []))

    def load(self, result: EMC3DResult) -> int:
        """Append the checkpointed iterations to ``result``; return how many there were."""
        done = self.completed()
        for it in done:
            ds = xr.open_zarr(self.path, group=f"iter_{it:03d}", zarr_format=3, consolidated=False).load()
            result.iterations.append(EMC3DIteration.from_dataset(ds))
        return len(done)

    def save(self, record: EMC3DIteration, quaternions: np.ndarray) -> None:
        """Write one iteration, then mark it complete."""
        # The component labels are strings, which Zarr v3 has no stable type for; they are implied.
        record.to_dataset(quaternions).drop_vars("component").to_zarr(
            self.path, group=f"iter_{record.iteration:03d}", mode="w", zarr_format=3, consolidated=False
        )
        root = self._root("r+")
        done = sorted(set(self.completed()) | {record.iteration})
        root.attrs["complete"] = done
