#!/usr/bin/env python3
"""Check the Helm chart in charts/weir without a cluster or a helm binary.

Run from anywhere (it works relative to the repository root):

    .venv/bin/python scripts/check_chart.py

with the packages of scripts/requirements-ci.txt installed. It

1. lints the chart (strict) with its default values and with each
   charts/weir/ci/*-values.yaml, failing on any error or warning (only the
   "icon is recommended" note is let through);
2. renders the chart with the same values and validates every object against
   the Kubernetes OpenAPI schemas of the oldest supported version (the lower
   bound of Chart.yaml's kubeVersion, 1.30) and of 1.37, in strict mode (unknown fields are errors);
   Prometheus Operator ServiceMonitors, which have no built-in schema, are
   only checked for apiVersion, kind and metadata.name;
3. asserts properties of the manifests that the schemas cannot express: no
   wildcard in any RBAC rule, the agent DaemonSet's GPU scheduling, downward
   API variables and model cache, the operator's hardening and probes, and
   the value-dependent parts of each CI values file;
4. checks that values.schema.json rejects a value of the wrong type.

It prints one line per values file and exits non-zero on the first class of
failure, listing every failure found.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Callable

import helm_python as helm
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "weir"
RELEASE = "weir"
NAMESPACE = "weir-system"
# helm lint's --kube-version: a version inside the chart's kubeVersion range.
LINT_KUBE_VERSION = "v1.33.0"
# Newest Kubernetes validated against; the oldest is the lower bound of
# Chart.yaml's kubeVersion (">=1.30.0-0" -> 1.30).
NEWEST_KUBE_VERSION = "1.37"
# Lint findings that are advice rather than problems.
LINT_ALLOWED = ("icon is recommended",)
SEVERITY = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}

NVIDIA_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
NVIDIA_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
MODEL_CACHE = "/var/lib/weir/models"

Obj = dict[str, Any]


class Failures:
    """Collects failures so one run reports all of them."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.messages.append(f"{where}: {message}")

    def check(self, condition: bool, where: str, message: str) -> bool:
        if not condition:
            self.add(where, message)
        return condition


# --------------------------------------------------------------------------
# Lint, render, validate


def lint(values: Obj, label: str, fails: Failures) -> None:
    report = helm.lint(str(CHART), values, strict=True, kube_version=LINT_KUBE_VERSION)
    for err in report.get("errors") or []:
        fails.add(f"lint [{label}]", str(err))
    for msg in report.get("messages") or []:
        if msg.get("severity", 0) >= 2 and not any(a in msg.get("error", "") for a in LINT_ALLOWED):
            sev = SEVERITY.get(msg.get("severity"), str(msg.get("severity")))
            fails.add(f"lint [{label}]", f"{sev} {msg.get('path')}: {msg.get('error')}")


def render(values: Obj) -> dict[str, str]:
    chart = helm.Chart.load(str(CHART))
    return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def parse(manifests: dict[str, str], label: str, fails: Failures) -> list[tuple[str, Obj]]:
    """Every object of the rendered templates, with the template it came from."""
    objects = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        try:
            docs = list(yaml.safe_load_all(text))
        except yaml.YAMLError as e:
            fails.add(f"{path} [{label}]", f"not valid YAML: {e}")
            continue
        for doc in docs:
            if doc is None:
                continue
            if not isinstance(doc, dict):
                fails.add(f"{path} [{label}]", f"a document is a {type(doc).__name__}, not an object")
                continue
            objects.append((path, doc))
    return objects


def describe(obj: Obj) -> str:
    return f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"


def kube_versions(fails: Failures) -> tuple[str, ...]:
    """The oldest supported Kubernetes (from Chart.yaml) and the newest."""
    kube_version = str(yaml.safe_load((CHART / "Chart.yaml").read_text()).get("kubeVersion", ""))
    m = re.match(r"^>=\s*v?(\d+)\.(\d+)", kube_version)
    if not m:
        fails.add("Chart.yaml", f"kubeVersion {kube_version!r} has no '>=MAJOR.MINOR' lower bound")
        return (NEWEST_KUBE_VERSION,)
    return (f"{m[1]}.{m[2]}", NEWEST_KUBE_VERSION)


def validate(path: str, obj: Obj, versions: tuple[str, ...], label: str, fails: Failures) -> None:
    where = f"{path} {describe(obj)} [{label}]"
    if obj.get("apiVersion", "").startswith("monitoring.coreos.com/"):
        # A Prometheus Operator CRD: no schema ships with Kubernetes.
        fails.check(obj.get("kind") == "ServiceMonitor", where, "unexpected monitoring.coreos.com kind")
        fails.check(bool((obj.get("metadata") or {}).get("name")), where, "metadata.name is missing")
        fails.check(isinstance(obj.get("spec"), dict), where, "spec is missing")
        return
    for version in versions:
        try:
            kubernetes_validate.validate(obj, desired_version=version, strict=True)
        except kubernetes_validate.ValidationError as e:
            at = ".".join(str(p) for p in e.path) or "(root)"
            fails.add(where, f"invalid for Kubernetes {version} at {at}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            fails.add(where, e.message)
        except kubernetes_validate.InvalidSchemaError as e:
            fails.add(where, e.message)
        except (KeyError, TypeError) as e:
            fails.add(where, f"not a Kubernetes object ({e!r})")


# --------------------------------------------------------------------------
# Assertions on the rendered objects


def find(objects: list[tuple[str, Obj]], kind: str, name: str | None = None) -> list[Obj]:
    return [o for _, o in objects if o.get("kind") == kind
            and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[tuple[str, Obj]], kind: str, name: str, where: str, fails: Failures) -> Obj | None:
    found = find(objects, kind, name)
    if fails.check(len(found) == 1, where, f"expected one {kind}/{name}, found {len(found)}"):
        return found[0]
    return None


def container(pod_spec: Obj, name: str) -> Obj:
    for c in pod_spec.get("containers", []):
        if c.get("name") == name:
            return c
    return {}


def env_field_path(c: Obj, name: str) -> str | None:
    for e in c.get("env", []):
        if e.get("name") == name:
            return ((e.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
    return None


def env_secret(c: Obj, name: str) -> tuple[str, str] | None:
    """(Secret name, key) an environment variable is read from, if any."""
    for e in c.get("env", []):
        if e.get("name") == name:
            ref = (e.get("valueFrom") or {}).get("secretKeyRef") or {}
            return ref.get("name"), ref.get("key")
    return None


def check_rbac(objects: list[tuple[str, Obj]], label: str, fails: Failures) -> None:
    for kind in ("Role", "ClusterRole"):
        for role in find(objects, kind):
            where = f"{describe(role)} [{label}]"
            for i, rule in enumerate(role.get("rules") or []):
                for field in ("verbs", "resources", "apiGroups", "resourceNames", "nonResourceURLs"):
                    values = rule.get(field) or []
                    fails.check(not any("*" in v for v in values), where,
                                f"rule {i} has a wildcard in {field}: {values}")


def check_operator(objects: list[tuple[str, Obj]], label: str, fails: Failures) -> Obj | None:
    where = f"operator Deployment [{label}]"
    dep = one(objects, "Deployment", f"{RELEASE}-operator", where, fails)
    if dep is None:
        return None
    pod = dep["spec"]["template"]["spec"]
    c = container(pod, "operator")
    if not fails.check(bool(c), where, "no container named operator"):
        return dep
    sc = c.get("securityContext") or {}
    pod_sc = pod.get("securityContext") or {}
    fails.check(sc.get("readOnlyRootFilesystem") is True, where, "readOnlyRootFilesystem is not true")
    fails.check(sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where,
                "runAsNonRoot is not true")
    fails.check(sc.get("allowPrivilegeEscalation") is False, where, "allowPrivilegeEscalation is not false")
    fails.check("ALL" in ((sc.get("capabilities") or {}).get("drop") or []), where,
                "capabilities do not drop ALL")
    for probe, path in (("livenessProbe", "/health"), ("readinessProbe", "/ready")):
        got = ((c.get(probe) or {}).get("httpGet") or {}).get("path")
        fails.check(got == path, where, f"{probe} is not an httpGet on {path} (got {got!r})")
    args = c.get("args") or []
    fails.check(args[:1] == ["run"] and "--leader-election" in args, where,
                f"args are not 'run ... --leader-election': {args}")
    fails.check(env_field_path(c, "POD_NAMESPACE") == "metadata.namespace", where,
                "POD_NAMESPACE is not from metadata.namespace")
    fails.check(any(p.get("name") == "metrics" for p in c.get("ports") or []), where,
                "no port named metrics")
    return dep


def check_agent(objects: list[tuple[str, Obj]], label: str, fails: Failures) -> Obj | None:
    where = f"agent DaemonSet [{label}]"
    ds = one(objects, "DaemonSet", f"{RELEASE}-agent", where, fails)
    if ds is None:
        return None
    pod = ds["spec"]["template"]["spec"]
    c = container(pod, "agent")
    if not fails.check(bool(c), where, "no container named agent"):
        return ds
    fails.check(env_field_path(c, "NODE_NAME") == "spec.nodeName", where,
                "NODE_NAME is not from spec.nodeName")
    fails.check(env_field_path(c, "POD_IP") == "status.podIP", where, "POD_IP is not from status.podIP")
    peer = env_secret(c, "WEIR_PEER_TOKEN")
    fails.check(peer is not None and peer[1] == "token", where, "WEIR_PEER_TOKEN is not from a Secret")
    if peer is not None and peer[0] == f"{RELEASE}-peer-token":
        secret = find(objects, "Secret", f"{RELEASE}-peer-token")
        fails.check(len(secret) == 1 and "token" in (secret[0].get("data") or {}), where,
                    "the peer-token Secret the agent reads is not rendered")
    host_paths = {v["name"]: v["hostPath"] for v in pod.get("volumes") or [] if "hostPath" in v}
    fails.check(bool(host_paths), where, "no hostPath volume")
    mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts") or []}
    fails.check(any(mounts.get(n) == MODEL_CACHE for n in host_paths), where,
                f"no hostPath volume mounted at {MODEL_CACHE}")
    fails.check(any(p.get("name") == "http" for p in c.get("ports") or []), where, "no port named http")
    sc = c.get("securityContext") or {}
    fails.check(sc.get("readOnlyRootFilesystem") is True and sc.get("runAsNonRoot") is True, where,
                "the agent container is not read-only and non-root")
    for probe, path in (("startupProbe", "/health"), ("livenessProbe", "/health"),
                        ("readinessProbe", "/ready")):
        got = ((c.get(probe) or {}).get("httpGet") or {}).get("path")
        fails.check(got == path, where, f"{probe} is not an httpGet on {path} (got {got!r})")
    drain = [a for a in c.get("args") or [] if str(a).startswith("--drain-timeout=")]
    if fails.check(len(drain) == 1, where, "no --drain-timeout argument"):
        seconds = int(drain[0].split("=", 1)[1])
        grace = pod.get("terminationGracePeriodSeconds")
        fails.check(isinstance(grace, int) and grace > seconds, where,
                    f"terminationGracePeriodSeconds {grace!r} does not outlast the drain ({seconds} s)")
    return ds


def check_defaults(objects: list[tuple[str, Obj]], fails: Failures) -> None:
    label = "defaults"
    ds = check_agent(objects, label, fails)
    if ds is not None:
        pod = ds["spec"]["template"]["spec"]
        where = f"agent DaemonSet [{label}]"
        fails.check(NVIDIA_TOLERATION in (pod.get("tolerations") or []), where,
                    f"no toleration {NVIDIA_TOLERATION}")
        fails.check(pod.get("nodeSelector") == NVIDIA_NODE_SELECTOR, where,
                    f"nodeSelector is {pod.get('nodeSelector')}, not {NVIDIA_NODE_SELECTOR}")
        limits = (container(pod, "agent").get("resources") or {}).get("limits") or {}
        fails.check("nvidia.com/gpu" not in limits, where, "requests GPUs although gpusPerNode is 0")
        fails.check("runtimeClassName" not in pod, where, "sets runtimeClassName by default")
    dep = check_operator(objects, label, fails)
    if dep is not None:
        fails.check(dep["spec"]["replicas"] == 2, f"operator Deployment [{label}]", "replicas is not 2")
    fails.check(len(find(objects, "PodDisruptionBudget")) == 1, f"[{label}]",
                "no PodDisruptionBudget for 2 operator replicas")
    fails.check(not find(objects, "ServiceMonitor"), f"[{label}]", "ServiceMonitor rendered by default")
    for kind in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"):
        fails.check(bool(find(objects, kind)), f"[{label}]", f"no {kind}")
    lease_roles = [r for r in find(objects, "Role")
                   if any("leases" in (rule.get("resources") or []) for rule in r.get("rules") or [])]
    fails.check(len(lease_roles) == 1 and lease_roles[0]["metadata"].get("namespace") == NAMESPACE,
                f"[{label}]", "no namespaced Role for the leader-election Lease")
    for role in find(objects, "ClusterRole"):
        for rule in role.get("rules") or []:
            fails.check("leases" not in (rule.get("resources") or []), f"{describe(role)} [{label}]",
                        "leases belong in the namespaced Role")
    svc = one(objects, "Service", RELEASE, f"endpoint Service [{label}]", fails)
    if svc is not None:
        fails.check(svc["spec"].get("type") == "ClusterIP", f"endpoint Service [{label}]", "not ClusterIP")
    peers = one(objects, "Service", f"{RELEASE}-agents", f"peer Service [{label}]", fails)
    if peers is not None:
        fails.check(peers["spec"].get("clusterIP") == "None", f"peer Service [{label}]", "not headless")
    one(objects, "Service", f"{RELEASE}-operator-metrics", f"operator metrics Service [{label}]", fails)


def check_gpu(objects: list[tuple[str, Obj]], fails: Failures) -> None:
    label = "gpu-values.yaml"
    ds = check_agent(objects, label, fails)
    check_operator(objects, label, fails)
    where = f"agent DaemonSet [{label}]"
    if ds is not None:
        pod = ds["spec"]["template"]["spec"]
        fails.check(pod.get("runtimeClassName") == "nvidia", where, "runtimeClassName is not nvidia")
        limits = (container(pod, "agent").get("resources") or {}).get("limits") or {}
        fails.check(limits.get("nvidia.com/gpu") == 1, where, f"limits lack nvidia.com/gpu: 1 ({limits})")
        fails.check(limits.get("memory") == "16Gi", where, "the memory limit was lost")
        c = container(pod, "agent")
        fails.check(env_secret(c, "WEIR_LIMITS_REDIS_URL") == ("weir-redis", "url"), where,
                    "WEIR_LIMITS_REDIS_URL is not from agent.tenantLimits.redisUrlSecret")
        fails.check(env_secret(c, "WEIR_METRICS_TOKEN") == ("weir-metrics", "token"), where,
                    "WEIR_METRICS_TOKEN is not from metrics.bearerTokenSecret")
    agent_monitors = [m for m in find(objects, "ServiceMonitor") if m["metadata"]["name"].endswith("-agent")]
    fails.check(bool(agent_monitors) and all(
        e.get("bearerTokenSecret") == {"name": "weir-metrics", "key": "token"}
        for m in agent_monitors for e in m["spec"]["endpoints"]), f"[{label}]",
        "the agent ServiceMonitor does not send the metrics bearer token")
    fails.check(len(find(objects, "ServiceMonitor")) >= 1, f"[{label}]", "no ServiceMonitor")
    svc = one(objects, "Service", RELEASE, f"endpoint Service [{label}]", fails)
    if svc is not None:
        fails.check(svc["spec"].get("type") == "LoadBalancer", f"endpoint Service [{label}]",
                    "not LoadBalancer")


def check_minimal(objects: list[tuple[str, Obj]], fails: Failures) -> None:
    label = "minimal-values.yaml"
    ds = check_agent(objects, label, fails)
    dep = check_operator(objects, label, fails)
    for kind in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
                 "PodDisruptionBudget"):
        fails.check(not find(objects, kind), f"[{label}]", f"{kind} rendered")
    if dep is not None:
        pod = dep["spec"]["template"]["spec"]
        fails.check(dep["spec"]["replicas"] == 1, f"operator Deployment [{label}]", "replicas is not 1")
        fails.check(pod.get("serviceAccountName") == "weir-operator-external",
                    f"operator Deployment [{label}]", "does not use the given ServiceAccount")
    if ds is not None:
        fails.check(ds["spec"]["template"]["spec"].get("serviceAccountName") == "weir-agent-external",
                    f"agent DaemonSet [{label}]", "does not use the given ServiceAccount")


# Value-dependent assertions for the known CI values files; any other
# *-values.yaml gets the checks common to all.
CHECKS: dict[str, Callable[[list[tuple[str, Obj]], Failures], None]] = {
    "defaults": check_defaults,
    "gpu-values.yaml": check_gpu,
    "minimal-values.yaml": check_minimal,
}


def check_common(objects: list[tuple[str, Obj]], label: str, fails: Failures) -> None:
    check_agent(objects, label, fails)
    check_operator(objects, label, fails)


# --------------------------------------------------------------------------


def check_schema_rejects(fails: Failures) -> None:
    """values.schema.json must turn away a value of the wrong type."""
    bad = {"operator": {"replicas": "two"}}
    try:
        render(bad)
    except helm.HelmError as e:
        if "replicas" not in str(e):
            fails.add("values.schema.json", f"rejected {bad} without naming replicas: {e}")
        return
    fails.add("values.schema.json", f"accepted {bad}")


def main() -> int:
    fails = Failures()
    versions = kube_versions(fails)
    runs: list[tuple[str, Obj]] = [("defaults", {})]
    ci_files = sorted((CHART / "ci").glob("*-values.yaml"))
    if not ci_files:
        fails.add("charts/weir/ci", "no *-values.yaml files")
    for f in ci_files:
        runs.append((f.name, yaml.safe_load(f.read_text()) or {}))

    summary = []
    for label, values in runs:
        lint(values, label, fails)
        try:
            manifests = render(values)
        except helm.HelmError as e:
            fails.add(f"render [{label}]", str(e))
            continue
        objects = parse(manifests, label, fails)
        for path, obj in objects:
            validate(path, obj, versions, label, fails)
        check_rbac(objects, label, fails)
        if label in CHECKS:
            CHECKS[label](objects, fails)
        else:
            check_common(objects, label, fails)
        kinds = sorted({o["kind"] for _, o in objects})
        summary.append(f"  {label:<22} {len(objects):>3} objects validated "
                       f"(Kubernetes {' and '.join(versions)}): {', '.join(kinds)}")

    check_schema_rejects(fails)

    print(f"Helm chart {CHART.relative_to(ROOT)}: lint (strict), render, schema validation")
    print("\n".join(summary))
    if fails.messages:
        print(f"\nFAILED: {len(fails.messages)} problem(s):", file=sys.stderr)
        for m in fails.messages:
            print(f"  - {m}", file=sys.stderr)
        return 1
    print("  values.schema.json rejects operator.replicas: \"two\"")
    print("chart check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
