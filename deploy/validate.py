#!/usr/bin/env python3
"""Validates the deployment files offline.

- Every Kubernetes manifest of the base and of the overlays (built here the way kustomize builds
  them: resources, namespace, images, JSON 6902 patches) against the Kubernetes schemas
  (kubernetes-validate), strictly. The Prometheus Operator kinds are checked structurally.
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


def pod_containers(doc):
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("containers", []) + spec.get("initContainers", [])


def check_operator_kind(doc, where):
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        fail(f"{where}: {doc['kind']} has no spec")
        return
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
        for required in ["Namespace", "Secret", "ConfigMap", "Deployment", "Service", "ServiceMonitor", "PrometheusRule", "HorizontalPodAutoscaler", "PodDisruptionBudget"]:
            if required not in kinds:
                fail(f"{name}: no {required}")
        for doc in docs:
            where = f"{name}: {doc['kind']}/{doc['metadata']['name']}"
            count += 1
            if doc["kind"] in OPERATOR_KINDS:
                check_operator_kind(doc, where)
                continue
            try:
                kubernetes_validate.validate(copy.deepcopy(doc), K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                fail(f"{where}: {e.message} at {'/'.join(str(p) for p in e.path)}")
        for doc in docs:
            if doc["kind"] == "Deployment":
                check_deployment(doc, name)
    print(f"validated {count} manifests in {len(builds)} builds against Kubernetes {K8S_VERSION}")
    return builds


def check_deployment(doc, name):
    spec = doc["spec"]["template"]["spec"]
    if spec.get("terminationGracePeriodSeconds", 30) < 60:
        fail(f"{name}: terminationGracePeriodSeconds must be at least 60")
    sc = spec.get("securityContext", {})
    if not sc.get("runAsNonRoot") or sc.get("runAsUser") != 1000:
        fail(f"{name}: pods must run as non-root user 1000")
    container = spec["containers"][0]
    env = {e["name"] for e in container.get("env", [])}
    for needed in ["DATABASE_URL", "POD_NAME", "POD_NAMESPACE"]:
        if needed not in env:
            fail(f"{name}: container env lacks {needed}")
    for probe, path in [("livenessProbe", "/health"), ("readinessProbe", "/ready")]:
        if container.get(probe, {}).get("httpGet", {}).get("path") != path:
            fail(f"{name}: {probe} must GET {path}")


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
    for doc in builds["base"]:
        if doc["kind"] == "HorizontalPodAutoscaler":
            for metric in doc["spec"]["metrics"]:
                if metric["type"] == "Pods":
                    exprs.append(("hpa", metric["pods"]["metric"]["name"]))
    return exprs


def validate_against_scrape(builds, scrape_path):
    families = set(re.findall(r"^# TYPE (\S+) ", pathlib.Path(scrape_path).read_text(), re.M))
    checked = 0
    for where, expr in queried_metrics(builds):
        names = OUR_METRICS.findall(expr)
        if not names:
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
    validate_dockerfile()
    if args.scrape:
        validate_against_scrape(builds, args.scrape)
    if errors:
        print("\n".join(f"error: {e}" for e in errors), file=sys.stderr)
        sys.exit(1)
    print("deployment files are valid")


if __name__ == "__main__":
    main()
