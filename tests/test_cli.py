"""The diffdask command, run as a user would (ingest, info, errors) against a real cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
from click.testing import CliRunner

import diffdask as dd
from diffdask.cli import main
from diffdask.demo import write_demo_cxi
from diffdask.io import open_frames


def test_ingest_and_info_on_a_scheduler(cluster, tmp_path):
    write_demo_cxi(str(tmp_path / "run.cxi"), n_frames=40, shape=(32, 32), seed=3)
    runner = CliRunner()
    result = runner.invoke(
        main,
        ["ingest", str(tmp_path / "run.cxi"), str(tmp_path / "run.zarr"), "--batch-frames", "16",
         "--per-frame", "diameter_nm=entry_1/sample_1/diameter_nm", "--scheduler", cluster.scheduler_address],
    )
    assert result.exit_code == 0, result.output
    assert "Dask dashboard" in result.output and "ingested 40 frames" in result.output
    with h5py.File(tmp_path / "run.cxi") as f:
        raw = f["entry_1/data_1/data"][()]
        diameters = f["entry_1/sample_1/diameter_nm"][()]
    ds = open_frames(tmp_path / "run.zarr")
    assert np.array_equal(ds.frames.values, raw) and np.array_equal(ds.diameter_nm.values, diameters)
    assert ((55 <= diameters) & (diameters <= 84)).all()

    info = runner.invoke(main, ["info", str(tmp_path / "run.zarr"), "--json"])
    assert info.exit_code == 0, info.output
    meta = json.loads(info.output)
    assert meta["n_frames"] == 40 and meta["frame_shape"] == [32, 32] and meta["batch_frames"] == 16
    assert meta["per_frame"] == {"diameter_nm": {"dims": ["frame"], "dtype": "float64"}}
    assert meta["geometry"]["wavelength_m"] == dd.get_geometry(ds).wavelength_m
    table = runner.invoke(main, ["info", str(tmp_path / "run.zarr")])
    assert table.exit_code == 0 and "compression" in table.output and "diameter_nm" in table.output


def test_demo_data_is_seeded_and_per_frame_deterministic(tmp_path):
    write_demo_cxi(str(tmp_path / "a.cxi"), n_frames=12, shape=(32, 32), seed=9, block=5)
    write_demo_cxi(str(tmp_path / "b.cxi"), n_frames=12, shape=(32, 32), seed=9, block=12)
    with h5py.File(tmp_path / "a.cxi") as a, h5py.File(tmp_path / "b.cxi") as b:
        assert np.array_equal(a["entry_1/data_1/data"][()], b["entry_1/data_1/data"][()])
        assert a["entry_1/data_1/data"][()].sum() > 12 * 100  # real photons, not an empty file


def test_errors_are_one_clear_line_with_exit_status_2(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["info", str(tmp_path / "missing.zarr")])
    assert result.exit_code == 2 and "error:" in result.output and "Traceback" not in result.output
    (tmp_path / "x.h5").write_text("nope")
    result = runner.invoke(main, ["ingest", str(tmp_path / "x.h5"), str(tmp_path / "o.zarr")])
    assert result.exit_code == 2 and "not an HDF5 file" in result.output
    result = runner.invoke(main, ["ingest", str(tmp_path / "x.h5"), str(tmp_path / "o.zarr"), "--per-frame", "oops"])
    assert result.exit_code == 2 and "NAME=PATH" in result.output


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "diffdask.cli", "--help"], capture_output=True, text=True, check=True)
    assert "ingest" in out.stdout and "info" in out.stdout


def test_readme_quick_start_runs(cluster, tmp_path, monkeypatch):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = readme.split("## Quick start (Python)")[1].split("```python")[1].split("```")[0]
    write_demo_cxi(str(tmp_path / "run.cxi"), n_frames=30, shape=(32, 32), seed=1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIFFDASK_SCHEDULER", cluster.scheduler_address)
    exec(compile(code, "README.md", "exec"), {})
    with h5py.File(tmp_path / "run.cxi") as f:
        raw, bad = f["entry_1/data_1/data"][()], f["entry_1/instrument_1/detector_1/mask"][()] != 0
    stored = open_frames(tmp_path / "run.zarr")
    assert np.array_equal(stored.frames.values, raw)
    from diffdask.io import open_results

    expected = np.where(bad[None], 0, raw).sum(axis=(1, 2))
    assert np.array_equal(open_results(tmp_path / "run.zarr", "total").total.values, expected)


def test_ingest_overwrite_into_a_users_directory_deletes_nothing(tmp_path):
    """The reported data loss: `ingest run.cxi SOME_DIR --overwrite` emptied SOME_DIR."""
    write_demo_cxi(str(tmp_path / "run.cxi"), n_frames=8, shape=(16, 16), seed=1)
    users = tmp_path / "scratch"
    users.mkdir()
    (users / "analysis.py").write_text("print('mine')")
    result = CliRunner().invoke(main, ["ingest", str(tmp_path / "run.cxi"), str(users), "--overwrite"])
    assert result.exit_code == 2 and "not a diffdask store" in result.output, result.output
    assert "Traceback" not in result.output and "--overwrite" not in result.output.split("error:")[-1]
    assert sorted(p.name for p in users.iterdir()) == ["analysis.py"]
    assert (users / "analysis.py").read_text() == "print('mine')"


def test_a_damaged_store_is_one_line_and_debug_keeps_the_traceback(tmp_path):
    write_demo_cxi(str(tmp_path / "run.cxi"), n_frames=20, shape=(16, 16), seed=2)
    runner = CliRunner()
    store = tmp_path / "run.zarr"
    assert runner.invoke(main, ["ingest", str(tmp_path / "run.cxi"), str(store), "--batch-frames", "10",
                                "--workers", "1"]).exit_code == 0
    shard = store / "frames" / "c" / "1" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:40])
    result = runner.invoke(main, ["reduce", str(store), "--threshold", "0.5", "--workers", "1"])
    assert result.exit_code == 2, result.output
    assert "frames 10–19" in result.output and "Traceback" not in result.output
    debug = runner.invoke(main, ["--debug", "reduce", str(store), "--threshold", "0.5", "--workers", "1"])
    assert isinstance(debug.exception, dd.StoreFormatError)


def test_info_verify_lists_missing_and_corrupt_shards(tmp_path):
    write_demo_cxi(str(tmp_path / "run.cxi"), n_frames=40, shape=(16, 16), seed=4)
    runner = CliRunner()
    store = tmp_path / "run.zarr"
    args = ["--workers", "1"]
    assert runner.invoke(main, ["ingest", str(tmp_path / "run.cxi"), str(store), "--batch-frames", "10", *args]).exit_code == 0
    clean = runner.invoke(main, ["info", str(store), "--verify", *args])
    assert clean.exit_code == 0 and "4 of 4 shards ok" in clean.output, clean.output
    (store / "frames" / "c" / "1" / "0" / "0").unlink()
    shard = store / "frames" / "c" / "3" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:50])
    result = runner.invoke(main, ["info", str(store), "--verify", "--json", *args])
    assert result.exit_code == 1
    checks = json.loads(result.stdout)["verify"]  # the dashboard line goes to stderr
    assert [c["status"] for c in checks] == ["ok", "missing", "ok", "corrupt"]
    assert checks[1]["frames"] == [10, 19] and checks[3]["frames"] == [30, 39]
