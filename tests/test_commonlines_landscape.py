"""CLPCA landscape and absolute embedding on noise-free slices of simulated particles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

import diffdask as dd
from diffdask.commonlines import (
    AbsoluteEmbedding,
    cc_matrix,
    clpca,
    embed,
    feature_grid,
    rotation_invariant_features,
)

SIZE = 48
N_ANGLES, MASK_RADIUS = 60, 3
CLASSES = ("cube", "small sphere", "large sphere", "elongated")


def _sphere_amplitude(qr):
    """Form factor of a uniform sphere at q·R (1 at q = 0)."""
    qr = np.where(qr < 1e-6, 1e-6, qr)
    return 3 * (np.sin(qr) - qr * np.cos(qr)) / qr**3


def simulated_averages(per_class, seed):
    """Noise-free central slices |F(q)|² of particles at random orientations (small angles).

    A slice through the 3-D intensity is what an average becomes once enough frames of
    one orientation are merged; q is in units of 2π / (particle size), S // 2 the centre.
    """
    rng = np.random.default_rng(seed)
    q = (np.arange(SIZE) - SIZE // 2) * 0.25  # nm⁻¹ per pixel, in these units
    qy, qx = np.meshgrid(q, q, indexing="ij")
    plane = np.stack([qx, qy, np.zeros_like(qx)], axis=-1)  # (S, S, 3)
    images, labels = [], []
    for label, shape in enumerate(CLASSES):
        for rot in Rotation.random(per_class, random_state=rng):
            k = plane @ rot.as_matrix().T  # the slice's q vectors in the particle frame
            if shape == "cube":
                amp = np.prod(np.sinc(k * 1.6 / np.pi), axis=-1)  # edge 3.2
            elif shape == "small sphere":
                amp = _sphere_amplitude(np.linalg.norm(k, axis=-1) * 1.6)
            elif shape == "large sphere":
                amp = _sphere_amplitude(np.linalg.norm(k, axis=-1) * 2.4)
            else:
                amp = _sphere_amplitude(np.linalg.norm(k * [1.0, 1.0, 3.0], axis=-1) * 1.2)
            images.append(amp**2)
            labels.append(label)
    return np.stack(images), np.asarray(labels)


def purity(labels, clusters):
    """Fraction of averages whose cluster's majority class is their own."""
    return sum(np.bincount(labels[clusters == c]).max() for c in np.unique(clusters)) / len(labels)


@pytest.fixture(scope="module")
def landscape():
    averages, labels = simulated_averages(25, seed=3)
    cc = cc_matrix(averages, N_ANGLES, MASK_RADIUS, "bilinear", block_size=40).compute()
    return averages, labels, cc, clpca(cc, 3)


def test_classes_separate_in_clpca_space(landscape):
    from sklearn.cluster import KMeans

    _, labels, cc, space = landscape
    assert np.allclose(cc, cc.T) and np.all(np.diag(cc) == 1)
    clusters = KMeans(4, n_init=10, random_state=0).fit_predict(space.coordinates)
    score = purity(labels, clusters)
    print(f"CLPCA cluster purity {score:.3f}; explained variance {space.explained_variance_ratio.round(3)}")
    assert score >= 0.9
    assert space.coordinates.shape == (100, 3)


def test_clpca_is_the_pca_of_the_rows(landscape):
    from sklearn.decomposition import PCA

    _, _, cc, space = landscape
    np.testing.assert_allclose(np.abs(space.coordinates), np.abs(PCA(3).fit_transform(cc)), atol=1e-8)
    assert np.all(np.diff(space.explained_variance_ratio) <= 0)


@pytest.mark.parametrize("method", ["pca", "isomap", "spectral", "tsne"])
def test_embeddings_of_the_cc_matrix(landscape, method):
    _, labels, cc, _ = landscape
    options = {"max_iter": 250} if method == "tsne" else {}
    coords = embed(cc, method, n_components=2, seed=1, **options)
    assert coords.shape == (100, 2) and np.isfinite(coords).all()
    np.testing.assert_array_equal(coords, embed(cc, method, n_components=2, seed=1, **options))


def test_embedding_errors(landscape):
    _, _, cc, _ = landscape
    with pytest.raises(dd.ParameterError, match="method"):
        embed(cc, "umap")
    with pytest.raises(dd.ParameterError, match="NaN"):
        clpca(np.where(np.eye(4, dtype=bool), 1.0, np.nan))
    with pytest.raises(dd.ParameterError, match="square"):
        clpca(cc[:5])


def test_features_are_invariant_to_in_plane_rotation():
    rng = np.random.default_rng(0)
    blob = rng.random((SIZE + 1, SIZE + 1))
    blob = blob + blob[::-1, ::-1]  # centrosymmetric, like a diffraction pattern
    turned = np.rot90(blob)  # about the centre pixel S // 2 of an odd-sized image
    f = rotation_invariant_features(np.stack([blob, turned]), mask_radius=3).compute()
    np.testing.assert_allclose(f[0], f[1], rtol=1e-10, atol=1e-15)
    grid = feature_grid(SIZE + 1, 3)
    kept_orders = grid["orders"][grid["keep"].any(axis=1)]
    assert np.all(kept_orders % 2 == 0)
    r = grid["radii_px"]
    assert grid["keep"][:, 0].sum() == int(np.pi * r[0]) // 2 + 1 and grid["keep"].sum() == f.shape[1]


def test_absolute_embedding_places_held_out_averages_near_their_class(landscape, tmp_path):
    averages, labels, _, space = landscape
    model = AbsoluteEmbedding(mask_radius=MASK_RADIUS, epochs=60, seed=5).fit(averages, space.coordinates)
    assert model.validation_mse_.shape == (3,) and len(model.validation_index_) == 20
    spread = space.coordinates.var(axis=0)
    print(f"validation MSE per component {model.validation_mse_.round(4)} (variance {spread.round(4)})")
    # CLPCA-1 and -2 hold > 99 % of the variance here; CLPCA-3 is orientation noise.
    assert model.validation_mse_[0] < 0.2 * spread[0] and model.validation_mse_[:2].sum() < 0.2 * spread[:2].sum()

    new, new_labels = simulated_averages(5, seed=99)  # unseen orientations
    placed = model.transform(new, block_size=7).compute()
    centroids = np.stack([space.coordinates[labels == c].mean(0) for c in range(len(CLASSES))])
    nearest = np.argmin(np.linalg.norm(placed[:, None] - centroids[None], axis=-1), axis=1)
    accuracy = np.mean(nearest == new_labels)
    print(f"held-out averages placed nearest their class centroid: {accuracy:.2f}")
    assert accuracy >= 0.9

    model.save(tmp_path / "landscape.pt")
    again = AbsoluteEmbedding.load(tmp_path / "landscape.pt")
    np.testing.assert_array_equal(again.transform(new, block_size=7).compute(), placed)
    np.testing.assert_array_equal(again.validation_mse_, model.validation_mse_)
    # Seeded: the same seed trains the same network.
    first, second = (AbsoluteEmbedding(mask_radius=MASK_RADIUS, epochs=2, seed=7) for _ in range(2))
    first.fit(averages, space.coordinates)
    second.fit(averages, space.coordinates)
    for name, value in first.state.items():
        assert torch.equal(value, second.state[name])
    with pytest.raises(dd.ParameterError, match="trained on 48"):
        model.transform(np.ones((2, 40, 40)))


def test_cli_writes_matrix_embedding_and_figure(cluster, tmp_path):
    from click.testing import CliRunner

    from diffdask.cli import main

    averages, labels = simulated_averages(6, seed=4)
    store = tmp_path / "averages.zarr"
    dd.save_frames(dd.make_frame_stack(averages, per_frame={"label": labels}), store, batch_frames=10)
    runner = CliRunner()
    args = ["commonlines", str(store), "--angles", "30", "--mask-radius", "3", "--color-by", "label",
            "--block-size", "8", "--absolute", str(tmp_path / "abs.pt"), "--epochs", "20",
            "--scheduler", cluster.scheduler_address]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    saved = dd.open_results(store, "commonlines")
    expected = cc_matrix(averages, 30, 3).compute()
    np.testing.assert_allclose(saved.cc.values, expected, rtol=0, atol=1e-14)
    np.testing.assert_allclose(saved.clpca.values, clpca(expected).coordinates)
    assert saved.attrs["n_angles"] == 30 and "commonlines" in dd.list_results(store)
    assert (tmp_path / "averages-clpca.png").stat().st_size > 1000
    assert AbsoluteEmbedding.load(tmp_path / "abs.pt").validation_mse_.shape == (3,)

    bad = runner.invoke(main, ["commonlines", str(store), "--mask-radius", "30"])
    assert bad.exit_code == 2 and "mask_radius" in bad.output and "Traceback" not in bad.output
    bad = runner.invoke(main, ["commonlines", str(store), "--mask-radius", "3", "--color-by", "nope"])
    assert bad.exit_code == 2 and "label" in bad.output
