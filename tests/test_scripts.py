"""scripts/: the example config, systemd units, the cron line, the Kubernetes manifests (structure checked
the way `kubectl apply --dry-run=client` would, for the fields they use), and release-bump end to end."""

from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import typer
import typer.main
import yaml

import rke2_mirror.jobs.sync as job
from rke2_mirror.cli.app import app
from rke2_mirror.cli.options import parse_shard
from rke2_mirror_testkit.images import list_tags
from rke2_mirror_testkit.release_server import start_release_server

from .test_sync import CORE, NEW, OLD, lists_root, source, write_release  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
K8S = SCRIPTS / "k8s"


def check_sync_args(args: list[str]) -> None:
    """The arguments parse as `rke2-mirror sync` arguments (no unknown option, no missing value)."""
    assert args[0] == "sync", args
    cmd = typer.main.get_command(app).commands["sync"]
    try:
        cmd.make_context("sync", list(args[1:]))
    except typer.TyperException as exc:  # typer's click: NoSuchOption, BadParameter, ...
        pytest.fail(f"rke2-mirror {shlex.join(args)}: {exc}")


# --------------------------------------------------------------------------- example config, README


def test_example_config_is_valid_and_documents_every_key():
    path = SCRIPTS / "examples" / "sync.yaml"
    cfg = job.load_config(path).config
    assert cfg.target.url == "https://harbor.example.com" and cfg.releases[0].channels == ("stable",)
    text = path.read_text()
    # every key of the model appears in the example, commented out or not
    import dataclasses

    def keys(cls):
        for f in dataclasses.fields(cls):
            yield f.name
            t = cls.__annotations__[f.name]
            inner = {"TargetSpec": job.TargetSpec, "SourcesSpec": job.SourcesSpec, "CopySpec": job.CopySpec,
                     "OutputsSpec": job.OutputsSpec, "NodeSpec": job.NodeSpec,
                     "tuple[ReleaseSpec, ...]": job.ReleaseSpec}.get(str(t))
            if inner:
                yield from keys(inner)
    missing = [k for k in keys(job.SyncConfig) if not re.search(rf"^\s*#?\s*-?\s*{k}:", text, re.M)]
    assert not missing, f"keys not shown in {path}: {missing}"


def test_readme_sync_configs_are_valid():
    blocks = re.findall(r"```ya?ml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    configs = [b for b in blocks if re.match(r"(#.*\n)*version: 1\b", b)]
    if not configs:
        pytest.skip("no sync config in the README yet")
    for b in configs:
        job.parse_config(b, "README.md", ROOT)


# --------------------------------------------------------------------------- systemd and cron


def _unit(path: Path) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    cp.optionxform = str  # systemd keys are case-sensitive
    cp.read_string(path.read_text())
    return cp


def test_systemd_units():
    service = _unit(SCRIPTS / "systemd" / "rke2-mirror-sync.service")
    timer = _unit(SCRIPTS / "systemd" / "rke2-mirror-sync.timer")
    assert service["Service"]["Type"] == "oneshot"
    exec_start = shlex.split(service["Service"]["ExecStart"])
    assert exec_start[0].endswith("/rke2-mirror")
    check_sync_args(exec_start[1:])
    assert "3" in service["Service"]["SuccessExitStatus"].split()  # lock held: not a failure
    lock = exec_start[exec_start.index("--lock") + 1]
    assert lock.startswith(f"/run/{service['Service']['RuntimeDirectory']}/")  # writable under ProtectSystem=strict
    assert timer["Timer"]["Unit"] == "rke2-mirror-sync.service" and timer["Install"]["WantedBy"] == "timers.target"
    assert timer["Timer"]["OnCalendar"]
    # what the unit runs and the documentation it names are where the README's "Installing" steps put them
    install = (ROOT / "README.md").read_text().split("## Installing", 1)[1].split("\n## ", 1)[0]
    assert exec_start[0] == "/usr/local/bin/rke2-mirror"
    assert re.search(r"^ln -s\S* /opt/rke2-mirror/bin/rke2-mirror /usr/local/bin/", install, re.M)
    for doc in service["Unit"]["Documentation"].split():
        assert doc.startswith("file:///"), doc
        assert re.search(rf"^install .*README\.md {re.escape(doc[len('file://'):])}$", install, re.M), doc


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path):
    rke2_mirror = Path(shutil.which("rke2-mirror") or ROOT / ".venv" / "bin" / "rke2-mirror")
    if not rke2_mirror.exists():
        pytest.skip("rke2-mirror is not installed")
    for name in ("rke2-mirror-sync.service", "rke2-mirror-sync.timer"):
        text = (SCRIPTS / "systemd" / name).read_text().replace("/usr/local/bin/rke2-mirror", str(rke2_mirror))
        (tmp_path / name).write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", "rke2-mirror-sync.service", "rke2-mirror-sync.timer"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    problems = [l for l in proc.stderr.splitlines() if "rke2-mirror-sync" in l]
    assert proc.returncode == 0 and not problems, proc.stderr
    proc = subprocess.run(["systemd-analyze", "calendar", _unit(tmp_path / "rke2-mirror-sync.timer")["Timer"]["OnCalendar"]],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


_CRON_FIELD = {0: (0, 59), 1: (0, 23), 2: (1, 31), 3: (1, 12), 4: (0, 7)}


def check_cron_field(text: str, lo: int, hi: int) -> None:
    for part in text.split(","):
        base, _, step = part.partition("/")
        assert not step or step.isdigit() and int(step) > 0, text
        if base == "*":
            continue
        a, _, b = base.partition("-")
        for v in (a, b) if b else (a,):
            assert v.isdigit() and lo <= int(v) <= hi, f"{text}: {v} not in {lo}..{hi}"


def test_cron_line():
    lines = [l for l in (SCRIPTS / "cron" / "rke2-mirror-sync").read_text().splitlines()
             if l.strip() and not l.lstrip().startswith("#")]
    jobs_ = [l for l in lines if not re.match(r"^[A-Z_]+=", l)]
    assert len(jobs_) == 1
    fields = jobs_[0].split(None, 6)
    for i in range(5):
        check_cron_field(fields[i], *_CRON_FIELD[i])
    assert fields[5] == "root"  # /etc/cron.d lines name the user
    command = fields[6]
    assert "%" not in command  # cron would turn it into a newline
    proc = subprocess.run(["sh", "-n", "-c", command], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    sync = command[command.index("rke2-mirror sync"):].split(">>")[0]
    check_sync_args(shlex.split(sync)[1:])


# --------------------------------------------------------------------------- Kubernetes

_META = {"name", "namespace", "labels", "annotations", "generateName"}
SCHEMA: dict[str, dict[str, str | None]] = {
    # kind: {field: schema of its value (None: a leaf or a free-form map)}
    "ConfigMap": {"apiVersion": None, "kind": None, "metadata": "ObjectMeta", "data": None, "binaryData": None,
                  "immutable": None},
    "Namespace": {"apiVersion": None, "kind": None, "metadata": "ObjectMeta", "spec": None},
    "Secret": {"apiVersion": None, "kind": None, "metadata": "ObjectMeta", "data": None, "stringData": None,
               "type": None, "immutable": None},
    "CronJob": {"apiVersion": None, "kind": None, "metadata": "ObjectMeta", "spec": "CronJobSpec"},
    "Job": {"apiVersion": None, "kind": None, "metadata": "ObjectMeta", "spec": "JobSpec"},
    "Kustomization": {"apiVersion": None, "kind": None, "namespace": None, "resources": None, "labels": None,
                      "images": None, "configMapGenerator": None, "secretGenerator": None, "patches": None},
    "ObjectMeta": {k: None for k in _META},
    "CronJobSpec": {"schedule": None, "timeZone": None, "concurrencyPolicy": None, "startingDeadlineSeconds": None,
                    "successfulJobsHistoryLimit": None, "failedJobsHistoryLimit": None, "suspend": None,
                    "jobTemplate": "JobTemplateSpec"},
    "JobTemplateSpec": {"metadata": "ObjectMeta", "spec": "JobSpec"},
    "JobSpec": {"completionMode": None, "completions": None, "parallelism": None, "backoffLimit": None,
                "backoffLimitPerIndex": None, "maxFailedIndexes": None, "activeDeadlineSeconds": None,
                "ttlSecondsAfterFinished": None, "suspend": None, "podFailurePolicy": None,
                "template": "PodTemplateSpec"},
    "PodTemplateSpec": {"metadata": "ObjectMeta", "spec": "PodSpec"},
    "PodSpec": {"restartPolicy": None, "automountServiceAccountToken": None, "serviceAccountName": None,
                "securityContext": "PodSecurityContext", "containers": "[Container]", "initContainers": "[Container]",
                "volumes": "[Volume]", "nodeSelector": None, "tolerations": None, "affinity": None,
                "imagePullSecrets": None, "priorityClassName": None, "enableServiceLinks": None},
    "PodSecurityContext": {"runAsNonRoot": None, "runAsUser": None, "runAsGroup": None, "fsGroup": None,
                           "seccompProfile": "SeccompProfile", "supplementalGroups": None},
    "SeccompProfile": {"type": None, "localhostProfile": None},
    "Container": {"name": None, "image": None, "imagePullPolicy": None, "command": None, "args": None,
                  "env": "[EnvVar]", "envFrom": None, "resources": "Resources", "securityContext": "SecurityContext",
                  "volumeMounts": "[VolumeMount]", "workingDir": None},
    "EnvVar": {"name": None, "value": None, "valueFrom": None},
    "Resources": {"requests": None, "limits": None},
    "SecurityContext": {"allowPrivilegeEscalation": None, "readOnlyRootFilesystem": None, "runAsNonRoot": None,
                        "runAsUser": None, "runAsGroup": None, "capabilities": "Capabilities",
                        "seccompProfile": "SeccompProfile", "privileged": None},
    "Capabilities": {"add": None, "drop": None},
    "VolumeMount": {"name": None, "mountPath": None, "readOnly": None, "subPath": None},
    "Volume": {"name": None, "configMap": "ConfigMapVolume", "secret": "SecretVolume", "emptyDir": "EmptyDir"},
    "ConfigMapVolume": {"name": None, "items": "[KeyToPath]", "optional": None, "defaultMode": None},
    "SecretVolume": {"secretName": None, "items": "[KeyToPath]", "optional": None, "defaultMode": None},
    "KeyToPath": {"key": None, "path": None, "mode": None},
    "EmptyDir": {"medium": None, "sizeLimit": None},
}
API_VERSIONS = {"ConfigMap": "v1", "Namespace": "v1", "Secret": "v1", "CronJob": "batch/v1", "Job": "batch/v1",
                "Kustomization": "kustomize.config.k8s.io/v1beta1"}
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def check_fields(value, schema: str, where: str) -> None:
    if schema.startswith("["):
        assert isinstance(value, list), f"{where}: expected a list"
        for i, item in enumerate(value):
            check_fields(item, schema[1:-1], f"{where}[{i}]")
        return
    assert isinstance(value, dict), f"{where}: expected a mapping"
    allowed = SCHEMA[schema]
    for k, v in value.items():
        assert k in allowed, f"{where}: unknown field {k!r} (strict validation would refuse it)"
        if allowed[k]:
            check_fields(v, allowed[k], f"{where}.{k}")


def manifests() -> dict[str, list[dict]]:
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, path
        out[path.name] = docs
    return out


def pod_specs(doc: dict) -> dict:
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


def test_manifests_have_the_structure_kubectl_validates():
    found = manifests()
    assert {"cronjob.yaml", "indexed-job.yaml", "configmap.yaml", "secret.yaml", "namespace.yaml"} <= set(found)
    for name, docs in found.items():
        for doc in docs:
            kind = doc.get("kind")
            assert kind in API_VERSIONS and doc.get("apiVersion") == API_VERSIONS[kind], f"{name}: {kind}"
            check_fields(doc, kind, f"{name}:{kind}")
            if kind != "Kustomization":
                meta_name = doc["metadata"]["name"]
                assert _DNS1123.match(meta_name) and len(meta_name) <= (52 if kind == "CronJob" else 63), meta_name
    kustom = found["kustomization.yaml"][0]
    assert all((K8S / r).is_file() for r in kustom["resources"])


def test_workloads_fit_together():
    found = manifests()
    objects = {(d["kind"], d["metadata"]["name"]): d for docs in found.values() for d in docs if "metadata" in d}
    config_map = objects[("ConfigMap", "rke2-mirror-sync")]
    secret = objects[("Secret", "rke2-mirror-harbor")]
    assert secret["type"] == "kubernetes.io/dockerconfigjson"
    auths = json.loads(secret["stringData"][".dockerconfigjson"])["auths"]
    cfg = job.parse_config(config_map["data"]["sync.yaml"], "configmap.yaml:sync.yaml", Path("/etc/rke2-mirror"))
    assert job.RegistryURL.parse(cfg.target.url).host in auths  # the Secret holds the target's credentials

    cron = objects[("CronJob", "rke2-mirror-sync")]
    s = cron["spec"]
    fields = s["schedule"].split()
    assert len(fields) == 5
    for i, f in enumerate(fields):
        check_cron_field(f, *_CRON_FIELD[i])
    assert s["concurrencyPolicy"] == "Forbid"
    indexed = objects[("Job", "rke2-mirror-sync-sharded")]
    for doc in (cron, indexed):
        pod = pod_specs(doc)
        assert pod["restartPolicy"] in ("Never", "OnFailure")
        (c,) = pod["containers"]
        assert c["image"] and c["command"] == ["rke2-mirror"]
        check_sync_args(c["args"])
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        assert {m["name"] for m in mounts.values()} <= set(volumes), "a mount names a volume that is not there"
        assert len(mounts) == len(c["volumeMounts"])
        # no mount inside a read-only configMap/secret mount (the kubelet cannot create its mount point)
        for a in mounts:
            for b in mounts:
                if a != b and b.startswith(a.rstrip("/") + "/"):
                    assert "emptyDir" in volumes[mounts[a]["name"]], f"{b} is mounted inside {a}"

        def file_in(path: str, kinds=("configMap", "secret")) -> tuple[dict, str] | None:
            for mp, m in mounts.items():
                if path.startswith(mp.rstrip("/") + "/"):
                    vol = volumes[m["name"]]
                    return vol, path[len(mp.rstrip("/")) + 1:]
            return None

        # the config file is the ConfigMap's key
        vol, rel = file_in(c["args"][1])
        assert vol["configMap"]["name"] == "rke2-mirror-sync"
        items = {i["path"]: i["key"] for i in vol["configMap"].get("items", [])}
        assert items.get(rel, rel) in config_map["data"]
        # the credentials file is the Secret's key
        vol, rel = file_in(cfg.target.credentials.file)
        assert vol["secret"]["secretName"] == "rke2-mirror-harbor"
        items = {i["path"]: i["key"] for i in vol["secret"].get("items", [])}
        assert items[rel] in secret["stringData"]
        assert vol["secret"]["defaultMode"] & 0o040, "the file must be readable by the pod's fsGroup"
        # with a read-only root filesystem, the lock and the lists cache must be on writable volumes
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        for path in (cfg.lock, cfg.lists_dir + "/x"):
            vol, _ = file_in(path)
            assert "emptyDir" in vol, path
    # the Indexed Job: shards come from JOB_COMPLETION_INDEX and RKE2_MIRROR_SHARDS = completions
    spec = indexed["spec"]
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] <= spec["completions"]
    (c,) = pod_specs(indexed)["containers"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert int(env["RKE2_MIRROR_SHARDS"]) == spec["completions"] and "--shard" not in c["args"]
    n = spec["completions"]
    assert [parse_shard(None, {"JOB_COMPLETION_INDEX": str(i), **env}) for i in range(n)] == [(i, n) for i in range(n)]


def test_manifests_pass_kubernetes_schema_validation():
    kv = pytest.importorskip("kubernetes_validate")
    for name, docs in manifests().items():
        for doc in docs:
            if doc["kind"] != "Kustomization":
                kv.validate(doc, "1.30", strict=True)


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl not installed")
def test_kustomization_builds():
    proc = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    docs = list(yaml.safe_load_all(proc.stdout))
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "CronJob", "Namespace"]  # the Secret is the operator's
    assert all(d["metadata"].get("namespace") == "rke2-mirror" for d in docs if d["kind"] != "Namespace")
    kustom = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (image,) = kustom["images"]
    (cron,) = [d for d in docs if d["kind"] == "CronJob"]
    assert pod_specs(cron)["containers"][0]["image"] == f"{image['newName']}:{image['newTag']}"


def test_kustomization_keeps_the_real_secret_and_creates_the_namespace():
    """`kubectl apply -k scripts/k8s` after `kubectl create secret ...` (the README's order) must not replace
    the real Secret with a placeholder, and must create the namespace everything goes into."""
    kustom = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = [d for r in kustom["resources"] for d in yaml.safe_load_all((K8S / r).read_text()) if d]
    placeholders = ("CHANGE-ME", "changeme", "example.com")
    for d in listed:
        if d["kind"] == "Secret":
            body = json.dumps({k: d.get(k) for k in ("data", "stringData")})
            assert not any(p in body for p in placeholders), f"kustomization.yaml applies the placeholder Secret {d['metadata']['name']}"
    assert not any(d["kind"] == "Secret" for d in listed), "the credentials Secret is created by the operator, not by apply -k"
    for gen in kustom.get("secretGenerator", []):  # allowed only from local files git does not track
        for f in gen.get("files", []) + gen.get("envs", []):
            path = K8S / f.split("=", 1)[-1]
            ignored = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=ROOT)
            assert ignored.returncode == 0, f"secretGenerator reads {path}, which git would track"
    namespaces = [d for d in listed if d["kind"] == "Namespace"]
    assert [n["metadata"]["name"] for n in namespaces] == [kustom["namespace"]] == ["rke2-mirror"]
    # every manifest applied with `kubectl -n rke2-mirror apply -f` lands in that namespace too
    secret = next(d for d in manifests()["secret.yaml"] if d["kind"] == "Secret")
    assert secret["metadata"].get("namespace") == kustom["namespace"]
    # the README: the namespace comes from `apply -k`, then the Secret is created in it
    readme = (ROOT / "README.md").read_text()
    apply_at = readme.index("kubectl apply -k scripts/k8s")
    create = re.search(r"kubectl -n (\S+) create secret docker-registry rke2-mirror-harbor", readme)
    assert create and create.group(1) == "rke2-mirror" and apply_at < create.start()


def test_containerfile_builds_what_the_manifests_run():
    text = (K8S / "Containerfile").read_text()
    for src in re.findall(r"^COPY (.+) /src", text, re.M):
        for p in src.split():
            assert (ROOT / p).exists(), p
    assert 'ENTRYPOINT ["rke2-mirror"]' in text
    # the manifests run the version this checkout builds
    from rke2_mirror import __version__

    tag = re.search(r"-t (\S+) \.", text).group(1)
    assert tag.endswith(f":{__version__}")
    for name in ("cronjob.yaml", "indexed-job.yaml"):
        (doc,) = manifests()[name]
        assert pod_specs(doc)["containers"][0]["image"] == tag, name
    kustom = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert [f"{i['name']}:{i['newTag']}" for i in kustom["images"]] == [tag]
    assert re.search(r'^rke2-mirror = "rke2_mirror.cli:main"', (ROOT / "pyproject.toml").read_text(), re.M)


# --------------------------------------------------------------------------- release-bump


def git(repo: Path, *args: str) -> str:
    proc = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=repo,
                          capture_output=True, text=True, check=True)
    return proc.stdout


@pytest.fixture
def bump_repo(tmp_path, lists_root):
    """A GitOps-style repository: lists/ with the old release, a sync config pinning it."""
    repo = tmp_path / "repo"
    shutil.copytree(lists_root / "rke2" / OLD, repo / "lists" / "rke2" / OLD)
    git(repo, "init", "-q")
    return repo


def write_bump_config(repo: Path, server, source, target) -> Path:
    config = repo / "sync.yaml"
    config.write_text(f"""\
# the mirror of our clusters
version: 1
target:
  url: {target.url}
releases:
  - product: rke2
    versions: [{OLD}]   # pinned: bumped by scripts/release-bump
    flavors: [core]
    release_url: {server.release_url("rke2")}
    channel_url: {server.channel_url("rke2")}
sources:
  endpoints: {{docker.io: "{source.url}"}}
outputs:
  registries_yaml: deploy/registries.yaml
""")
    return config


def test_release_bump_fetches_diffs_mirrors_and_stages(bump_repo, lists_root, source, registry_factory):
    dst = registry_factory(name="dst")
    server = start_release_server(lists_root, {"rke2": {"stable": NEW}})
    try:
        config = write_bump_config(bump_repo, server, source, dst)
        git(bump_repo, "add", ".")
        git(bump_repo, "commit", "-qm", "init")
        proc = subprocess.run([str(SCRIPTS / "release-bump"), "stable", "--config", "sync.yaml"],
                              cwd=bump_repo, capture_output=True, text=True, timeout=120)
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stderr
    assert f"rke2 {OLD} -> {NEW}: 1 added, 1 removed, 3 changed, 2 unchanged" in proc.stdout
    assert "  + docker.io/rancher/mirrored-library-traefik:2.11.24" in proc.stdout
    assert f"rke2 channel stable -> {NEW}" in proc.stderr
    # the lists, verified, in lists/ (the same flavors as the previous version there)
    new_dir = bump_repo / "lists" / "rke2" / NEW
    assert sorted(p.name for p in new_dir.iterdir()) == sorted(p.name for p in (lists_root / "rke2" / NEW).iterdir())
    assert (new_dir / CORE).read_bytes() == (lists_root / "rke2" / NEW / CORE).read_bytes()
    # what is added or changed was mirrored, nothing else
    assert list_tags(dst.url, "rancher/mirrored-library-traefik") == ["2.11.24"]
    assert list_tags(dst.url, "rancher/hardened-etcd") == ["v3.5.21-k3s1-build20250612"]
    assert list_tags(dst.url, "rancher/mirrored-pause") == []
    # registries.yaml regenerated, the pin moved (comments kept), all staged
    regs = (bump_repo / "deploy" / "registries.yaml").read_text()
    assert f"(RKE2 {NEW})" in regs and yaml.safe_load(regs)["mirrors"]["docker.io"]["endpoint"] == [dst.url]
    text = (bump_repo / "sync.yaml").read_text()
    assert f"versions: [{NEW}]   # pinned: bumped by scripts/release-bump" in text and "# the mirror of our clusters" in text
    assert job.load_config(bump_repo / "sync.yaml").config.releases[0].versions == (NEW,)
    staged = set(git(bump_repo, "diff", "--cached", "--name-only").split())
    assert staged == {f"lists/rke2/{NEW}/{p.name}" for p in new_dir.iterdir()} | {"deploy/registries.yaml", "sync.yaml"}
    assert proc.stdout.rstrip().endswith(
        f"git commit -m 'rke2: {OLD} -> {NEW} (1 added, 1 removed, 3 changed images)'")


def test_release_bump_refuses_a_list_that_fails_its_checksum(bump_repo, tmp_path):
    served = tmp_path / "served"
    write_release(served, NEW, ["docker.io/rancher/rke2-runtime:v1.30.14-rke2r1"])
    with open(served / "rke2" / NEW / CORE, "a") as f:
        f.write("docker.io/evil/miner:latest\n")
    server = start_release_server(served, {"rke2": {"stable": NEW}})
    try:
        proc = subprocess.run([str(SCRIPTS / "release-bump"), NEW, "--flavor", "core",
                               "--release-url", server.release_url("rke2"), "--channel-url", server.channel_url("rke2")],
                              cwd=bump_repo, capture_output=True, text=True, timeout=60)
    finally:
        server.stop()
    assert proc.returncode == 2, proc.stderr
    assert f"release-bump: error: {CORE} of rke2 {NEW} does not match sha256sum-amd64.txt" in proc.stderr
    assert not (bump_repo / "lists" / "rke2" / NEW / CORE).exists()
    assert git(bump_repo, "diff", "--cached", "--name-only") == ""


def test_cli_start_up_imports_only_what_mirror_needs():
    """Start-up is most of a no-op run: the archive, node-check and progress-bar modules are
    imported by the commands that use them, not by `import rke2_mirror.cli.app`."""
    import sys

    code = ("import sys, rke2_mirror.cli.app; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith(('rke2_mirror', 'tqdm', 'yaml')))))")
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
    assert {"rke2_mirror.cli.app", "rke2_mirror.engine.copy", "rke2_mirror.endpoints.registry"} <= loaded
    lazy = {"rke2_mirror.endpoints.ociarchive", "rke2_mirror.endpoints.dockerarchive", "rke2_mirror.endpoints.layout", "rke2_mirror.node.verify",
            "rke2_mirror.node.versions", "rke2_mirror.node.registries", "rke2_mirror.node.resolver",
            "rke2_mirror.node.writer", "rke2_mirror.releases.checksums", "rke2_mirror.jobs.sync", "tqdm"}
    assert not lazy & loaded, sorted(lazy & loaded)


# --------------------------------------------------------------------------- the demo (scripts/demo.sh)


def _read_until(fd: int, marker: str, buf: list[str], deadline: float) -> bool:
    """Read the demo's output into `buf` until `marker` shows up (True) or the output ends (False)."""
    import os
    import select
    import time

    while marker not in "".join(buf):
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail("the demo took too long:\n" + "".join(buf)[-3000:])
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                return False
            buf.append(chunk.decode(errors="replace"))
    return True


def test_demo_prints_what_an_operator_types_and_keeps_the_registries_until_enter(tmp_path):
    """The demo's transcript (issue 17, item 4): every command printed as typed, before its output; the
    dry run its --help promises; with --keep on a terminal, the printed commands run again as shown."""
    import os
    import pty
    import sys
    import time

    from rke2_mirror_testkit.registry_proc import REGISTRY_BINARY

    if not os.access(REGISTRY_BINARY, os.X_OK):
        pytest.skip(f"{REGISTRY_BINARY} not installed")
    master, slave = pty.openpty()  # stdin is a terminal: --keep waits for Enter
    proc = subprocess.Popen([sys.executable, "-m", "rke2_mirror_testkit.demo", "--keep"], cwd=tmp_path,
                            stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    os.close(slave)
    buf: list[str] = []
    work = None
    try:
        waiting = _read_until(proc.stdout.fileno(), "Press Enter to stop them", buf, time.monotonic() + 240)
        transcript = "".join(buf)
        assert waiting, transcript[-3000:]
        lines = transcript.splitlines()
        work = Path(next(l for l in lines if l.startswith("$ cd ")).split(None, 2)[2])

        # every command as an operator types it: `rke2-mirror ...`, after `cd` / `export`
        shell = [l for l in lines if l.startswith("$ ")]
        assert shell and all(l.startswith(("$ rke2-mirror ", "$ export ", "$ cd ")) for l in shell), shell
        assert not [l for l in lines if ".venv/bin/python -m" in l or "-m rke2_mirror" in l]
        commands = [l.split()[2] + (" --dry-run" if "--dry-run" in l else "") + (" --for-node" if "--for-node" in l else "")
                    for l in shell if l.startswith("$ rke2-mirror ")]
        promised = ["list", "mirror", "mirror --dry-run", "mirror", "registries-yaml", "verify", "save", "inspect", "load",
                    "save --for-node", "inspect", "save", "inspect", "extract"]
        assert commands == promised
        # the demo's --help promises the same steps, in the same order
        help_text = " ".join(subprocess.run([sys.executable, "-m", "rke2_mirror_testkit.demo", "--help"],
                                            capture_output=True, text=True, check=True).stdout.split())
        at = 0
        for step in promised:
            found = help_text.find(step, at)
            assert found >= 0, f"--help does not promise {step!r} after position {at}: {help_text}"
            at = found + len(step)
        # each command comes before its own output
        list_at = lines.index("$ rke2-mirror list stable")
        assert list_at < next(i for i, l in enumerate(lines) if "channel stable ->" in l)
        dry = next(i for i, l in enumerate(lines) if l.startswith("$ rke2-mirror mirror ") and "--dry-run" in l)
        assert re.match(r"19 images: 0 would copy, 19 already present, 0 failed", next(
            l for l in lines[dry:] if l.startswith("19 images:"))), lines[dry:dry + 5]
        # no jargon; the per-image sizes explained
        assert "getHostConfigs" not in transcript and "hosts.toml" not in transcript
        assert "copied once, with whichever image reached it first" in transcript
        assert "keep running" in transcript
        # the whole payload: a chart (its declared image already in the set) and the install files, written out
        assert "charts' images: 1 declared, 0 not already in the image set" in transcript
        assert "contents: 19 images, 1 chart(s), 1 file set(s)" in transcript
        assert "rke2.linux-amd64.tar.gz matches sha256sum-amd64.txt" in transcript

        # while it waits: the printed lines, pasted into a shell, run against the registries still there
        setup = [l[2:] for l in shell if l.startswith(("$ cd ", "$ export "))]
        bash_script = "\n".join(["set -e", *setup, lines[dry][2:]])
        rerun = subprocess.run(["bash", "-c", bash_script], capture_output=True, text=True, timeout=120,
                               env={k: v for k, v in os.environ.items() if not k.startswith("RKE2_MIRROR_")})
        assert rerun.returncode == 0, bash_script + "\n" + rerun.stderr
        assert "19 images: 0 would copy, 19 already present, 0 failed" in rerun.stderr

        os.write(master, b"\n")
        assert proc.wait(timeout=60) == 0
        _read_until(proc.stdout.fileno(), "\0", buf, time.monotonic() + 30)
        tail = "".join(buf)[len(transcript):]
        assert f"work directory kept: {work}" in tail
        assert work.is_dir() and (work / "registries.yaml").is_file()
        # and now they are stopped
        stopped = subprocess.run(["bash", "-c", bash_script], capture_output=True, text=True, timeout=120)
        assert stopped.returncode != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("keep, interactive, says", [
    (False, False, "stop now and the work directory is removed"),
    (True, False, "stdin is not a terminal"),
])
def test_demo_says_what_happens_to_the_registries(keep, interactive, says, capsys):
    from rke2_mirror_testkit.demo import _hold_or_stop

    _hold_or_stop(keep, interactive)
    out = capsys.readouterr().out
    assert says in out and "--keep" in out
