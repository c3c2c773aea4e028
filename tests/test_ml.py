"""Torch inference over partitions: equals a plain loop, loads once per worker, safe weights."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

import diffdask as dd
from diffdask.ml import (
    GeometryRegressor,
    HitClassifier,
    MLPHead,
    ModelFileError,
    ModelSpec,
    Preprocess,
    load_model,
    predict,
    save_model,
)


def _tiny_classifier(path, seed: int, crop=(24, 12), trained_on=(24, 12)) -> HitClassifier:
    torch.manual_seed(seed)
    model = HitClassifier(width=4, blocks_per_stage=(1, 1))
    spec = ModelSpec("HitClassifier", {"width": 4, "blocks_per_stage": [1, 1]},
                     Preprocess(crop=crop, scale="log1p", normalize="max").to_dict(), ["single", "other"],
                     input_shape=list(trained_on))
    model.eval()
    save_model(model, path, spec)
    return model


@pytest.fixture
def stack():
    rng = np.random.default_rng(0)
    frames = rng.poisson(2.0, size=(37, 30, 20)).astype("uint16")
    mask = np.ones((30, 20), bool)
    mask[0] = False
    return dd.make_frame_stack(frames, mask=mask, chunks=8)


def _loop(models, stack, mirror=False):
    prep = Preprocess(crop=(24, 12), scale="log1p", normalize="max")
    x = torch.from_numpy(prep.apply(stack.frames.values, stack.mask.values, (14.5, 9.5)))
    outs = []
    with torch.inference_mode():
        for m in models:
            p = torch.softmax(m(x), dim=1)
            if mirror:
                flipped = (x.flip(-1), x.flip(-2), x.flip(-1).flip(-2))
                p = (p + sum(torch.softmax(m(f), dim=1) for f in flipped)) / 4
            outs.append(p.double().numpy())
    return np.mean(outs, axis=0)


def test_predict_on_a_cluster_equals_a_plain_loop_and_loads_once_per_worker(client, tmp_path, stack):
    model = _tiny_classifier(tmp_path / "m", seed=1)
    out = predict(stack, tmp_path / "m.pt", batch_size=5)
    graph = dict(out.probabilities.data.__dask_graph__())
    assert len(pickle.dumps(graph)) < 200_000  # no weights in the graph
    assert not any(isinstance(v, torch.Tensor) for v in graph.values())
    probs = out.probabilities.values
    assert probs.shape == (37, 2) and list(out.output.values) == ["single", "other"]
    assert np.allclose(probs, _loop([model], stack), atol=1e-6)
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-6)
    out.probabilities.values  # a second computation must not reload
    weights = str((tmp_path / "m.pt").resolve())
    loads = client.run(_loads_on_worker, weights)
    assert sorted(loads.values()) == [1, 1]


def _loads_on_worker(weights):
    from diffdask.ml.inference import LOADS as worker_loads  # the worker's own counter

    return worker_loads[weights]


def test_ensembles_and_mirroring_are_exact_averages(tmp_path, stack):
    models = [_tiny_classifier(tmp_path / f"m{i}", seed=i) for i in range(3)]
    paths = [tmp_path / f"m{i}.pt" for i in range(3)]
    ensemble = predict(stack, paths, mirror=True).probabilities.values
    assert np.allclose(ensemble, _loop(models, stack, mirror=True), atol=1e-6)
    single = predict(stack, paths[0], mirror=True).probabilities.values
    assert not np.allclose(single, ensemble)


def test_weights_round_trip_and_unsafe_or_broken_files_are_refused(tmp_path):
    model = MLPHead(5, 3, hidden=(7,))
    save_model(model, tmp_path / "head", ModelSpec("MLPHead", {"in_features": 5, "out_features": 3, "hidden": [7]},
                                                   kind="regressor", outputs=["a", "b", "c"]))
    back, spec = load_model(tmp_path / "head.pt")
    for a, b in zip(model.state_dict().values(), back.state_dict().values()):
        assert torch.equal(a, b)
    assert spec.kind == "regressor" and spec.outputs == ["a", "b", "c"]

    # The sidecar pins every constructor argument, defaults included, and rebuilds that network.
    regressor = GeometryRegressor(width=8, blocks_per_stage=(1, 1), coordinates=False)
    save_model(regressor, tmp_path / "geo", ModelSpec("GeometryRegressor", {"width": 8, "blocks_per_stage": [1, 1],
                                                                           "coordinates": False}, kind="regressor"))
    kwargs = json.loads((tmp_path / "geo.json").read_text())["kwargs"]
    assert kwargs["n_outputs"] == 4 and kwargs["in_channels"] == 1 and kwargs["coordinates"] is False
    x = torch.rand(2, 1, 32, 32)
    with torch.inference_mode():
        assert torch.equal(load_model(tmp_path / "geo.pt")[0].eval()(x), regressor.eval()(x))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"weight": Evil()}, tmp_path / "evil.pt")
    (tmp_path / "evil.json").write_text((tmp_path / "head.json").read_text())
    with pytest.raises(ModelFileError, match="pickled"):
        load_model(tmp_path / "evil.pt")
    # Random bytes are called what they are: not a weights file (not "pickled objects").
    (tmp_path / "noise.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "noise.json").write_text((tmp_path / "head.json").read_text())
    with pytest.raises(ModelFileError, match="not a torch weights file"):
        load_model(tmp_path / "noise.pt")
    (tmp_path / "half.pt").write_bytes((tmp_path / "head.pt").read_bytes()[:200])
    (tmp_path / "half.json").write_text((tmp_path / "head.json").read_text())
    with pytest.raises(ModelFileError, match="cannot be read|not a torch"):
        load_model(tmp_path / "half.pt")
    (tmp_path / "head.json").write_text((tmp_path / "head.json").read_text().replace('"out_features": 3', '"out_features": 4'))
    with pytest.raises(ModelFileError, match="do not fit"):
        load_model(tmp_path / "head.pt")
    with pytest.raises(dd.StoreNotFoundError, match="missing"):
        load_model(tmp_path / "nothing.pt")


def test_wrong_input_shapes_and_options_are_clear_errors(tmp_path, stack):
    _tiny_classifier(tmp_path / "m", seed=0, crop=None)
    with pytest.raises(dd.SchemaError, match="trained on 24×12 patches but these 30×20 frames"):
        predict(stack, tmp_path / "m.pt")
    _tiny_classifier(tmp_path / "ok", seed=0)
    with pytest.raises(dd.ParameterError, match="batch_size"):
        predict(stack, tmp_path / "ok.pt", batch_size=0)
    with pytest.raises(dd.StoreNotFoundError):
        predict(stack, tmp_path / "absent.pt")
    if not torch.cuda.is_available():
        with pytest.raises(dd.ParameterError, match="CUDA"):
            predict(stack, tmp_path / "ok.pt", device="cuda").probabilities.values
    with pytest.raises(dd.ParameterError):
        Preprocess(scale="cube")


def test_preprocess_crops_around_the_beam_and_pads():
    block = np.arange(2 * 6 * 8, dtype=float).reshape(2, 6, 8)
    out = Preprocess(crop=(4, 4), scale="none", normalize="none").apply(block, np.ones((6, 8), bool), (1.0, 6.2))
    assert out.shape == (2, 1, 4, 4)
    # centre (1, 6) → rows −1..2, columns 4..7: the first row is padding
    assert np.array_equal(out[0, 0, 0], np.zeros(4)) and np.array_equal(out[0, 0, 1:], block[0, 0:3, 4:8])


# ----------------------------------------------------------------- training
def _streaks(n: int, seed: int):
    """Positives: a horizontal streak through the centre; negatives: a vertical one (Poisson)."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.3
    base = np.full((n, 30, 20), 0.3)
    for i in range(n):
        if y[i]:
            base[i, 13:17, :] += 6
        else:
            base[i, :, 8:12] += 6
    frames = rng.poisson(base).astype("uint16")
    return dd.make_frame_stack(frames, per_frame={"single_hit": y}, chunks=50)


def _config(**changes):
    from diffdask.ml.augment import Augment
    from diffdask.ml.train import TrainConfig

    base = dict(arch_kwargs={"width": 4, "blocks_per_stage": [1, 1]},
                preprocess=Preprocess(crop=(24, 12), scale="log1p", normalize="max"),
                positive_fraction=0.5, steps=60, batch_size=16, learning_rate=3e-3, k_folds=2,
                augment=Augment(p_rotate=0.3, max_rotate_deg=10, p_noise=0.3), checkpoint_every=10, seed=4)
    base.update(changes)
    return TrainConfig(**base)


def test_a_tiny_classifier_learns_a_separable_task(tmp_path):
    from diffdask.ml.train import ensemble_paths, train_classifier

    result = train_classifier(_streaks(160, 0), "single_hit", str(tmp_path / "hits"), _config())
    assert len(result.models) == 2 and result.mean_f1 >= 0.9, result.folds
    test = _streaks(80, 1)
    probs = predict(test, ensemble_paths(str(tmp_path / "hits")), mirror=True).probabilities.values
    assert ((probs[:, 0] >= 0.5) == test.single_hit.values).mean() >= 0.95


def test_training_is_seeded_and_resumes_to_the_same_weights(tmp_path):
    from diffdask.ml.train import train_classifier

    ds = _streaks(60, 2)
    config = _config(steps=20, k_folds=2)
    train_classifier(ds, "single_hit", str(tmp_path / "a"), config)
    train_classifier(ds, "single_hit", str(tmp_path / "b"), config)

    def interrupt(step, total, loss):
        if step == 13:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_classifier(ds, "single_hit", str(tmp_path / "c"), config, progress=interrupt)
    train_classifier(ds, "single_hit", str(tmp_path / "c"), config)
    for k in range(2):
        a, _ = load_model(tmp_path / "a" / f"fold_{k}" / "model.pt")
        for other in ("b", "c"):
            b, _ = load_model(tmp_path / other / f"fold_{k}" / "model.pt")
            for ta, tb in zip(a.state_dict().values(), b.state_dict().values()):
                assert torch.equal(ta, tb), other


def test_training_refuses_bad_labels(tmp_path):
    from diffdask.ml.train import TrainConfig, train_classifier

    ds = _streaks(40, 3)
    with pytest.raises(dd.SchemaError, match="no per-frame label"):
        train_classifier(ds, "is_single", str(tmp_path), _config())
    one_class = ds.assign(single_hit=("frame", np.ones(40, bool)))
    with pytest.raises(dd.SchemaError, match="single class"):
        train_classifier(one_class, "single_hit", str(tmp_path), _config())
    with pytest.raises(dd.ParameterError):
        TrainConfig(positive_fraction=1.5)
    for net in (HitClassifier, GeometryRegressor):
        with pytest.raises(dd.ParameterError, match="width"):
            net(width=0)
        with pytest.raises(dd.ParameterError, match="blocks_per_stage"):
            net(blocks_per_stage=(2, 0))


def test_a_small_regressor_learns_the_beam_centre(tmp_path):
    from diffdask.ml.train import TrainConfig, train_regressor

    rng = np.random.default_rng(5)
    n = 160
    cy, cx = rng.uniform(10, 20, n), rng.uniform(6, 14, n)
    yy, xx = np.mgrid[:30, :20]
    frames = np.stack([rng.poisson(0.2 + 20 * np.exp(-((yy - a) ** 2 + (xx - b) ** 2) / 4)) for a, b in zip(cy, cx)])
    ds = dd.make_frame_stack(frames.astype("uint16"), per_frame={"beam_center_y": cy, "beam_center_x": cx})
    config = TrainConfig(architecture="GeometryRegressor", arch_kwargs={"width": 8, "blocks_per_stage": [1, 1]},
                         preprocess=Preprocess(scale="sqrt", normalize="max"), steps=250, batch_size=32,
                         learning_rate=3e-3, augment=None, seed=1)
    result = train_regressor(ds, ["beam_center_y", "beam_center_x"], str(tmp_path / "geo"), config)
    spread = np.array([cy.std(), cx.std()])
    assert all(np.array(list(result["mae"].values())) < 0.35 * spread), result["mae"]
    out = predict(ds, result["model"]).predictions
    assert list(out.output.values) == ["beam_center_y", "beam_center_x"]
    assert np.abs(out.values[:, 0] - cy).mean() < 0.35 * spread[0]


def test_train_and_predict_commands(cluster, tmp_path):
    from click.testing import CliRunner

    from diffdask.cli import main
    from diffdask.io import open_results, save_frames

    save_frames(_streaks(60, 7), tmp_path / "hits.zarr")
    runner = CliRunner()
    result = runner.invoke(main, ["train", "hits", str(tmp_path / "hits.zarr"), "--out", str(tmp_path / "ens"),
                                  "--steps", "5", "--folds", "2", "--crop", "24", "12",
                                  "--scheduler", cluster.scheduler_address])
    assert result.exit_code == 0, result.output
    assert "fold 1" in result.output and len(list((tmp_path / "ens").glob("fold_*/model.pt"))) == 2
    result = runner.invoke(main, ["predict", str(tmp_path / "hits.zarr"), "--model", str(tmp_path / "ens"), "--mirror",
                                  "--scheduler", cluster.scheduler_address])
    assert result.exit_code == 0, result.output
    probs = open_results(tmp_path / "hits.zarr", "predict").probabilities.values
    assert probs.shape == (60, 2) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    result = runner.invoke(main, ["predict", str(tmp_path / "hits.zarr"), "--model", str(tmp_path / "none")])
    assert result.exit_code == 2
