"""Shared fixtures: one data cache and one teacher store per test session, never the home directory.

Teachers are the expensive part of every trial, so the session trains one small mnist1d ensemble
(``base_cfg``) once; every test whose config keeps the same teacher fields reuses its members.
Tests that damage a store work on their own ``TeacherStore(tmp_path)``, never on the shared one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

# The shared ensemble: small enough to train in seconds on two CPU cores, good enough to be well
# above chance on mnist1d.
TEACHER_EPOCHS = 8
TEACHER_MEMBERS = 2


@pytest.fixture(scope="session")
def kd_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kd_ray_session")
    return {"data": root / "data", "teachers": root / "teachers"}


@pytest.fixture(scope="session", autouse=True)
def _kd_env(kd_dirs: dict[str, Path]):
    """KD_RAY_DATA and KD_RAY_TEACHERS point into the session's temporary directory, for this
    process and for every subprocess it starts; torch runs on one thread."""
    import torch

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KD_RAY_DATA", str(kd_dirs["data"]))
        mp.setenv("KD_RAY_TEACHERS", str(kd_dirs["teachers"]))
        # The models here are tiny: a second intra-op thread buys nothing and, on a machine whose
        # cores are busy with other work, makes every step wait for it.
        mp.setenv("OMP_NUM_THREADS", "1")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def base_cfg():
    """A tiny mnist1d trial whose teacher ensemble is the session's shared one."""
    from kd_ray.config import TrialConfig

    return TrialConfig(
        dataset="mnist1d", teacher_epochs=TEACHER_EPOCHS, teacher_members=TEACHER_MEMBERS,
        epochs=2, eval_every=1, device="cpu",
    )


@pytest.fixture(scope="session")
def session_store(kd_dirs: dict[str, Path]):
    from kd_ray.train.teachers import TeacherStore

    return TeacherStore(kd_dirs["teachers"])


@pytest.fixture(scope="session")
def mnist1d_arrays(kd_dirs: dict[str, Path]):
    from kd_ray.data.datasets import load_arrays

    return load_arrays("mnist1d", kd_dirs["data"])


@pytest.fixture(scope="session")
def shared_teacher(base_cfg, session_store, mnist1d_arrays) -> list[str]:
    """Train the shared ensemble into the session store (once); returns its member keys."""
    import torch

    from kd_ray.train.teachers import ensure_members

    return ensure_members(base_cfg, session_store, mnist1d_arrays, torch.device("cpu"))


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory: pytest.TempPathFactory):
    """A real local Ray instance (2 CPUs, no GPU) shared by one test module, shut down after it."""
    import os

    import ray

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        if not os.environ.get("KD_RAY_DATA"):
            mp.setenv("KD_RAY_DATA", str(tmp_path_factory.mktemp("kd_ray_data")))
        ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False)
        try:
            yield ray
        finally:
            ray.shutdown()
