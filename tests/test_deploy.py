"""The deployment files hold together: the Dockerfiles install the serving extra only and carry the production
basics, the compose stack is complete, the Grafana dashboard only plots metrics the service exports, and the
Kubernetes manifests (plain and KServe) are valid and drain cleanly. Fast and offline: no container engine or cluster
needed (that is tests/container, `make docker-test`)."""
import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "docker" / "k8s"
QUEUE_DELAY = ROOT / "docker" / "k8s-queue-delay"  # the overlay that autoscales on queue delay
KSERVE_GROUP = "serving.kserve.io/"
KSERVE_MANIFEST = "kserve-inferenceservice.yaml"


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in dockerfile.read_text().splitlines() if not l.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in text.splitlines() if line.strip()]


def _final_stage(instructions):
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


def _k8s_documents():
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def _is_kserve(doc) -> bool:
    return doc["apiVersion"].startswith(KSERVE_GROUP)


def _one(kind):
    found = [doc for _, doc in _k8s_documents() if doc["kind"] == kind]
    assert len(found) == 1, kind
    return found[0]


def _exported_sample_names():
    metrics = pytest.importorskip("service.metrics")
    names = set()
    for family in metrics.Metrics().registry.collect():
        suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"],
                    "gauge": [""]}[family.type]
        names |= {family.name + s for s in suffixes}
    return names


# ---- Dockerfiles ----

def test_the_cpu_image_installs_the_serving_extra_only():
    instructions = _instructions(ROOT / "Dockerfile")
    runs = " ".join(args for op, args in instructions if op == "RUN")
    # the grpc extra too: the image serves the Open Inference Protocol over gRPC; openvino only when asked for
    assert ("ARG", "EXTRAS=serve,grpc") in instructions and '".[${EXTRAS}]"' in runs
    assert not re.search(r"\.\[[^\]]*(train|export|gpu|dev|reference)", runs)
    assert "torch" not in runs
    copies = [args for op, args in _instructions(ROOT / "Dockerfile") if op == "COPY"]
    assert not any(re.search(r"\b(model|export)/", c) for c in copies), "model/ and export/ (torch) must stay out"


def test_the_cpu_image_starts_from_slim_python_and_has_the_production_basics():
    instructions = _instructions(ROOT / "Dockerfile")
    froms = [args for op, args in instructions if op == "FROM"]
    args = dict(a.split("=", 1) for op, a in instructions if op == "ARG" and "=" in a)
    assert len(froms) >= 2, "multi-stage: a builder and a runtime stage"
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    final = _final_stage(instructions)
    ops = {op for op, _ in final}
    assert {"USER", "EXPOSE", "HEALTHCHECK", "ENTRYPOINT"} <= ops
    assert any(op == "COPY" and "--from=builder" in a for op, a in final), "the runtime stage copies the built venv"
    user = next(a for op, a in final if op == "USER")
    assert user.split(":")[0] not in {"0", "root"}
    assert next(a for op, a in final if op == "EXPOSE").split() == ["8000", "8001"]  # HTTP, gRPC
    healthcheck = next(a for op, a in final if op == "HEALTHCHECK")
    assert "CMD [" in healthcheck, "exec form"
    assert "/readyz" in (ROOT / "docker" / "healthcheck.py").read_text()
    assert "tini" in next(a for op, a in final if op == "ENTRYPOINT"), "an init forwards SIGTERM to the server"
    env = " ".join(a for op, a in final if op == "ENV")
    for setting in ("VITSERVE_HOST=0.0.0.0", "VITSERVE_REPO=/models", "VITSERVE_PORT=8000", "VITSERVE_GRPC_PORT=8001"):
        assert setting in env


def test_the_gpu_image_installs_onnxruntime_gpu_without_the_cpu_onnxruntime():
    dockerfile = ROOT / "docker" / "Dockerfile.gpu"
    instructions = _instructions(dockerfile)
    args = dict(a.split("=", 1) for op, a in instructions if op == "ARG" and "=" in a)
    assert re.fullmatch(r"nvidia/cuda:[\w.]+-cudnn-runtime-ubuntu[\d.]+", args["CUDA_IMAGE"])
    runs = " ".join(a for op, a in instructions if op == "RUN")
    assert "!= 'onnxruntime'" in runs and "extras['gpu']" in runs
    assert "--no-deps" in runs, "resolving .[serve,gpu] again would pull the CPU onnxruntime"
    final = _final_stage(instructions)
    assert "VITSERVE_DEVICE=cuda" in " ".join(a for op, a in final if op == "ENV")
    assert {"USER", "EXPOSE", "HEALTHCHECK", "ENTRYPOINT"} <= {op for op, _ in final}


# ---- compose ----

def test_the_compose_service_has_healthcheck_port_read_only_models_and_limits():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service = compose["services"]["vitserve"]
    assert "profiles" not in service, "the service must start with a plain `docker-compose up`"
    assert "/readyz" in (ROOT / "docker" / "healthcheck.py").read_text()
    assert service["healthcheck"]["test"][:2] == ["CMD", "python"]
    assert any(str(p).endswith(":8000") for p in service["ports"]) and any(str(p).endswith(":8001") for p in service["ports"])
    assert "./models:/models:ro" in service["volumes"]
    assert service["restart"] in {"unless-stopped", "always", "on-failure"}
    assert {"cpus", "memory"} <= set(service["deploy"]["resources"]["limits"])
    grace = int(service["stop_grace_period"].rstrip("s"))
    drain = float(re.search(r"[\d.]+", str(service["environment"]["VITSERVE_DRAIN_TIMEOUT_S"]).split(":-")[-1]).group())
    assert grace > drain


def test_monitoring_is_behind_a_profile_and_scrapes_the_service():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name in ("prometheus", "grafana"):
        assert compose["services"][name]["profiles"] == ["monitoring"], name
    scrape = yaml.safe_load((ROOT / "docker" / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    assert any(job.get("metrics_path", "/metrics") == "/metrics" and "vitserve:8000" in job["static_configs"][0]["targets"]
               for job in scrape)
    mounts = " ".join(compose["services"]["prometheus"]["volumes"] + compose["services"]["grafana"]["volumes"])
    assert "./docker/prometheus/prometheus.yml" in mounts and "./docker/grafana/provisioning" in mounts
    datasources = yaml.safe_load(next((ROOT / "docker/grafana/provisioning/datasources").glob("*.yml")).read_text())
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    providers = yaml.safe_load(next((ROOT / "docker/grafana/provisioning/dashboards").glob("*.yml")).read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_the_gpu_override_builds_the_cuda_image_and_reserves_a_gpu():
    override = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())["services"]["vitserve"]
    assert override["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    assert override["environment"]["VITSERVE_DEVICE"] == "cuda"
    device = override["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


# ---- Grafana dashboard ----

def test_the_dashboard_plots_only_metrics_the_service_exports():
    dashboard = json.loads((ROOT / "docker/grafana/dashboards/vitserve.json").read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {name for e in expressions for name in re.findall(r"\bvitserve_\w+", e)}
    unknown = used - _exported_sample_names()
    assert not unknown, f"the dashboard queries metrics the service does not export: {sorted(unknown)}"
    for needed in ("vitserve_requests_total", "vitserve_request_duration_seconds_bucket", "vitserve_queue_depth_images",
                   "vitserve_inference_seconds_bucket", "vitserve_rejections_total", "vitserve_model_served_version",
                   "vitserve_model_loads_total"):
        assert needed in used, needed
    assert any("vitserve_batch_size_" in n for n in used)
    assert any(e.startswith("histogram_quantile(") and "vitserve_request_duration_seconds_bucket" in e for e in expressions)


# ---- Kubernetes ----

def _kubernetes_problem(doc) -> str | None:
    """What the Kubernetes API schema (strict: no unknown fields) finds wrong in `doc`, or None."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    try:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.ValidationError as error:  # its str() dumps the whole schema: keep the gist
        where = "/".join(str(p) for p in getattr(error, "path", []))
        return f"{doc['kind']} at {where or '/'}: {getattr(error, 'message', error)}"
    return None


def test_the_kubernetes_manifests_are_valid():
    docs = [(name, doc) for name, doc in _k8s_documents() if not _is_kserve(doc)]
    assert {doc["kind"] for _, doc in docs} >= {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"}
    for name, doc in docs:
        problem = _kubernetes_problem(doc)
        assert problem is None, f"{name}: {problem}"


def test_kustomize_applies_every_plain_manifest_and_leaves_kserve_out():
    """`kubectl apply -k docker/k8s` must work on any cluster: a KServe kind there fails on clusters without KServe."""
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    docs = _k8s_documents()
    assert sorted(listed) == sorted({name for name, doc in docs if not _is_kserve(doc)})
    assert KSERVE_MANIFEST in {name for name, doc in docs if _is_kserve(doc)}


def test_the_deployment_probes_drains_and_runs_one_worker_per_pod():
    deployment, config = _one("Deployment"), _one("ConfigMap")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {"requests", "limits"} <= set(container["resources"])
    assert container["envFrom"][0]["configMapRef"]["name"] == config["metadata"]["name"]
    settings = config["data"]
    assert all(k.startswith("VITSERVE_") for k in settings)
    assert "VITSERVE_WORKERS" not in settings and settings["VITSERVE_HOST"] == "0.0.0.0"  # removed: vit-serve refuses it
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > float(settings["VITSERVE_DRAIN_TIMEOUT_S"]) + float(pre_stop[1])
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_the_service_and_autoscaler_target_the_deployment():
    deployment, service, hpa = _one("Deployment"), _one("Service"), _one("HorizontalPodAutoscaler")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] in {"http", 8000}
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"


def _apply_json_patch(doc: dict, operation: dict) -> None:
    """The JSON Patch operations the overlay uses (replace, add on an object member), as kustomize applies them."""
    assert operation["op"] in ("replace", "add"), operation
    *parents, last = operation["path"].strip("/").split("/")
    node = doc
    for key in parents:
        node = node[key]
    assert operation["op"] == "add" or last in node, f"replace of a missing {operation['path']}"
    node[last] = operation["value"]


def _queue_delay_overlay() -> list[dict]:
    """docker/k8s-queue-delay rendered as kustomize renders it: the base's manifests with its patches applied."""
    kustomization = yaml.safe_load((QUEUE_DELAY / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../k8s"]
    docs = [copy.deepcopy(doc) for _, doc in _k8s_documents() if not _is_kserve(doc)]
    for patch in kustomization["patches"]:
        target = patch["target"]
        [doc] = [d for d in docs if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]
                 and d["apiVersion"] == f"{target['group']}/{target['version']}"]
        for operation in yaml.safe_load((QUEUE_DELAY / patch["path"]).read_text()):
            _apply_json_patch(doc, operation)
    return docs


def adapter_rules() -> list[dict]:
    return yaml.safe_load((QUEUE_DELAY / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"]


def test_the_queue_delay_overlay_scales_on_the_metric_the_adapter_serves():
    docs = _queue_delay_overlay()
    for doc in docs:
        problem = _kubernetes_problem(doc)
        assert problem is None, problem
    [hpa] = [doc for doc in docs if doc["kind"] == "HorizontalPodAutoscaler"]
    [metric] = hpa["spec"]["metrics"]  # the queue delay alone: two HPAs, or CPU beside it, would fight over replicas
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    [rule] = adapter_rules()
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    series = re.search(r"^(\w+)\{", rule["seriesQuery"]).group(1)
    assert re.fullmatch(rule["name"]["matches"], series) and series in _exported_sample_names()
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert rule["metricsQuery"].count("<<.LabelMatchers>>") == 2 and "by (<<.GroupBy>>)" in rule["metricsQuery"]
    if shutil.which("kubectl"):  # where kubectl is installed, its kustomize renders the same manifests
        rendered = subprocess.run(["kubectl", "kustomize", str(QUEUE_DELAY)], capture_output=True, text=True, timeout=60)
        assert rendered.returncode == 0, rendered.stderr
        key = lambda doc: (doc["kind"], doc["metadata"]["name"])  # noqa: E731
        assert sorted(yaml.safe_load_all(rendered.stdout), key=key) == sorted(docs, key=key)


# ---- KServe ----
# kubernetes-validate knows only the core API, not KServe's CRD. The InferenceService is checked in two parts: KServe's
# own fields against a schema written here from the KServe v1beta1 API reference (InferenceServiceSpec; PredictorSpec =
# one implementation + ComponentExtensionSpec + an inline core PodSpec), and everything else in the predictor as the
# core PodSpec it is inlined from, strictly, so that a field KServe does not have (the API server would silently
# drop it) fails here.

STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
COMPONENT_EXTENSION = {  # ComponentExtensionSpec: how KServe deploys and scales a component
    "minReplicas": {"type": "integer", "minimum": 0}, "maxReplicas": {"type": "integer", "minimum": 0},
    "scaleTarget": {"type": "integer", "minimum": 1}, "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]},
    "containerConcurrency": {"type": "integer", "minimum": 0}, "timeout": {"type": "integer", "minimum": 1},
    "canaryTrafficPercent": {"type": "integer", "minimum": 0, "maximum": 100},
    "logger": {"type": "object"}, "batcher": {"type": "object"}, "deploymentStrategy": {"type": "object"},
    "labels": STRING_MAP, "annotations": STRING_MAP,
}
# PredictorSpec's one-of implementations (frameworks, and `model` for a ServingRuntime); a custom predictor gives none
# of them, only PodSpec containers. protocolVersion and storageUri belong inside an implementation.
IMPLEMENTATIONS = ("sklearn", "xgboost", "tensorflow", "pytorch", "triton", "onnx", "huggingface", "pmml", "lightgbm",
                   "paddle", "model")
PREDICTOR_ONLY = ("storageUris", "workerSpec")
INFERENCE_SERVICE = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "serving.kserve.io/v1beta1"}, "kind": {"const": "InferenceService"},
        "metadata": {"type": "object", "required": ["name"], "properties": {
            # KServe refuses other names: they become DNS labels of the predictor's host
            "name": {"type": "string", "pattern": "^[a-z]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
            "labels": STRING_MAP, "annotations": STRING_MAP}},
        "spec": {"type": "object", "required": ["predictor"], "additionalProperties": False, "properties": {
            "predictor": {"type": "object", "properties": {
                **COMPONENT_EXTENSION, **{name: {"type": "object"} for name in IMPLEMENTATIONS},
                "storageUris": {"type": "array", "minItems": 1}, "workerSpec": {"type": "object"}}},
            "transformer": {"type": "object"}, "explainer": {"type": "object"}}},
    },
}
KSERVE_CONTAINER = "kserve-container"  # the container KServe treats as the custom predictor
PROTOCOLS = ("v1", "v2")  # a custom predictor's PROTOCOL (KServe's validateCustomProtocol)


def _kserve_problems(doc) -> list[str]:
    """What KServe (its CRD schema and its admission checks for a custom predictor) would refuse in `doc`."""
    jsonschema = pytest.importorskip("jsonschema")
    problems = [f"at {'/'.join(map(str, error.path)) or '/'}: {error.message}"
                for error in jsonschema.Draft202012Validator(INFERENCE_SERVICE).iter_errors(doc)]
    if problems:
        return problems
    predictor = doc["spec"]["predictor"]
    pod_spec = {k: v for k, v in predictor.items() if k not in {*COMPONENT_EXTENSION, *IMPLEMENTATIONS, *PREDICTOR_ONLY}}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": doc["metadata"]["name"]}, "spec": pod_spec}
    if problem := _kubernetes_problem(pod):
        problems.append(f"the predictor's PodSpec: {problem}")
    containers = pod_spec.get("containers", [])
    # KServe's implementations: the frameworks given, plus a custom predictor when a container is named
    # kserve-container (or, with no framework, the first container); there must be exactly one
    implementations = [name for name in IMPLEMENTATIONS if name in predictor]
    if any(c["name"] == KSERVE_CONTAINER for c in containers) or (containers and not implementations):
        implementations.append("a custom predictor")
    if len(implementations) != 1:
        problems.append(f"exactly one implementation in a predictor, found {implementations or 'none'}")
    if containers and implementations == ["a custom predictor"]:
        protocol = {e["name"]: e.get("value") for e in containers[0].get("env", [])}.get("PROTOCOL")
        if protocol is not None and protocol not in PROTOCOLS:
            problems.append(f"PROTOCOL {protocol!r} is none of {PROTOCOLS}")
    if predictor.get("maxReplicas") and predictor.get("minReplicas", 1) > predictor["maxReplicas"]:
        problems.append("minReplicas > maxReplicas")
    return problems


def _inference_service():
    return _one("InferenceService")


def test_the_inference_service_is_valid_for_kserve():
    assert _kserve_problems(_inference_service()) == []


def _set_env(predictor, name: str, value: str) -> None:
    env = predictor["containers"][0].setdefault("env", [])
    env[:] = [e for e in env if e["name"] != name] + [{"name": name, "value": value}]


@pytest.mark.parametrize("change, fragment", [
    (lambda p: p.update(protocolVersion="v2"), "protocolVersion"),  # belongs to predictor.model, not a custom predictor
    (lambda p: _set_env(p, "PROTOCOL", "v3"), "PROTOCOL"),
    (lambda p: p["containers"][0].update(readinessProbe={"httpGet": {"path": "/v2/health/ready"}}), "port"),
    (lambda p: p.update(minReplicas=11), "minReplicas > maxReplicas"),
    (lambda p: p.update(scaleMetric="gpu"), "scaleMetric"),
    (lambda p: p.update(model={"modelFormat": {"name": "onnx"}}), "exactly one implementation"),
])
def test_the_kserve_check_catches_what_kserve_would_refuse(change, fragment):
    broken = copy.deepcopy(_inference_service())
    change(broken["spec"]["predictor"])
    problems = _kserve_problems(broken)
    assert any(fragment in problem for problem in problems), problems


def test_the_inference_service_speaks_v2_and_runs_the_pod_the_deployment_runs():
    v2 = pytest.importorskip("service.v2")
    service, deployment, config = _inference_service(), _one("Deployment"), _one("ConfigMap")
    predictor, pod = service["spec"]["predictor"], deployment["spec"]["template"]["spec"]
    [container], [reference] = predictor["containers"], pod["containers"]
    assert container["name"] == KSERVE_CONTAINER
    assert {"name": "PROTOCOL", "value": "v2"} in container["env"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] == "http", probe
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    paths = {container[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert paths <= v2.HEALTH_PATHS, "probes reach the service's V2 health endpoints (open without an API key)"
    [port] = container["ports"]
    assert port["name"] == "http" and str(port["containerPort"]) == config["data"]["VITSERVE_PORT"]
    # the same image, settings, resources, models and hardening as the Deployment
    for field in ("image", "envFrom", "resources", "volumeMounts", "securityContext", "lifecycle"):
        assert container[field] == reference[field], field
    for field in ("volumes", "securityContext", "terminationGracePeriodSeconds"):
        assert predictor[field] == pod[field], field
    annotations = service["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "RawDeployment", "the pod keeps preStop and its drain"
    assert predictor["minReplicas"] <= predictor["maxReplicas"]
    budget = _one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"]
    assert budget.items() <= predictor["labels"].items(), "pdb.yaml also guards the predictor's pods"
