"""Deployment recipes rendered and checked without a cluster (and TLS for real, on loopback)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import diffdask as dd

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))


def test_slurm_job_script_has_gpu_directives_and_lifetimes():
    pytest.importorskip("dask_jobqueue")
    from cluster.slurm.recipe import slurm_cluster

    with slurm_cluster(account="proj", gpus_per_job=2, start=False, scheduler_options={"host": "127.0.0.1"}) as c:
        script = c.job_script()
    assert "#SBATCH --gres=gpu:2" in script and "#SBATCH --gpus-per-task=2" in script
    assert "#SBATCH -A proj" in script and "#SBATCH -p gpu" in script
    assert "--lifetime 3h50m" in script and "--lifetime-stagger 5m" in script
    assert "--resources GPU=2" in script and "export OMP_NUM_THREADS=1" in script
    assert "--preload" not in script  # workers import diffdask's modules as tasks need them


def test_pbs_job_script_requests_gpus():
    pytest.importorskip("dask_jobqueue")
    from cluster.pbs.recipe import pbs_cluster

    with pbs_cluster(account="proj", start=False, scheduler_options={"host": "127.0.0.1"}) as c:
        script = c.job_script()
    assert "#PBS -l select=1:ncpus=8:ngpus=1:mem=64GB" in script
    assert "--lifetime 3h50m" in script


def test_sbatch_script_is_valid_bash_with_gpu_directives():
    text = (ROOT / "cluster" / "slurm" / "diffdask.sbatch").read_text()
    assert "#SBATCH --gres=gpu:4" in text and "--scheduler-file" in text and "diffdask run" in text
    subprocess.run(["bash", "-n", str(ROOT / "cluster" / "slurm" / "diffdask.sbatch")], check=True)


def test_kubernetes_manifest_has_private_scheduler_and_gpu_group():
    docs = list(yaml.safe_load_all((ROOT / "cluster" / "kubernetes" / "daskcluster.yaml").read_text()))
    kinds = [d["kind"] for d in docs]
    assert kinds == ["DaskCluster", "DaskWorkerGroup"]
    cluster, gpu = docs
    assert cluster["spec"]["scheduler"]["service"]["type"] == "ClusterIP"
    ports = {p["port"] for p in cluster["spec"]["scheduler"]["service"]["ports"]}
    assert ports == {8786, 8787}
    assert gpu["spec"]["cluster"] == cluster["metadata"]["name"]
    limits = gpu["spec"]["worker"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    for doc in docs:
        args = doc["spec"]["worker"]["spec"]["containers"][0]["args"]
        assert "--preload" not in args


def test_local_recipe_without_gpu_and_clear_error_when_forced():
    from cluster.local.recipe import local_cluster

    with local_cluster(gpu="auto", n_workers=1, processes=False) as client:
        assert client.submit(sum, [2, 3]).result() == 5
    try:
        import dask_cuda  # noqa: F401
    except ImportError:
        with pytest.raises(dd.BackendError, match="dask-cuda"):
            local_cluster(gpu=True)


def test_gateway_test_server_listens_on_loopback_only():
    text = (ROOT / "cluster" / "gateway" / "gateway_config.py").read_text()
    compile(text, "gateway_config.py", "exec")
    assert 'c.Gateway.address = "127.0.0.1:8000"' in text and 'c.Proxy.address = "127.0.0.1:8001"' in text


def test_docker_image_is_cuda_based():
    text = (ROOT / "cluster" / "docker" / "Dockerfile").read_text()
    assert text.startswith("#") and "FROM nvidia/cuda:12" in text and "diffdask[gpu" in text


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make test certificates")
def test_tls_cluster_on_loopback(tmp_path):
    from cluster.tls.recipe import local_tls_client, security

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=diffdask-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "node.key", "-out", "node.csr", "-subj", "/CN=diffdask")
    run("x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "node.pem", "-days", "2")
    sec = security(str(tmp_path / "ca.pem"), str(tmp_path / "node.pem"), str(tmp_path / "node.key"))
    with local_tls_client(sec, n_workers=1) as client:
        assert client.scheduler.address.startswith("tls://127.0.0.1:")
        assert client.submit(pow, 3, 4).result() == 81


def test_example_pipeline_names_only_known_steps(tmp_path):
    from diffdask.pipeline import available_steps

    spec = yaml.safe_load((ROOT / "cluster" / "pipeline.yaml").read_text())
    names = [next(iter(step)) for step in spec["steps"]]
    assert names and set(names) <= set(available_steps())
