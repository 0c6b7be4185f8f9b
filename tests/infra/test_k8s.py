"""infra/k8s: every manifest validates (core kinds against the upstream schemas kubernetes-validate
ships, KServe and KEDA kinds against tests/infra/schemas), the kustomization lists them all, no secret
value is written down, and the workloads are probed, bounded, non-root and wired to each other."""

from __future__ import annotations

import copy
import inspect
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from backend.config import ServingSettings, UISettings
from backend.rag.jobs import JobQueue
from backend.serving.discovery import parse_target
from tests.infra import files

K8S_VERSION = "1.30"
CRD_SCHEMAS = {
    ("serving.kserve.io/v1beta1", "InferenceService"): "kserve-inferenceservice.json",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "kserve-servingruntime.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda-triggerauthentication.json",
}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|HMAC_KEY")
NOT_SETTINGS = {"FORWARDED_ALLOW_IPS"}  # uvicorn's own: trusted proxy addresses
WORKLOADS = ("qwen-chat-ui", "qwen-rag-worker")


@cache
def crd_schema(name: str) -> dict[str, Any]:
    schema = json.loads((files.SCHEMAS / name).read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def validate(doc: dict[str, Any]) -> None:
    """Raises jsonschema.ValidationError (or kubernetes_validate's) when `doc` is invalid."""
    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_SCHEMAS:
        jsonschema.Draft202012Validator(crd_schema(CRD_SCHEMAS[key])).validate(doc)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def as_pod(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


POD_SPEC_FIELDS = {"containers", "volumes", "serviceAccountName", "securityContext",
                   "terminationGracePeriodSeconds", "tolerations", "nodeSelector", "affinity"}  # fmt: skip


def embedded_pods() -> list[dict[str, Any]]:
    """The Kubernetes types inside the KServe objects, as Pods kubernetes-validate can check."""
    pods = []
    runtime = files.k8s_object("ServingRuntime", "qwen-vllm")["spec"]
    pods.append(as_pod("runtime", {"containers": runtime["containers"],
                                   "volumes": runtime.get("volumes", [])}))  # fmt: skip
    predictor = files.k8s_object("InferenceService", "qwen-engine")["spec"]["predictor"]
    model = {k: v for k, v in predictor["model"].items()
             if k not in {"modelFormat", "runtime", "storageUri", "protocolVersion", "storage"}}  # fmt: skip
    spec = {k: v for k, v in predictor.items() if k in POD_SPEC_FIELDS}
    spec["containers"] = [{"name": "kserve-container", **model}]
    pods.append(as_pod("predictor", spec))
    return pods


def test_every_manifest_validates() -> None:
    docs = files.k8s_documents()
    assert len(docs) > 20
    for name, doc in docs:
        try:
            validate(doc)
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as exc:
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {exc.message}")


def test_kubernetes_types_inside_kserve_objects_validate() -> None:
    pods = embedded_pods()
    assert pods  # the KServe objects do carry pod specs to check
    for pod in pods:
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)  # raises when invalid


@pytest.mark.parametrize(
    ("kind", "edit"),
    [
        ("Deployment", lambda d: d["spec"]["template"]["spec"]["containers"][0].update(imagePullPolicyy="Always")),
        ("ScaledObject", lambda d: d["spec"]["triggers"][0]["metadata"].update(lagCount=10)),
        ("InferenceService", lambda d: d["spec"]["predictor"]["model"].pop("modelFormat")),
        ("ServingRuntime", lambda d: d["spec"].update(container=[])),
        ("TriggerAuthentication", lambda d: d["spec"]["secretTargetRef"][0].pop("key")),
    ],
)  # fmt: skip
def test_validation_rejects_a_broken_manifest(kind: str, edit: Any) -> None:
    doc = copy.deepcopy(files.k8s_objects(kind)[0])
    edit(doc)
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        validate(doc)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = files.load_yaml(files.K8S / "kustomization.yaml")
    on_disk = {p.name for p in files.K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(on_disk)
    assert kustomization["namespace"] == "qwen"
    assert all(
        doc["metadata"].get("namespace") in (None, "qwen") for _, doc in files.k8s_documents()
    )


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(spec.get("initContainers", [])) + list(spec["containers"])


@cache
def pod_specs() -> dict[str, dict[str, Any]]:
    specs = {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]
        for d in files.k8s_objects("Deployment")
    }
    specs |= {
        d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in files.k8s_objects("Job")
    }
    runtime = files.k8s_object("ServingRuntime", "qwen-vllm")["spec"]
    predictor = files.k8s_object("InferenceService", "qwen-engine")["spec"]["predictor"]
    specs["qwen-engine"] = {**predictor, "containers": runtime["containers"]}
    return specs


def test_no_secret_objects_or_literal_secret_values() -> None:
    assert not files.k8s_objects("Secret")
    for name, spec in pod_specs().items():
        for container in containers(spec):
            for var in container.get("env", []):
                if SECRET_NAME.search(var["name"]) or var["name"] in files.secret_env_names():
                    assert "value" not in var, (name, var["name"])
                    assert var["valueFrom"]["secretKeyRef"]["name"] == "qwen-secrets", (
                        name,
                        var["name"],
                    )
    for config in files.k8s_objects("ConfigMap"):
        for key in config["data"]:
            assert not SECRET_NAME.search(key) and key not in files.secret_env_names(), key


def test_configmap_keys_are_real_settings() -> None:
    data = files.k8s_object("ConfigMap", "qwen-config")["data"]
    assert set(data) - NOT_SETTINGS <= files.settings_env_names()
    assert data["QWEN_MODE"] == "production"
    assert all(isinstance(value, str) for value in data.values())


def test_production_processes_get_every_checked_secret() -> None:
    required = {"QWEN_UI__AUTH_SECRET", "QWEN_UI__ADMIN_PASSWORD", "QWEN_RAG__SERVICE_TOKEN",
                "QWEN_AUDIT__HMAC_KEY", "QWEN_DATABASE__URL", "QWEN_REDIS__URL"}  # fmt: skip
    for name in (*WORKLOADS, "qwen-admin-init"):
        (container,) = pod_specs()[name]["containers"]
        assert required <= {var["name"] for var in container["env"]}, name


def test_workloads_are_probed_bounded_and_non_root() -> None:
    for name, spec in pod_specs().items():
        pod_security = spec["securityContext"]
        assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] > 0, name
        assert pod_security["seccompProfile"]["type"] == "RuntimeDefault", name
        for container in containers(spec):
            resources = container.get("resources") or spec.get("model", {}).get("resources")
            assert resources and {"cpu", "memory"} <= set(resources["requests"]), name
            assert {"cpu", "memory"} <= set(resources["limits"]), name
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            if name != "qwen-admin-init":  # a Job: no traffic, no probes
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    assert probe in container, (name, probe)


def test_engine_requests_a_gpu() -> None:
    resources = files.k8s_object("InferenceService", "qwen-engine")["spec"]["predictor"]["model"][
        "resources"
    ]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "1"


def prestop_seconds(container: dict[str, Any]) -> int:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    return int(command[1])


def test_grace_period_covers_prestop_and_drain() -> None:
    drains = {
        "qwen-chat-ui": UISettings().drain_s + 15,  # its own drain, then uvicorn's shutdown
        "qwen-rag-worker": 30,
    }  # uvicorn graceful shutdown (backend/cli.py)
    runtime = files.k8s_object("ServingRuntime", "qwen-vllm")["spec"]["containers"][0]
    drains["qwen-engine"] = int(
        next(a for a in runtime["args"] if a.startswith("--shutdown-timeout=")).split("=")[1]
    )
    for name, drain in drains.items():
        spec = pod_specs()[name]
        (container,) = spec["containers"]
        assert spec["terminationGracePeriodSeconds"] > prestop_seconds(container) + drain, name


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def pod_labels() -> dict[str, dict[str, str]]:
    labels = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
              for d in files.k8s_objects("Deployment") + files.k8s_objects("Job")}  # fmt: skip
    isvc = files.k8s_object("InferenceService", "qwen-engine")
    # KServe labels predictor pods with the InferenceService's name, plus spec.predictor.labels.
    labels["qwen-engine"] = {"serving.kserve.io/inferenceservice": "qwen-engine", "component": "predictor",
                             **isvc["spec"]["predictor"]["labels"]}  # fmt: skip
    return labels


def test_selectors_find_their_pods() -> None:
    for deployment in files.k8s_objects("Deployment"):
        template = deployment["spec"]["template"]["metadata"]["labels"]
        assert matches(deployment["spec"]["selector"]["matchLabels"], template)
    for service in files.k8s_objects("Service"):
        targets = [
            name
            for name, labels in pod_labels().items()
            if matches(service["spec"]["selector"], labels)
        ]
        assert len(targets) == 1, service["metadata"]["name"]
        (container,) = pod_specs()[targets[0]]["containers"]
        port_names = {port["name"] for port in container["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names
    for pdb in files.k8s_objects("PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert sum(matches(selector, labels) for labels in pod_labels().values()) == 1


def test_ingress_is_sticky_and_keeps_websockets_open() -> None:
    ingress = files.k8s_object("Ingress", "qwen-chat-ui")
    notes = ingress["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/affinity"] == "cookie"
    assert notes["nginx.ingress.kubernetes.io/affinity-mode"] == "persistent"
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    assert int(notes["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 3600
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == "qwen-chat-ui" and ingress["spec"]["tls"]


def routed(path: str, rules: list[dict[str, Any]]) -> bool:
    """Whether an Ingress with `rules` sends `path` to a backend (networking.k8s.io/v1 matching:
    Exact is the whole path, Prefix matches whole path elements)."""
    for rule in rules:
        for entry in rule["http"]["paths"]:
            want, kind = entry["path"], entry["pathType"]
            if kind == "Exact" and path == want:
                return True
            if kind in ("Prefix", "ImplementationSpecific"):
                prefix = want.rstrip("/")
                if path == prefix or path.startswith(prefix + "/") or not prefix:
                    return True
    return False


def test_ingress_routes_the_ui_and_keeps_metrics_and_probes_inside() -> None:
    rules = files.k8s_object("Ingress", "qwen-chat-ui")["spec"]["rules"]
    for public in ("/", "/chat", "/chat/", "/chat/login", "/chat/ws/socket.io/"):
        assert routed(public, rules), public
    for internal in ("/metrics", "/healthz", "/readyz", "/metrics/", "/chatx"):
        assert not routed(internal, rules), internal


def policies_for(labels: dict[str, str]) -> list[dict[str, Any]]:
    return [
        p
        for p in files.k8s_objects("NetworkPolicy")
        if matches(p["spec"]["podSelector"].get("matchLabels", {}), labels)
    ]


def egress_ports(labels: dict[str, str]) -> dict[int, list[dict[str, Any]]]:
    ports: dict[int, list[dict[str, Any]]] = {}
    for policy in policies_for(labels):
        for rule in policy["spec"].get("egress", []):
            for port in rule.get("ports", []):
                ports.setdefault(port["port"], []).extend(rule["to"])
    return ports


def test_network_policies_deny_by_default() -> None:
    default = files.k8s_object("NetworkPolicy", "default-deny")
    assert default["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}


def test_chat_ui_reaches_exactly_its_dependencies() -> None:
    labels = pod_labels()
    ports = egress_ports(labels["qwen-chat-ui"])
    assert set(ports) == {53, 8100, 8080, 6379, 5432}
    assert any(
        matches(peer["podSelector"]["matchLabels"], labels["qwen-rag-worker"])
        for peer in ports[8100]
    )
    assert any(
        matches(peer["podSelector"]["matchLabels"], labels["qwen-engine"]) for peer in ports[8080]
    )


def test_only_chat_ui_and_monitoring_reach_the_backends() -> None:
    labels = pod_labels()
    for target, port in (("qwen-rag-worker", 8100), ("qwen-engine", 8080)):
        rules = [
            rule for p in policies_for(labels[target]) for rule in p["spec"].get("ingress", [])
        ]
        (rule,) = rules
        assert rule["ports"] == [{"protocol": "TCP", "port": port}]
        sources = [
            peer.get("podSelector", {}).get("matchLabels")
            or peer["namespaceSelector"]["matchLabels"]
            for peer in rule["from"]
        ]
        assert sources == [{"app.kubernetes.io/name": "qwen-stack", "app.kubernetes.io/component": "chat-ui"},
                           {"kubernetes.io/metadata.name": "monitoring"}]  # fmt: skip


def test_every_pod_has_its_own_policy() -> None:
    for name, labels in pod_labels().items():
        assert [p for p in policies_for(labels) if p["spec"]["podSelector"]], name


def test_rag_worker_scales_on_the_jobs_stream_lag() -> None:
    scaled = files.k8s_object("ScaledObject", "qwen-rag-worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "qwen-rag-worker"
    (trigger,) = scaled["spec"]["triggers"]
    defaults = {name: p.default for name, p in inspect.signature(JobQueue).parameters.items()}
    assert trigger["type"] == "redis-streams" and "lagCount" in trigger["metadata"]
    assert trigger["metadata"]["stream"] == defaults["stream"] == "qwen:rag:jobs"
    assert trigger["metadata"]["consumerGroup"] == defaults["group"] == "rag-workers"
    auth = files.k8s_object("TriggerAuthentication", trigger["authenticationRef"]["name"])
    assert {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]} == {"address", "password"}


def test_engine_scales_on_waiting_requests_and_kv_cache() -> None:
    scaled = files.k8s_object("ScaledObject", "qwen-engine")
    # KServe's raw deployment for InferenceService qwen-engine is the Deployment qwen-engine-predictor.
    isvc = files.k8s_object("InferenceService", "qwen-engine")
    assert scaled["spec"]["scaleTargetRef"]["name"] == isvc["metadata"]["name"] + "-predictor"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "external"
    triggers = {t["name"]: t for t in scaled["spec"]["triggers"]}
    assert "vllm:num_requests_waiting" in triggers["waiting"]["metadata"]["query"]
    kv = triggers["kv-cache"]
    assert (
        "min_over_time(vllm:kv_cache_usage_perc" in kv["metadata"]["query"]
        and "[2m]" in kv["metadata"]["query"]
    )
    assert kv["metadata"]["threshold"] == "0.75" and kv["metricType"] == "Value"
    assert scaled["spec"]["minReplicaCount"] >= 1  # a GPU replica takes minutes to start


def test_vllm_runtime_flags_match_compose_and_settings() -> None:
    (container,) = files.k8s_object("ServingRuntime", "qwen-vllm")["spec"]["containers"]
    given = {a.split("=")[0]: a.partition("=")[2] for a in container["args"] if a.startswith("--")}
    compose_flags = {
        a.split("=")[0]
        for a in files.compose()["services"]["vllm"]["command"]
        if a.startswith("--")
    }
    assert set(given) == compose_flags
    assert given["--scheduling-policy"] == "priority"
    config = files.k8s_object("ConfigMap", "qwen-config")["data"]
    assert given["--max-model-len"] == config["QWEN_ENGINE__N_CTX"]
    assert given["--served-model-name"] == config["QWEN_LLM__MODEL"]
    assert container["image"] == "vllm/vllm-openai:v0.18.0"
    assert config["QWEN_SERVING__PRIORITY_SCHEDULING"] == "true"
    assert int(config["QWEN_SERVING__SLOTS_PER_REPLICA"]) <= int(given["--max-num-seqs"])


def test_model_comes_from_the_models_volume() -> None:
    isvc = files.k8s_object("InferenceService", "qwen-engine")
    claim = isvc["spec"]["predictor"]["model"]["storageUri"].removeprefix("pvc://").split("/")[0]
    assert claim in {pvc["metadata"]["name"] for pvc in files.k8s_objects("PersistentVolumeClaim")}
    config = files.k8s_object("ConfigMap", "qwen-config")["data"]
    rag = pod_specs()["qwen-rag-worker"]
    mounts = {m["mountPath"]: m for m in rag["containers"][0]["volumeMounts"]}
    assert (
        config["QWEN_RAG__EMBEDDING_MODEL"].startswith("/models/") and mounts["/models"]["readOnly"]
    )


def test_internal_urls_point_at_services() -> None:
    config = files.k8s_object("ConfigMap", "qwen-config")["data"]
    services = {s["metadata"]["name"]: s for s in files.k8s_objects("Service")}
    rag = re.fullmatch(r"http://([\w-]+):(\d+)", config["QWEN_RAG__WORKER_URL"])
    assert rag and int(rag.group(2)) in {p["port"] for p in services[rag.group(1)]["spec"]["ports"]}
    assert (
        config["QWEN_LLM__BASE_URL"] == "http://qwen-engine-predictor/v1"
    )  # KServe's Service, port 80


def test_engine_discovery_resolves_to_the_engine_pods() -> None:
    config = files.k8s_object("ConfigMap", "qwen-config")["data"]
    target = ServingSettings(discover=config["QWEN_SERVING__DISCOVER"]).discover
    assert target is not None
    host, port = parse_target(target)
    service = files.k8s_object("Service", host.split(".")[0])
    assert service["spec"]["clusterIP"] == "None"  # headless: DNS answers with the pod IPs
    assert not service["spec"].get("publishNotReadyAddresses", False)
    assert matches(service["spec"]["selector"], pod_labels()["qwen-engine"])
    # The addresses are the pods', so the port is the container's, not the Service's.
    (container,) = files.k8s_object("ServingRuntime", "qwen-vllm")["spec"]["containers"]
    assert port in {p["containerPort"] for p in container["ports"]}


def test_readme_documents_the_secret_keys() -> None:
    keys = {var["valueFrom"]["secretKeyRef"]["key"]
            for spec in pod_specs().values() for c in containers(spec) for var in c.get("env", [])
            if "valueFrom" in var and "secretKeyRef" in var["valueFrom"]}  # fmt: skip
    keys |= {
        ref["key"]
        for auth in files.k8s_objects("TriggerAuthentication")
        for ref in auth["spec"]["secretTargetRef"]
    }
    readme = Path(files.K8S / "README.md").read_text(encoding="utf-8")
    assert all(f"--from-literal={key}=" in readme for key in keys), keys
