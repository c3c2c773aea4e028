"""3D EMC: Dragonfly's orientation sets and detector, iterations reproduced from Dragonfly's own
outputs, independence of chunks and workers, checkpoint/resume, bad input."""

from __future__ import annotations

from pathlib import Path

import dask
import h5py
import numpy as np
import pytest

import diffdask as dd
from diffdask.emc import EMC3D, Detector3D, fundamental_zone, group_quaternions, quaternion_set
from diffdask.emc.quaternions import multiply
from diffdask.errors import GeometryError, ParameterError, SchemaError, StoreExistsError
from diffdask.io.dragonfly import read_emc, read_emc_output, read_quaternions

REF = Path(__file__).parents[2] / "shared" / "data" / "dragonfly_emc3d"
if not REF.exists():
    REF = Path("/work/shared/data/dragonfly_emc3d")


@pytest.fixture(scope="module")
def frames():
    return read_emc(str(REF / "photons.emc"), str(REF / "det_64.h5"))


def _emc(**kw):
    options = dict(quaternions=str(REF / "quat_n4.dat"), beta=0.5, beta_schedule=(2.0, 2), keep_probabilities=True)
    options.update(kw)
    return EMC3D(**options)


def _one_iteration(emc, ds, k, **kw):
    prev = read_emc_output(str(REF / f"output_{k - 1:03d}.h5"))
    scales = None if k == 1 else prev["scale"]
    return emc.run(ds, 1, start_model=prev["intens"][0], start_scales=scales, start_iteration=k, **kw).final


def _rel(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


def test_quaternion_set_is_dragonflys():
    q, w = quaternion_set(4)
    ref_q, ref_w = read_quaternions(str(REF / "quat_n4.dat"))
    assert q.shape == ref_q.shape == (10 * (5 * 4**3 + 4), 4)
    overlap = np.abs(q @ ref_q.T)  # |cos| of half the angle between rotations: 1 for the same one
    match = overlap.argmax(axis=1)
    assert np.all(overlap.max(axis=1) > 1 - 1e-12)
    assert np.unique(match).size == q.shape[0]
    assert np.allclose(w, ref_w[match], rtol=1e-9, atol=0)
    for n in (1, 2, 3, 5):
        assert quaternion_set(n)[0].shape[0] == 10 * (5 * n**3 + n)


@pytest.mark.parametrize("group, order", [("O", 24), ("I", 60)])
def test_fundamental_zone_keeps_the_rotations_nearest_identity(group, order):
    q, w = quaternion_set(5)
    g = group_quaternions(group)
    assert g.shape == (order, 4)
    fq, fw = fundamental_zone(q, w, group)
    assert np.isclose(fw.sum(), 1.0)
    images = np.abs(multiply(fq[:, None, :], g[None, :, :])[..., 0])
    assert np.all(np.abs(fq[:, 0]) >= images.max(axis=1) - 1e-10)
    # Every rotation of the full set has an image in the zone (the zone tiles SO(3)).
    assert 0.9 / order < fq.shape[0] / q.shape[0] < 2.0 / order


def test_detector_from_geometry_matches_dragonflys_make_detector():
    # [parameters] of the reference: λ 2.5 Å, 175 mm, 64×64 pixels of 1 mm, centre 31.5.
    geometry = dd.Geometry((64, 64), pixel_size_m=1e-3, distance_m=0.175, wavelength_m=2.5e-10)
    ds = dd.make_frame_stack(np.zeros((1, 64, 64), np.uint16), attrs=geometry.to_attrs())
    # Dragonfly's polarisation "x" is along its x axis, which diffdask puts on the frame rows (lab y).
    det = Detector3D.from_dataset(ds, polarization="y")
    with h5py.File(REF / "det_64.h5") as f:
        ref_q = np.stack([f["qx"][()], f["qy"][()], f["qz"][()]], axis=1)
        ref_corr = f["corr"][()]
    assert np.abs(det.q - ref_q).max() < 1e-9
    assert np.allclose(det.corr, ref_corr / ref_corr.mean(), rtol=1e-9)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_each_iteration_reproduces_dragonfly(frames, k):
    it = _one_iteration(_emc(truncation_threads=2), frames, k)
    ref = read_emc_output(str(REF / f"output_{k:03d}.h5"))
    assert _rel(it.model, ref["intens"][0]) < 1e-6
    assert _rel(it.weights, ref["inter_weight"][0]) < 1e-12
    for name in ("scale", "likelihood", "mutual_info"):
        assert _rel(getattr(it, name), ref[name]) < 1e-6, name
    assert np.array_equal(it.orientation, ref["orientations"])
    p = it.probabilities
    for d, (place, prob) in enumerate(zip(*ref["probabilities"])):
        order = np.argsort(place)
        assert np.array_equal(p.indices[p.indptr[d] : p.indptr[d + 1]], place[order])
        assert np.abs(p.data[p.indptr[d] : p.indptr[d + 1]] - prob[order]).max() < 1e-9


def test_a_global_cut_stays_close_once_the_active_rotations_agree(frames):
    # Without Dragonfly's per-thread cut, probabilities below e^-14 of the best fall out of the
    # normalisation: P moves by ~1e-5 and the model by ~1e-4 of its maximum.
    it = _one_iteration(_emc(), frames, 2)
    ref = read_emc_output(str(REF / "output_002.h5"))
    assert _rel(it.model, ref["intens"][0]) < 3e-4
    assert _rel(it.scale, ref["scale"]) < 1e-6
    assert np.array_equal(it.orientation, ref["orientations"])


def test_result_does_not_depend_on_chunks_or_workers(frames, client):
    emc = _emc(truncation_threads=2, keep_probabilities=False)
    subset = np.arange(frames.sizes["frame"]) >= 700
    distributed = _one_iteration(emc, frames, 2, blacklist=subset)
    rechunked = read_emc(str(REF / "photons.emc"), str(REF / "det_64.h5"), chunks=97)
    with dask.config.set(scheduler="threads", num_workers=1):
        local = _one_iteration(emc, rechunked, 2, blacklist=subset)
    assert distributed.model.tobytes() == local.model.tobytes()
    assert np.array_equal(distributed.scale, local.scale, equal_nan=True)
    assert np.isnan(local.scale[subset]).all() and np.all(local.orientation[subset] == -1)


def test_resumed_run_ends_with_the_bytes_of_an_uninterrupted_one(frames, tmp_path):
    emc = _emc(keep_probabilities=False)
    subset = np.arange(frames.sizes["frame"]) >= 400
    start = read_emc_output(str(REF / "output_000.h5"))["intens"][0]
    whole = emc.run(frames, 3, start_model=start, blacklist=subset).final
    store = str(tmp_path / "emc3d.zarr")
    emc.run(frames, 2, start_model=start, blacklist=subset, out=store)
    with pytest.raises(StoreExistsError, match="resume=True"):
        emc.run(frames, 3, start_model=start, blacklist=subset, out=store)
    with pytest.raises(ParameterError, match="other settings"):
        _emc(beta=0.25, keep_probabilities=False).run(frames, 3, start_model=start, blacklist=subset, out=store,
                                                      resume=True)
    resumed = emc.run(frames, 3, start_model=start, blacklist=subset, out=store, resume=True)
    assert [it.iteration for it in resumed.iterations] == [1, 2, 3]
    assert resumed.final.model.tobytes() == whole.model.tobytes()
    ds = resumed.to_dataset()
    assert ds["model"].dims == ("qx", "qy", "qz") and ds.sizes["iteration"] == 3
    paths = resumed.write_dragonfly(str(tmp_path / "out"))
    back = read_emc_output(paths[-1])
    assert np.array_equal(back["intens"][0], whole.model)


def test_a_folder_that_is_not_a_checkpoint_is_left_alone(frames, tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(StoreExistsError, match="not a diffdask 3D EMC checkpoint"):
        _emc().run(frames, 1, out=str(tmp_path), resume=True)
    assert (tmp_path / "mine.txt").read_text() == "user data"


def test_bad_input_gets_a_clear_error(frames, tmp_path):
    for level in (0, 101, 2.5):
        with pytest.raises(ParameterError, match="quaternion level"):
            EMC3D(quaternions=level)
    with pytest.raises(ParameterError, match="point group"):
        EMC3D(quaternions=1, point_group="D7")
    with pytest.raises(GeometryError, match="Ewald sphere"):
        EMC3D(quaternions=1, size=41).run(frames, 1)
    with pytest.raises(SchemaError, match="start model"):
        EMC3D(quaternions=1).run(frames, 1, start_model=np.ones((5, 5, 5)))
    with pytest.raises(ParameterError, match="iterations"):
        EMC3D(quaternions=1).run(frames, 0)
    empty = tmp_path / "empty.emc"
    header = np.zeros(256, "<i4")
    header[1] = 4096
    empty.write_bytes(header.tobytes())
    with pytest.raises(SchemaError, match="no frames"):
        EMC3D(quaternions=1).run(read_emc(str(empty), str(REF / "det_64.h5")), 1)
    no_geometry = dd.make_frame_stack(np.zeros((3, 8, 8), np.uint16))
    with pytest.raises(GeometryError, match="q-vector"):
        EMC3D(quaternions=1).run(no_geometry, 1)
