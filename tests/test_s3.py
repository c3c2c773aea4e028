"""Stores on object storage: S3 round trips and resumable region writes against a local moto server."""

from __future__ import annotations

import dask
import numpy as np
import pytest
import zarr

import diffdask as dd
from diffdask.io import open_frames, open_results, save_frames, save_results, store_info

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with one bucket; yields fsspec storage options."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "us-east-1"},
    }
    import boto3

    boto3.client(
        "s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    ).create_bucket(Bucket="diffdask-test")
    yield options
    server.stop()


def test_round_trip_through_s3_on_a_cluster(client, s3, photon_stack):
    url = "s3://diffdask-test/run.zarr"
    out = save_frames(photon_stack, url, batch_frames=16, storage_options=s3)
    assert np.array_equal(out.frames.values, photon_stack.frames.values)
    back = open_frames(url, **s3)
    for name in ("frames", "mask", "label", "orientation"):
        assert np.array_equal(back[name].values, photon_stack[name].values), name
    assert dd.get_geometry(back) == dd.get_geometry(photon_stack)
    info = store_info(url, **s3)
    assert info["n_frames"] == 70 and info["compression_ratio"] > 3
    total = back.frames.sum(dim=("y", "x")).rename("total")
    save_results(total, url, "total", storage_options=s3)
    assert np.array_equal(open_results(url, "total", **s3).total.values, photon_stack.frames.values.sum(axis=(1, 2)))


def test_interrupted_s3_write_resumes_to_identical_objects(s3, photon_stack):
    stack = photon_stack.chunk({"frame": 10})
    ref, job = "s3://diffdask-test/ref.zarr", "s3://diffdask-test/job.zarr"
    save_frames(stack, ref, batch_frames=10, storage_options=s3)

    def fail(block, block_info=None):
        if block_info[0]["chunk-location"][0] == 4:
            raise RuntimeError("lost connection to the detector")
        return block

    broken = stack.assign(frames=(stack.frames.dims, stack.frames.data.map_blocks(fail, dtype=stack.frames.dtype)))
    # One thread, so no batch is still in flight when the failure stops the job and the count of
    # finished batches is the same on every run.
    with dask.config.set(scheduler="synchronous"), pytest.raises(RuntimeError, match="lost connection"):
        save_frames(broken, job, batch_frames=10, storage_options=s3)
    with pytest.raises(dd.IncompleteStoreError):
        open_frames(job, **s3)
    done = zarr.open_array(job, path="_diffdask/done", mode="r", storage_options=s3)[:]
    assert done[4] == -1
    resumed = save_frames(stack, job, batch_frames=10, storage_options=s3, compute=False)
    writes = [k for k in dict(resumed.__dask_graph__()) if str(k).startswith("_write_batch")]
    assert len(writes) == int((done < 0).sum()) < done.size
    dask.compute(resumed)
    fs = s3fs.S3FileSystem(**s3)
    fs.invalidate_cache()
    objects = sorted(p.split("/", 2)[2] for p in fs.find("diffdask-test/ref.zarr"))
    assert objects == sorted(p.split("/", 2)[2] for p in fs.find("diffdask-test/job.zarr"))
    for key in objects:
        assert fs.cat(f"diffdask-test/ref.zarr/{key}") == fs.cat(f"diffdask-test/job.zarr/{key}"), key


def test_object_storage_without_credentials_is_a_clear_error(s3, photon_stack, monkeypatch, tmp_path):
    # No key anywhere botocore looks (and no instance-metadata lookup: only loopback traffic).
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    anonymous = {"client_kwargs": s3["client_kwargs"]}
    url = "s3://diffdask-test/no-credentials.zarr"
    with pytest.raises(dd.StoreNotFoundError, match="needs credentials"):
        open_frames(url, **anonymous)
    with pytest.raises(dd.StoreNotFoundError, match="AWS_ACCESS_KEY_ID"):
        save_frames(photon_stack, url, storage_options=anonymous)
