import os

# Keep Ray quiet and small inside the test suite; the machine has 2 cores.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """The embedded digits prepared once as shards (read-only for tests)."""
    from raydd.data import prepare
    out = tmp_path_factory.mktemp("digits")
    prepare("digits", out, workers=1)
    return str(out)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray of 2 CPUs for one test module (modules that need a special one define their own)."""
    import ray

    from raydd.config import RayConfig
    from raydd.raycluster import init_ray
    init_ray(RayConfig(num_cpus=2))
    yield
    ray.shutdown()
