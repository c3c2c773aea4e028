"""Batch pipelines: many inputs, failed inputs reported, done flags, SIGKILL and resume."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import diffdask as dd
from diffdask.cli import main
from diffdask.demo import write_demo_cxi
from diffdask.io import open_frames, open_results
from diffdask.pipeline import load_pipeline, run_pipeline

PIPELINE = """
inputs: archive/run_*.cxi
output: processed/{stem}.zarr
steps:
  - ingest: {batch_frames: 20}
  - reduce: {what: "com,radial,hits", threshold: 0.5, min_lit: 5}
  - emc2d: {classes: 2, rotations: 6, iterations: 2, seed: 3}
"""


def _archive(root: Path, n_inputs: int = 3, broken: bool = False) -> Path:
    (root / "archive").mkdir(parents=True)
    for i in range(n_inputs):
        write_demo_cxi(str(root / "archive" / f"run_{i:02d}.cxi"), n_frames=60, shape=(32, 32), seed=i, block=30)
    if broken:
        data = (root / "archive" / "run_00.cxi").read_bytes()
        (root / "archive" / "run_99.cxi").write_bytes(data[: len(data) // 3])
    (root / "pipeline.yaml").write_text(PIPELINE)
    return root / "pipeline.yaml"


def test_pipeline_processes_inputs_reports_failures_and_skips_done_work(client, tmp_path):
    path = _archive(tmp_path, n_inputs=2, broken=True)
    pipeline = load_pipeline(str(path))
    assert [Path(p).name for p in pipeline.inputs] == ["run_00.cxi", "run_01.cxi", "run_99.cxi"]
    report = run_pipeline(pipeline)
    status = {(Path(r.source).name, r.step): r.status for r in report.steps}
    assert status == {
        ("run_00.cxi", "ingest"): "done", ("run_00.cxi", "reduce"): "done", ("run_00.cxi", "emc2d"): "done",
        ("run_01.cxi", "ingest"): "done", ("run_01.cxi", "reduce"): "done", ("run_01.cxi", "emc2d"): "done",
        ("run_99.cxi", "ingest"): "failed", ("run_99.cxi", "reduce"): "not run", ("run_99.cxi", "emc2d"): "not run",
    }
    summary = open_results(tmp_path / "processed" / "run_00.zarr", "summary")
    assert summary.com_y.shape == (60,) and "hit rate" in next(
        r.message for r in report.steps if r.step == "reduce" and r.status == "done")
    failure = next(r for r in report.steps if r.status == "failed")
    assert "truncated" in failure.message
    assert [Path(p).name for p in report.failed_inputs] == ["run_99.cxi"]
    ds = open_frames(tmp_path / "processed" / "run_01.zarr")
    emc = open_results(tmp_path / "processed" / "run_01.zarr", "emc2d/final")
    assert emc.scale.shape == (60,) and ds.frames.shape == (60, 32, 32)
    again = run_pipeline(load_pipeline(str(path)))
    assert [r.status for r in again.steps if "run_99" not in r.source] == ["skipped"] * 6


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_sigkill_mid_pipeline_then_rerun_matches_an_uninterrupted_run(cluster, tmp_path):
    reference, job = tmp_path / "reference", tmp_path / "job"
    env = dict(os.environ, DIFFDASK_SCHEDULER=cluster.scheduler_address)
    command = [sys.executable, "-m", "diffdask.cli", "run"]
    ref_path, job_path = _archive(reference), _archive(job)
    subprocess.run(command + [str(ref_path)], env=env, check=True, capture_output=True)

    proc = subprocess.Popen(command + [str(job_path)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = job / ".diffdask-pipeline"
    deadline = time.time() + 120
    while time.time() < deadline and not list(state.glob("run_01.cxi/*.json")):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # mid-pipeline: inputs 1 and 2 are not finished
    proc.wait()
    flags = sorted(p.relative_to(state).as_posix() for p in state.rglob("*.json"))
    assert len(flags) < 9
    for flag in flags:  # everything marked done is complete and readable
        source, step = flag.split("/")
        store = job / "processed" / source.replace(".cxi", ".zarr")
        if step.endswith("ingest.json"):
            open_frames(store)
        elif step.endswith("reduce.json"):
            open_results(store, "summary")
        else:
            open_results(store, "emc2d/final")

    rerun = subprocess.run(command + [str(job_path)], env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "skipped" in rerun.stdout
    for i in range(3):
        a, b = reference / "processed" / f"run_{i:02d}.zarr", job / "processed" / f"run_{i:02d}.zarr"
        # Every frame-stack object is identical; the root metadata differs only in the source path.
        frames_a = {k: v for k, v in _tree(a).items() if not k.startswith("results") and k != "zarr.json"}
        frames_b = {k: v for k, v in _tree(b).items() if not k.startswith("results") and k != "zarr.json"}
        assert frames_a == frames_b
        attrs_a, attrs_b = dict(open_frames(a).attrs), dict(open_frames(b).attrs)
        assert attrs_a.pop("source").replace("reference", "job") == attrs_b.pop("source")
        assert attrs_a == attrs_b
        ea, eb = open_results(a, "emc2d/final"), open_results(b, "emc2d/final")
        for name in ("models", "scale", "orientation", "occupancy"):
            assert np.array_equal(ea[name].values, eb[name].values, equal_nan=True), name
        sa, sb = open_results(a, "summary"), open_results(b, "summary")
        for name in sa.data_vars:
            assert np.array_equal(sa[name].values, sb[name].values, equal_nan=True), name


def test_bad_pipelines_are_clear_errors(tmp_path):
    path = _archive(tmp_path, n_inputs=1)
    bad = tmp_path / "bad.yaml"
    bad.write_text(PIPELINE.replace("- emc2d:", "- sharpen:"))
    with pytest.raises(dd.ParameterError, match="unknown step 'sharpen'.*available steps"):
        load_pipeline(str(bad))
    bad.write_text(PIPELINE.replace("batch_frames: 20", "batch_size: 20"))
    with pytest.raises(dd.ParameterError, match="takes"):
        load_pipeline(str(bad))
    bad.write_text(PIPELINE.replace("run_*.cxi", "nothing_*.cxi"))
    with pytest.raises(dd.StoreNotFoundError, match="matches no file"):
        load_pipeline(str(bad))
    with pytest.raises(dd.StoreNotFoundError):
        load_pipeline(str(tmp_path / "missing.yaml"))
    runner = CliRunner()
    t0 = time.time()
    result = runner.invoke(main, ["run", str(path), "--scheduler", "tcp://127.0.0.1:1"])
    assert result.exit_code == 2 and "could not reach" in result.output
    assert time.time() - t0 < 20


def test_predict_step_runs_a_model_over_each_input(client, tmp_path):
    import torch

    from diffdask.ml import HitClassifier, ModelSpec, Preprocess, save_model

    (tmp_path / "archive").mkdir()
    write_demo_cxi(str(tmp_path / "archive" / "run_00.cxi"), n_frames=40, shape=(32, 32), seed=0, block=40)
    torch.manual_seed(0)
    weights = save_model(HitClassifier(width=4, blocks_per_stage=(1,)).eval(), tmp_path / "model",
                         ModelSpec("HitClassifier", {"width": 4, "blocks_per_stage": [1]},
                                   Preprocess(crop=(16, 16)).to_dict(), ["single", "other"], input_shape=[16, 16]))
    (tmp_path / "p.yaml").write_text(f"""
inputs: archive/run_*.cxi
output: out/{{stem}}.zarr
steps:
  - ingest: {{batch_frames: 20}}
  - predict: {{model: {weights}, mirror: true}}
""")
    report = run_pipeline(load_pipeline(str(tmp_path / "p.yaml")))
    assert [r.status for r in report.steps] == ["done", "done"], report.steps
    probs = open_results(tmp_path / "out" / "run_00.zarr", "predict").probabilities.values
    assert probs.shape == (40, 2) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)


def test_roi_step_on_a_simulated_scan_archive(tmp_path):
    from diffdask.io import save_frames

    geometry = dd.Geometry((32, 32), pixel_size_m=75e-6, distance_m=2.0, wavelength_m=1.409e-10)
    (tmp_path / "scans").mkdir()
    scan = dd.simulate_ptycho(400, geometry, probe_diameter_m=0.5e-6, overlap=0.4, coverage=0.3,
                              particle_diameter_m=(3e-6, 5e-6), beta=1e-6, photons_per_frame=1e4, seed=1, chunks=200)
    save_frames(scan, tmp_path / "scans" / "s1.zarr")
    (tmp_path / "p.yaml").write_text("inputs: scans/*.zarr\noutput: scans/{name}\nsteps:\n  - roi: {border: 1}\n")
    report = run_pipeline(load_pipeline(str(tmp_path / "p.yaml")))
    assert [r.status for r in report.steps] == ["done"], report.steps
    roi = open_results(tmp_path / "scans" / "s1.zarr", "roi")
    footprint = scan.in_object.values
    assert (roi.in_roi.values & footprint).sum() >= 0.95 * footprint.sum()


def test_changed_options_and_deleted_outputs_are_recomputed_not_skipped(client, tmp_path):
    """The reported stale flags: a changed threshold or a deleted store was skipped with rc 0."""
    path = _archive(tmp_path, n_inputs=1)
    path.write_text(PIPELINE.replace("  - emc2d: {classes: 2, rotations: 6, iterations: 2, seed: 3}\n", ""))
    store = tmp_path / "processed" / "run_00.zarr"
    first = run_pipeline(load_pipeline(str(path)))
    assert [r.status for r in first.steps] == ["done", "done"]
    assert [r.status for r in run_pipeline(load_pipeline(str(path))).steps] == ["skipped", "skipped"]

    path.write_text(path.read_text().replace("threshold: 0.5", "threshold: 3.5"))
    changed = run_pipeline(load_pipeline(str(path)))
    assert [r.status for r in changed.steps] == ["skipped", "done"]
    assert open_results(store, "summary").attrs["threshold"] == 3.5

    shutil.rmtree(store)
    rebuilt = run_pipeline(load_pipeline(str(path)))
    assert [r.status for r in rebuilt.steps] == ["done", "done"]
    assert open_frames(store).sizes["frame"] == 60
    assert open_results(store, "summary").attrs["threshold"] == 3.5
