"""The /dev/shm check before training: Docker's 64 MB against the loader workers' batches, and the
advice in its message (each way out it names passes the same check)."""

from __future__ import annotations

import re

import pytest

from segstudy.config_profiles import load_config
from segstudy.data.shared_memory import check_shared_memory, loader_shm_bytes
from segstudy.errors import UserError

DOCKER_SHM = 64 * 2**20  # what a container gets without --ipc=host or --shm-size


@pytest.fixture
def full(monkeypatch):
    monkeypatch.setenv("CITYSCAPES_ROOT", "/data/cityscapes")
    return lambda **overrides: load_config("full", overrides)


@pytest.mark.parametrize("gpus", [1, 4])
def test_docker_default_shm_is_refused_with_advice_that_works(full, tmp_path, gpus):
    cfg = full(**{"train.gpus": gpus})
    with pytest.raises(UserError) as caught:
        check_shared_memory(cfg, tmp_path, size=DOCKER_SHM)
    message = str(caught.value)
    assert "\n" not in message and f"{tmp_path} has 64 MiB free" in message
    assert "data.num_workers = 8" in message and "docker run --ipc=host" in message
    shm_gib = int(re.search(r"--shm-size=(\d+)g", message)[1])
    check_shared_memory(cfg, tmp_path, size=shm_gib * 2**30)  # the size it names is enough
    assert shm_gib * 2**30 - loader_shm_bytes(cfg) <= 2 * 2**30  # and not much more than needed
    workers = int(re.search(r"--set data\.num_workers=(\d+)$", message)[1])
    check_shared_memory(full(**{"train.gpus": gpus, "data.num_workers": workers}), tmp_path, size=DOCKER_SHM)


def test_the_fewer_workers_advised_are_the_most_that_fit(full, tmp_path):
    cfg = full()
    size = loader_shm_bytes(cfg, num_workers=3)  # room for 3 workers' batches, not 4
    with pytest.raises(UserError, match=r"--set data\.num_workers=3$"):
        check_shared_memory(cfg, tmp_path, size=size)
    check_shared_memory(full(**{"data.num_workers": 3}), tmp_path, size=size)


def test_full_resolution_validation_batches_set_the_need(full):
    """Per process: (8 workers x 2 prefetched + 1 read) batches of its share of the 8 validation images
    at 1024x2048 (the shorter side data.base_size), float32 RGB + int64 labels: 20 B a pixel. The
    training's crops (its share of 8 crops of 512 x 1024) are 4x smaller and do not count."""
    assert loader_shm_bytes(full()) == 17 * 8 * 1024 * 2048 * 20  # 5.3 GiB
    assert loader_shm_bytes(full(**{"train.gpus": 4})) == 4 * 17 * 2 * 1024 * 2048 * 20  # 5.3 GiB
    small_eval = full(**{"data.base_size": 256})  # now the training batches are the larger
    assert loader_shm_bytes(small_eval) == 17 * 8 * 512 * 1024 * 20


def test_nothing_to_check_without_workers_or_without_the_folder(full, tmp_path):
    check_shared_memory(full(**{"data.num_workers": 0}), tmp_path, size=0)
    check_shared_memory(full(), tmp_path / "no-shm-here", size=0)  # macOS: no /dev/shm


def test_a_folder_with_room_passes_as_it_is(tmp_path):
    """shutil.disk_usage of a real folder: the smoke profile's one worker needs a few MB."""
    cfg = load_config("smoke", {"data.num_workers": 1})
    assert 0 < loader_shm_bytes(cfg) < 2**20
    check_shared_memory(cfg, tmp_path)
