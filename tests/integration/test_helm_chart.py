"""The Helm chart under the real Helm engine (helm-python-sdk: Helm's Go SDK through its C ABI, no helm binary).

Lint, render each example values file, and validate every rendered object against the Kubernetes 1.30,
KubeRay ray.io/v1 and prometheus-operator schemas vendored in deploy/schemas/. Bad values must fail at
render time with a message naming the field; secrets must never reach a ConfigMap.
"""

from __future__ import annotations

import base64
import copy
import importlib.util
import json
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

import helm_python as helm  # helm-python-sdk: Helm's Go SDK as a library

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "forkrl"
EXAMPLES = REPO / "deploy" / "helm" / "examples"
RELEASE, NAMESPACE = "demo", "train"
FULLNAME = "demo-forkrl"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


schemas = _load("forkrl_schema_validate", REPO / "deploy" / "schemas" / "validate.py")
sync_dashboards = _load("forkrl_sync_dashboards", REPO / "deploy" / "helm" / "sync_dashboards.py")


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as c:
        yield c


def render(chart, values: dict | None = None) -> list[dict]:
    """All objects of a release, as the install would create them (schema-checked by the engine)."""
    out = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = [d for path, text in sorted(out.items()) if not path.endswith("NOTES.txt")
            for d in yaml.safe_load_all(text) if d]
    return docs


def example(name: str) -> dict:
    return helm.values_from_yaml((EXAMPLES / name).read_text())


def by_kind(docs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d)
    return out


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def cluster_spec(docs: list[dict]) -> dict:
    kinds = by_kind(docs)
    if "RayJob" in kinds:
        return one(docs, "RayJob")["spec"]["rayClusterSpec"]
    return one(docs, "RayCluster")["spec"]


def entrypoint(docs: list[dict]) -> list[str]:
    kinds = by_kind(docs)
    if "RayJob" in kinds:
        return shlex.split(one(docs, "RayJob")["spec"]["entrypoint"])
    job = one(docs, "Job")
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    return shlex.split(env["FORKRL_ENTRYPOINT"])


def train_params(args: list[str]) -> dict:
    """The entrypoint parsed by the real `forkrl train` command line (without running it)."""
    import typer.main

    from cluster.cli import app

    assert args[:2] == ["forkrl", "train"]
    command = typer.main.get_command(app).get_command(None, "train")
    return command.make_context("train", args[2:]).params


def ray_containers(docs: list[dict]) -> list[dict]:
    spec = cluster_spec(docs)
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    return [c for p in pods for c in p["spec"]["containers"]]


# ----------------------------------------------------------------------------------------------- lint

@pytest.mark.parametrize("values_file", [None] + sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_lint_has_no_warnings(values_file):
    values = example(values_file) if values_file else None
    report = helm.lint(CHART, values, strict=True, kube_version="v1.30.0", namespace=NAMESPACE)
    serious = [m for m in report["messages"] if m["severity"] >= 2]
    assert serious == [] and report["errors"] == [], report


# ------------------------------------------------------------------- render + vendored-schema validation

CASES = {  # the default monitoring.enabled "auto" renders no monitor: the render has no prometheus-operator API
    "defaults": ({}, {"ConfigMap", "Secret", "Service", "StatefulSet", "NetworkPolicy",
                      "PersistentVolumeClaim", "RayJob"}),
    "external-redis.yaml": (None, {"ConfigMap", "Secret", "PersistentVolumeClaim", "RayJob"}),
    "raycluster.yaml": (None, {"ConfigMap", "Secret", "Service", "StatefulSet", "NetworkPolicy",
                               "PersistentVolumeClaim", "RayCluster", "Job"}),
    "monitoring-off.yaml": (None, {"ConfigMap", "Secret", "Service", "StatefulSet", "NetworkPolicy",
                                   "PersistentVolumeClaim", "RayJob"}),
    "redis-persistence.yaml": (None, {"ConfigMap", "Secret", "Service", "StatefulSet", "NetworkPolicy",
                                      "PersistentVolumeClaim", "RayJob", "ServiceMonitor"}),
    "qwen3-8b-top20.yaml": (None, {"ConfigMap", "Secret", "Service", "StatefulSet", "NetworkPolicy",
                                   "PersistentVolumeClaim", "RayJob"}),
    "podmonitor": ({"monitoring": {"enabled": True}}, {"ConfigMap", "Secret", "Service", "StatefulSet",
                                                       "NetworkPolicy", "PersistentVolumeClaim", "RayJob",
                                                       "PodMonitor"}),
}


def case_values(case: str) -> dict:
    values = CASES[case][0]
    if values is None:
        values = example(case)
    if case == "qwen3-8b-top20.yaml":  # the documented `--set-file forkrl.configYaml=<recipe>`
        values = {**values, "forkrl": {"config": {}, "configYaml": (REPO / "configs" / "qwen3-8b-dapo-top20.yaml").read_text()}}
    return values


@pytest.mark.parametrize("case", list(CASES))
def test_render_is_valid_against_vendored_schemas(chart, case):
    docs = render(chart, case_values(case))
    dashboards = bool(list((CHART / "dashboards").glob("*.json")))
    expected = set(CASES[case][1])
    if dashboards and case != "monitoring-off.yaml":
        expected.add("ConfigMap")  # the dashboards ConfigMap joins the config one
    assert {d["kind"] for d in docs} == expected
    problems = [msg for d in docs for msg in schemas.errors(d)]
    assert problems == []
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), "two objects of one kind share a name"
    for d in docs:
        assert d["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


def test_vendored_schemas_reject_broken_objects(chart):
    """The validation above can fail: typos and wrong types in each vendored schema family are caught."""
    docs = render(chart, example("redis-persistence.yaml"))
    rayjob = copy.deepcopy(one(render(chart, {}), "RayJob"))
    rayjob["spec"]["entrypont"] = rayjob["spec"].pop("entrypoint")
    assert any("entrypont" in e for e in schemas.errors(rayjob))
    assert any("'entrypoint' is a required property" in e for e in schemas.errors(rayjob))

    rayjob = copy.deepcopy(one(render(chart, {}), "RayJob"))
    worker = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    worker["template"]["spec"]["containers"][0]["resoures"] = {}
    worker["replicas"] = "2"
    errs = schemas.errors(rayjob)
    assert any("workerGroupSpecs.0.template.spec.containers.0" in e and "resoures" in e for e in errs)
    assert any("workerGroupSpecs.0.replicas" in e for e in errs)

    monitor = copy.deepcopy(one(docs, "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"
    assert any("endpoints.0.interval" in e for e in schemas.errors(monitor))

    sts = copy.deepcopy(one(docs, "StatefulSet"))
    del sts["spec"]["serviceName"]
    assert any("'serviceName' is a required property" in e for e in schemas.errors(sts))

    assert schemas.errors({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}}) == [
        "Pod/x: no vendored schema for v1/Pod"]


# ----------------------------------------------------------------------------------- behaviour per case

def test_default_rayjob_runs_forkrl_train_on_gpu_workers(chart, tmp_path):
    docs = render(chart, {})
    job = one(docs, "RayJob")
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    args = entrypoint(docs)
    assert args[:3] == ["forkrl", "train", "/etc/forkrl/config.yaml"]
    assert f"queue.url=redis://{FULLNAME}-redis.{NAMESPACE}.svc:6379/0" in args
    assert "metrics.host=0.0.0.0" in args and "metrics.port=9400" in args
    assert "run.output_dir=/data/runs" in args

    spec = cluster_spec(docs)
    assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "forkrl-metrics", "containerPort": 9400} in head["ports"]
    (gpu,) = spec["workerGroupSpecs"]
    assert (gpu["groupName"], gpu["replicas"], gpu["minReplicas"], gpu["maxReplicas"]) == ("gpu", 2, 2, 2)
    res = gpu["template"]["spec"]["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == 8 and res["requests"]["nvidia.com/gpu"] == 8
    assert gpu["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"

    # The config the head mounts, with the chart's overrides, is a valid forkrl config.
    from cluster.config import load_config

    params = train_params(args)
    assert params["config"] == "/etc/forkrl/config.yaml" and params["resume"] is None
    (tmp_path / "config.yaml").write_text(config_of(docs))
    cfg = load_config(tmp_path / "config.yaml", params["overrides"])
    assert cfg.queue.url == f"redis://{FULLNAME}-redis.{NAMESPACE}.svc:6379/0"
    assert (cfg.metrics.host, cfg.metrics.port, cfg.run.output_dir) == ("0.0.0.0", 9400, "/data/runs")

    # Every Ray pod mounts the checkpoint claim the chart creates, and /dev/shm in memory.
    pvc = one(docs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for pod in [spec["headGroupSpec"]["template"], gpu["template"]]:
        vols = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert vols["checkpoints"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        assert vols["dshm"]["emptyDir"]["medium"] == "Memory"


def config_of(docs: list[dict]) -> str:
    cm = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == f"{FULLNAME}-config"]
    return cm[0]["data"]["config.yaml"]


def test_recipe_as_config_yaml_resolves_to_the_recipe(chart, tmp_path):
    from cluster.config import load_config

    values = case_values("qwen3-8b-top20.yaml")
    values["forkrl"] = {**values["forkrl"], "overrides": ["learner.lr=2e-6", "run.name=my run"],
                        "resume": "/data/runs/qwen3-8b-dapo-top20-1"}
    docs = render(chart, values)
    assert config_of(docs).strip() == values["forkrl"]["configYaml"].strip()
    params = train_params(entrypoint(docs))
    assert params["resume"] == "/data/runs/qwen3-8b-dapo-top20-1"
    (tmp_path / "config.yaml").write_text(config_of(docs))
    assert params["overrides"][-2:] == ["learner.lr=2e-6", "run.name=my run"]  # quoted whole, in order
    cfg = load_config(tmp_path / "config.yaml", params["overrides"][:-1])
    assert cfg.learner.lr == 2e-6
    assert cfg.algorithm.top_entropy_ratio == 0.2 and cfg.rollout.group_size == 16
    assert cfg.run.output_dir == "/data/runs"
    spec = cluster_spec(docs)
    (h100,) = spec["workerGroupSpecs"]
    assert h100["groupName"] == "h100"
    mounts = {m["name"]: m for m in h100["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["models"]["mountPath"] == "/models" and mounts["models"]["readOnly"] is True
    assert cfg.model.path.startswith("/models/")


def test_external_redis_uses_the_url_and_its_secret(chart):
    docs = render(chart, example("external-redis.yaml"))
    assert "queue.url=redis://redis-master.data.svc:6379/0" in entrypoint(docs)
    for c in ray_containers(docs):
        (env,) = [e for e in c["env"] if e["name"] == "FORKRL_REDIS_PASSWORD"]
        assert env["valueFrom"]["secretKeyRef"] == {"name": "forkrl-queue", "key": "password"}


def test_raycluster_mode_submits_with_ray_job_submit(chart):
    docs = render(chart, example("raycluster.yaml"))
    rc = one(docs, "RayCluster")
    job = one(docs, "Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["RAY_ADDRESS"] == f"http://{rc['metadata']['name']}-head-svc.{NAMESPACE}.svc:8265"
    assert "ray job submit -- $FORKRL_ENTRYPOINT" in container["args"][0]
    assert entrypoint(docs)[:2] == ["forkrl", "train"]
    (gpu,) = rc["spec"]["workerGroupSpecs"]
    assert (gpu["replicas"], gpu["minReplicas"], gpu["maxReplicas"]) == (2, 1, 4)
    assert job["spec"]["backoffLimit"] == 1
    no_submit = render(chart, {**example("raycluster.yaml"), "submitter": {"enabled": False}})
    assert "Job" not in by_kind(no_submit)


def test_redis_persistence_and_servicemonitor(chart):
    docs = render(chart, example("redis-persistence.yaml"))
    sts = one(docs, "StatefulSet")
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert claim["spec"]["storageClassName"] == "standard-rwo"
    redis = sts["spec"]["template"]["spec"]["containers"][0]
    assert "--appendonly yes" in redis["args"][0] and "volumes" not in sts["spec"]["template"]["spec"]
    (pw,) = [e for e in redis["env"] if e["name"] == "REDIS_PASSWORD"]
    assert pw["valueFrom"]["secretKeyRef"] == {"name": "forkrl-redis-password", "key": "redis-password"}
    assert [d["metadata"]["name"] for d in by_kind(docs)["Secret"]] == [f"{FULLNAME}-ray-token"]  # no password made

    # The ServiceMonitor selects the metrics Service, which selects the head pod's metrics port.
    sm = one(docs, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    svc = [s for s in docs if s["kind"] == "Service" and s["metadata"]["name"] == f"{FULLNAME}-metrics"][0]
    assert all(svc["metadata"]["labels"][k] == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
    head_labels = cluster_spec(docs)["headGroupSpec"]["template"]["metadata"]["labels"]
    assert all(head_labels[k] == v for k, v in svc["spec"]["selector"].items())
    assert svc["spec"]["ports"][0]["targetPort"] == sm["spec"]["endpoints"][0]["port"] == "forkrl-metrics"


def test_podmonitor_selects_only_the_head_pod(chart):
    docs = render(chart, {"monitoring": {"enabled": True}})
    pm = one(docs, "PodMonitor")
    sel = pm["spec"]["selector"]["matchLabels"]
    spec = cluster_spec(docs)
    head = spec["headGroupSpec"]["template"]["metadata"]["labels"]
    worker = spec["workerGroupSpecs"][0]["template"]["metadata"]["labels"]
    assert all(head.get(k) == v for k, v in sel.items())
    assert not all(worker.get(k) == v for k, v in sel.items())
    assert pm["spec"]["podMetricsEndpoints"][0] == {"port": "forkrl-metrics", "path": "/metrics", "interval": "15s"}


def test_redis_is_reachable_only_from_the_release(chart):
    docs = render(chart, {})
    np_ = one(docs, "NetworkPolicy")
    redis_labels = one(docs, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert np_["spec"]["podSelector"]["matchLabels"] == redis_labels
    allowed = np_["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    spec = cluster_spec(docs)
    for pod in [spec["headGroupSpec"]["template"], spec["workerGroupSpecs"][0]["template"]]:
        assert all(pod["metadata"]["labels"][k] == v for k, v in allowed.items())
    assert np_["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 6379}]


# ------------------------------------------------------------------------------------------- secrets

def redis_secret(docs: list[dict]) -> dict:
    (secret,) = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == f"{FULLNAME}-redis"]
    return secret


def test_password_only_in_its_secret(chart):
    docs = render(chart, {})
    secret = redis_secret(docs)
    password = base64.b64decode(secret["data"]["password"]).decode()
    assert len(password) == 32 and password.isalnum()
    others = [d for d in docs if d is not secret]
    assert all(password not in yaml.safe_dump(d) for d in others)
    for c in ray_containers(docs):
        (env,) = [e for e in c["env"] if e["name"] == "FORKRL_REDIS_PASSWORD"]
        assert env["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": "password"}
        assert all("value" not in e for e in c["env"] if "PASSWORD" in e["name"])
    # Two installs draw two passwords (nothing hard-coded).
    again = base64.b64decode(redis_secret(render(chart, {}))["data"]["password"]).decode()
    assert again != password


def test_ray_token_authenticates_every_ray_process_and_submitter(chart):
    for values in ({}, example("raycluster.yaml")):
        docs = render(chart, values)
        (secret,) = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == f"{FULLNAME}-ray-token"]
        token = base64.b64decode(secret["data"]["token"]).decode()
        assert len(token) == 48 and token.isalnum()
        assert all(token not in yaml.safe_dump(d) for d in docs if d is not secret)
        kinds = by_kind(docs)
        if "RayJob" in kinds:
            submitters = one(docs, "RayJob")["spec"]["submitterPodTemplate"]["spec"]["containers"]
        else:
            submitters = one(docs, "Job")["spec"]["template"]["spec"]["containers"]
        for c in ray_containers(docs) + submitters:
            env = {e["name"]: e for e in c["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token", c["name"]
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"],
                                                                          "key": "token"}, c["name"]
        head = cluster_spec(docs)["headGroupSpec"]["rayStartParams"]
        assert head["dashboard-host"] == "0.0.0.0"   # reachable by the submitter, which holds the token
    assert base64.b64decode([d for d in render(chart, {}) if d["kind"] == "Secret" and d["metadata"]["name"]
                             == f"{FULLNAME}-ray-token"][0]["data"]["token"]).decode() != token


@pytest.mark.parametrize("case", ["defaults", "raycluster.yaml", "podmonitor"])
def test_ray_pods_carry_no_label_old_kuberay_rejects(chart, case):
    """KubeRay < 1.2 copies a Ray pod's labels onto the head Service and looks it up by
    app.kubernetes.io/name=kuberay (kuberay #2147): a Ray pod template must not set app.kubernetes.io/name."""
    docs = render(chart, case_values(case))
    spec = cluster_spec(docs)
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    if "RayJob" in by_kind(docs):
        pods.append(one(docs, "RayJob")["spec"]["submitterPodTemplate"])
    for pod in pods:
        labels = pod["metadata"]["labels"]
        assert not [k for k in labels if k.startswith("app.kubernetes.io/")], labels
        assert labels["forkrl.io/release"] == RELEASE


def test_monitoring_auto_renders_no_monitor_without_the_operator_api(chart):
    # `helm install` on a cluster without prometheus-operator's CRDs must not fail on a PodMonitor;
    # explicit true still renders it (and kind ServiceMonitor its Service too)
    assert not {"PodMonitor", "ServiceMonitor"} & set(by_kind(render(chart, {})))
    assert "PodMonitor" in by_kind(render(chart, {"monitoring": {"enabled": True}}))
    sm = by_kind(render(chart, {"monitoring": {"enabled": True, "kind": "ServiceMonitor"}}))
    assert "ServiceMonitor" in sm and f"{FULLNAME}-metrics" in [d["metadata"]["name"] for d in sm["Service"]]
    assert not {"PodMonitor", "ServiceMonitor"} & set(by_kind(render(chart, {"monitoring": {"enabled": False}})))
    with pytest.raises(helm.HelmError, match="monitoring"):
        render(chart, {"monitoring": {"enabled": "yes"}})


def test_password_in_config_is_refused(chart):
    with pytest.raises(helm.HelmValuesError, match="/forkrl/config/queue/password"):
        render(chart, {"forkrl": {"config": {"queue": {"password": "hunter2"}}}})
    with pytest.raises(helm.HelmError, match="forkrl.configYaml: contains a password"):
        render(chart, {"forkrl": {"config": {}, "configYaml": "queue:\n  password: hunter2\n"}})


# ------------------------------------------------------------------------------------- bad values fail

BAD_VALUES = [
    ("mode: raycluser\n", "/mode"),
    ("workers:\n  - {name: gpu, replicas: 1, gpus: '8'}\n", "/workers/0/gpus"),
    ("workers:\n  - {name: GPU_Group, replicas: 1, gpus: 8}\n", "/workers/0/name"),
    ("workers: []\n", "/workers"),
    ("redis:\n  enabled: false\n", "/queue"),
    ("redis: {enabled: false}\nqueue: {url: 'redis://forkrl:s3cret@redis:6379/0', passwordSecret: {name: q}}\n",
     "/queue/url"),
    ("monitoring: {kind: Servicemonitor}\n", "/monitoring/kind"),
    ("metrics: {port: 80}\n", "/metrics/port"),
    ("checkpoints: {size: 500G}\n", "/checkpoints/size"),
    ("forkrl: {config: {learnr: {lr: 1.0e-6}}}\n", "learnr"),
    ("hed: {resources: {}}\n", "hed"),
]


@pytest.mark.parametrize("text,field", BAD_VALUES, ids=[b[1] for b in BAD_VALUES])
def test_bad_values_file_fails_naming_the_field(chart, tmp_path, text, field):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    values = helm.values_from_yaml(path.read_text())
    with pytest.raises(helm.HelmValuesError) as err:
        chart.validate_schema(values)
    assert field in str(err.value)
    with pytest.raises(helm.HelmValuesError, match=field.replace("/", "/")):
        render(chart, values)
    report = helm.lint(CHART, values, namespace=NAMESPACE)
    assert any(field in e for e in report["errors"])


def test_config_sections_in_schema_match_forkrl_config():
    from cluster.config import Config

    schema = json.loads((CHART / "values.schema.json").read_text())
    sections = schema["properties"]["forkrl"]["properties"]["config"]["properties"]
    assert set(sections) == set(Config.model_fields)


# ------------------------------------------------------------------------------------------ dashboards

def test_chart_dashboards_equal_the_repository_dashboards():
    diff = sync_dashboards.differences()
    assert diff == [], f"run `python deploy/helm/sync_dashboards.py`: {diff}"


def test_dashboards_configmap_carries_sidecar_label(chart):
    files = sorted((CHART / "dashboards").glob("*.json"))
    if not files:
        pytest.skip("no dashboards in the chart yet (covered by test_dashboard_sync_mechanism)")
    docs = render(chart, {"dashboards": {"label": "grafana_dashboard", "labelValue": "1",
                                         "annotations": {"grafana_folder": "forkrl"}}})
    (cm,) = [d for d in docs if d["metadata"]["name"] == f"{FULLNAME}-dashboards"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "forkrl"}
    assert sorted(cm["data"]) == [p.name for p in files]
    for p in files:
        assert json.loads(cm["data"][p.name]) == json.loads(p.read_text())


def test_dashboard_sync_mechanism(tmp_path):
    """On a copy of the chart: sync adds, updates and removes dashboards; the ConfigMap follows; too large fails."""
    chart_dir = tmp_path / "forkrl"
    shutil.copytree(CHART, chart_dir, ignore=shutil.ignore_patterns("dashboards"))
    source = tmp_path / "dashboards"
    source.mkdir()
    (source / "a.json").write_text(json.dumps({"title": "A", "panels": []}))
    target = chart_dir / "dashboards"
    assert sync_dashboards.differences(source, target) == ["missing in chart: a.json"]
    sync_dashboards.sync(source, target)
    assert sync_dashboards.differences(source, target) == []

    def dashboards_cm(values=None):
        with helm.Chart.load(chart_dir) as c:
            docs = render(c, values or {})
        return [d for d in docs if d["metadata"]["name"] == f"{FULLNAME}-dashboards"]

    (cm,) = dashboards_cm({"dashboards": {"label": "my_dashboards", "labelValue": "yes"}})
    assert cm["metadata"]["labels"]["my_dashboards"] == "yes" and list(cm["data"]) == ["a.json"]
    assert schemas.errors(cm) == []
    assert dashboards_cm({"dashboards": {"enabled": False}}) == []

    (source / "a.json").write_text(json.dumps({"title": "A2"}))
    (source / "b.json").write_text(json.dumps({"title": "B"}))
    assert sorted(sync_dashboards.differences(source, target)) == ["differs: a.json", "missing in chart: b.json"]
    sync_dashboards.sync(source, target)
    (cm,) = dashboards_cm()
    assert json.loads(cm["data"]["a.json"]) == {"title": "A2"} and sorted(cm["data"]) == ["a.json", "b.json"]

    (source / "a.json").unlink()
    assert sync_dashboards.differences(source, target) == ["no longer in dashboards/: a.json"]
    sync_dashboards.sync(source, target)
    assert sorted(p.name for p in target.glob("*.json")) == ["b.json"]

    (target / "huge.json").write_text(json.dumps({"title": "x" * 1_100_000}))
    with pytest.raises(helm.HelmError, match="exceed what one ConfigMap holds"):
        dashboards_cm()
