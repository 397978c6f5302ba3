"""The deployment files hold together: the Dockerfiles install the serving extra only and carry the production
basics, the compose stack is complete, the Grafana dashboard only plots metrics the service exports, and the
Kubernetes manifests are valid and drain cleanly. Fast and offline: no container engine needed (that is
tests/container, `make docker-test`)."""
import json
import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "docker" / "k8s"


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
    runs = " ".join(args for op, args in _instructions(ROOT / "Dockerfile") if op == "RUN")
    assert '".[serve,grpc]"' in runs  # the grpc extra too: the image serves the Open Inference Protocol over gRPC
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
                   "vitserve_inference_seconds_bucket", "vitserve_rejections_total"):
        assert needed in used, needed
    assert any("vitserve_batch_size_" in n for n in used)
    assert any(e.startswith("histogram_quantile(") and "vitserve_request_duration_seconds_bucket" in e for e in expressions)


# ---- Kubernetes ----

def test_the_kubernetes_manifests_are_valid():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = _k8s_documents()
    assert {doc["kind"] for _, doc in docs} >= {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"}
    version = kubernetes_validate.latest_version()
    for name, doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:  # its str() dumps the whole schema: keep the gist
            where = "/".join(str(p) for p in getattr(error, "path", []))
            pytest.fail(f"{name} ({doc['kind']}) at {where or '/'}: {getattr(error, 'message', error)}")
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted({name for name, _ in docs})


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
    assert settings["VITSERVE_WORKERS"] == "1" and settings["VITSERVE_HOST"] == "0.0.0.0"
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
