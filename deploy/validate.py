#!/usr/bin/env python3
"""Validates the deployment files offline.

- Every Kubernetes manifest of the base and of the overlays (built here the way kustomize builds
  them: resources, namespace, images, JSON 6902 patches) and of kubernetes/examples against the
  Kubernetes schemas (kubernetes-validate), strictly. The Prometheus Operator and External
  Secrets kinds are checked structurally.
- No build contains a Secret (`kubectl apply -k` must never overwrite the real credentials); the
  Deployment reads `url` from it and, optionally, `admin-token`.
- Pods meet the Pod Security `restricted` profile, which the Namespace enforces.
- The Dockerfile: multi-stage, runs as user 1000, exposes the probe and metrics ports.
- With --scrape FILE (a /metrics scrape of a running host): every metric the Grafana dashboard
  and the alert rules query is exported by the host.
"""

import argparse
import copy
import json
import pathlib
import re
import sys

import jsonpatch
import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).resolve().parent
K8S_VERSION = "1.30"
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}
CRD_KINDS = OPERATOR_KINDS | {"ExternalSecret"}
# Created outside the manifests (kubectl or External Secrets), read by the Deployment.
DB_SECRET = "database-credentials"
# Pod Security `restricted`: the volume types it admits, the one capability it lets a pod add.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
OUR_METRICS = re.compile(r"\b(pupsourcing_orchestrator_[a-z_]+|projection_host_[a-z_]+|projection_lag_events)\b")
errors = []


def fail(message):
    errors.append(message)


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def build(kustomization_dir):
    """A small kustomize: resources (files or other kustomizations), namespace, images, patches."""
    k = yaml.safe_load((kustomization_dir / "kustomization.yaml").read_text())
    docs = []
    for resource in k.get("resources", []):
        target = (kustomization_dir / resource).resolve()
        if target.is_dir():
            docs.extend(build(target))
        elif target.is_file():
            docs.extend(load_docs(target))
        else:
            fail(f"{kustomization_dir}: resource {resource} does not exist")
    namespace = k.get("namespace")
    for doc in docs:
        if namespace and doc["kind"] != "Namespace":
            doc.setdefault("metadata", {})["namespace"] = namespace
        for pairs in k.get("labels", []):
            doc.setdefault("metadata", {}).setdefault("labels", {}).update(pairs.get("pairs", {}))
    for image in k.get("images", []):
        for doc in docs:
            for c in pod_containers(doc):
                name, _, _ = c["image"].partition(":")
                if name == image["name"]:
                    c["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    for patch in k.get("patches", []):
        ops = yaml.safe_load(patch["patch"]) if "patch" in patch else yaml.safe_load((kustomization_dir / patch["path"]).read_text())
        target = patch["target"]
        matched = [d for d in docs if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]]
        if not matched:
            fail(f"{kustomization_dir}: patch target {target} matches nothing")
        for doc in matched:
            try:
                patched = jsonpatch.apply_patch(doc, ops)
            except Exception as e:  # noqa: BLE001 - report any patch failure
                fail(f"{kustomization_dir}: patch on {target} failed: {e}")
                continue
            doc.clear()
            doc.update(patched)
    return docs


def pod_spec(doc):
    """The pod spec of a Pod, or of a workload's pod template (Deployment, Job, ...)."""
    if doc.get("kind") == "Pod":
        return doc.get("spec", {})
    return doc.get("spec", {}).get("template", {}).get("spec", {})


def pod_containers(doc):
    spec = pod_spec(doc)
    return spec.get("containers", []) + spec.get("initContainers", [])


def check_operator_kind(doc, where):
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        fail(f"{where}: {doc['kind']} has no spec")
        return
    if doc["kind"] == "ExternalSecret":
        if not spec.get("secretStoreRef", {}).get("name"):
            fail(f"{where}: ExternalSecret needs secretStoreRef.name")
        if spec.get("target", {}).get("name") != DB_SECRET:
            fail(f"{where}: ExternalSecret must write the Secret {DB_SECRET} that the Deployment reads")
        keys = {d.get("secretKey") for d in spec.get("data", [])}
        if "url" not in keys:
            fail(f"{where}: ExternalSecret must provide the key url (DATABASE_URL)")
    if doc["kind"] == "ServiceMonitor":
        if not spec.get("endpoints") or not spec.get("selector"):
            fail(f"{where}: ServiceMonitor needs endpoints and a selector")
    if doc["kind"] == "PrometheusRule":
        for group in spec.get("groups", []):
            for rule in group.get("rules", []):
                if "alert" not in rule or "expr" not in rule:
                    fail(f"{where}: every rule needs alert and expr: {rule}")


def validate_manifests():
    builds = {"base": build(ROOT / "kubernetes" / "base")}
    for overlay in sorted((ROOT / "kubernetes" / "overlays").iterdir()):
        builds[f"overlay {overlay.name}"] = build(overlay)
    count = 0
    for name, docs in builds.items():
        kinds = {d["kind"] for d in docs}
        for required in ["Namespace", "ConfigMap", "Deployment", "Service", "ServiceMonitor", "PrometheusRule", "HorizontalPodAutoscaler", "PodDisruptionBudget"]:
            if required not in kinds:
                fail(f"{name}: no {required}")
        for doc in docs:
            if doc["kind"] == "Secret":
                fail(f"{name}: contains the Secret {doc['metadata']['name']}; `kubectl apply -k` would overwrite the real "
                     f"credentials: create {DB_SECRET} with kubectl or External Secrets (docs/kubernetes.md) instead")
            if doc["kind"] == "Namespace":
                check_namespace(doc, name)
        for doc in docs:
            count += check_schema(doc, f"{name}: {doc['kind']}/{doc['metadata']['name']}")
        for doc in docs:
            if doc["kind"] == "Deployment":
                check_deployment(doc, name)
    print(f"validated {count} manifests in {len(builds)} builds against Kubernetes {K8S_VERSION}")
    return builds


def check_schema(doc, where):
    if doc["kind"] in CRD_KINDS:
        check_operator_kind(doc, where)
        return 1
    try:
        kubernetes_validate.validate(copy.deepcopy(doc), K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        fail(f"{where}: {e.message} at {'/'.join(str(p) for p in e.path)}")
    return 1


def check_namespace(doc, name):
    labels = doc["metadata"].get("labels", {})
    if labels.get("pod-security.kubernetes.io/enforce") != "restricted":
        fail(f"{name}: Namespace {doc['metadata']['name']} must enforce the Pod Security profile restricted")


def validate_examples(builds):
    """kubernetes/examples: applied by hand into the base's namespace, so each must validate, and
    its pods must be admitted there."""
    base = builds["base"]
    deployment = next(d for d in base if d["kind"] == "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"].get("labels", {})
    count = 0
    for path in sorted((ROOT / "kubernetes" / "examples").glob("*.yaml")):
        for doc in load_docs(path):
            where = f"examples/{path.name}: {doc['kind']}/{doc['metadata']['name']}"
            if doc["kind"] == "Secret":
                fail(f"{where}: an example must not carry credentials; create {DB_SECRET} by hand or with External Secrets")
            count += check_schema(doc, where)
            if pod_spec(doc).get("containers"):
                check_restricted(pod_spec(doc), where)
            if doc["kind"] == "NetworkPolicy":
                selected = doc["spec"].get("podSelector", {}).get("matchLabels", {})
                if not selected or any(pod_labels.get(k) != v for k, v in selected.items()):
                    fail(f"{where}: podSelector {selected} does not select the Deployment's pods {pod_labels}")
    print(f"validated {count} example manifests")


def check_deployment(doc, name):
    spec = doc["spec"]["template"]["spec"]
    if spec.get("terminationGracePeriodSeconds", 30) < 60:
        fail(f"{name}: terminationGracePeriodSeconds must be at least 60")
    sc = spec.get("securityContext", {})
    if not sc.get("runAsNonRoot") or sc.get("runAsUser") != 1000:
        fail(f"{name}: pods must run as non-root user 1000")
    check_restricted(spec, name)
    container = spec["containers"][0]
    env = {e["name"]: e for e in container.get("env", [])}
    for needed in ["DATABASE_URL", "POD_NAME", "POD_NAMESPACE", "PLUGIN_CACHE_DIR"]:
        if needed not in env:
            fail(f"{name}: container env lacks {needed}")
    for var, key, optional in [("DATABASE_URL", "url", False), ("ADMIN_TOKEN", "admin-token", True)]:
        ref = env.get(var, {}).get("valueFrom", {}).get("secretKeyRef", {})
        if ref.get("name") != DB_SECRET or ref.get("key") != key:
            fail(f"{name}: {var} must come from Secret {DB_SECRET}, key {key}")
        elif bool(ref.get("optional", False)) != optional:
            fail(f"{name}: {var} must {'' if optional else 'not '}be optional (the admin API is off without a token; the host cannot run without a database)")
    check_cache_dir(spec, container, env.get("PLUGIN_CACHE_DIR", {}).get("value"), name)
    for probe, path in [("livenessProbe", "/health"), ("readinessProbe", "/ready")]:
        if container.get(probe, {}).get("httpGet", {}).get("path") != path:
            fail(f"{name}: {probe} must GET {path}")


def check_restricted(spec, where):
    """The Pod Security `restricted` profile (plus our read-only root filesystem)."""
    sc = spec.get("securityContext", {})
    containers = spec.get("containers", []) + spec.get("initContainers", [])
    for field in ["hostNetwork", "hostPID", "hostIPC"]:
        if spec.get(field):
            fail(f"{where}: {field} is not allowed under restricted")
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            fail(f"{where}: volume {volume['name']} ({', '.join(sorted(kinds))}) is not allowed under restricted")
    for c in containers:
        csc = c.get("securityContext", {})
        cwhere = f"{where}: container {c['name']}"
        if not (csc.get("runAsNonRoot", sc.get("runAsNonRoot"))):
            fail(f"{cwhere}: runAsNonRoot must be true")
        if csc.get("runAsUser", sc.get("runAsUser")) == 0:
            fail(f"{cwhere}: must not run as user 0")
        seccomp = csc.get("seccompProfile", sc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            fail(f"{cwhere}: seccompProfile must be RuntimeDefault (got {seccomp})")
        if csc.get("allowPrivilegeEscalation") is not False:
            fail(f"{cwhere}: allowPrivilegeEscalation must be false")
        if csc.get("privileged"):
            fail(f"{cwhere}: must not be privileged")
        caps = csc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            fail(f"{cwhere}: capabilities must drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            fail(f"{cwhere}: may add only NET_BIND_SERVICE")
        if csc.get("readOnlyRootFilesystem") is not True:
            fail(f"{cwhere}: readOnlyRootFilesystem must be true")
        for port in c.get("ports", []):
            if port.get("hostPort"):
                fail(f"{cwhere}: hostPort is not allowed under restricted")


def check_cache_dir(spec, container, cache_dir, name):
    """With a read-only root filesystem the plugin cache needs an emptyDir, and a directory below
    its mount point: the mount point belongs to root, and the host refuses a cache directory that
    another user owns (runtime/loader.rs, prepare_cache_dir)."""
    if not cache_dir:
        fail(f"{name}: PLUGIN_CACHE_DIR must be set (the root filesystem is read-only)")
        return
    empty_dirs = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
    below = [m for m in container.get("volumeMounts", [])
             if m["name"] in empty_dirs and cache_dir.startswith(m["mountPath"].rstrip("/") + "/")]
    if not below:
        fail(f"{name}: PLUGIN_CACHE_DIR {cache_dir} must be a subdirectory of an emptyDir mount")


def validate_dockerfile():
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+\S+(?:\s+AS\s+(\S+))?", text, re.M | re.I)
    if len(stages) < 2:
        fail("Dockerfile: expected a multi-stage build")
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    if not users or not users[-1].startswith("1000"):
        fail("Dockerfile: the runtime stage must run as user 1000")
    exposed = " ".join(re.findall(r"^EXPOSE\s+(.+)$", text, re.M))
    for port in ["8080", "9090"]:
        if port not in exposed:
            fail(f"Dockerfile: port {port} is not exposed")
    if "/plugins" not in text:
        fail("Dockerfile: no /plugins mount point")
    print("validated the Dockerfile")


def queried_metrics(builds):
    exprs = []
    dashboard = json.loads((ROOT / "grafana" / "projection-host-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            exprs.append(("dashboard: " + panel["title"], target["expr"]))
    for doc in builds["base"]:
        if doc["kind"] == "PrometheusRule":
            for group in doc["spec"]["groups"]:
                for rule in group["rules"]:
                    exprs.append(("alert: " + rule["alert"], rule["expr"]))
    hpa_metrics = set()
    for doc in builds["base"]:
        if doc["kind"] == "HorizontalPodAutoscaler":
            for metric in doc["spec"]["metrics"]:
                if metric["type"] == "Pods":
                    hpa_metrics.add(metric["pods"]["metric"]["name"])
                    exprs.append(("hpa", metric["pods"]["metric"]["name"]))
    # The prometheus-adapter example serves the HPA's metric from a series the host exports.
    adapter = load_docs(ROOT / "kubernetes" / "examples" / "prometheus-adapter.yaml")[0]
    served = set()
    for rule in yaml.safe_load(adapter["data"]["config.yaml"])["rules"]:
        exprs.append(("prometheus-adapter", rule["seriesQuery"]))
        served.add(rule["name"]["as"])
    for missing in sorted(hpa_metrics - served):
        fail(f"hpa: metric {missing} is not served by examples/prometheus-adapter.yaml")
    return exprs


AGGREGATION = re.compile(r"\b(sum|max|min|avg|count)\s*(by\s*\(([^)]*)\))?\s*\(")


def validate_rule_labels(builds):
    """Every aggregation in an alert keeps namespace and replica_set (one environment, one
    replica set per alert), except over `up`, which has no replica_set."""
    for doc in builds["base"]:
        if doc["kind"] != "PrometheusRule":
            continue
        for group in doc["spec"]["groups"]:
            for rule in group["rules"]:
                expr = rule["expr"]
                for match in AGGREGATION.finditer(expr):
                    labels = {l.strip() for l in (match.group(3) or "").split(",") if l.strip()}
                    needed = {"namespace"} if "(up{" in expr else {"namespace", "replica_set"}
                    if not needed <= labels:
                        fail(f"alert {rule['alert']}: `{match.group(0)}` must keep {', '.join(sorted(needed - labels))}")


def validate_against_scrape(builds, scrape_path):
    families = set(re.findall(r"^# TYPE (\S+) ", pathlib.Path(scrape_path).read_text(), re.M))
    checked = 0
    for where, expr in queried_metrics(builds):
        names = OUR_METRICS.findall(expr)
        # `up` is Prometheus' own series for a scrape target (the host cannot export it).
        if not names and not re.search(r"\bup\{", expr):
            fail(f"{where}: queries none of the host's metrics: {expr}")
        for metric in names:
            family = re.sub(r"_(bucket|sum|count)$", "", metric)
            if metric not in families and family not in families:
                fail(f"{where}: {metric} is not exported by the host")
            checked += 1
    print(f"checked {checked} metric references against {len(families)} exported families")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scrape", help="a /metrics scrape of a running host")
    args = parser.parse_args()
    builds = validate_manifests()
    validate_examples(builds)
    validate_rule_labels(builds)
    validate_dockerfile()
    if args.scrape:
        validate_against_scrape(builds, args.scrape)
    if errors:
        print("\n".join(f"error: {e}" for e in errors), file=sys.stderr)
        sys.exit(1)
    print("deployment files are valid")


if __name__ == "__main__":
    main()
