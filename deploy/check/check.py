"""The checks of scripts/check-deploy, which installs the tools and runs this with them.

Offline, from the repository alone:
- each kustomization under deploy/kubernetes renders with kubectl's kustomize, without warnings;
- every object it renders is valid against the Kubernetes JSON schemas (kubernetes-validate's,
  strict: unknown fields are errors) of the oldest and newest versions in K8S_VERSIONS, and the
  prometheus-operator kinds against our schemas in deploy/check/schemas;
- what ties the objects together: selectors select pods, named ports exist, the Secrets,
  ConfigMaps and keys referenced exist, pods meet the restricted Pod Security Standard with
  requests and limits, and nimgate's containers mount their config as a directory, probe its
  health endpoints and get the time to drain;
- each nimgate config (the in-image one, the ConfigMap's, the sidecar's Secret's): YAML, an
  admin listener reachable and behind a token, every variable it names provided, and
  `nimgate check-config`;
- the PrometheusRule holds the same groups as deploy/prometheus/nimgate-rules.yml, and promtool
  accepts them;
- deploy/Dockerfile passes hadolint, its VERSION is the workspace's, and the build context that
  .dockerignore leaves holds the workspace (cargo reads its manifests there).

Every problem is printed with where it is; the exit status is 1 when there is one.
"""

from __future__ import annotations

import argparse
import base64
import copy
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jsonschema
import referencing
import yaml
from kubernetes_validate import utils as kv

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZATIONS = ["deploy/kubernetes/gateway", "deploy/kubernetes/sidecar"]
# 1.30: the oldest Kubernetes where a preStop `sleep` works without a feature gate; 1.37: the
# newest kubernetes-validate bundles.
K8S_VERSIONS = ["1.30", "1.37"]
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring-v1.json",
}
RULES_FILE = ROOT / "deploy/prometheus/nimgate-rules.yml"
PROMETHEUS_RULE = ROOT / "deploy/kubernetes/gateway/prometheusrule.yaml"
IMAGE_CONFIG = ROOT / "deploy/nimgate.yaml"
CONFIG_DIR = "/etc/nimgate"
CONFIG_FILE = "nimgate.yaml"
# Containers allowed a writable root filesystem, and why: NIM writes below its install tree.
WRITABLE_ROOT = {"nim"}
# Containers whose image may stay at :latest: NIM's release is the user's to pick (the
# kustomization says to pin it).
LATEST_ALLOWED = {"nim"}
# Secrets the user creates outside the kustomization (image pull credentials).
EXTERNAL_SECRETS = {"ngc-registry"}
# Seconds the grace period must leave after preStop and the drain, before the kubelet kills.
MARGIN_SECONDS = 5
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet"}


class Problems:
    def __init__(self) -> None:
        self.found: list[str] = []

    def add(self, where: str, what: str) -> None:
        self.found.append(f"{where}: {what}")
        print(f"  FAIL {where}: {what}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kubectl", required=True)
    parser.add_argument("--hadolint", required=True)
    parser.add_argument("--promtool", required=True)
    parser.add_argument("--nimgate", required=True, help="the nimgate binary, for check-config")
    parser.add_argument("--sync-rules", action="store_true",
                        help="rewrite the PrometheusRule from deploy/prometheus/nimgate-rules.yml first")
    args = parser.parse_args()

    if args.sync_rules:
        PROMETHEUS_RULE.write_text(prometheus_rule_text())
        print(f"wrote {PROMETHEUS_RULE.relative_to(ROOT)}")

    problems = Problems()
    for kdir in KUSTOMIZATIONS:
        print(f"== {kdir}")
        objects = render(args.kubectl, kdir, problems)
        if objects is None:
            continue
        print(f"  rendered {len(objects)} objects: " + ", ".join(sorted(f"{o['kind']}/{name(o)}" for o in objects)))
        validate_schemas(kdir, objects, problems)
        # The checks below read the objects as the schemas describe them: an object the
        # schemas refused may stop one of them, which is then reported, not raised.
        for check in (check_references, check_pods, check_nimgate_pods, check_prometheus_rules):
            try:
                check(kdir, objects, args, problems)
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
                problems.add(kdir, f"{check.__name__} stopped on a malformed object: {type(e).__name__}: {e}")

    print("== deploy/Dockerfile, .dockerignore, deploy/nimgate.yaml")
    check_image(args.hadolint, args.nimgate, problems)

    if problems.found:
        print(f"\ncheck-deploy: {len(problems.found)} problem(s)")
        return 1
    print("\ncheck-deploy: ok")
    return 0


# --- rendering -------------------------------------------------------------------------------

def render(kubectl: str, kdir: str, problems: Problems) -> list[dict] | None:
    done = subprocess.run([kubectl, "kustomize", str(ROOT / kdir)], capture_output=True, text=True)
    if done.returncode != 0:
        problems.add(kdir, f"kubectl kustomize failed: {done.stderr.strip()}")
        return None
    if done.stderr.strip():
        problems.add(kdir, f"kubectl kustomize warns: {done.stderr.strip()}")
    return [o for o in yaml.safe_load_all(done.stdout) if o]


def name(obj: dict) -> str:
    return (obj.get("metadata") or {}).get("name", "?")


def where(kdir: str, obj: dict, path: str = "") -> str:
    return f"{kdir} {obj.get('kind')}/{name(obj)}" + (f" {path}" if path else "")


# --- schemas ---------------------------------------------------------------------------------

@functools.cache
def k8s_definitions(version: str) -> referencing.Resource:
    return referencing.Resource.from_contents(
        kv.schema_contents(f"kubernetes-json-schema/v{version}.0-local-strict/_definitions.json", version))


@functools.cache
def k8s_validator(version: str, api_version: str, kind: str) -> jsonschema.Validator | None:
    # kubernetes-validate's file naming: apps/v1 -> apps-v1, v1 -> v1, networking.k8s.io/v1 -> networking-v1.
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    try:
        schema = kv.schema_contents(
            f"kubernetes-json-schema/v{version}.0-local-strict/{kind.lower()}-{group_version}.json", version)
    except FileNotFoundError:
        return None
    registry = k8s_definitions(version) @ (referencing.Resource.from_contents(schema) @ referencing.Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


@functools.cache
def crd_validator(file: str) -> jsonschema.Validator:
    schema = json.loads((ROOT / "deploy/check/schemas" / file).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def validate_schemas(kdir: str, objects: list[dict], problems: Problems) -> None:
    checked = 0
    for obj in objects:
        key = (obj.get("apiVersion"), obj.get("kind"))
        if key in CRD_SCHEMAS:
            validators = [("CRD schema", crd_validator(CRD_SCHEMAS[key]))]
        else:
            validators = [(f"Kubernetes {v}", k8s_validator(v, *key)) for v in K8S_VERSIONS]
        for label, validator in validators:
            if validator is None:
                problems.add(where(kdir, obj), f"no {label} schema for {key[0]} {key[1]}")
                continue
            for error in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
                path = ".".join(str(p) for p in error.absolute_path) or "(object)"
                problems.add(where(kdir, obj), f"{label}: {path}: {error.message}")
            checked += 1
    print(f"  schemas: {checked} validations of {len(objects)} objects "
          f"(Kubernetes {' and '.join(K8S_VERSIONS)} strict; ServiceMonitor, PrometheusRule: deploy/check/schemas)")


# --- references between objects --------------------------------------------------------------

def pod_templates(objects: list[dict]) -> list[tuple[dict, dict]]:
    """(workload, pod template) for every workload rendered."""
    return [(o, o["spec"]["template"]) for o in objects
            if o.get("kind") in WORKLOAD_KINDS and isinstance(o.get("spec", {}).get("template"), dict)]


def matches(selector: dict | None, labels: dict) -> bool:
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        value, op, values = labels.get(expr["key"]), expr["operator"], expr.get("values") or []
        if (op == "In" and value not in values) or (op == "NotIn" and value in values) \
                or (op == "Exists" and value is None) or (op == "DoesNotExist" and value is not None):
            return False
    return True


def selected(objects: list[dict], selector: dict | None) -> list[tuple[dict, dict]]:
    return [(w, t) for w, t in pod_templates(objects) if matches(selector, t.get("metadata", {}).get("labels") or {})]


def container_ports(template: dict) -> list[dict]:
    return [p for c in template["spec"].get("containers", []) for p in c.get("ports") or []]


def has_port(template: dict, port) -> bool:
    key = "name" if isinstance(port, str) else "containerPort"
    return any(p.get(key) == port for p in container_ports(template))


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {name(o): o for o in objects if o.get("kind") == kind}


def data_keys(obj: dict) -> set[str]:
    return set(obj.get("data") or {}) | set(obj.get("stringData") or {}) | set(obj.get("binaryData") or {})


def check_references(kdir: str, objects: list[dict], args, problems: Problems) -> None:
    seen: set[tuple[str, str]] = set()
    for o in objects:
        key = (o.get("kind"), name(o))
        if key in seen:
            problems.add(where(kdir, o), "defined twice")
        seen.add(key)

    secrets, config_maps = by_kind(objects, "Secret"), by_kind(objects, "ConfigMap")

    def need(at: str, kind: str, ref_name: str, key: str | None = None) -> None:
        pool = secrets if kind == "Secret" else config_maps
        if ref_name not in pool:
            problems.add(at, f"{kind} {ref_name} is not in the kustomization")
        elif key is not None and key not in data_keys(pool[ref_name]):
            problems.add(at, f"{kind} {ref_name} has no key {key}")

    for workload, template in pod_templates(objects):
        spec = template["spec"]
        if not matches(workload["spec"].get("selector"), template.get("metadata", {}).get("labels") or {}):
            problems.add(where(kdir, workload), "spec.selector does not select its own pod template")
        for volume in spec.get("volumes") or []:
            if "configMap" in volume:
                need(where(kdir, workload, f"volume {volume['name']}"), "ConfigMap", volume["configMap"]["name"])
            if "secret" in volume:
                need(where(kdir, workload, f"volume {volume['name']}"), "Secret", volume["secret"]["secretName"])
        for pull in spec.get("imagePullSecrets") or []:
            if pull["name"] not in EXTERNAL_SECRETS:
                need(where(kdir, workload, "imagePullSecrets"), "Secret", pull["name"])
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            at = where(kdir, workload, f"container {c['name']}")
            for source in c.get("envFrom") or []:
                if "secretRef" in source:
                    need(at, "Secret", source["secretRef"]["name"])
                if "configMapRef" in source:
                    need(at, "ConfigMap", source["configMapRef"]["name"])
            for env in c.get("env") or []:
                ref = env.get("valueFrom") or {}
                if "secretKeyRef" in ref:
                    need(f"{at} env {env['name']}", "Secret", ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"])
                if "configMapKeyRef" in ref:
                    need(f"{at} env {env['name']}", "ConfigMap", ref["configMapKeyRef"]["name"],
                         ref["configMapKeyRef"]["key"])
            for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(probe_name) or {}
                port = (probe.get("httpGet") or probe.get("tcpSocket") or {}).get("port")
                if isinstance(port, str) and not any(p.get("name") == port for p in c.get("ports") or []):
                    problems.add(at, f"{probe_name} names port {port}, which the container does not declare")

    for svc in by_kind(objects, "Service").values():
        # A Service's selector is a plain map of labels; an empty one selects nothing.
        targets = selected(objects, {"matchLabels": svc["spec"]["selector"]}) if svc["spec"].get("selector") else []
        if not targets:
            problems.add(where(kdir, svc), "its selector matches no pod template in the kustomization")
        for port in svc["spec"].get("ports", []):
            target = port.get("targetPort", port["port"])
            for workload, template in targets:
                if not has_port(template, target):
                    problems.add(where(kdir, svc, f"port {port.get('name', port['port'])}"),
                                 f"targetPort {target} is not a container port of {workload['kind']}/{name(workload)}")

    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for obj in by_kind(objects, kind).values():
            selector = obj["spec"].get("selector" if kind == "PodDisruptionBudget" else "podSelector")
            targets = selected(objects, selector)
            if not targets:
                problems.add(where(kdir, obj), "its selector matches no pod template in the kustomization")
            for rule in obj["spec"].get("ingress") or []:
                for port in rule.get("ports") or []:
                    for workload, template in targets:
                        if "port" in port and not has_port(template, port["port"]):
                            problems.add(where(kdir, obj), f"port {port['port']} is not a container port of "
                                                           f"{workload['kind']}/{name(workload)}")
                for peer in rule.get("from") or []:
                    if "podSelector" in peer and "namespaceSelector" not in peer \
                            and not selected(objects, peer["podSelector"]):
                        problems.add(where(kdir, obj), f"ingress from {peer['podSelector']} matches no pod template")

    for hpa in by_kind(objects, "HorizontalPodAutoscaler").values():
        ref = hpa["spec"]["scaleTargetRef"]
        target = by_kind(objects, ref["kind"]).get(ref["name"])
        if target is None:
            problems.add(where(kdir, hpa), f"scaleTargetRef {ref['kind']}/{ref['name']} is not in the kustomization")
        elif hpa["spec"].get("minReplicas", 1) > target["spec"].get("replicas", 1):
            problems.add(where(kdir, hpa), "minReplicas is above the Deployment's replicas")
        for metric in hpa["spec"].get("metrics") or []:
            resource = (metric.get("resource") or {}).get("name")
            if target is not None and resource and metric["resource"]["target"]["type"] == "Utilization":
                for c in target["spec"]["template"]["spec"]["containers"]:
                    if resource not in ((c.get("resources") or {}).get("requests") or {}):
                        problems.add(where(kdir, hpa), f"scales on {resource} utilization, but container "
                                                       f"{c['name']} has no {resource} request")

    services = by_kind(objects, "Service")
    for sm in by_kind(objects, "ServiceMonitor").values():
        targets = [s for s in services.values() if matches(sm["spec"]["selector"], s["metadata"].get("labels") or {})]
        if not targets:
            problems.add(where(kdir, sm), "its selector matches no Service in the kustomization")
        for endpoint in sm["spec"]["endpoints"]:
            for svc in targets:
                if endpoint.get("port") and not any(p.get("name") == endpoint["port"] for p in svc["spec"]["ports"]):
                    problems.add(where(kdir, sm), f"endpoint port {endpoint['port']} is not a port of Service/{name(svc)}")
            credentials = (endpoint.get("authorization") or {}).get("credentials")
            if credentials:
                need(where(kdir, sm, "authorization"), "Secret", credentials["name"], credentials["key"])
    print("  references: selectors, ports, Secrets, ConfigMaps and keys checked")


# --- pod security and resources --------------------------------------------------------------

def check_pods(kdir: str, objects: list[dict], args, problems: Problems) -> None:
    """The restricted Pod Security Standard, plus requests and limits and read-only roots."""
    for workload, template in pod_templates(objects):
        spec = template["spec"]
        pod_sc = spec.get("securityContext") or {}
        for forbidden in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(forbidden):
                problems.add(where(kdir, workload), f"{forbidden} is set")
        if any("hostPath" in v for v in spec.get("volumes") or []):
            problems.add(where(kdir, workload), "mounts a hostPath")
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            at = where(kdir, workload, f"container {c['name']}")
            sc = c.get("securityContext") or {}

            def setting(field: str):
                return sc.get(field, pod_sc.get(field))

            if setting("runAsNonRoot") is not True:
                problems.add(at, "runAsNonRoot is not true")
            if setting("runAsUser") == 0:
                problems.add(at, "runs as uid 0")
            if (setting("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
                problems.add(at, "seccompProfile is not RuntimeDefault")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.add(at, "allowPrivilegeEscalation is not false")
            if sc.get("privileged"):
                problems.add(at, "is privileged")
            if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                problems.add(at, "does not drop ALL capabilities")
            if (sc.get("capabilities") or {}).get("add"):
                problems.add(at, "adds capabilities")
            if sc.get("readOnlyRootFilesystem") is not True and c["name"] not in WRITABLE_ROOT:
                problems.add(at, "readOnlyRootFilesystem is not true")
            resources = c.get("resources") or {}
            for field in ("requests", "limits"):
                if "memory" not in (resources.get(field) or {}):
                    problems.add(at, f"no memory {field[:-1]}")
            if "cpu" not in (resources.get("requests") or {}):
                problems.add(at, "no cpu request")
            if c.get("image", "").endswith(":latest") and c["name"] not in LATEST_ALLOWED:
                problems.add(at, f"image {c['image']} is not pinned")
    print("  pods: restricted security context, requests and limits checked")


# --- nimgate's containers and configs --------------------------------------------------------

def is_nimgate(container: dict) -> bool:
    return container["name"] == "nimgate"


def seconds(text: str) -> float:
    """A humane duration as nimgate writes them: 250ms, 30s, 2m, 1h, or combined (1m30s)."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text.replace(" ", ""):
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


def prestop_sleep(container: dict) -> int:
    return ((container.get("lifecycle") or {}).get("preStop") or {}).get("sleep", {}).get("seconds", 0)


def env_names_in(config, path: str = "") -> list[tuple[str, str]]:
    """Every (field path, variable) the config reads from the environment (`*_env` fields)."""
    found = []
    if isinstance(config, dict):
        for k, v in config.items():
            at = f"{path}.{k}" if path else str(k)
            if str(k).endswith("_env") and isinstance(v, str):
                found.append((at, v))
            else:
                found.extend(env_names_in(v, at))
    elif isinstance(config, list):
        for i, v in enumerate(config):
            found.extend(env_names_in(v, f"{path}[{i}]"))
    return found


def listen_port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def check_nimgate_pods(kdir: str, objects: list[dict], args, problems: Problems) -> None:
    nimgate = args.nimgate
    secrets, config_maps = by_kind(objects, "Secret"), by_kind(objects, "ConfigMap")
    found = 0
    for workload, template in pod_templates(objects):
        spec = template["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        for c in spec["containers"]:
            if not is_nimgate(c):
                continue
            found += 1
            at = where(kdir, workload, f"container {c['name']}")
            mount = next((m for m in c.get("volumeMounts") or [] if m["mountPath"].rstrip("/") == CONFIG_DIR), None)
            if mount is None:
                problems.add(at, f"nothing is mounted at {CONFIG_DIR}")
                continue
            if mount.get("subPath") or mount.get("subPathExpr"):
                problems.add(at, f"{CONFIG_DIR} is mounted with a subPath: the kubelet never updates it, so no live reload")
            volume = volumes.get(mount["name"], {})
            if "configMap" in volume:
                text = (config_maps.get(volume["configMap"]["name"], {}).get("data") or {}).get(CONFIG_FILE)
            elif "secret" in volume:
                source = secrets.get(volume["secret"]["secretName"], {})
                text = (source.get("stringData") or {}).get(CONFIG_FILE)
                if text is None and CONFIG_FILE in (source.get("data") or {}):
                    text = base64.b64decode(source["data"][CONFIG_FILE]).decode()
            else:
                problems.add(at, f"{CONFIG_DIR} is not a ConfigMap or Secret volume")
                continue
            if text is None:
                problems.add(at, f"the volume at {CONFIG_DIR} has no {CONFIG_FILE}")
                continue
            cli = c.get("args") or []
            if "--config" in cli and cli[cli.index("--config") + 1:][:1] != [f"{CONFIG_DIR}/{CONFIG_FILE}"]:
                problems.add(at, f"--config is not {CONFIG_DIR}/{CONFIG_FILE}")
            config = check_config_text(f"{at} {CONFIG_FILE}", text, nimgate, problems)
            if config is None:
                continue
            server = config.get("server") or {}
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports") or []}
            if listen_port(server.get("listen", "0.0.0.0:8080")) != ports.get("http"):
                problems.add(at, f"server.listen {server.get('listen')} is not the container port `http` ({ports.get('http')})")
            if listen_port(server.get("admin_listen", "127.0.0.1:9090")) != ports.get("admin"):
                problems.add(at, f"server.admin_listen is not the container port `admin` ({ports.get('admin')})")
            for probe_name, path in (("readinessProbe", "/health/ready"), ("livenessProbe", "/health/live")):
                probe = (c.get(probe_name) or {}).get("httpGet") or {}
                if probe.get("path") != path or probe.get("port") not in ("http", ports.get("http")):
                    problems.add(at, f"{probe_name} is not GET {path} on the gateway port")
            # Every variable the config names must be in the container's environment.
            provided = {e["name"] for e in c.get("env") or []}
            for source_ref in c.get("envFrom") or []:
                ref = source_ref.get("secretRef") or source_ref.get("configMapRef") or {}
                pool = secrets if "secretRef" in source_ref else config_maps
                provided |= {source_ref.get("prefix", "") + k for k in data_keys(pool.get(ref.get("name"), {}))}
            for field, var in env_names_in(config):
                if var not in provided:
                    problems.add(at, f"{field} names {var}, which the container's env and envFrom do not provide")
            # Drain: preStop, then SIGTERM and drain_timeout, within the grace period; every
            # other container of the pod keeps serving until nimgate is done.
            drain = seconds(str(server.get("drain_timeout", "30s")))
            pre_stop = prestop_sleep(c)
            grace = spec.get("terminationGracePeriodSeconds", 30)
            if pre_stop <= 0:
                problems.add(at, "no preStop sleep: the listener closes before the endpoints drop the pod")
            if grace < pre_stop + drain + MARGIN_SECONDS:
                problems.add(at, f"terminationGracePeriodSeconds {grace} < preStop {pre_stop} + drain_timeout "
                                 f"{drain:g} + {MARGIN_SECONDS}: streams are killed mid-drain")
            for other in spec["containers"]:
                if other is c:
                    continue
                if prestop_sleep(other) < pre_stop + drain:
                    problems.add(where(kdir, workload, f"container {other['name']}"),
                                 f"preStop sleep {prestop_sleep(other)} < nimgate's preStop {pre_stop} + drain_timeout "
                                 f"{drain:g}: it stops before nimgate's last streams end")
                if grace < prestop_sleep(other) + MARGIN_SECONDS:
                    problems.add(where(kdir, workload, f"container {other['name']}"),
                                 f"terminationGracePeriodSeconds {grace} leaves it no time after its preStop")
    print(f"  nimgate: {found} container(s): config mount, config, probes, environment and drain timing checked")


def check_config_text(at: str, text: str, nimgate: str, problems: Problems) -> dict | None:
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as e:
        problems.add(at, f"not YAML: {e}")
        return None
    if not isinstance(config, dict):
        problems.add(at, "not a mapping")
        return None
    server = config.get("server") or {}
    admin = server.get("admin_listen", "127.0.0.1:9090")
    if not admin.startswith(("0.0.0.0:", "[::]:")):
        problems.add(at, f"server.admin_listen {admin}: only 0.0.0.0 (or [::]) is reachable from outside the container")
    if not server.get("admin_token_env"):
        problems.add(at, "server.admin_token_env is not set: the admin listener is reachable without a token")
    run_check_config(at, config, nimgate, problems)
    return config


def without_discovery(config: dict) -> dict:
    stripped = copy.deepcopy(config)
    for backend in stripped.get("backends") or []:
        backend.pop("discovery", None)
    return stripped


def run_check_config(at: str, config: dict, nimgate: str, problems: Problems) -> None:
    """`nimgate check-config` with a placeholder in every variable the config names (whether they
    are provided is checked against the manifests). A binary that does not know `discovery` yet
    (backends found by DNS) checks the rest of the config without it."""
    env = dict(os.environ)
    for field, var in env_names_in(config):
        # Distinct (keys must be), and of the form the field takes.
        env[var] = "redis://:check-deploy@127.0.0.1:6379/0" if "redis_url" in field else f"check-deploy-{var}"

    def run(cfg: dict) -> subprocess.CompletedProcess:
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump(cfg, f)
        try:
            return subprocess.run([nimgate, "check-config", f.name], capture_output=True, text=True, env=env)
        finally:
            os.unlink(f.name)

    done = run(config)
    if done.returncode != 0:
        problem_lines = [line.strip() for line in done.stdout.splitlines()[1:] if line.strip()]
        if problem_lines and all(re.match(r"backends\[\d+\]\.discovery: unknown field", p) for p in problem_lines):
            done = run(without_discovery(config))
            note = " (this nimgate knows no `discovery` yet: checked without it)"
        else:
            note = ""
    else:
        note = ""
    if done.returncode != 0:
        for line in (done.stdout + done.stderr).strip().splitlines()[1:] or [done.stderr.strip()]:
            problems.add(at, f"nimgate check-config: {line.strip()}")
    else:
        print(f"  nimgate check-config ok: {at}{note}")


# --- the PrometheusRule ----------------------------------------------------------------------

def prometheus_rule_text() -> str:
    """The PrometheusRule: deploy/prometheus/nimgate-rules.yml's text under `spec:`, comments kept."""
    rules = RULES_FILE.read_text().splitlines()
    body = [f"  {line}" if line.strip() else "" for line in rules if not line.startswith("#")]
    return "\n".join([
        "# Generated from deploy/prometheus/nimgate-rules.yml by `scripts/check-deploy --sync-rules`;",
        "# scripts/check-deploy fails when the two differ. Edit the rules there, then regenerate.",
        "# Your Prometheus must select it: its ruleSelector (e.g. a `release: ...` label added in",
        "# kustomization.yaml) and ruleNamespaceSelector must match this object and its namespace.",
        "apiVersion: monitoring.coreos.com/v1",
        "kind: PrometheusRule",
        "metadata:",
        "  name: nimgate",
        "spec:",
        *body,
    ]) + "\n"


def check_prometheus_rules(kdir: str, objects: list[dict], args, problems: Problems) -> None:
    promtool = args.promtool
    for rule in by_kind(objects, "PrometheusRule").values():
        at = where(kdir, rule)
        if rule.get("spec") != yaml.safe_load(RULES_FILE.read_text()):
            problems.add(at, f"spec differs from {RULES_FILE.relative_to(ROOT)}: "
                             "run scripts/check-deploy --sync-rules")
        with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
            yaml.safe_dump(rule.get("spec"), f)
        try:
            done = subprocess.run([promtool, "check", "rules", f.name], capture_output=True, text=True)
        finally:
            os.unlink(f.name)
        if done.returncode != 0:
            problems.add(at, f"promtool check rules: {(done.stdout + done.stderr).strip()}")
        else:
            count = sum(len(g.get("rules") or []) for g in rule["spec"].get("groups") or [])
            print(f"  promtool check rules ok: {count} rules of {at}, the same as {RULES_FILE.relative_to(ROOT)}")


# --- the image -------------------------------------------------------------------------------

def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    """.dockerignore as (exclude?, regex) in order; the last match decides, as in Docker."""
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        patterns.append((not include, re.compile(regex + "(?:/.*)?$")))
    return patterns


def in_context(path: str, patterns: list[tuple[bool, re.Pattern]]) -> bool:
    excluded = False
    for exclude, regex in patterns:
        if regex.match(path):
            excluded = exclude
    return not excluded


def build_context(into: Path) -> int:
    """Copies the files .dockerignore lets into the build context; returns how many."""
    patterns = dockerignore_patterns()
    count = 0
    for dirpath, dirnames, filenames in os.walk(ROOT):
        rel_dir = os.path.relpath(dirpath, ROOT)
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        # Skip what is excluded whole, unless an exception may bring part of it back.
        dirnames[:] = [d for d in dirnames if in_context(rel_dir + d, patterns)
                       or any(not ex and r.pattern.startswith(re.escape(rel_dir + d)) for ex, r in patterns)]
        for f in filenames:
            rel = rel_dir + f
            if in_context(rel, patterns):
                (into / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, into / rel)
                count += 1
    return count


def workspace_version() -> str:
    text = (ROOT / "Cargo.toml").read_text()
    section = re.search(r"^\[workspace\.package\]\n(.*?)(?=^\[|\Z)", text, re.S | re.M)
    match = re.search(r'^version\s*=\s*"([^"]+)"', section.group(1) if section else "", re.M)
    return match.group(1) if match else "?"


def check_image(hadolint: str, nimgate: str, problems: Problems) -> None:
    dockerfile = ROOT / "deploy/Dockerfile"
    done = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True)
    if done.returncode != 0:
        for line in (done.stdout + done.stderr).strip().splitlines():
            problems.add("deploy/Dockerfile", f"hadolint: {line}")
    else:
        print("  hadolint ok")
    text = dockerfile.read_text()
    match = re.search(r"^ARG VERSION=(\S+)", text, re.M)
    version = workspace_version()
    if not match or match.group(1) != version:
        problems.add("deploy/Dockerfile", f"ARG VERSION={match.group(1) if match else '(none)'} is not the "
                                          f"workspace's version {version} (Cargo.toml)")
    for needed in ("USER 65532", "EXPOSE 8080 9090", 'ENTRYPOINT ["/usr/local/bin/nimgate"]',
                   f"COPY deploy/nimgate.yaml {CONFIG_DIR}/{CONFIG_FILE}"):
        if needed not in text:
            problems.add("deploy/Dockerfile", f"no `{needed}`")

    with tempfile.TemporaryDirectory() as context:
        count = build_context(Path(context))
        for source in re.findall(r"^COPY (?!--from)(?:--\S+ )*(\S+) ", text, re.M):
            if source != "." and not (Path(context) / source).exists():
                problems.add(".dockerignore", f"excludes {source}, which deploy/Dockerfile copies")
        for needed in ("Cargo.toml", "Cargo.lock"):
            if not (Path(context) / needed).exists():
                problems.add(".dockerignore", f"excludes {needed}")
        for leaked in ("target", ".git"):
            if (Path(context) / leaked).exists():
                problems.add(".dockerignore", f"lets {leaked}/ into the build context")
        done = subprocess.run(["cargo", "metadata", "--no-deps", "--offline", "--format-version", "1"],
                              cwd=context, capture_output=True, text=True)
        if done.returncode != 0:
            problems.add(".dockerignore", f"cargo cannot read the workspace in the build context: {done.stderr.strip()}")
        else:
            packages = sorted(p["name"] for p in json.loads(done.stdout)["packages"])
            size = sum(f.stat().st_size for f in Path(context).rglob("*") if f.is_file())
            print(f"  build context: {count} files, {size / 1e6:.1f} MB; cargo reads the workspace there "
                  f"({', '.join(packages)})")
    check_config_text("deploy/nimgate.yaml (the image's config)", IMAGE_CONFIG.read_text(), nimgate, problems)


if __name__ == "__main__":
    sys.exit(main())
