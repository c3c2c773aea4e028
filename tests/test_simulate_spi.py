"""SPI simulator against analytic references written out here, independently of the code."""

from __future__ import annotations

import math

import dask
import dask.array as da
import numpy as np
import pytest
from click.testing import CliRunner
from scipy.spatial.transform import Rotation

from diffdask import Geometry, ParameterError, StoreNotFoundError
from diffdask.blocks import generate_frames
from diffdask.cli import main
from diffdask.io import open_frames
from diffdask.simulate import (
    Particle,
    atomic_form_factor,
    detector_mask,
    form_factor_volume,
    melting_ensemble,
    simulate_spi,
)

R_E = 2.8179403262e-15  # m
RHO = 430.0  # e/nm³, the Particle default


@pytest.fixture(autouse=True)
def _sync_scheduler():
    with dask.config.set(scheduler="synchronous"):
        yield


def reference_s(shape, pixel, distance, wavelength, center):
    """s = (û − ẑ)/λ (nm⁻¹), polarisation (x) and solid angle of each pixel, from first principles."""
    iy, ix = np.indices(shape, dtype=float)
    x = (ix - center[1]) * pixel
    y = (iy - center[0]) * pixel
    r = np.sqrt(x**2 + y**2 + distance**2)
    u = np.stack([x / r, y / r, distance / r])
    s = (u - np.array([0, 0, 1.0])[:, None, None]) / (wavelength * 1e9)
    polarization = 1 - u[0] ** 2
    # A flat pixel of area A at distance r, tilted by 2θ from the line of sight: A cos(2θ)/r².
    solid = pixel**2 * (distance / r) / r**2
    return s, polarization, solid


def sphere_f(s_len, diameter):
    x = np.pi * diameter * s_len
    x = np.where(x == 0, 1e-9, x)
    return RHO * np.pi / 6 * diameter**3 * 3 * (np.sin(x) - x * np.cos(x)) / x**3


SHAPE = (48, 56)
PIXEL, DIST, LAM = 300e-6, 0.26, 0.729e-9
CENTER = (20.3, 30.8)
GEOM = Geometry(SHAPE, PIXEL, DIST, LAM, beam_center_yx=CENTER)
FLUENCE = 1e24


def test_sphere_pattern_equals_analytic_formula():
    mask = detector_mask(GEOM, gap_px=2, beamstop_radius_px=3)
    ds = simulate_spi(3, GEOM, Particle("sphere", 70.0), fluence_photons_per_m2=FLUENCE,
                      fluence_jitter_shape=None, noise=False, mask=mask, seed=3)
    frames = ds.frames.values
    s, pol, solid = reference_s(SHAPE, PIXEL, DIST, LAM, CENTER)
    f = sphere_f(np.linalg.norm(s, axis=0), 70.0)
    expected = FLUENCE * R_E**2 * pol * solid * f**2
    envelope = RHO * np.pi / 6 * 70.0**3 * np.minimum(1, 3 / (np.pi * 70 * np.linalg.norm(s, axis=0)) ** 2)
    away_from_zeros = (np.abs(f) > 0.05 * envelope) & mask
    for frame in frames:
        rel = np.abs(frame - expected)[away_from_zeros] / expected[away_from_zeros]
        assert rel.max() < 1e-3
        assert np.all(frame[~mask] == 0)
    assert away_from_zeros.sum() > 0.5 * mask.sum()


def test_sphere_slicing_path_close_to_analytic():
    exact = simulate_spi(4, GEOM, Particle("sphere", 70.0), noise=False, seed=1).frames.values
    sliced = simulate_spi(4, GEOM, Particle("sphere", 70.0), noise=False, seed=1, method="slicing").frames.values
    ok = exact > 1e-3 * exact.max()
    rel = np.abs(sliced - exact)[ok] / exact[ok]
    # Trilinear slicing at the default step 1/(8D): ≈ 2 % median per-pixel error.
    assert np.median(rel) < 0.03
    assert np.percentile(rel, 90) < 0.08


def test_superellipsoid_p2_equals_sphere():
    sphere = Particle("sphere", 70.0)
    blob = Particle("superellipsoid", 70.0, exponent=2.0)
    s_max = 0.08
    vol = form_factor_volume(blob, s_max)
    n = vol.values.shape[0]
    axis = np.arange(n) * vol.step_inv_nm  # one octant, s ≥ 0
    s_len = np.sqrt(axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2)
    f = sphere_f(s_len, 70.0)
    envelope = RHO * np.pi / 6 * 70.0**3 * np.minimum(1, 3 / (np.pi * 70 * s_len + 1e-9) ** 2)
    inside = (s_len <= s_max) & (np.abs(f) > 0.05 * envelope)
    # The density route (blurred voxels → transform → deconvolution) reproduces the sphere's F.
    assert np.max(np.abs(vol.values - f)[inside] / np.abs(f[inside])) < 1e-3
    a = simulate_spi(4, GEOM, blob, noise=False, seed=5).frames.values
    b = simulate_spi(4, GEOM, sphere, noise=False, seed=5, method="slicing").frames.values
    ok = b > 1e-3 * b.max()
    assert np.max(np.abs(a - b)[ok] / b[ok]) < 1e-2


@pytest.mark.parametrize("p", [3.0, 6.0, 12.0])
def test_superellipsoid_forward_scattering_is_its_electron_count(p):
    axes = np.array([1.0, 0.8, 0.6])
    vol = form_factor_volume(Particle("superellipsoid", 60.0, exponent=p, axes_ratio=tuple(axes)), 0.05)
    a, b, c = 30.0 * axes
    # Volume of |x/a|^p + |y/b|^p + |z/c|^p ≤ 1: 8abc Γ(1 + 1/p)³ / Γ(1 + 3/p).
    volume = 8 * a * b * c * math.gamma(1 + 1 / p) ** 3 / math.gamma(1 + 3 / p)
    assert vol.values[0, 0, 0] == pytest.approx(RHO * volume, rel=1e-3)


def test_icosahedral_shell_forward_scattering_is_its_electron_count():
    d, shell = 70.0, 0.2
    vol = form_factor_volume(Particle("icosahedral_shell", d, shell_fraction=shell), 0.05)
    # Icosahedron of circumradius R: edge a = R / sin(2π/5), volume 5(3 + √5)a³/12.
    def volume(radius):
        a = radius / math.sin(2 * math.pi / 5)
        return 5 * (3 + math.sqrt(5)) * a**3 / 12
    electrons = RHO * (volume(d / 2) - volume(d / 2 * (1 - shell)))
    assert vol.values[0, 0, 0] == pytest.approx(electrons, rel=1e-3)


def write_pdb(path, atoms):
    lines = []
    for i, (el, (x, y, z)) in enumerate(atoms, start=1):
        lines.append(
            f"ATOM  {i:5d} {el:<3s}  ALA A   1    {x:8.3f}{y:8.3f}{z:8.3f}  1.00  0.00          {el:>2s}"
        )
    path.write_text("\n".join(lines + ["END"]) + "\n")
    return path


ATOMS = [("C", (0.0, 0.0, 0.0)), ("N", (14.0, 3.0, -2.0)), ("O", (-5.0, 9.0, 6.0)),
         ("S", (3.0, -11.0, 8.0)), ("C", (8.0, 7.0, -9.0)), ("H", (-10.0, -4.0, 1.0))]


def test_pdb_direct_sum_and_friedel_symmetry(tmp_path):
    pdb = write_pdb(tmp_path / "tiny.pdb", ATOMS)
    # Hard X-rays far away: s_z ≈ 0 (flat Ewald sphere), beam on the central pixel.
    geom = Geometry((33, 33), 100e-6, 1.0, 0.02e-9)
    ds = simulate_spi(2, geom, Particle("pdb", pdb_path=str(pdb)), noise=False,
                      fluence_jitter_shape=None, seed=11)
    frames = ds.frames.values
    q = ds.orientation.values
    s, pol, solid = reference_s((33, 33), 100e-6, 1.0, 0.02e-9, (16, 16))
    pos = np.array([a[1] for a in ATOMS]) / 10.0
    pos -= pos.mean(axis=0)
    for frame, quat in zip(frames, q):
        rot = Rotation.from_quat([quat[1], quat[2], quat[3], quat[0]]).as_matrix()
        s_body = np.einsum("ji,jyx->iyx", rot, s)  # Rᵀ s
        s_len = np.linalg.norm(s, axis=0)
        f = sum(atomic_form_factor(el, s_len) * np.exp(2j * np.pi * np.einsum("i,iyx->yx", p, s_body))
                for (el, _), p in zip(ATOMS, pos))
        expected = FLUENCE * R_E**2 * pol * solid * np.abs(f) ** 2
        np.testing.assert_allclose(frame, expected, rtol=1e-3)
        # Friedel: I(s) = I(−s); the mirror pixel sees −s up to the tiny s_z.
        assert np.max(np.abs(frame - frame[::-1, ::-1]) / frame) < 1e-3
        # The atoms are not centrosymmetric, so the symmetry is not trivial in one half.
        assert np.max(np.abs(frame - frame[::-1, :]) / frame) > 1e-2


def test_pdb_slicing_matches_direct_sum(tmp_path):
    pdb = write_pdb(tmp_path / "tiny.pdb", ATOMS)
    geom = Geometry((32, 32), 200e-6, 0.2, 0.2e-9)
    p = Particle("pdb", pdb_path=str(pdb))
    direct = simulate_spi(3, geom, p, noise=False, seed=2).frames.values
    sliced = simulate_spi(3, geom, p, noise=False, seed=2, method="slicing", oversampling=12).frames.values
    ok = direct > 1e-2 * direct.max()
    assert np.median(np.abs(sliced - direct)[ok] / direct[ok]) < 0.02


def test_photon_statistics_mean_equals_variance():
    geom = Geometry((24, 24), 300e-6, 0.26, 0.729e-9)
    n = 600
    ds = simulate_spi(n, geom, Particle("sphere", 60.0), fluence_jitter_shape=None, seed=7,
                      fluence_photons_per_m2=2e23, background_photons=0.5, chunks=97)
    mu = simulate_spi(1, geom, Particle("sphere", 60.0), fluence_jitter_shape=None, seed=7,
                      fluence_photons_per_m2=2e23, background_photons=0.5, noise=False).frames.values[0]
    counts = ds.frames.values.astype(float)
    assert np.all(counts == np.round(counts))
    mean, var = counts.mean(axis=0), counts.var(axis=0, ddof=1)
    # Per pixel the sample mean is within 5 standard errors of μ.
    assert np.all(np.abs(mean - mu) < 5 * np.sqrt(mu / n) + 1e-9)
    # Poisson: variance = mean; the pooled ratio is precise to ≈ √(2/n)/√pixels.
    sel = mu > 2
    ratio = var[sel].sum() / mean[sel].sum()
    assert abs(ratio - 1) < 5 * math.sqrt(2 / n) / math.sqrt(sel.sum()) + 0.01


def test_two_particle_pattern_equals_two_body_interference():
    ds = simulate_spi(4, GEOM, [Particle("sphere", (50.0, 80.0))], single_hit_fraction=0.0,
                      particles_per_multi_hit=(2, 2), gap_nm=(20, 50), noise=False,
                      fluence_jitter_shape=None, seed=9)
    s, pol, solid = reference_s(SHAPE, PIXEL, DIST, LAM, CENTER)
    s_len = np.linalg.norm(s, axis=0)
    frames = ds.frames.values
    pos, diam = ds.particle_position_nm.values, ds.particle_diameter_nm.values.astype(float)
    assert np.all(ds.n_particles.values == 2)
    for frame, t, d in zip(frames, pos, diam):
        gap = np.linalg.norm(t[1] - t[0]) - (d[0] + d[1]) / 2
        assert 20 - 1e-6 <= gap <= 50 + 1e-6
        f1, f2 = sphere_f(s_len, d[0]), sphere_f(s_len, d[1])
        phase = 2 * np.pi * np.einsum("i,iyx->yx", t[1] - t[0], s)
        intensity = f1**2 + f2**2 + 2 * f1 * f2 * np.cos(phase)
        expected = FLUENCE * R_E**2 * pol * solid * intensity
        ok = expected > 1e-3 * expected.max()
        assert np.max(np.abs(frame - expected)[ok] / expected[ok]) < 2e-3


def test_ellipsoid_orientation_convention():
    axes = np.array([1.0, 0.6, 0.4])
    ds = simulate_spi(3, GEOM, Particle("ellipsoid", 80.0, axes_ratio=tuple(axes)), noise=False,
                      fluence_jitter_shape=None, seed=4)
    s, pol, solid = reference_s(SHAPE, PIXEL, DIST, LAM, CENTER)
    semi = 40.0 * axes
    for frame, q in zip(ds.frames.values, ds.orientation.values):
        rot = Rotation.from_quat([q[1], q[2], q[3], q[0]]).as_matrix()
        s_body = np.einsum("ji,jyx->iyx", rot, s)
        x = 2 * np.pi * np.sqrt(np.einsum("i,iyx->yx", semi**2, s_body**2))
        f = RHO * 4 / 3 * np.pi * semi.prod() * 3 * (np.sin(x) - x * np.cos(x)) / x**3
        expected = FLUENCE * R_E**2 * pol * solid * f**2
        ok = expected > 1e-3 * expected.max()
        assert np.max(np.abs(frame - expected)[ok] / expected[ok]) < 2e-3


def test_same_seed_same_bytes_for_any_chunking():
    kw = dict(particles=[Particle("sphere", (55, 84)), Particle("superellipsoid", 42, exponent=8, name="rounded cube")],
              fractions=[0.6, 0.4], single_hit_fraction=0.7, seed=21)
    geom = Geometry((20, 20), 600e-6, 0.3, 0.7e-9)
    a = simulate_spi(23, geom, chunks=5, **kw)
    b = simulate_spi(23, geom, chunks=23, **kw)
    with dask.config.set(scheduler="threads", num_workers=2):
        c = simulate_spi(23, geom, chunks=4, **kw).compute()
    a, b = a.compute(), b.compute()
    for name in a.data_vars:
        assert a[name].values.tobytes() == b[name].values.tobytes() == c[name].values.tobytes(), name
    # A subrange of the frames is the same whatever the chunk it falls in.
    d = simulate_spi(23, geom, chunks=9, **kw).frames[10:15].values
    assert d.tobytes() == a.frames.values[10:15].tobytes()
    other = simulate_spi(23, geom, chunks=5, **{**kw, "seed": 22}).frames.values
    assert other.tobytes() != a.frames.values.tobytes()


def test_mixture_and_class_fractions_within_binomial_error():
    n = 3000
    geom = Geometry((8, 8), 600e-6, 0.3, 0.7e-9)
    ds = simulate_spi(n, geom, [Particle("sphere", 40), Particle("cube", 40)], fractions=[0.7, 0.3],
                      single_hit_fraction=0.9, seed=5, chunks=1000)
    single = ds.single_hit.values
    for observed, p in ((single.mean(), 0.9), ((ds.shape_class.values == 1).mean(), 0.3)):
        assert abs(observed - p) < 4 * math.sqrt(p * (1 - p) / n)
    counts = ds.n_particles.values
    assert np.all((counts == 1) == single)
    assert set(np.unique(counts[~single])) == {2, 3, 4}
    scale = ds.fluence_scale.values.astype(float)
    # Gamma(2, ½): mean 1, variance ½.
    assert abs(scale.mean() - 1) < 4 * math.sqrt(0.5 / n)
    assert abs(scale.var() - 0.5) < 0.1


def test_orientations_uniform_on_so3():
    n = 4000
    geom = Geometry((4, 4), 600e-6, 0.3, 0.7e-9)
    q = simulate_spi(n, geom, Particle("sphere", 40), seed=8, chunks=2000).orientation.values
    assert np.allclose(np.linalg.norm(q, axis=1), 1)
    z = Rotation.from_quat(q[:, [1, 2, 3, 0]]).apply([0, 0, 1.0])
    # A uniformly rotated axis is uniform on the sphere: mean 0, second moments δ_ij/3.
    assert np.all(np.abs(z.mean(axis=0)) < 4 / math.sqrt(3 * n))
    np.testing.assert_allclose(z.T @ z / n, np.eye(3) / 3, atol=0.03)


def test_element_form_factors_match_tables():
    for el, z in (("H", 1), ("C", 6), ("N", 7), ("O", 8), ("P", 15), ("S", 16)):
        assert float(atomic_form_factor(el, np.array(0.0))) == pytest.approx(z, abs=0.01)
    # International Tables Vol. C, Table 6.1.1.1: carbon at sinθ/λ = 0.5 Å⁻¹ is 1.69 e.
    assert float(atomic_form_factor("C", np.array(10.0))) == pytest.approx(1.69, abs=0.01)


def test_detector_mask_gaps_and_beamstop():
    geom = Geometry((20, 30), 1e-4, 0.1, 1e-10, beam_center_yx=(8.0, 12.0))
    m = detector_mask(geom, gap_px=2, beamstop_radius_px=2.5)
    iy, ix = np.indices((20, 30))
    expected = ~np.isin(iy, [9, 10]) & ~np.isin(ix, [14, 15]) & (np.hypot(iy - 8, ix - 12) > 2.5)
    np.testing.assert_array_equal(m, expected)


def test_generate_frames_pattern():
    def kernel(start, stop, offset):
        idx = np.arange(start, stop)
        return {"frames": (idx + offset)[:, None, None] * np.ones((1, 2, 3)), "index": idx}

    out = generate_frames(kernel, 10, 4, {"frames": ((2, 3), float), "index": ((), int)}, {"offset": 5})
    assert out["frames"].chunks[0] == (4, 4, 2)
    assert isinstance(out["index"], da.Array)
    np.testing.assert_array_equal(out["index"].compute(), np.arange(10))
    np.testing.assert_array_equal(out["frames"][:, 1, 2].compute(), np.arange(10) + 5)
    with pytest.raises(ParameterError):
        generate_frames(kernel, 0, 4, {"index": ((), int)})


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: Particle("sphere", -5.0), "diameter_nm"),
        (lambda: Particle("sphere", (80.0, 50.0)), "low ≤ high"),
        (lambda: Particle("blob", 50.0), "unknown particle shape"),
        (lambda: Particle("superellipsoid", 50.0, exponent=0.5), "exponent"),
        (lambda: simulate_spi(2, GEOM, single_hit_fraction=1.2), "single_hit_fraction"),
        (lambda: simulate_spi(2, GEOM, [Particle(), Particle("cube")], fractions=[1.5, -0.5]), "fractions"),
        (lambda: simulate_spi(2, GEOM, [Particle(), Particle("cube")], fractions=[0.5, 0.4]), "sum to 1"),
        (lambda: simulate_spi(2, GEOM, method="fast"), "unknown method"),
        (lambda: simulate_spi(2, GEOM, Particle("superellipsoid", 70, exponent=4), method="exact"), "closed-form"),
        (lambda: simulate_spi(2, GEOM, oversampling=3, method="slicing"), "oversampling"),
        (lambda: simulate_spi(2, GEOM, gap_nm=-1), "gap_nm"),
        (lambda: simulate_spi(2, GEOM, seed=-1), "seed"),
    ],
)
def test_bad_input_raises_clear_errors(call, match):
    with pytest.raises(ParameterError, match=match):
        call()


def test_too_coarse_grid_names_needed_size():
    p = Particle("superellipsoid", 70.0, exponent=4)
    with pytest.raises(ParameterError, match=r"grid_size ≥ (\d+)") as err:
        simulate_spi(2, GEOM, p, grid_size=11)
    needed = int(err.value.args[0].rsplit("≥ ", 1)[1].rstrip("."))
    # The needed size gives a step ≤ 1/(4 D) and is accepted.
    ds = simulate_spi(1, GEOM, p, grid_size=needed, noise=False)
    assert ds.frames.values.max() > 0


def test_pdb_errors(tmp_path):
    with pytest.raises(StoreNotFoundError, match="does not exist"):
        Particle("pdb", None, pdb_path=str(tmp_path / "missing.pdb"))
    bad = write_pdb(tmp_path / "iron.pdb", [("C", (0, 0, 0)), ("FE", (1, 1, 1))])
    with pytest.raises(ParameterError, match="Fe"):
        Particle("pdb", None, pdb_path=str(bad))
    good = write_pdb(tmp_path / "ok.pdb", ATOMS)
    with pytest.raises(ParameterError, match="leave diameter_nm unset"):
        Particle("pdb", 50.0, pdb_path=str(good))


def test_a_frame_needs_only_its_own_chunk():
    geom = Geometry((16, 16), 600e-6, 0.3, 0.7e-9)
    ds = simulate_spi(1_000_000, geom, chunks=500, seed=1)
    one = ds.frames.data[654_321:654_322]
    (optimized,) = dask.optimize(one)
    # Chunks are independent: after culling, one frame of a 10⁶-frame run is one kernel call.
    assert len(dict(optimized.__dask_graph__())) <= 3
    other = simulate_spi(1_000_000, geom, chunks=333, seed=1).frames.data[654_321:654_322]
    assert one.compute().tobytes() == other.compute().tobytes()


def test_cli_simulate_spi_writes_a_labelled_store(cluster, tmp_path):
    store = tmp_path / "spi.zarr"
    result = CliRunner().invoke(main, ["simulate", "spi", str(store), "--n-frames", "24", "--shape", "32",
                                       "--single-hit-fraction", "0.8", "--seed", "4", "--batch-frames", "8",
                                       "--scheduler", cluster.scheduler_address])
    assert result.exit_code == 0, result.output
    assert "simulated 24 spi frames" in result.output
    stored = open_frames(store)
    geom = Geometry((32, 32), 600e-6, 0.3, 6e-10)
    expected = simulate_spi(24, geom, Particle("sphere", (55.0, 84.0)), single_hit_fraction=0.8, seed=4, chunks=5,
                            mask=detector_mask(geom, gap_px=4, beamstop_radius_px=4.0))
    assert stored.frames.values.tobytes() == expected.frames.values.tobytes()
    assert np.array_equal(stored.single_hit.values, expected.single_hit.values)
    assert stored.attrs["simulation"]["seed"] == 4
    bad = CliRunner().invoke(main, ["simulate", "spi", str(tmp_path / "x.zarr"), "--n-frames", "2",
                                    "--particle", "blob"])
    assert bad.exit_code == 2 and "unknown particle shape" in bad.output


def test_melting_ensemble_conserves_electrons_and_fractions():
    particles, fractions = melting_ensemble(42.0)
    zero = np.zeros((1, 3, 1))
    cube, rounded, sphere = (
        float(p.structure_factor(zero, np.array([p.size_range_nm[0]]))[0, 0]) if p.exact
        else float(form_factor_volume(p, 0.05).values[0, 0, 0])
        for p in particles[:3]
    )
    # Melting keeps the electrons: cube (a³ ρ) = sphere (π d³/6 · ρ · 17.31/19.32).
    gold = 79 * 19.32 / 196.97 * 6.02214076e23 / 1e21
    assert cube == pytest.approx(42.0**3 * gold, rel=1e-9)
    assert sphere == pytest.approx(cube, rel=1e-9)
    # Superellipsoid volume 8abc Γ(1 + 1/p)³ / Γ(1 + 3/p), here p = 6 and a = b = c = 21 nm.
    volume = 8 * 21.0**3 * math.gamma(1 + 1 / 6) ** 3 / math.gamma(1 + 3 / 6)
    assert rounded == pytest.approx(volume * gold, rel=1e-3)
    n = 2000
    ds = simulate_spi(n, Geometry((8, 8), 600e-6, 0.3, 0.7e-9), particles, fractions=fractions, seed=3,
                      chunks=1000, oversampling=4)
    assert ds.attrs["shape_classes"] == ["cube", "rounded cube", "sphere", "contaminant"]
    for k, p in enumerate(fractions):
        assert abs((ds.shape_class.values == k).mean() - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_same_bytes_on_a_two_process_cluster(client):
    geom = Geometry((24, 24), 600e-6, 0.3, 6e-10)
    kw = dict(particles=[Particle("superellipsoid", 42, exponent=6), Particle("icosahedral_shell", 60)],
              single_hit_fraction=0.8, seed=5)
    # The grids travel to the worker processes once per graph (their quad cache stays behind).
    on_cluster = client.compute(simulate_spi(30, geom, chunks=4, **kw).frames.data).result()
    with dask.config.set(scheduler="synchronous"):
        local = simulate_spi(30, geom, chunks=30, **kw).frames.values
    assert on_cluster.tobytes() == local.tobytes()


def test_a_detector_too_big_for_memory_is_refused_before_any_allocation():
    from diffdask import simulate_spi

    huge = Geometry((200_000, 200_000), pixel_size_m=75e-6, distance_m=0.5, wavelength_m=1e-10)
    with pytest.raises(ParameterError, match=r"200000×200000 detector needs .* GiB"):
        simulate_spi(10, huge, seed=0)


def test_a_mask_that_leaves_no_good_pixel_is_refused():
    from diffdask import detector_mask

    tiny = Geometry((1, 1), pixel_size_m=75e-6, distance_m=0.5, wavelength_m=1e-10)
    with pytest.raises(ParameterError, match="mask every pixel of a 1×1 detector"):
        detector_mask(tiny, gap_px=2, beamstop_radius_px=3.0)
