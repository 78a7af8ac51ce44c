"""The cluster files: the `ray up` files pass Ray's own autoscaler schema, the KubeRay manifests
hold what KubeRay needs, every node authenticates with the token, Ray's ports stay private, the
shared filesystem reaches every container, and the cluster configs fill the nodes with the paper's
settings. No cluster is started."""
import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest
import ray
import yaml

from raydd.config import load_config
from raydd.config.load import flatten

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_FILES = sorted(ROOT.glob("cluster/*.yaml"))
KUBERAY = ROOT / "cluster" / "kuberay"
CLUSTER_CONFIGS = sorted(ROOT.glob("configs/cluster_*.yaml"))
DOC = ROOT / "docs" / "clusters.md"
MOUNT = "/mnt/shared"
PY = f"py{sys.version_info.major}{sys.version_info.minor}"
IMAGE = f"rayproject/ray:{ray.__version__}-{PY}"   # the Ray and Python that submit the jobs
# The shared filesystem each `ray up` file mounts: a fragment of its mount command.
SHARED_FS = {"aws.yaml": "-t nfs4 -o nfsvers=4.1", "gcp.yaml": "-t nfs", "azure.yaml": "vers=4,minorversion=1",
             "onprem.yaml": "-t nfs"}
# What a GPU worker brings where Ray detects it from the instance type (AWS).
INSTANCE_RESOURCES = {"g5.2xlarge": {"CPU": 8, "GPU": 1}}


def _load(path):
    return yaml.safe_load(path.read_text())


def _starts(cfg):
    return [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_file_is_valid_for_ray_up(path):
    from ray.autoscaler._private.util import prepare_config, validate_config
    cfg = _load(path)
    validate_config(prepare_config(cfg))  # raises on any schema violation
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in path.read_text()
    assert any("raydd" in c for c in cfg["setup_commands"])


def test_there_are_cluster_files():
    assert {p.name for p in CLUSTER_FILES} == set(SHARED_FS)
    assert {p.name for p in KUBERAY.glob("*.yaml")} >= {"raycluster.yaml", "rayjob.yaml", "shared.yaml"}


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_file_turns_token_auth_on_everywhere(path):
    """Ray only authenticates when every process has RAY_AUTH_MODE=token and the same token."""
    cfg = _load(path)
    mounts = cfg["file_mounts"]
    token = [dst for dst, src in mounts.items() if src == "~/.ray/auth_token"]
    assert len(token) == 1 and token[0].endswith("/.ray/auth_token")
    starts = _starts(cfg)
    assert len(starts) == 2
    for c in starts:
        assert c.startswith("export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=~/.ray/auth_token")
        assert "chmod 600 ~/.ray/auth_token" in c
    assert any("RAY_AUTH_MODE=token" in c and ".bashrc" in c for c in cfg["setup_commands"])


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_ray_ports_stay_private(path):
    """Dashboard on loopback, no unauthenticated Prometheus endpoint, no firewall rule for a Ray port."""
    cfg = _load(path)
    for c in _starts(cfg):
        env = c.split("&&")[0]
        assert "RAY_enable_metrics_collection=0" in env and "--disable-usage-stats" in c
        assert "--ray-client-server-port" not in c and "--metrics-export-port" not in c
    rules = cfg["provider"].get("security_group", {}).get("IpPermissions", [])
    assert all(r.get("FromPort") == r.get("ToPort") == 22 for r in rules), rules
    assert "Ray Client (10001)" in path.read_text()   # the file says why it stays on


def test_ray_client_cannot_be_switched_off():
    """Ray Client's server starts on the head whenever grpc imports, and `ray start` takes no port
    that turns it off; the files keep it unpublished instead. Once Ray accepts 0 here, turn it off."""
    from ray._private.parameter import RayParams
    from ray._private.utils import get_ray_client_dependency_error
    assert get_ray_client_dependency_error() is None
    with pytest.raises(ValueError, match="ray_client_server_port"):
        RayParams(ray_client_server_port=0)


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_shared_filesystem_reaches_every_container(path):
    cfg = _load(path)
    init = cfg.get("initialization_commands", [])
    mount = [c for c in init if re.search(rf"\bmount\b.* {MOUNT}\)?$", c)]
    assert len(mount) == 1 and SHARED_FS[path.name] in mount[0], init
    assert f"mountpoint -q {MOUNT} ||" in mount[0]   # idempotent: `ray up` runs it again
    assert any(f"{MOUNT}/runs" in c and "chown" in c for c in init)
    assert f"test -w {MOUNT}/runs" in " ".join(cfg["setup_commands"])
    if "docker" in cfg:
        assert f"-v {MOUNT}:{MOUNT}" in cfg["docker"]["run_options"]
        assert cfg["docker"]["image"] == f"{IMAGE}-gpu"
    assert cfg.get("rsync_filter") == [".gitignore"]   # data/ and runs/ are not copied to every node


def _gpu_workers(cfg):
    """(CPU, GPU) of each `ray up` worker type that has a GPU."""
    out = []
    for name, nt in cfg.get("available_node_types", {}).items():   # onprem: your machines, your sizes
        if name == cfg["head_node_type"]:
            continue
        res = nt["resources"] or INSTANCE_RESOURCES[nt["node_config"]["InstanceType"]]
        if res.get("GPU", 0):
            out.append((res["CPU"], res["GPU"]))
    return out


def test_local_token_is_made_private(tmp_path, monkeypatch):
    from raydd.raycluster import private_token
    token = tmp_path / "auth_token"
    token.write_text("secret")
    token.chmod(0o644)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    private_token()
    assert token.stat().st_mode & 0o777 == 0o600
    private_token(tmp_path / "absent")   # no token file: nothing to do, no error


# ---- KubeRay ---------------------------------------------------------------------------------

def _docs(name):
    return [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]


def _one(name, kind):
    docs = [d for d in _docs(name) if d["kind"] == kind]
    assert len(docs) == 1, f"{name}: expected one {kind}"
    return docs[0]


def _cluster_specs():
    return {"raycluster.yaml": _one("raycluster.yaml", "RayCluster")["spec"],
            "rayjob.yaml": _one("rayjob.yaml", "RayJob")["spec"]["rayClusterSpec"]}


def _pods(spec):
    return [("head", spec["headGroupSpec"]["template"]["spec"])] + \
           [(g["groupName"], g["template"]["spec"]) for g in spec["workerGroupSpecs"]]


def _pvc_mounts(pod):
    """mountPath of each PersistentVolumeClaim the pod's first container mounts, by claim name."""
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", [])
              if "persistentVolumeClaim" in v}
    return {claims[m["name"]]: m["mountPath"] for m in pod["containers"][0].get("volumeMounts", [])
            if m["name"] in claims}


def _version(v):
    return tuple(int(x) for x in v.split(".")[:3])


def test_kuberay_manifests_are_ray_io_v1():
    assert _one("raycluster.yaml", "RayCluster")["apiVersion"] == "ray.io/v1"
    assert _one("rayjob.yaml", "RayJob")["apiVersion"] == "ray.io/v1"
    for name in ("raycluster.yaml", "rayjob.yaml", "shared.yaml"):
        for d in _docs(name):
            assert d["metadata"]["namespace" if d["kind"] != "Namespace" else "name"] == "raydd"


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_cluster_spec(name):
    spec = _cluster_specs()[name]
    # KubeRay's own rule: token auth needs spec.rayVersion >= 2.52.0.
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["rayVersion"] == ray.__version__ and _version(spec["rayVersion"]) >= (2, 52, 0)
    pods = _pods(spec)
    gpu_groups = []
    for group, pod in pods:
        c = pod["containers"][0]
        assert c["image"] == f"{IMAGE}-gpu", (group, c["image"])
        assert {"name": "RAY_enable_metrics_collection", "value": "0"} in c["env"]
        assert "RAY_AUTH_MODE" not in {e["name"] for e in c["env"]}   # the operator sets it with the token
        res = c["resources"]
        if group != "head":
            assert res["requests"] == res["limits"]   # whole CPUs/GPUs: Ray counts the limits
        if int(res["limits"].get("nvidia.com/gpu", 0)) >= 1:
            gpu_groups.append((int(res["limits"]["cpu"]), int(res["limits"]["nvidia.com/gpu"])))
    assert gpu_groups and "nvidia.com/gpu" not in pods[0][1]["containers"][0]["resources"]["limits"]
    for g in spec["workerGroupSpecs"]:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    # The head Service publishes the container's ports: GCS and dashboard, never Ray Client.
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert ports == {"gcs-server": 6379, "dashboard": 8265}


def test_kuberay_shared_volume_is_mounted_alike_everywhere():
    pvc = _one("shared.yaml", "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    claim = pvc["metadata"]["name"]
    pods = [pod for spec in _cluster_specs().values() for _, pod in _pods(spec)]
    pods += [_one("rayjob.yaml", "RayJob")["spec"]["submitterPodTemplate"]["spec"],
             _one("shared.yaml", "Pod")["spec"]]
    assert len(pods) == 6
    for pod in pods:
        assert _pvc_mounts(pod) == {claim: MOUNT}


def test_kuberay_dashboard_stays_private():
    """A RayCluster's dashboard binds to loopback (port-forward reaches it); a RayJob's must listen on
    the pod IP for the operator, so the NetworkPolicy admits only this namespace and the operator."""
    specs = _cluster_specs()
    assert specs["raycluster.yaml"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert specs["rayjob.yaml"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    policy = _one("shared.yaml", "NetworkPolicy")["spec"]
    assert policy["podSelector"] == {"matchLabels": {"app.kubernetes.io/created-by": "kuberay-operator"}}
    assert policy["policyTypes"] == ["Ingress"]
    for rule in policy["ingress"]:
        peers = rule["from"]
        same_namespace = all(set(p) == {"podSelector"} for p in peers)
        assert same_namespace or rule["ports"] == [{"port": 8265, "protocol": "TCP"}], rule


def _runtime_env_pip():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return [d for d in deps if not d.startswith("ray")]


def test_rayjob_runs_raydd_on_the_shared_volume():
    job = _one("rayjob.yaml", "RayJob")["spec"]
    args = _raydd_run(job["entrypoint"])
    assert args.out.is_absolute() and str(args.out).startswith(f"{MOUNT}/runs/")
    env = yaml.safe_load(job["runtimeEnvYAML"])
    assert env["working_dir"] == f"{MOUNT}/raydd"   # uploaded by the submitter, which mounts the volume
    assert env["pip"] == _runtime_env_pip() == yaml.safe_load((KUBERAY / "runtime_env.yaml").read_text())["pip"]
    # KubeRay's rules: a submitter pod template is for K8sJobMode only, and never restarts.
    assert job["submissionMode"] == "K8sJobMode"
    submitter = job["submitterPodTemplate"]["spec"]
    assert submitter["restartPolicy"] == "Never"
    assert submitter["containers"][0]["image"] == IMAGE
    assert job["shutdownAfterJobFinishes"] is True


# ---- raydd's cluster configs -----------------------------------------------------------------

def _raydd_run(command):
    """The `raydd run CONFIG --out DIR` in a command line, parsed by raydd's own CLI; CONFIG must load."""
    from raydd.cli import build_parser
    words = shlex.split(command)
    start = next(i for i, w in enumerate(words) if w == "raydd" and words[i + 1:i + 2] == ["run"])
    args = build_parser().parse_args(words[start + 1:])
    assert (ROOT / args.config).is_file() and args.config.startswith("configs/cluster_")
    load_config(ROOT / args.config)
    return args


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.name)
def test_cluster_config_keeps_the_paper_settings(path):
    """Only where things live and how a node is shared differ from the paper config."""
    cfg = load_config(path)
    paper = load_config(path.with_name(path.name.removeprefix("cluster_")))
    mine, theirs = flatten(cfg.to_dict()), flatten(paper.to_dict())
    changed = {k for k in mine if mine[k] != theirs[k]}
    assert changed - {"name", "data.dir", "ray.address", "evaluate.storage_path"} <= \
        {k for k in changed if ".resources." in k}
    assert cfg.ray.address == "auto"
    assert cfg.data.dir.startswith(f"{MOUNT}/data/") or "://" in cfg.data.dir or cfg.data.dir.startswith("pipe:")
    assert cfg.evaluate.storage_path.startswith(f"{MOUNT}/") or "://" in cfg.evaluate.storage_path


def _stage_resources(cfg):
    return {"teachers": cfg.teachers.resources, "distill": cfg.distill.resources,
            "service": cfg.distill.service.resources, "evaluate": cfg.evaluate.resources}


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.name)
def test_cluster_config_fills_the_gpu_workers(path):
    """Every GPU worker of every cluster file holds several teachers or trials, using all its CPUs
    and its whole GPU; the group worker and its teacher service share one node."""
    nodes = {(c, g) for p in CLUSTER_FILES for c, g in _gpu_workers(_load(p))}
    for spec in _cluster_specs().values():
        for group, pod in _pods(spec)[1:]:
            lim = pod["containers"][0]["resources"]["limits"]
            nodes.add((int(lim["cpu"]), int(lim["nvidia.com/gpu"])))
    assert nodes == {(8, 1)}
    res = _stage_resources(load_config(path))
    for stage in ("teachers", "evaluate"):
        r = res[stage]
        per_gpu, per_cpu = 1 / r.gpus, 8 / r.cpus
        assert per_gpu == per_cpu >= 2 and per_gpu == int(per_gpu), (stage, r)
    pair = (res["distill"].cpus + res["service"].cpus, res["distill"].gpus + res["service"].gpus)
    assert pair[0] <= 8 and pair[1] == 1


# ---- the walk-through ------------------------------------------------------------------------

def _commands(text, markdown=False):
    """Command lines of a doc's code blocks, or of a file's lines and comments; continuations joined."""
    if markdown:
        text = "\n".join(re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M))
    text = re.sub(r"\\\n\s*#?\s*", " ", text)
    return [line.lstrip("# ").strip() for line in text.splitlines()]


def test_doc_walks_through_a_launch():
    lines = _commands(DOC.read_text(), markdown=True)
    for path in CLUSTER_FILES:
        rel = f"cluster/{path.name}"
        assert any(f"ray up {rel}" in c for c in lines) and any(f"ray down {rel}" in c for c in lines)
    needed = ["ray get-auth-token --generate", "ray dashboard cluster/aws.yaml", "ray rsync-down cluster/aws.yaml",
              "kubectl apply -f cluster/kuberay/rayjob.yaml", "kubectl apply -f cluster/kuberay/raycluster.yaml",
              "port-forward", "kubectl delete -f cluster/kuberay/raycluster.yaml"]
    for n in needed:
        assert any(n in c for c in lines), n
    submits = [c for c in lines if "ray job submit" in c]
    assert submits and all("--working-dir ." in c and "RAY_AUTH_MODE=token" in c for c in submits)
    for c in submits:
        _raydd_run(c)


@pytest.mark.parametrize("path", [DOC, *CLUSTER_FILES, *KUBERAY.glob("*.yaml")], ids=lambda p: p.name)
def test_commands_in_files_and_doc_are_current(path):
    """No `ray exec … raydd run` (it dies with the SSH session); pipe: templates use raydd's {name};
    every `raydd run` given names a cluster config that loads."""
    text = path.read_text()
    assert "{shard}" not in text
    for m in re.finditer(r"pipe:[^\"'`\n]*", text):
        assert "{name}" in m.group(0), m.group(0)
    for c in _commands(text, markdown=path.suffix == ".md"):
        assert not ("ray exec" in c and "raydd run" in c), c
        if "raydd run" in c and ("ray job submit" in c or c.startswith("entrypoint:")):
            _raydd_run(c.removeprefix("entrypoint:"))
