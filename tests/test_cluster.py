"""Cluster: the environment of worker processes, on the local cluster and in the image's Dask config."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from genre_batch.cluster import WORKER_ENVIRON

ROOT = Path(__file__).resolve().parents[1]


def test_local_cluster_workers_get_the_worker_environ(dask_scheduler: str) -> None:
    """Each worker process of the local cluster runs with WORKER_ENVIRON's malloc thresholds, not Dask's default."""
    from distributed import Client

    with Client(dask_scheduler, timeout="20s") as client:
        seen = client.run(lambda: {name: os.environ.get(name) for name in WORKER_ENVIRON})
    assert len(seen) == 2
    assert all(env == {name: str(value) for name, value in WORKER_ENVIRON.items()} for env in seen.values()), seen


def test_image_dask_config_sets_the_same_worker_environ() -> None:
    """docker/dask.yaml, copied to /etc/dask by the Dockerfile, gives external workers the same environment."""
    config = yaml.safe_load((ROOT / "docker" / "dask.yaml").read_text())
    assert config["distributed"]["nanny"]["pre-spawn-environ"] == WORKER_ENVIRON
    assert "COPY docker/dask.yaml /etc/dask/dask.yaml" in (ROOT / "docker" / "Dockerfile").read_text().splitlines()
