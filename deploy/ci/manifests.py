"""Checks on rendered manifests (`kubectl kustomize OVERLAY`) that a schema cannot make (deploy/ci/check):

- each Deployment's terminationGracePeriodSeconds covers TRIPTYCH_SHUTDOWN_GRACE_SECONDS (+1 s to stop, +4 s margin);
- startup, liveness and readiness probes are gRPC probes on the health-only port, liveness on `liveness`;
- the model store is mounted read-only, and each Deployment has a PodDisruptionBudget and an autoscaler;
- every role's Service is headless (clients balance over its pods) and servers set max_connection_age.
"""

from __future__ import annotations

import sys

import yaml

DEFAULT_GRACE = 30.0  # serving/settings.py shutdown_grace_seconds


def env_of(container: dict, configmaps: dict[str, dict]) -> dict[str, str]:
    values = {}
    for source in container.get("envFrom", []):
        values.update(configmaps.get(source.get("configMapRef", {}).get("name"), {}))
    values.update({e["name"]: e.get("value") for e in container.get("env", []) if "value" in e})
    return values


def check(objects: list[dict]) -> list[str]:
    problems = []
    configmaps = {o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"}
    by_kind = lambda kind: [o for o in objects if o["kind"] == kind]  # noqa: E731
    budgets = {
        o["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/component") for o in by_kind("PodDisruptionBudget")
    }
    scaled = {o["spec"]["scaleTargetRef"]["name"] for o in by_kind("HorizontalPodAutoscaler")}
    for service in by_kind("Service"):
        if service["spec"].get("clusterIP") != "None":
            problems.append(f"Service {service['metadata']['name']} is not headless (clusterIP: None)")
    for deployment in by_kind("Deployment"):
        name = deployment["metadata"]["name"]
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        env = env_of(container, configmaps)
        grace = float(env.get("TRIPTYCH_SHUTDOWN_GRACE_SECONDS", DEFAULT_GRACE))
        if pod.get("terminationGracePeriodSeconds", 30) < grace + 5:
            problems.append(f"{name}: terminationGracePeriodSeconds below the drain's {grace:.0f} s + 5")
        if float(env.get("TRIPTYCH_MAX_CONNECTION_AGE_SECONDS", 0)) <= 0:
            problems.append(f"{name}: no TRIPTYCH_MAX_CONNECTION_AGE_SECONDS (clients would never rebalance)")
        health_port = int(env.get("TRIPTYCH_HEALTH_PORT", 0))
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = container.get(kind, {}).get("grpc")
            if probe is None or probe.get("port") != health_port:
                problems.append(f"{name}: {kind} is not a gRPC probe on TRIPTYCH_HEALTH_PORT ({health_port})")
            elif (probe.get("service") == "liveness") != (kind != "readinessProbe"):
                problems.append(f"{name}: {kind} asks health name {probe.get('service')!r}")
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for mount in container.get("volumeMounts", []):
            if mount["mountPath"] == "/models":
                claim = volumes[mount["name"]].get("persistentVolumeClaim", {})
                if not (mount.get("readOnly") and claim.get("readOnly")):
                    problems.append(f"{name}: the model store is not mounted read-only")
        component = deployment["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/component")
        if component not in budgets:
            problems.append(f"{name}: no PodDisruptionBudget")
        if name not in scaled:
            problems.append(f"{name}: no HorizontalPodAutoscaler")
    return problems


def main(path: str) -> int:
    with open(path) as handle:
        objects = [o for o in yaml.safe_load_all(handle) if o]
    problems = check(objects)
    for problem in problems:
        print(f"{path}: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
