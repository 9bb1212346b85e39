#!/usr/bin/env python3
"""Tests of the Helm chart helm/junction, run by scripts/test-helm (part of ./scripts/test).

No Kubernetes is available, so this does the next best things:

1. lint: `helm lint --strict` (the Helm v4 engine embedded in helm-python-sdk), once per
   Kubernetes version in K8S_VERSIONS.
2. render + validate: render the chart with the defaults and with variants; every object must
   validate strictly (unknown fields are errors) against the OpenAPI schemas of every version
   in K8S_VERSIONS (kubernetes-validate). Bad values must be refused with a clear message.
3. HA properties asserted on the rendered objects.
4. boot: the rendered StatefulSet's container (command, args, env, the ConfigMap-mounted TOML)
   is run as real `junction serve` processes, one per pod, with only what Kubernetes itself
   would supply substituted (see `PodSim`): the cluster must form, take a produce and a read,
   survive kill -9 of one pod, let it rejoin and catch up, pass the chart's own `helm test`
   script, and stop gracefully within terminationGracePeriodSeconds.

Every check prints one line; the first failure stops the run with exit status 1.
"""

from __future__ import annotations

import base64

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import helm_python
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "junction"
K8S_VERSIONS = ["1.29.0", "1.31.0", "1.33.0"]
RELEASE = "junction"
NAMESPACE = "streaming"

CHECKS = 0
STARTED = time.monotonic()


class Failure(Exception):
    pass


def check(cond: bool, what: str, detail: str = "") -> None:
    global CHECKS
    CHECKS += 1
    if not cond:
        raise Failure(f"{what}{': ' + detail if detail else ''}")
    print(f"  ok  {what}")


def section(title: str) -> None:
    print(f"\n--- {title}  [{time.monotonic() - STARTED:.1f}s]")


# ---------------------------------------------------------------------------------------------
# Rendering


def render(values: dict[str, Any] | None = None, name: str = RELEASE) -> dict[str, str]:
    chart = helm_python.Chart.load(str(CHART))
    return chart.render(values or {}, name=name, namespace=NAMESPACE, is_install=True)


def objects(manifests: dict[str, str]) -> list[dict[str, Any]]:
    out = []
    for path, text in sorted(manifests.items()):
        if not path.endswith(".yaml"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                out.append(doc)
    return out


def one(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    if len(found) != 1:
        raise Failure(f"expected one {kind} {name or ''}, found {len(found)}")
    return found[0]


def validate_all(label: str, objs: list[dict[str, Any]]) -> None:
    for version in K8S_VERSIONS:
        builtin = 0
        for o in objs:
            if o["apiVersion"].startswith(("monitoring.coreos.com/", "cert-manager.io/")):
                continue  # a CRD: checked structurally where it is rendered
            try:
                kubernetes_validate.validate(o, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = "/".join(str(p) for p in e.path)
                raise Failure(
                    f"{label}: {o['kind']}/{o['metadata']['name']} is invalid for Kubernetes "
                    f"{version} at {path or '/'}: {e.message}"
                ) from None
            builtin += 1
        check(True, f"{label}: {builtin} objects valid (strict) for Kubernetes {version}")


def toml_of(objs: list[dict[str, Any]]) -> str:
    cm = one(objs, "ConfigMap", f"{fullname()}-config")
    return cm["data"]["junction.toml"]


def fullname(release: str = RELEASE) -> str:
    return release if "junction" in release else f"{release}-junction"


def pod_labels(sts: dict[str, Any]) -> dict[str, str]:
    return sts["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# ---------------------------------------------------------------------------------------------
# 1-3: lint, validation, bad values, HA properties


def test_lint() -> None:
    section("helm lint --strict")
    for version in K8S_VERSIONS:
        report = helm_python.lint(str(CHART), strict=True, namespace=NAMESPACE, kube_version=f"v{version}")
        problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        check(not problems, f"lint --strict clean for Kubernetes {version}", json.dumps(problems))


VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "five replicas": {"replicaCount": 5},
    "persistence off": {"persistence": {"enabled": False}},
    "ServiceMonitor and dashboard on": {
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
        "grafanaDashboard": {"enabled": True},
    },
    "custom resources, hard anti-affinity, storage class, extras": {
        "resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"cpu": "4", "memory": "8Gi"}},
        "podAntiAffinity": "hard",
        "topologySpread": {"enabled": True, "whenUnsatisfiable": "DoNotSchedule"},
        "persistence": {"storageClass": "fast-ssd", "size": "200Gi"},
        "extraEnv": [{"name": "RUST_BACKTRACE", "value": "1"}],
        "extraVolumes": [{"name": "scratch", "emptyDir": {"sizeLimit": "1Gi"}}],
        "extraVolumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
        "priorityClassName": "streaming-critical",
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "junction", "effect": "NoSchedule"}],
        "nodeSelector": {"node-pool": "junction"},
        "service": {"type": "LoadBalancer", "annotations": {"a": "b"}},
    },
    "release name without 'junction'": {},
    "TLS by cert-manager": {"tls": {"certManager": {"enabled": True, "issuerRef": {"name": "cluster-ca", "kind": "ClusterIssuer"}}}},
    "TLS and auth off": {"tls": {"enabled": False}, "auth": {"mode": "none"}},
}


def test_render_and_validate() -> dict[str, list[dict[str, Any]]]:
    section(f"render variants and validate strictly against Kubernetes {', '.join(K8S_VERSIONS)}")
    rendered = {}
    for label, values in VARIANTS.items():
        release = "events" if "without" in label else RELEASE
        objs = objects(render(values, name=release))
        validate_all(label, objs)
        rendered[label] = objs
    return rendered


BAD_VALUES: list[tuple[str, dict[str, Any], str]] = [
    ("replicaCount 2", {"replicaCount": 2}, "/replicaCount"),
    ("replicaCount 4 (even)", {"replicaCount": 4}, "/replicaCount"),
    ("replicaCount 1", {"replicaCount": 1}, "/replicaCount"),
    ("replicaCount 7", {"replicaCount": 7}, "/replicaCount"),
    ("replicaCount as a string", {"replicaCount": "3"}, "/replicaCount"),
    ("negative volume size", {"persistence": {"size": "-10Gi"}}, "/persistence/size"),
    ("zero volume size", {"persistence": {"size": "0"}}, "/persistence/size"),
    ("volume size without a number", {"persistence": {"size": "Gi"}}, "/persistence/size"),
    ("negative grace period", {"terminationGracePeriodSeconds": -1}, "/terminationGracePeriodSeconds"),
    ("grace period too short for a handoff", {"terminationGracePeriodSeconds": 5}, "/terminationGracePeriodSeconds"),
    ("negative minReadySeconds", {"minReadySeconds": -5}, "/minReadySeconds"),
    ("zero max message size", {"config": {"maxMessageBytes": 0}}, "/config/maxMessageBytes"),
    ("max message size above 64 MiB", {"config": {"maxMessageBytes": 67108865}}, "/config/maxMessageBytes"),
    ("unknown top-level key", {"replicas": 3}, "additional properties 'replicas'"),
    ("unknown config key (typo)", {"config": {"heartbeatMS": 100}}, "additional properties 'heartbeatMS'"),
    ("OrderedReady pod management", {"podManagementPolicy": "OrderedReady"}, "/podManagementPolicy"),
    ("anti-affinity 'medium'", {"podAntiAffinity": "medium"}, "/podAntiAffinity"),
    ("port 0", {"ports": {"grpc": 0}}, "/ports/grpc"),
    ("PDB allowing two of three down", {"podDisruptionBudget": {"maxUnavailable": 2}}, "at most 1"),
    ("election timeout under two heartbeats", {"config": {"heartbeatMs": 500, "electionMinMs": 600, "electionMaxMs": 900}}, "twice"),
    ("election max not above min", {"config": {"electionMinMs": 900, "electionMaxMs": 900}}, "greater than"),
    ("quiescence sooner than an election timeout", {"config": {"quiesceAfterMs": 100}}, "0 (never) or at least"),
    ("negative quiescence", {"config": {"quiesceAfterMs": -1}}, "/config/quiesceAfterMs"),
    ("negative tail window", {"config": {"tailWindowBytes": -1}}, "/config/tailWindowBytes"),
    ("negative opening wave", {"config": {"openWave": -1}}, "/config/openWave"),
    ("format level 0", {"config": {"maxFormatLevel": 0}}, "/config/maxFormatLevel"),
    ("cert-manager without an issuer", {"tls": {"certManager": {"enabled": True}}}, "issuerRef.name"),
    ("cert-manager and an existing Secret", {"tls": {"existingSecret": "mine", "certManager": {"enabled": True, "issuerRef": {"name": "ca"}}}}, "leave tls.existingSecret empty"),
    ("an issuer kind that does not exist", {"tls": {"certManager": {"issuerRef": {"kind": "Issuers"}}}}, "/tls/certManager/issuerRef/kind"),
]


def test_bad_values() -> None:
    section("bad values are refused with a clear message")
    for label, values, expect in BAD_VALUES:
        try:
            render(values)
        except (helm_python.HelmValuesError, helm_python.HelmRenderError) as e:
            msg = " ".join(str(e).split())
            check(expect in msg, f"refused: {label}", f"message does not name {expect!r}: {msg}")
            continue
        raise Failure(f"accepted bad values: {label}: {values}")
    # Five replicas with a PDB of two is a legal choice.
    objs = objects(render({"replicaCount": 5, "podDisruptionBudget": {"maxUnavailable": 2}}))
    check(one(objs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 2, "accepted: five replicas with maxUnavailable 2")


def test_replica_guard() -> None:
    section("upgrade guard: a running cluster grows freely, shrinks only after remove-node")
    # `lookup` returns nothing offline, so render a copy of the chart whose lookup is replaced
    # by the live StatefulSet a cluster would return (spec.replicas as JSON gives it: a float).
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    call = 'lookup "apps/v1" "StatefulSet" .Release.Namespace (include "junction.fullname" .)'
    check(helpers.count(call) == 1, "the guard looks up the live StatefulSet of this release")
    cases: list[tuple[int, int, list[int] | None, str | None]] = [
        (3, 3, None, None),
        (3, 5, None, None),
        (5, 3, None, "nodes 4,5 must leave the cluster first"),
        (5, 3, [5], "nodes 4 must leave the cluster first"),
        (5, 3, [4, 5], None),
        (5, 3, [5, 4, 9], None),
    ]
    with tempfile.TemporaryDirectory(prefix="junction-chart-guard-") as tmp:
        for live, want, removed, refusal in cases:
            copy = Path(tmp) / f"junction-{live}-{want}-{len(removed or [])}"
            shutil.copytree(CHART, copy)
            (copy / "templates" / "_helpers.tpl").write_text(
                helpers.replace(call, f'dict "spec" (dict "replicas" (float64 {live}))'))
            chart = helm_python.Chart.load(str(copy))
            values: dict[str, Any] = {"replicaCount": want}
            if removed is not None:
                values["scaleDown"] = {"removedNodes": removed}
            try:
                chart.render(values, name=RELEASE, namespace=NAMESPACE, is_upgrade=True)
                refused = None
            except helm_python.HelmRenderError as e:
                refused = " ".join(str(e).split())
            label = f"upgrade of a {live}-node cluster to replicaCount {want} (removedNodes {removed})"
            if refusal is None:
                check(refused is None, f"{label} renders", str(refused))
            else:
                check(refused is not None and f"replicaCount {want} is below the running cluster's {live}" in refused
                      and refusal in refused and "junction cluster remove-node N --wait" in refused,
                      f"{label} is refused: {refusal}", str(refused))


def members_of(toml_text: str) -> dict[int, str]:
    m = re.search(r'^members = "([^"]*)"$', toml_text, re.M)
    if not m:
        raise Failure(f"no members line in the rendered config:\n{toml_text}")
    out = {}
    for entry in m.group(1).split(","):
        node, addr = entry.split("=", 1)
        out[int(node)] = addr
    return out


def test_ha_properties(rendered: dict[str, list[dict[str, Any]]]) -> None:
    section("HA properties of the rendered objects")
    objs = rendered["defaults"]
    name = fullname()
    headless_name = f"{name}-headless"
    sts = one(objs, "StatefulSet", name)
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    labels = pod_labels(sts)
    c = pod["containers"][0]
    values = helm_python.Chart.load(str(CHART)).values

    check(spec["replicas"] == 3, "StatefulSet: 3 replicas by default")

    # Node-to-node calls carry a secret the chart makes, mounted for the pod's group only.
    secret = one(objs, "Secret", f"{name}-cluster-secret")
    secret_value = base64.b64decode(secret["data"]["cluster-secret"]).decode()
    check(len(secret_value) == 64 and secret_value.isalnum(), "cluster secret: 64 random characters")
    check(secret["metadata"]["annotations"].get("helm.sh/resource-policy") == "keep",
          "cluster secret: kept on uninstall, like the data volumes")
    secret_vol = next(v for v in pod["volumes"] if v["name"] == "cluster-secret")
    secret_mount = next(m for m in c["volumeMounts"] if m["name"] == "cluster-secret")
    check(secret_vol["secret"]["secretName"] == secret["metadata"]["name"]
          and secret_vol["secret"]["defaultMode"] == 0o440 and secret_mount["readOnly"],
          "cluster secret: mounted read-only, readable by the pod's group only")
    check(f'cluster-secret-file = "{secret_mount["mountPath"]}/cluster-secret"' in toml_of(objs),
          "config: cluster-secret-file points at the mounted secret")
    again = one(objects(render()), "Secret", f"{name}-cluster-secret")
    check(again["data"] != secret["data"], "cluster secret: a fresh value per install")
    own = objects(render({"clusterSecret": {"existingSecret": "my-secret", "key": "s"}}))
    own_pod = one(own, "StatefulSet", name)["spec"]["template"]["spec"]
    check(not [o for o in own if o["kind"] == "Secret" and o["metadata"]["name"].endswith("-cluster-secret")]
          and next(v for v in own_pod["volumes"] if v["name"] == "cluster-secret")["secret"]["secretName"] == "my-secret"
          and 'cluster-secret-file = "/etc/junction-secret/s"' in toml_of(own),
          "clusterSecret.existingSecret: no Secret rendered, the given one mounted")
    # Client authentication is on by default, with an admin token the chart makes.
    token = one(objs, "Secret", f"{name}-admin-token")
    token_value = base64.b64decode(token["data"]["admin-token"]).decode()
    check(len(token_value) == 64 and token_value.isalnum()
          and token["metadata"]["annotations"].get("helm.sh/resource-policy") == "keep",
          "admin token: 64 random characters, kept on uninstall")
    token_vol = next(v for v in pod["volumes"] if v["name"] == "admin-token")
    token_mount = next(m for m in c["volumeMounts"] if m["name"] == "admin-token")
    check(token_vol["secret"]["secretName"] == token["metadata"]["name"]
          and token_vol["secret"]["defaultMode"] == 0o440 and token_mount["readOnly"]
          and 'auth = "keys"' in toml_of(objs)
          and f'admin-token-file = "{token_mount["mountPath"]}/admin-token"' in toml_of(objs),
          "auth.mode=keys by default: the admin token mounted read-only for the pod's group, the config points at it")
    test_pod = one(objs, "Pod")
    check(any(e["name"] == "JUNCTION_TOKEN_FILE" for e in test_pod["spec"]["containers"][0]["env"]),
          "helm test pod: sends the admin token")
    open_objs = objects(render({"auth": {"mode": "none", "adminToken": {"existingSecret": "", "key": "admin-token"}}}))
    open_pod = one(open_objs, "StatefulSet", name)["spec"]["template"]["spec"]
    check(not [o for o in open_objs if o["kind"] == "Secret" and o["metadata"]["name"].endswith("-admin-token")]
          and not [v for v in open_pod["volumes"] if v["name"] == "admin-token"]
          and 'auth = "none"' in toml_of(open_objs),
          "auth.mode=none: no admin token, no mount, auth off in the config")
    check(spec["podManagementPolicy"] == "Parallel", "StatefulSet: podManagementPolicy Parallel")
    check(spec["serviceName"] == headless_name, "StatefulSet: serviceName is the headless Service")
    check(spec["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"partition": 0}},
          "StatefulSet: RollingUpdate, one pod at a time (no maxUnavailable)")
    check(spec["minReadySeconds"] >= 5, f"StatefulSet: minReadySeconds {spec['minReadySeconds']} before the next pod")
    check(selects(spec["selector"]["matchLabels"], labels), "StatefulSet: selector matches the pod labels")
    check("checksum/config" in spec["template"]["metadata"]["annotations"], "pod: config checksum rolls pods on config change")

    headless = one(objs, "Service", headless_name)
    check(headless["spec"]["clusterIP"] == "None", "headless Service: clusterIP None")
    check(headless["spec"]["publishNotReadyAddresses"] is True, "headless Service: publishNotReadyAddresses")
    check(selects(headless["spec"]["selector"], labels), "headless Service: selects the pods")
    client = one(objs, "Service", name)
    check(client["spec"].get("clusterIP") != "None" and not client["spec"].get("publishNotReadyAddresses"),
          "client Service: a virtual IP over ready pods only")
    check(selects(client["spec"]["selector"], labels), "client Service: selects the pods")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for svc in (headless, client):
        for p in svc["spec"]["ports"]:
            check(p["targetPort"] in ports and ports[p["targetPort"]] == p["port"],
                  f"{svc['metadata']['name']}: port {p['name']} → container port {p['targetPort']}")

    pdb = one(objs, "PodDisruptionBudget", name)
    check(pdb["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": spec["selector"]["matchLabels"]}},
          "PDB: maxUnavailable 1 over exactly the StatefulSet's pods")

    aa = pod["affinity"]["podAntiAffinity"]
    soft = aa["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    check(soft["topologyKey"] == "kubernetes.io/hostname" and selects(soft["labelSelector"]["matchLabels"], labels)
          and "requiredDuringSchedulingIgnoredDuringExecution" not in aa,
          "anti-affinity: soft, one pod per hostname preferred")
    hard_pod = one(rendered["custom resources, hard anti-affinity, storage class, extras"], "StatefulSet")["spec"]["template"]["spec"]
    hard = hard_pod["affinity"]["podAntiAffinity"]
    check("requiredDuringSchedulingIgnoredDuringExecution" in hard
          and hard["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"] == "kubernetes.io/hostname",
          "anti-affinity: hard when podAntiAffinity=hard")
    tsc = pod["topologySpreadConstraints"][0]
    check(tsc["topologyKey"] == "topology.kubernetes.io/zone" and tsc["maxSkew"] == 1
          and selects(tsc["labelSelector"]["matchLabels"], labels), "topology spread across zones, maxSkew 1")

    http_port = values["ports"]["http"]
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = c[probe]["httpGet"]
        check(get["path"] == path and ports.get(get["port"]) == http_port,
              f"{probe}: GET {path} on the HTTP port ({http_port})")
    toml = toml_of(objs)
    check(f':{http_port}"' in re.search(r'^http = .*$', toml, re.M).group(0), "config: HTTP server on the probed port")
    held = toml_of(objects(render({"config": {"maxFormatLevel": 1}})))
    check("max-format-level" not in toml and re.search(r'^max-format-level = 1$', held, re.M) is not None,
          "config: no format level limit by default; config.maxFormatLevel sets max-format-level")

    vct = spec["volumeClaimTemplates"][0]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    data_dir = re.search(r'^data-dir = "([^"]*)"$', toml, re.M).group(1)
    check(vct["metadata"]["name"] == "data" and vct["spec"]["resources"]["requests"]["storage"] == "10Gi"
          and vct["spec"]["accessModes"] == ["ReadWriteOnce"], "volumeClaimTemplate 'data', 10Gi, ReadWriteOnce")
    check(data_dir.startswith(mounts["data"]["mountPath"] + "/"), f"config: data-dir {data_dir} is on the data volume")
    check(all(v["name"] != "data" for v in pod["volumes"]), "persistence on: no emptyDir for data")
    check(spec["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"},
          "PVCs retained when the StatefulSet is deleted or scaled")
    np_objs = rendered["persistence off"]
    np_sts = one(np_objs, "StatefulSet")
    check("volumeClaimTemplates" not in np_sts["spec"]
          and {"name": "data", "emptyDir": {}} in np_sts["spec"]["template"]["spec"]["volumes"],
          "persistence off: data in an emptyDir, no claims")
    notes = render({"persistence": {"enabled": False}})[f"{RELEASE}/templates/NOTES.txt"]
    check("WARNING: persistence.enabled=false" in notes, "persistence off: NOTES warns that data is lost with the pod")
    custom_vct = one(rendered["custom resources, hard anti-affinity, storage class, extras"], "StatefulSet")["spec"]["volumeClaimTemplates"][0]
    check(custom_vct["spec"]["storageClassName"] == "fast-ssd" and custom_vct["spec"]["resources"]["requests"]["storage"] == "200Gi",
          "persistence: storage class and size from values")

    psc, csc = pod["securityContext"], c["securityContext"]
    check(psc["runAsNonRoot"] and psc["runAsUser"] != 0 and psc["seccompProfile"]["type"] == "RuntimeDefault",
          "pod securityContext: non-root, RuntimeDefault seccomp")
    check(csc["readOnlyRootFilesystem"] and csc["allowPrivilegeEscalation"] is False and csc["capabilities"] == {"drop": ["ALL"]},
          "container securityContext: read-only root, no privilege escalation, all capabilities dropped")
    sa = one(objs, "ServiceAccount", name)
    check(pod["serviceAccountName"] == name and sa["automountServiceAccountToken"] is False
          and pod["automountServiceAccountToken"] is False, "ServiceAccount, no API token mounted")
    check(pod["enableServiceLinks"] is False, "no service-link env vars in the JUNCTION_* namespace")
    res = c["resources"]
    check(res["requests"]["memory"] and res["requests"]["cpu"] and res["limits"]["memory"], "resources: requests and a memory limit")
    custom = one(rendered["custom resources, hard anti-affinity, storage class, extras"], "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    check(custom["resources"] == VARIANTS["custom resources, hard anti-affinity, storage class, extras"]["resources"],
          "resources: custom values rendered verbatim")
    check(pod["terminationGracePeriodSeconds"] >= 30, f"terminationGracePeriodSeconds {pod['terminationGracePeriodSeconds']}")

    for label, n in (("defaults", 3), ("five replicas", 5)):
        sts_n = one(rendered[label], "StatefulSet")
        members = members_of(toml_of(rendered[label]))
        want = {i + 1: f"{name}-{i}.{headless_name}.{NAMESPACE}.svc.cluster.local:7701" for i in range(n)}
        check(sts_n["spec"]["replicas"] == n and members == want,
              f"{label}: {n} replicas and all {n} members, node i+1 at pod i's headless DNS name", json.dumps(members))
    other = rendered["release name without 'junction'"]
    check(one(other, "StatefulSet")["metadata"]["name"] == "events-junction"
          and members_of(toml_of_named(other, "events-junction"))[1].startswith("events-junction-0.events-junction-headless."),
          "release 'events': names and member DNS names follow the release")

    sm_objs = rendered["ServiceMonitor and dashboard on"]
    sm = one(sm_objs, "ServiceMonitor", name)
    sm_headless = one(sm_objs, "Service", headless_name)
    ep = sm["spec"]["endpoints"][0]
    check(sm["apiVersion"] == "monitoring.coreos.com/v1" and selects(sm["spec"]["selector"]["matchLabels"], sm_headless["metadata"]["labels"])
          and not selects(sm["spec"]["selector"]["matchLabels"], one(sm_objs, "Service", name)["metadata"]["labels"])
          and ep["port"] == "http" and ep["path"] == "/metrics" and sm["metadata"]["labels"]["release"] == "prom",
          "ServiceMonitor (CRD, checked structurally): /metrics on port http of every pod via the headless Service")
    check(not any(o["kind"] == "ServiceMonitor" for o in objs), "ServiceMonitor off by default")

    test_pod = [o for o in objs if o["kind"] == "Pod"]
    check(len(test_pod) == 1 and test_pod[0]["metadata"]["annotations"]["helm.sh/hook"] == "test", "a helm test pod")


def cert_names(pem: bytes) -> set[str]:
    """The subjectAltName entries of a PEM certificate ("DNS:x", "IP Address:y")."""
    import ssl
    with tempfile.NamedTemporaryFile(suffix=".pem") as f:
        f.write(pem)
        f.flush()
        info = ssl._ssl._test_decode_cert(f.name)  # type: ignore[attr-defined]
    return {f"{kind}:{value}" for kind, value in info.get("subjectAltName", ())}


def test_tls(rendered: dict[str, list[dict[str, Any]]]) -> None:
    section("TLS: the nodes' certificate, where it is mounted, and who trusts it")
    name = fullname()
    headless = f"*.{name}-headless.{NAMESPACE}.svc.cluster.local"
    objs = rendered["defaults"]
    secret = one(objs, "Secret", f"{name}-tls")
    check(secret["type"] == "kubernetes.io/tls" and set(secret["data"]) == {"tls.crt", "tls.key", "ca.crt"},
          "by default the chart makes a kubernetes.io/tls Secret with tls.crt, tls.key and ca.crt")
    names = cert_names(base64.b64decode(secret["data"]["tls.crt"]))
    want = {f"DNS:{headless}", f"DNS:{name}.{NAMESPACE}.svc.cluster.local", "DNS:localhost", "IP Address:127.0.0.1"}
    check(want <= names, "the certificate names every pod (headless wildcard), the client Service and localhost",
          f"missing {sorted(want - names)} in {sorted(names)}")
    check(secret["metadata"].get("annotations", {}).get("helm.sh/resource-policy") == "keep",
          "the generated TLS Secret is kept on uninstall (like the data)")
    toml_text = toml_of(objs)
    check(all(f'{k} = "/etc/junction-tls/{v}"' in toml_text
              for k, v in [("tls-cert", "tls.crt"), ("tls-key", "tls.key"), ("tls-ca", "ca.crt")]),
          "the config points the node at the mounted certificate, key and CA", toml_text)
    pod = one(objs, "StatefulSet")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    mount = [m for m in c["volumeMounts"] if m["mountPath"] == "/etc/junction-tls"]
    check(len(mount) == 1 and "subPath" not in mount[0],
          "the TLS Secret is mounted whole (no subPath), so renewed files reach the node")
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    check(env.get("JUNCTION_TLS_CA") == "/etc/junction-tls/ca.crt",
          "`kubectl exec ... junction` in a pod trusts the cluster CA (JUNCTION_TLS_CA)")
    test_pod = one(objs, "Pod")
    vols = {v["name"]: v for v in test_pod["spec"].get("volumes", [])}
    ca_items = [i["key"] for v in vols.values() if "secret" in v and v["secret"]["secretName"] == f"{name}-tls"
                for i in v["secret"].get("items", [])]
    check(ca_items == ["ca.crt"], "the helm test pod gets the CA only, never the nodes' key", str(ca_items))

    cm = rendered["TLS by cert-manager"]
    cert = one(cm, "Certificate")
    spec = cert["spec"]
    check(spec["secretName"] == f"{name}-tls" and headless in spec["dnsNames"]
          and {"server auth", "client auth"} <= set(spec["usages"]) and spec["issuerRef"]["kind"] == "ClusterIssuer",
          "tls.certManager: a Certificate for every pod, for server and client auth, from the given issuer", str(spec))
    check(not any(o["kind"] == "Secret" and o.get("type") == "kubernetes.io/tls" for o in cm),
          "tls.certManager: the chart makes no certificate of its own")

    off = rendered["TLS and auth off"]
    check("tls-" not in toml_of(off) and not any(o["kind"] == "Secret" and o.get("type") == "kubernetes.io/tls" for o in off),
          "tls.enabled=false: no certificate, no TLS settings")


def toml_of_named(objs: list[dict[str, Any]], name: str) -> str:
    return one(objs, "ConfigMap", f"{name}-config")["data"]["junction.toml"]


# ---------------------------------------------------------------------------------------------
# 4: boot the rendered cluster


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def free_port_pairs(n: int, offset: int) -> list[int]:
    """`n` ports below the ephemeral range whose port + `offset` (the node's peer port) is free
    too: only explicit binds land there, so no outgoing connection can take them meanwhile."""
    ports: list[int] = []
    held: list[socket.socket] = []
    start = random.randrange(10_000, 25_000)
    for p in range(start, 30_000):
        if len(ports) == n:
            break
        pair = []
        for port in (p, p + offset):
            if any(port == q or port == q + offset for q in ports):
                break
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                break
            pair.append(s)
        if len(pair) == 2:
            ports.append(p)
        held += pair
    for s in held:
        s.close()
    if len(ports) < n:
        raise Failure(f"no {n} free port pairs below 30000")
    return ports


def peer_host() -> str:
    """The host the pods' DNS names are mapped to. `localhost` when it resolves to 127.0.0.1
    only, so peers are dialled by *name* as in Kubernetes (the resolver path of the dialer is
    exercised); otherwise the address itself."""
    try:
        addrs = {ai[4][0] for ai in socket.getaddrinfo("localhost", 7701, proto=socket.IPPROTO_TCP)}
    except OSError:
        return "127.0.0.1"
    return "localhost" if addrs == {"127.0.0.1"} else "127.0.0.1"


def expand_k8s(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined variables are replaced, $$ escapes, others stay."""

    def repl(m: re.Match[str]) -> str:
        if m.group(0).startswith("$$"):
            return m.group(0)[1:]
        return env.get(m.group(1), m.group(0))

    return re.sub(r"\$\$\([A-Za-z_][A-Za-z0-9_]*\)|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", repl, value)


class PodSim:
    """One pod of the rendered StatefulSet, run as a local process.

    What Kubernetes would supply, and what it is replaced with here (nothing else is changed):
    - the pod name `<statefulset>-<ordinal>` and namespace, through the downward API env
      (fieldRef metadata.name / metadata.namespace), then Kubernetes' $(VAR) expansion;
    - the volumes: each volumeMount's mountPath becomes a directory of this pod's temp dir;
      configMap volumes get the ConfigMap's keys as files, emptyDir/PVC start empty and the data
      volume is kept across restarts of the same pod (a PVC);
    - networking: each pod's headless DNS name `<pod>.<headless>.<ns>.svc.<domain>:<grpc port>`
      becomes localhost:<that pod's own ephemeral port> (a name resolved by the dialer, when
      localhost is 127.0.0.1 only; else 127.0.0.1:<port>), and the bind addresses
      `<bindAddress>:<grpc/http port>` of this pod become 127.0.0.1:<its ports>, in env values,
      args and the mounted config file;
    - the image's /usr/local/bin/junction becomes the built binary.
    After the substitution nothing may still name a .svc address or the wildcard bind address.
    """

    def __init__(self, ordinal: int, objs: list[dict[str, Any]], root: Path, binary: Path,
                 grpc_ports: list[int], http_ports: list[int]) -> None:
        sts = one(objs, "StatefulSet")
        self.sts_name = sts["metadata"]["name"]
        self.ordinal = ordinal
        self.name = f"{self.sts_name}-{ordinal}"
        self.grpc, self.http = grpc_ports[ordinal], http_ports[ordinal]
        self.addr = f"{peer_host()}:{self.grpc}"
        pod = sts["spec"]["template"]["spec"]
        c = pod["containers"][0]
        self.container = c
        values = helm_python.Chart.load(str(CHART)).values
        headless = sts["spec"]["serviceName"]
        domain, bind = values["clusterDomain"], values["bindAddress"]
        cport = {p["name"]: p["containerPort"] for p in c["ports"]}
        self.port_by_name = {"grpc": self.grpc, "http": self.http}
        self.subst: list[tuple[str, str]] = []
        for j, port in enumerate(grpc_ports):
            self.subst.append((f"{self.sts_name}-{j}.{headless}.{NAMESPACE}.svc.{domain}:{cport['grpc']}", f"{peer_host()}:{port}"))
        self.subst += [(f"{bind}:{cport['grpc']}", f"127.0.0.1:{self.grpc}"), (f"{bind}:{cport['http']}", f"127.0.0.1:{self.http}")]

        self.dir = root / self.name
        volumes = {v["name"]: v for v in pod["volumes"]}
        claims = {t["metadata"]["name"] for t in sts["spec"].get("volumeClaimTemplates", [])}
        self.mounts = {}
        for m in c["volumeMounts"]:
            if m["name"] not in volumes and m["name"] not in claims:
                raise Failure(f"volumeMount {m['name']} has no volume or claim template")
            host = self.dir / "volumes" / m["name"]
            host.mkdir(parents=True, exist_ok=True)
            self.mounts[m["mountPath"]] = host
        for m in c["volumeMounts"]:
            vol = volumes.get(m["name"])
            if vol and "configMap" in vol:
                cm = one(objs, "ConfigMap", vol["configMap"]["name"])
                for key, text in cm["data"].items():
                    (self.mounts[m["mountPath"]] / key).write_text(self.substitute(text))
            if vol and "secret" in vol:
                # The Secret as the kubelet projects it: the listed keys (or all), decoded.
                secret = one(objs, "Secret", vol["secret"]["secretName"])
                items = vol["secret"].get("items") or [{"key": k, "path": k} for k in secret["data"]]
                for item in items:
                    target = self.mounts[m["mountPath"]] / item["path"]
                    target.write_bytes(base64.b64decode(secret["data"][item["key"]]))
                    target.chmod(vol["secret"].get("defaultMode", 0o644))
        self.cwd = self.dir / "cwd"
        self.cwd.mkdir(parents=True, exist_ok=True)

        env: dict[str, str] = {}
        for e in c.get("env", []):
            if "valueFrom" in e:
                field = e["valueFrom"]["fieldRef"]["fieldPath"]
                env[e["name"]] = {"metadata.name": self.name, "metadata.namespace": NAMESPACE}[field]
            else:
                env[e["name"]] = expand_k8s(e.get("value", ""), env)
        self.env = {k: self.substitute(v) for k, v in env.items()}
        argv = [expand_k8s(a, env) for a in c["command"] + c.get("args", [])]
        if argv[0] != "/usr/local/bin/junction":
            raise Failure(f"unexpected container command {argv[0]}")
        self.argv = [str(binary)] + [self.substitute(a) for a in argv[1:]]
        for text in [*self.env.values(), *self.argv, *(p.read_text() for h in self.mounts.values() for p in h.glob("*.toml"))]:
            if ".svc." in text or f"{bind}:" in text:
                raise Failure(f"{self.name}: unsubstituted cluster address in {text!r}")
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "junction.log"

    def substitute(self, text: str) -> str:
        for old, new in self.subst:
            text = text.replace(old, new)
        # Mount paths, in one pass (a host path may itself start with a mount path like /tmp).
        paths = sorted(self.mounts, key=len, reverse=True)
        pattern = r"(?<![\w./-])(" + "|".join(re.escape(m) for m in paths) + r")(?=/|\"|'|$|\s)"
        return re.sub(pattern, lambda m: str(self.mounts[m.group(1)]), text)

    def start(self) -> None:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOSTNAME": self.name,
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": "1",
            **self.env,
        }
        with open(self.log, "ab") as log:
            log.write(f"\n=== start {' '.join(self.argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.argv, env=env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def probe(self, probe: str) -> bool:
        get = self.container[probe]["httpGet"]
        return http_get(f"http://127.0.0.1:{self.port_by_name[get['port']]}{get['path']}")[0] == 200

    def metrics(self) -> str:
        status, body = http_get(f"http://127.0.0.1:{self.http}/metrics")
        if status != 200:
            raise Failure(f"{self.name}: /metrics answered {status}")
        return body

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        if self.proc:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, grace: float, since: float | None = None) -> tuple[float, int | None]:
        """SIGTERM, as the kubelet does, then SIGKILL after `grace` seconds; returns (seconds to
        exit, exit code or None if it had to be killed). With `since`, SIGTERM was already sent
        at that time."""
        assert self.proc is not None
        t = since if since is not None else time.monotonic()
        if since is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(max(grace - (time.monotonic() - t), 1))
            return time.monotonic() - t, code
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return time.monotonic() - t, None

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except OSError:
        return 0, ""


def wait_for(what: str, cond: Callable[[], Any], timeout: float, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last_err = ""
    while time.monotonic() < deadline:
        try:
            value = cond()
            if value:
                return value
        except Failure as e:
            last_err = str(e)
        time.sleep(interval)
    raise Failure(f"timed out after {timeout:.0f}s waiting for {what}{': ' + last_err if last_err else ''}")


def peer_offset_of(objs: list[dict[str, Any]]) -> int:
    """The peer port offset of the rendered config."""
    sts = one(objs, "StatefulSet")
    toml_text = one(objs, "ConfigMap", f"{sts['metadata']['name']}-config")["data"]["junction.toml"]
    m = re.search(r"^\s*peer-port-offset = (\d+)$", toml_text, re.M)
    if not m:
        raise Failure("the rendered config has no peer-port-offset")
    return int(m.group(1))


def tls_ca_of(objs: list[dict[str, Any]], where: Path) -> Path | None:
    """The CA of the TLS Secret the chart rendered, written to a file (None without TLS)."""
    for o in objs:
        if o["kind"] == "Secret" and o.get("type") == "kubernetes.io/tls":
            where.mkdir(parents=True, exist_ok=True)
            path = where / "client-ca.crt"
            path.write_bytes(base64.b64decode(o["data"]["ca.crt"]))
            return path
    return None


def admin_token_of(objs: list[dict[str, Any]]) -> str | None:
    """The bootstrap admin token the chart rendered (None with auth.mode=none)."""
    for o in objs:
        if o["kind"] == "Secret" and o["metadata"]["name"].endswith("-admin-token"):
            return base64.b64decode(o["data"]["admin-token"]).decode()
    return None


class Cli:
    def __init__(self, binary: Path, token: str | None = None, ca: Path | None = None) -> None:
        self.binary = binary
        self.token = token
        self.ca = ca

    def run(self, servers: list[str], *args: str, stdin: str | None = None, timeout: float = 30,
            anonymous: bool = False) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("JUNCTION_")}
        if self.token and not anonymous:
            env["JUNCTION_TOKEN"] = self.token
        if self.ca:
            env["JUNCTION_TLS_CA"] = str(self.ca)
        return subprocess.run([str(self.binary), *args, "--server", ",".join(servers)], input=stdin, text=True,
                              capture_output=True, timeout=timeout, env=env)

    def ok(self, servers: list[str], *args: str, stdin: str | None = None, timeout: float = 30) -> str:
        r = self.run(servers, *args, stdin=stdin, timeout=timeout)
        if r.returncode != 0:
            raise Failure(f"junction {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()[-800:]}")
        return r.stdout

    def status(self, servers: list[str]) -> dict[str, Any]:
        return json.loads(self.ok(servers, "cluster", "status", "--json", timeout=15))

    def read_all(self, servers: list[str], station: str, count: int) -> list[str]:
        out = self.ok(servers, "read", station, "--count", str(count), "--json", timeout=60)
        return [json.loads(line)["payload"] for line in out.splitlines() if line.strip()]


def formed(cli: Cli, pods: list[PodSim], servers: list[str]) -> dict[str, Any] | None:
    st = cli.status(servers)
    alive = {n["id"] for n in st["nodes"] if n["alive"]}
    if st.get("metadata_leader") and alive == {p.ordinal + 1 for p in pods if p.alive()}:
        return st
    return None


def boot_cluster(label: str, objs: list[dict[str, Any]], binary: Path, root: Path, chaos: bool) -> dict[str, float]:
    timings: dict[str, float] = {}
    sts = one(objs, "StatefulSet")
    n = sts["spec"]["replicas"]
    grace = sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # Ports for one more pod than the StatefulSet has, to play `kubectl scale` up.
    # The peer port of each pod is its gRPC port + the rendered offset.
    offset = peer_offset_of(objs)
    grpc_ports, http_ports = free_port_pairs(n + 1, offset), free_ports(n + 1)
    pods = [PodSim(i, objs, root / label.replace(" ", "-"), binary, grpc_ports, http_ports) for i in range(n)]
    cli = Cli(binary, admin_token_of(objs), tls_ca_of(objs, root / label.replace(" ", "-")))
    every = [p.addr for p in pods]
    try:
        t0 = time.monotonic()
        for p in pods:  # podManagementPolicy: Parallel
            p.start()
        print(f"  headless DNS names mapped to {peer_host()}:<port>; bind addresses to 127.0.0.1:<port>")
        print(f"  started {n} pods: " + ", ".join(f"{p.name} (node {p.ordinal + 1}) grpc {p.addr} http :{p.http}" for p in pods))
        for p in pods:
            wait_for(f"{p.name} startupProbe", lambda p=p: p.probe("startupProbe"), 60)
            check(p.probe("livenessProbe"), f"{p.name}: startup and liveness probes answer 200")
        for p in pods:
            wait_for(f"{p.name} readinessProbe", lambda p=p: p.probe("readinessProbe"), 60)
        timings["all pods ready"] = time.monotonic() - t0
        check(True, f"all {n} pods ready (readiness probe /readyz) in {timings['all pods ready']:.1f}s")
        st = wait_for("a cluster of every pod", lambda: formed(cli, pods, every), 30)
        ids = {n_["addr"]: n_["id"] for n_ in st["nodes"]}
        check(ids == {p.addr: p.ordinal + 1 for p in pods},
              f"one cluster of {n} nodes, node id = ordinal + 1, metadata leader node {st['metadata_leader']}", json.dumps(st["nodes"]))

        station = "chart-boot"
        cli.ok(every, "station", "create", station, "--partitions", "3", "--replication-factor", str(min(n, 5)))
        first = [f"k{i % 10}\tmsg-{i}" for i in range(200)]
        cli.ok([pods[0].addr], "produce", station, "--key-sep", "TAB", stdin="\n".join(first) + "\n")
        got = cli.read_all([pods[-1].addr], station, len(first))
        check(sorted(got) == sorted(line.split("\t")[1] for line in first),
              f"produced {len(first)} messages through {pods[0].name}, read all back through {pods[-1].name}")
        r = cli.run(every, "produce", "no-such-station", stdin="x\n")
        check(r.returncode != 0 and re.search(r"not ?found", r.stderr + r.stdout, re.I) is not None,
              "producing to a missing station fails with NOT_FOUND", f"exit {r.returncode}: {r.stderr}{r.stdout}")
        if cli.ca:
            plain = Cli(binary, cli.token)
            r = plain.run(every, "station", "list", timeout=20)
            check(r.returncode != 0 and "requires TLS" in r.stderr,
                  "tls.enabled: a plaintext client is told the port requires TLS", f"exit {r.returncode}: {r.stderr[-600:]}")
        if cli.token:
            r = cli.run(every, "station", "list", anonymous=True)
            check(r.returncode != 0 and "no credential" in r.stderr,
                  "auth.mode=keys: a call without a token is refused (UNAUTHENTICATED)", f"exit {r.returncode}: {r.stderr}")
            key = json.loads(cli.ok(every, "auth", "key", "create", "--role", "reader", "--json"))
            reader = Cli(binary, key["token"], cli.ca)
            got = reader.read_all([pods[1].addr], station, len(first))
            r = reader.run(every, "station", "create", "not-for-readers")
            check(len(got) == len(first) and r.returncode != 0 and "may not manage" in r.stderr,
                  "an API key made with the admin token reads on any pod, and its role holds",
                  f"read {len(got)}; create exit {r.returncode}: {r.stderr}")

        if not chaos:
            return timings

        # `kubectl scale --replicas=4` behind the chart's back: the new pod is not a member,
        # so it must refuse to start rather than join or disturb the cluster.
        extra = PodSim(n, objs, root / label.replace(" ", "-"), binary, grpc_ports, http_ports)
        extra.start()
        assert extra.proc
        try:
            code = extra.proc.wait(20)
        except subprocess.TimeoutExpired:
            extra.kill9()
            raise Failure(f"{extra.name} (not in the member list) kept running") from None
        log = extra.log.read_text(errors="replace")
        check(code != 0 and f"node id {n + 1} is not in the member list" in log,
              f"kubectl scale up: {extra.name} exits ({code}) with 'node id {n + 1} is not in the member list'",
              extra.log_tail())
        st_after = cli.status(every)
        check(sorted(x["id"] for x in st_after["nodes"]) == list(range(1, n + 1)) and all(x["alive"] for x in st_after["nodes"]),
              f"the cluster still has exactly its {n} nodes, all alive")

        # kill -9 the pod that leads the metadata group.
        leader = st["metadata_leader"]
        victim = pods[leader - 1]
        rest = [p for p in pods if p is not victim]
        t = time.monotonic()
        victim.kill9()
        check(True, f"kill -9 {victim.name} (node {leader}, the metadata leader)")
        st2 = wait_for("a new metadata leader among the survivors",
                       lambda: (s := cli.status([p.addr for p in rest]))["metadata_leader"] not in (None, leader) and s, 30)
        timings["new metadata leader after kill -9"] = time.monotonic() - t
        check(True, f"node {st2['metadata_leader']} leads the metadata group {timings['new metadata leader after kill -9']:.1f}s later")
        second = [f"k{i % 10}\tmsg-{i}" for i in range(200, 400)]
        cli.ok([rest[0].addr], "produce", station, "--key-sep", "TAB", stdin="\n".join(second) + "\n", timeout=60)
        got = cli.read_all([rest[1].addr], station, 400)
        check(len(got) == 400 and set(got) == {f"msg-{i}" for i in range(400)},
              f"with {victim.name} down: 200 more produced, all 400 read through {rest[1].name}")

        # The pod comes back on the same volume (its PVC) and catches up.
        t = time.monotonic()
        victim.start()
        wait_for(f"{victim.name} ready again", lambda: victim.probe("readinessProbe"), 60)
        wait_for(f"{victim.name} alive in the cluster status", lambda: formed(cli, pods, every), 30)

        def caught_up() -> bool:
            offsets = re.findall(r'^junction_partition_next_offset\{[^}]*\} (\d+)', victim.metrics(), re.M)
            return len(offsets) == 3 and sum(int(o) for o in offsets) == 400

        wait_for(f"{victim.name}'s replicas to hold all 400 messages", caught_up, 60)
        timings["rejoin and catch up after restart"] = time.monotonic() - t
        check(True, f"{victim.name} rejoined and its 3 partition replicas hold all 400 messages "
                    f"{timings['rejoin and catch up after restart']:.1f}s after restart")
        got = cli.read_all([victim.addr], station, 400)
        check(sorted(got) == sorted(f"msg-{i}" for i in range(400)), f"all 400 read through the restarted {victim.name}")

        # The chart's own `helm test` pod, its script run as rendered.
        test_pod = one(objs, "Pod")
        tc = test_pod["spec"]["containers"][0]
        client_addr = f"{sts['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{pods[0].container['ports'][0]['containerPort']}"
        tenv: dict[str, str] = {}
        for e in tc["env"]:
            tenv[e["name"]] = expand_k8s(e["value"], tenv).replace(client_addr, ",".join(every))
        if tenv.get("JUNCTION_SERVER") != ",".join(every):
            raise Failure(f"helm test pod env not understood: {tc['env']}")
        if "JUNCTION_TOKEN_FILE" in tenv:
            # The pod's mount of the admin token Secret.
            mounts = {m["mountPath"] for m in tc.get("volumeMounts", [])}
            if not any(tenv["JUNCTION_TOKEN_FILE"].startswith(m + "/") for m in mounts):
                raise Failure(f"helm test pod: JUNCTION_TOKEN_FILE {tenv['JUNCTION_TOKEN_FILE']} is not on a mount")
            mounted = root / "test-pod-admin-token"
            mounted.write_text(admin_token_of(objs) or "")
            tenv["JUNCTION_TOKEN_FILE"] = str(mounted)
        if "JUNCTION_TLS_CA" in tenv:
            # The pod's mount of the CA (and only the CA) of the TLS Secret.
            mounts = {m["mountPath"] for m in tc.get("volumeMounts", [])}
            if not any(tenv["JUNCTION_TLS_CA"].startswith(m + "/") for m in mounts):
                raise Failure(f"helm test pod: JUNCTION_TLS_CA {tenv['JUNCTION_TLS_CA']} is not on a mount")
            tenv["JUNCTION_TLS_CA"] = str(tls_ca_of(objs, root / "test-pod-tls"))
        tcmd = [expand_k8s(a, tenv) for a in tc["command"] + tc.get("args", [])]
        r = subprocess.run(tcmd, env={"PATH": f"{binary.parent}:{os.environ.get('PATH', '/usr/bin:/bin')}", **tenv},
                           capture_output=True, text=True, timeout=90, cwd=root)
        check(r.returncode == 0 and "round trip ok" in r.stdout,
              "the helm test pod's script (status over gRPC, produce/read round trip) passes",
              f"exit {r.returncode}\n{r.stdout}\n{r.stderr}")

        # The Grafana dashboard names only metrics a real node exports (the nodes have now taken
        # produces, reads and, here, a produce refused for its size: 1.5 MiB against the 1 MiB
        # limit).
        r = cli.run(every, "produce", station, stdin="x" * (3 << 19) + "\n")
        check(r.returncode != 0 and "exceeds" in r.stderr + r.stdout,
              "a message over the size limit is refused", f"exit {r.returncode}: {r.stderr}{r.stdout}")
        exported = set()
        for p in pods:
            exported |= set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)", p.metrics(), re.M))
        dash_objs = objects(render({"grafanaDashboard": {"enabled": True}}))
        dash = json.loads(one(dash_objs, "ConfigMap", f"{fullname()}-dashboard")["data"]["junction.json"])
        used = {m for panel in dash["panels"] for t in panel["targets"] for m in re.findall(r"\bjunction_[a-z_]+", t["expr"])}
        missing = sorted(used - exported)
        check(not missing and len(used) >= 8, f"dashboard: all {len(used)} metric names it queries are exported by the nodes",
              f"missing {missing}")

        # Graceful stop of the metadata leader: it hands leadership off, exits 0, within the grace period.
        st = cli.status(every)
        leader = st["metadata_leader"]
        stopping = pods[leader - 1]
        others = [p.addr for p in pods if p is not stopping]
        assert stopping.proc
        t = time.monotonic()
        stopping.proc.send_signal(signal.SIGTERM)
        st3 = wait_for("another metadata leader after SIGTERM to the leader",
                       lambda: (s := cli.status(others))["metadata_leader"] not in (None, leader) and s, 15, interval=0.05)
        timings["SIGTERM to the metadata leader → another leader seen"] = time.monotonic() - t
        took, code = stopping.terminate(grace, since=t)
        timings["graceful stop (SIGTERM) of the metadata leader"] = took
        check(True, f"SIGTERM to {stopping.name}: node {st3['metadata_leader']} leads "
                    f"{timings['SIGTERM to the metadata leader → another leader seen']:.2f}s later")
        check(code == 0 and took < grace,
              f"SIGTERM: {stopping.name} exited 0 in {took:.1f}s, within terminationGracePeriodSeconds {grace}",
              f"exit {code} after {took:.1f}s\n{stopping.log_tail()}")
        return timings
    except BaseException:
        for p in pods:
            print(f"\n  --- log tail of {p.name} ({p.log}):\n{p.log_tail()}", file=sys.stderr)
        raise
    finally:
        stops = []
        for p in pods:
            if p.alive():
                took, code = p.terminate(grace)
                if code is not None:
                    stops.append(took)
        if stops:
            timings["slowest final graceful stop"] = max(stops)
        for p in pods:
            leftovers = list(p.cwd.iterdir())
            if leftovers:
                raise Failure(f"{p.name} wrote outside its volumes (the root filesystem is read-only): {leftovers}")


def scale_up(binary: Path, root: Path) -> dict[str, float]:
    """Pods 0-2 from the default render, then pods 3 and 4 from the replicaCount=5 render (what
    the upgraded StatefulSet adds): the new nodes must join the running cluster."""
    timings: dict[str, float] = {}
    small, big = objects(render()), objects(render({"replicaCount": 5}))
    # `helm upgrade` reads the installed cluster Secret back (lookup) and keeps its value; a
    # render without a cluster cannot, so the upgrade's objects take the installed Secret.
    big = [o for o in big if o["kind"] != "Secret"] + [o for o in small if o["kind"] == "Secret"]
    grace = one(big, "StatefulSet")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    offset = peer_offset_of(small)
    grpc_ports, http_ports = free_port_pairs(5, offset), free_ports(5)
    pods = [PodSim(i, small, root / "scale", binary, grpc_ports, http_ports) for i in range(3)]
    cli = Cli(binary, admin_token_of(small), tls_ca_of(small, root / "scale"))
    try:
        for p in pods:
            p.start()
        for p in pods:
            wait_for(f"{p.name} ready", lambda p=p: p.probe("readinessProbe"), 60)
        wait_for("a three-node cluster", lambda: formed(cli, pods, [p.addr for p in pods]), 30)
        t = time.monotonic()
        new = [PodSim(i, big, root / "scale", binary, grpc_ports, http_ports) for i in (3, 4)]
        pods += new
        for p in new:
            p.start()
        every = [p.addr for p in pods]
        for p in new:
            wait_for(f"{p.name} ready (it sees the metadata leader once it joined)",
                     lambda p=p: p.probe("readinessProbe"), 90)
        st = wait_for("five nodes in the cluster", lambda: formed(cli, pods, every), 60)
        timings["new pods joined"] = time.monotonic() - t
        check(sorted(x["id"] for x in st["nodes"]) == [1, 2, 3, 4, 5],
              f"scaled 3 → 5: {new[0].name} and {new[1].name} joined as nodes 4 and 5 "
              f"in {timings['new pods joined']:.1f}s", json.dumps(st["nodes"]))
        cli.ok(every, "station", "create", "scaled", "--partitions", "5", "--replication-factor", "5")
        lines = [f"k{i}\tm-{i}" for i in range(50)]
        cli.ok([new[1].addr], "produce", "scaled", "--key-sep", "TAB", stdin="\n".join(lines) + "\n")
        got = cli.read_all([new[0].addr], "scaled", 50)
        check(sorted(got) == sorted(f"m-{i}" for i in range(50)),
              f"a replication-5 station spans the new nodes: produced via {new[1].name}, read via {new[0].name}")
        return timings
    except BaseException:
        for p in pods:
            print(f"\n  --- log tail of {p.name} ({p.log}):\n{p.log_tail()}", file=sys.stderr)
        raise
    finally:
        for p in pods:
            if p.alive():
                p.terminate(grace)


def scale_down(binary: Path, root: Path) -> dict[str, float]:
    """Five pods from the replicaCount=5 render, a station with replicas on every node and a
    producer; step one of scaling down, `junction cluster remove-node 5 --wait` then `4`, moves
    their replicas to nodes 1-3 and takes them out of the cluster; step two is the upgrade to
    replicaCount=3 with scaleDown.removedNodes={4,5}: pods 3 and 4 stop, pods 2, 1, 0 restart
    one at a time with the three-member config. Every message produced before, between and
    after the removals is read back."""
    timings: dict[str, float] = {}
    big = objects(render({"replicaCount": 5}))
    small = objects(render({"replicaCount": 3, "scaleDown": {"removedNodes": [4, 5]}}))
    small = [o for o in small if o["kind"] != "Secret"] + [o for o in big if o["kind"] == "Secret"]
    grace = one(big, "StatefulSet")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    offset = peer_offset_of(big)
    grpc_ports, http_ports = free_port_pairs(5, offset), free_ports(5)
    pods = [PodSim(i, big, root / "down", binary, grpc_ports, http_ports) for i in range(5)]
    cli = Cli(binary, admin_token_of(big), tls_ca_of(big, root / "down"))
    produced: list[str] = []

    def produce(via: PodSim, n: int) -> None:
        lines = [f"k{len(produced) + i}\tm-{len(produced) + i}" for i in range(n)]
        cli.ok([via.addr], "produce", "shrink", "--key-sep", "TAB", stdin="\n".join(lines) + "\n")
        produced.extend(line.split("\t")[1] for line in lines)

    try:
        for p in pods:
            p.start()
        for p in pods:
            wait_for(f"{p.name} ready", lambda p=p: p.probe("readinessProbe"), 90)
        every = [p.addr for p in pods]
        wait_for("a five-node cluster", lambda: formed(cli, pods, every), 60)
        cli.ok(every, "station", "create", "shrink", "--partitions", "5", "--replication-factor", "3")
        produce(pods[0], 50)
        st = cli.status(every)
        held = {n["id"]: n["partition_replicas"] for n in st["nodes"]}
        check(held.get(4, 0) > 0 and held.get(5, 0) > 0, f"nodes 4 and 5 hold replicas before: {held}")
        stay = [p.addr for p in pods[:3]]
        t = time.monotonic()
        for node in (5, 4):
            out = cli.ok(stay, "cluster", "remove-node", str(node), "--wait", "--timeout-secs", "240", timeout=260)
            check(f"node {node} left the cluster" in out, f"remove-node {node} --wait: {out.strip()}")
            check(not pods[node - 1].probe("readinessProbe"),
                  f"the removed node {node} reports not ready (the Service stops routing to it)")
            produce(pods[1], 25)
        timings["remove-node 5 and 4"] = time.monotonic() - t
        st = cli.status(stay)
        check(sorted(n["id"] for n in st["nodes"]) == [1, 2, 3], f"nodes 1-3 remain: {st['nodes']}")
        replicas = {r for s in st["stations"] for p in s["partition_info"] for r in p["replicas"]}
        check(replicas <= {1, 2, 3}, f"every replica is on nodes 1-3: {sorted(replicas)}")
        # Step two: the upgrade. Pods 3 and 4 go; the others restart with three members.
        for p in pods[3:]:
            p.terminate(grace)
        t = time.monotonic()
        for i in (2, 1, 0):
            pods[i].terminate(grace)
            pods[i] = PodSim(i, small, root / "down", binary, grpc_ports, http_ports)
            pods[i].start()
            wait_for(f"{pods[i].name} ready with the three-member config",
                     lambda i=i: pods[i].probe("readinessProbe"), 90)
        wait_for("a three-node cluster", lambda: formed(cli, pods[:3], stay), 60)
        timings["rolling restart to three members"] = time.monotonic() - t
        produce(pods[2], 25)
        got = cli.read_all(stay, "shrink", len(produced))
        check(sorted(got) == sorted(produced),
              f"scaled 5 → 3: all {len(produced)} messages (before, between and after the removals) read back",
              f"missing {sorted(set(produced) - set(got))[:10]}")
        return timings
    except BaseException:
        for p in pods:
            print(f"\n  --- log tail of {p.name} ({p.log}):\n{p.log_tail()}", file=sys.stderr)
        raise
    finally:
        for p in pods:
            if p.alive():
                p.terminate(grace)


def test_boot(binary: Path) -> dict[str, dict[str, float]]:
    results = {}
    with tempfile.TemporaryDirectory(prefix="junction-chart-boot-") as tmp:
        section("boot the rendered three-node cluster (defaults) as real processes")
        results["3 nodes"] = boot_cluster("three", objects(render()), binary, Path(tmp), chaos=True)
        section("boot the rendered five-node cluster (replicaCount=5)")
        results["5 nodes"] = boot_cluster("five", objects(render({"replicaCount": 5})), binary, Path(tmp), chaos=False)
        section("scale a running three-node cluster to five (helm upgrade --set replicaCount=5)")
        results["3 → 5"] = scale_up(binary, Path(tmp))
        section("scale a running five-node cluster down to three (remove-node, then helm upgrade)")
        results["5 → 3"] = scale_down(binary, Path(tmp))
    return results


def main() -> int:
    # A SIGTERM (CI cancelling the run) unwinds normally, so the pods are stopped and the
    # temp dirs removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    binary = Path(os.environ.get("JUNCTION_BIN", ""))
    if not binary.is_file():
        print(f"JUNCTION_BIN={binary} is not the built junction binary", file=sys.stderr)
        return 2
    print(f"chart {CHART}, helm-python-sdk {helm_python.helm_sdk_version()}, kubernetes-validate "
          f"{kubernetes_validate.__version__}, Kubernetes versions {', '.join(K8S_VERSIONS)}")
    try:
        test_lint()
        rendered = test_render_and_validate()
        test_bad_values()
        test_replica_guard()
        test_ha_properties(rendered)
        test_tls(rendered)
        timings = test_boot(binary)
    except Failure as e:
        print(f"\nFAIL  {e}\n\nhelm chart tests FAILED after {CHECKS} passed checks "
              f"({time.monotonic() - STARTED:.1f}s)", file=sys.stderr)
        return 1
    print("\n--- timings")
    for cluster, ts in timings.items():
        for what, secs in ts.items():
            print(f"  {cluster}: {what}: {secs:.1f}s")
    print(f"\nhelm chart tests passed: {CHECKS} checks in {time.monotonic() - STARTED:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
