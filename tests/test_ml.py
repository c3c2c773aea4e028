"""Torch inference over partitions: equals a plain loop, loads once per worker, safe weights."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

import diffdask as dd
from diffdask.ml import (
    HitClassifier,
    ModelFileError,
    ModelSpec,
    MLPHead,
    Preprocess,
    load_model,
    predict,
    save_model,
)


def _tiny_classifier(path, seed: int, crop=(24, 12)) -> HitClassifier:
    torch.manual_seed(seed)
    model = HitClassifier(width=4, blocks_per_stage=(1, 1))
    spec = ModelSpec("HitClassifier", {"width": 4, "blocks_per_stage": [1, 1]},
                     Preprocess(crop=crop, scale="log1p", normalize="max").to_dict(), ["single", "other"])
    model.eval()
    save_model(model, path, spec)
    return model


@pytest.fixture(autouse=True)
def small_input(monkeypatch):
    # Tests run small nets on 24×12 patches instead of the paper's 192×96.
    monkeypatch.setattr(HitClassifier, "input_shape", (24, 12))


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
                p = (p + torch.softmax(m(torch.flip(x, dims=(-1,))), dim=1)) / 2
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

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"weight": Evil()}, tmp_path / "evil.pt")
    (tmp_path / "evil.json").write_text((tmp_path / "head.json").read_text())
    with pytest.raises(ModelFileError, match="pickled"):
        load_model(tmp_path / "evil.pt")
    (tmp_path / "head.json").write_text((tmp_path / "head.json").read_text().replace('"out_features": 3', '"out_features": 4'))
    with pytest.raises(ModelFileError, match="do not fit"):
        load_model(tmp_path / "head.pt")
    with pytest.raises(dd.StoreNotFoundError, match="missing"):
        load_model(tmp_path / "nothing.pt")


def test_wrong_input_shapes_and_options_are_clear_errors(tmp_path, stack):
    _tiny_classifier(tmp_path / "m", seed=0, crop=(20, 12))
    with pytest.raises(dd.SchemaError, match="24×12"):
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
