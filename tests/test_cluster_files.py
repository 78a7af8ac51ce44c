"""The `ray up` files must pass Ray's own autoscaler schema, and never expose Ray's ports."""
from pathlib import Path

import pytest
import yaml

CLUSTER_FILES = sorted(Path(__file__).resolve().parents[1].glob("cluster/*.yaml"))


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_file_is_valid_for_ray_up(path):
    from ray.autoscaler._private.util import prepare_config, validate_config
    cfg = yaml.safe_load(path.read_text())
    validate_config(prepare_config(cfg))  # raises on any schema violation
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in path.read_text()
    assert any("raydd" in c for c in cfg["setup_commands"])


def test_there_are_cluster_files():
    assert {p.name for p in CLUSTER_FILES} >= {"aws.yaml", "onprem.yaml"}


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_file_turns_token_auth_on_everywhere(path):
    """Ray only authenticates when every process has RAY_AUTH_MODE=token and the same token."""
    cfg = yaml.safe_load(path.read_text())
    mounts = cfg["file_mounts"]
    token = [dst for dst, src in mounts.items() if src == "~/.ray/auth_token"]
    assert len(token) == 1 and token[0].endswith("/.ray/auth_token")
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2
    for c in starts:
        assert c.startswith("export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=~/.ray/auth_token")
        assert "chmod 600 ~/.ray/auth_token" in c
    assert any("RAY_AUTH_MODE=token" in c and ".bashrc" in c for c in cfg["setup_commands"])


def test_local_token_is_made_private(tmp_path, monkeypatch):
    from raydd.raycluster import private_token
    token = tmp_path / "auth_token"
    token.write_text("secret")
    token.chmod(0o644)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    private_token()
    assert token.stat().st_mode & 0o777 == 0o600
    private_token(tmp_path / "absent")   # no token file: nothing to do, no error
