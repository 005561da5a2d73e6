"""Renders deploy/k8s (the small part of kustomize it uses) and checks the manifests and
deploy/Dockerfile against the rules of docs/DEPLOY.md and the settings table of docs/CLI.md.
No kubectl, no cluster, no container engine: the container's start command is run with
/bin/sh against a stub `kvdex` that records the environment and arguments it was given.

    /usr/bin/python3 tests/deploy/deploy_check.py [docs/CLI.md deploy/k8s deploy/Dockerfile
                                                   [KUSTOMIZATION_DIR...]]

checks deploy/k8s and every overlay in deploy/k8s/overlays/ (or the directories given),
prints one line per problem and exits 1 if there is any (0 and "ok" otherwise).
With TLS on (KVDEX_TLS_CERT), the probes must be httpGet on the metrics port and the
certificate files must come from a read-only Secret mount."""
import copy
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
from fractions import Fraction

import yaml

HEADLESS = "kvdex-headless"
CLIENT = "kvdex"
STATEFULSET = "kvdex"
CONTAINER = "kvdex"
MIN_REPLICAS = 3
GRACE_MARGIN_S = 5  # grace >= preStop sleep + drain + this
MAX_MEMORY_SHARE = 0.95  # --memory must leave this much of limits.memory as headroom


class RenderError(Exception):
    pass


# ---- docs/CLI.md ----------------------------------------------------------------------

def parse_cli_md(text):
    """The settings table of docs/CLI.md: {env: {flag, default, lo, hi, unit, used_by}}."""
    settings = {}
    for line in text.splitlines():
        if not line.startswith("| `--"):
            continue
        cells = [c.strip() for c in re.split(r" \| ", line.strip()[2:-2])]
        if len(cells) < 7:
            continue
        flag, env, default, bounds, unit, used_by = (cells[0].strip("`"), cells[1].strip("`"),
                                                     cells[2][1:-1], cells[3], cells[4], cells[5])
        lo = hi = None
        m = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", bounds)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
        settings[env] = {"flag": flag, "default": default, "lo": lo, "hi": hi, "unit": unit,
                         "used_by": [u.strip() for u in used_by.split(",")]}
    return settings


def kvdex_size(text):
    """Bytes for a kvdex size (workers/settings.c kvdex_parse_size), None if not one;
    a percentage returns the string "%" (it is of the node's RAM in a container)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?\d+)?)\s*(%|[KMGTB](?:[iI])?[Bb]?)?",
                     text or "")
    if not m:
        return None
    if m.group(2) == "%":
        return "%"
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "B": 1}
    return int(float(m.group(1)) * (mult[m.group(2)[0].upper()] if m.group(2) else 1))


# ---- Kubernetes quantities and env --------------------------------------------------------

_SUFFIX = {"": 1, "m": Fraction(1, 1000), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
           "P": 10**15, "E": 10**18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
           "Pi": 2**50, "Ei": 2**60}
# What the API server accepts as resourceFieldRef.divisor (validation.go).
MEMORY_DIVISORS = {"1", "1k", "1M", "1G", "1T", "1P", "1E", "1Ki", "1Mi", "1Gi", "1Ti",
                   "1Pi", "1Ei"}
CPU_DIVISORS = {"1m", "1"}


def quantity(q):
    """A Kubernetes quantity ("8Gi", "500m", 4) as a Fraction; ValueError if malformed."""
    m = re.fullmatch(r"([+-]?[0-9]*\.?[0-9]+)(?:[eE]([+-]?\d+))?(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?",
                     str(q).strip())
    if not m:
        raise ValueError(f"not a quantity: {q!r}")
    v = Fraction(m.group(1)) * _SUFFIX[m.group(3) or ""]
    return v * Fraction(10) ** int(m.group(2)) if m.group(2) else v


def k8s_expand(text, env):
    """Kubernetes' $(VAR) expansion of command, args and env values ($$ is a literal $)."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("$(", i) and text.find(")", i + 2) >= 0:
            j = text.find(")", i + 2)
            name = text[i + 2:j]
            out.append(env[name] if name in env else "$(" + name + ")")
            i = j + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


# ---- kustomize, the subset used -------------------------------------------------------------

KUSTOMIZE_KEYS = {"apiVersion", "kind", "resources", "namespace", "commonLabels", "images",
                  "patches"}
NAMESPACED = {"StatefulSet", "Service", "ConfigMap", "PodDisruptionBudget", "Deployment",
              "ServiceAccount", "Secret"}
# Strategic merge: the lists a patch may touch. Lists of objects merge by their
# patchMergeKey (k8s.io/api core/v1 types.go); command and args have no strategy and are
# replaced whole. Any other list is refused: kustomize might merge it in a way not done here.
SMP_MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name",
                  "volumeMounts": "mountPath", "env": "name"}
SMP_REPLACED_LISTS = {"command", "args"}


def _pod_specs(doc):
    spec = doc.get("spec") or {}
    if doc.get("kind") in ("StatefulSet", "Deployment", "DaemonSet", "ReplicaSet"):
        return [((spec.get("template") or {}).get("spec") or {})]
    return []


def strategic_merge(dst, patch, where):
    """Merges mapping `patch` into mapping `dst` in place, as kustomize's strategic merge
    does for the fields in SMP_MERGE_KEYS / SMP_REPLACED_LISTS: maps merge recursively, a
    null value removes the field, lists of objects merge item by item on their merge key.
    RenderError for anything else ($patch directives, other lists)."""
    for key, val in patch.items():
        at = f"{where}.{key}"
        if isinstance(key, str) and key.startswith("$"):
            raise RenderError(f"{at}: strategic-merge directive {key} is not understood by "
                              f"tests/deploy")
        if val is None:
            dst.pop(key, None)
        elif isinstance(val, dict):
            if not isinstance(dst.get(key), dict):
                dst[key] = {}
            strategic_merge(dst[key], val, at)
        elif isinstance(val, list):
            if key in SMP_REPLACED_LISTS:
                dst[key] = [copy.deepcopy(v) for v in val]
                continue
            mkey = SMP_MERGE_KEYS.get(key)
            if mkey is None:
                raise RenderError(f"{at}: tests/deploy does not know how kustomize merges the "
                                  f"list {key!r} (it merges only "
                                  f"{sorted(SMP_MERGE_KEYS) + sorted(SMP_REPLACED_LISTS)})")
            have = dst.get(key)
            if not isinstance(have, list):
                have = dst[key] = []
            for item in val:
                if not isinstance(item, dict) or item.get(mkey) is None:
                    raise RenderError(f"{at}: every item needs its merge key {mkey!r}")
                same = [h for h in have if isinstance(h, dict) and h.get(mkey) == item[mkey]]
                if same:
                    strategic_merge(same[0], item, f"{at}[{mkey}={item[mkey]}]")
                else:
                    have.append({})
                    strategic_merge(have[-1], item, f"{at}[{mkey}={item[mkey]}]")
        else:
            dst[key] = val
    return dst


def _apply_patch_file(docs, kfile, entry):
    """One `patches:` entry: {path: FILE}, FILE one strategic-merge patch of an object of
    `docs` named by its kind and metadata.name (and apiVersion, namespace if given)."""
    if not isinstance(entry, dict) or set(entry) != {"path"}:
        raise RenderError(f"{kfile}: patches entry {entry!r}: tests/deploy understands only "
                          f"{{path: FILE}} (no target, inline patch or options)")
    ppath = os.path.normpath(os.path.join(os.path.dirname(kfile), entry["path"]))
    if not os.path.isfile(ppath):
        raise RenderError(f"{kfile}: patch {entry['path']!r} does not exist")
    with open(ppath) as fh:
        patches = [d for d in yaml.safe_load_all(fh) if d is not None]
    if len(patches) != 1 or not isinstance(patches[0], dict):
        raise RenderError(f"{ppath}: want one strategic-merge patch (a mapping), found "
                          f"{len(patches)} document(s) (JSON 6902 patches are not understood "
                          f"by tests/deploy)")
    patch = patches[0]
    meta = patch.get("metadata") or {}
    if not patch.get("kind") or not meta.get("name"):
        raise RenderError(f"{ppath}: a strategic-merge patch needs kind and metadata.name")
    targets = [d for d in docs if d.get("kind") == patch["kind"] and
               (d.get("metadata") or {}).get("name") == meta["name"] and
               patch.get("apiVersion", d.get("apiVersion")) == d.get("apiVersion") and
               meta.get("namespace", (d.get("metadata") or {}).get("namespace")) ==
               (d.get("metadata") or {}).get("namespace")]
    if len(targets) != 1:
        raise RenderError(f"{ppath}: patch of {patch['kind']} {meta['name']!r} matches "
                          f"{len(targets)} resources, not 1")
    strategic_merge(targets[0], {k: v for k, v in patch.items()
                                 if k not in ("apiVersion", "kind")},
                    f"{os.path.basename(ppath)}:{patch['kind']}/{meta['name']}")


def render(path):
    """Documents of a kustomization directory (or its kustomization.yaml)."""
    kdir = path if os.path.isdir(path) else os.path.dirname(path)
    kfile = os.path.join(kdir, "kustomization.yaml")
    with open(kfile) as fh:
        k = yaml.safe_load(fh) or {}
    unknown = set(k) - KUSTOMIZE_KEYS
    if unknown:
        raise RenderError(f"{kfile}: {sorted(unknown)} not understood by tests/deploy "
                          f"(it renders only {sorted(KUSTOMIZE_KEYS - {'apiVersion', 'kind'})})")
    if k.get("kind", "Kustomization") != "Kustomization":
        raise RenderError(f"{kfile}: kind is {k.get('kind')!r}, not Kustomization")
    docs = []
    for res in k.get("resources") or []:
        rpath = os.path.normpath(os.path.join(kdir, res))
        if os.path.isdir(rpath):
            if not os.path.isfile(os.path.join(rpath, "kustomization.yaml")):
                raise RenderError(f"{kfile}: resource {res!r} is a directory without "
                                  f"kustomization.yaml")
            docs += render(rpath)
        elif os.path.isfile(rpath):
            with open(rpath) as fh:
                docs += [d for d in yaml.safe_load_all(fh) if d is not None]
        else:
            raise RenderError(f"{kfile}: resource {res!r} does not exist")
    # kustomize applies a level's patches before its namespace, labels and images.
    for entry in k.get("patches") or []:
        _apply_patch_file(docs, kfile, entry)
    for img in k.get("images") or []:
        for doc in docs:
            for pod in _pod_specs(doc):
                for c in (pod.get("containers") or []) + (pod.get("initContainers") or []):
                    name = re.split(r"[:@]", c.get("image", ""))[0]
                    if name != img.get("name"):
                        continue
                    new = img.get("newName", name)
                    if img.get("digest"):
                        new += "@" + img["digest"]
                    elif img.get("newTag"):
                        new += ":" + str(img["newTag"])
                    c["image"] = new
    labels = k.get("commonLabels") or {}
    for doc in docs:
        meta = doc.setdefault("metadata", {})
        if k.get("namespace") and doc.get("kind") in NAMESPACED:
            meta["namespace"] = k["namespace"]
        if not labels:
            continue
        meta.setdefault("labels", {}).update(labels)
        spec = doc.get("spec") or {}
        if doc.get("kind") == "Service":
            spec.setdefault("selector", {}).update(labels)
        elif doc.get("kind") in ("StatefulSet", "Deployment", "PodDisruptionBudget"):
            spec.setdefault("selector", {}).setdefault("matchLabels", {}).update(labels)
        if "template" in spec:
            spec["template"].setdefault("metadata", {}).setdefault("labels", {}).update(labels)
    return docs


# ---- Dockerfile ----------------------------------------------------------------------------

def parse_dockerfile(text):
    """Stages of a Dockerfile: [{"from": image, "name": alias, "instrs": [(INSTR, args)]}]."""
    lines, cur = [], ""
    for raw in text.splitlines():
        s = raw.strip()
        if s.startswith("#") or (not s and not cur):
            continue
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        cur += s
        if cur.strip():
            lines.append(cur.strip())
        cur = ""
    stages = []
    for ln in lines:
        instr, _, args = ln.partition(" ")
        instr, args = instr.upper(), args.strip()
        if instr == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            stages.append({"from": words[0], "name": words[2] if len(words) > 2 else None,
                           "instrs": []})
        elif stages:
            stages[-1]["instrs"].append((instr, args))
    return stages


def _exec_form(args):
    try:
        v = json.loads(args)
    except ValueError:
        return None
    return v if isinstance(v, list) and all(isinstance(x, str) for x in v) else None


def image_command(stages):
    """(ENTRYPOINT, CMD) of the final stage, as lists (None when absent or shell form)."""
    ep = cmd = None
    for instr, args in stages[-1]["instrs"] if stages else []:
        if instr == "ENTRYPOINT":
            ep, cmd = _exec_form(args) or ["/bin/sh", "-c", args], None
        elif instr == "CMD":
            cmd = _exec_form(args) or ["/bin/sh", "-c", args]
    return ep, cmd


def check_dockerfile(text, listen_port=None):
    problems = []
    stages = parse_dockerfile(text)
    if len(stages) < 2:
        return ["Dockerfile: needs a build stage and a slim runtime stage"]
    if not re.fullmatch(r"debian:(12|bookworm)(@.*)?", stages[0]["from"]):
        problems.append(f"Dockerfile: build stage FROM {stages[0]['from']}, not debian:12")
    runs = " ; ".join(a for i, a in stages[0]["instrs"] if i == "RUN")
    if ".ci/install" not in runs:
        problems.append("Dockerfile: build stage does not install packages with .ci/install")
    if not re.search(r"bazel (?:\S+ )*build\b(?=.*-c opt)(?=.*//workers:kvdex)", runs):
        problems.append("Dockerfile: build stage does not run `bazel build -c opt //workers:kvdex`")
    if not re.fullmatch(r"debian:(12|bookworm)-slim(@.*)?", stages[-1]["from"]):
        problems.append(f"Dockerfile: runtime stage FROM {stages[-1]['from']}, not debian:12-slim")
    if not any(i == "COPY" and "--from=" in a for i, a in stages[-1]["instrs"]):
        problems.append("Dockerfile: runtime stage copies nothing from the build stage")
    ep, cmd = image_command(stages)
    if not ep or os.path.basename(ep[0]) != "kvdex" or ep[1:] != ["serve"] or cmd:
        problems.append(f"Dockerfile: entrypoint is {ep} (CMD {cmd}), not exec-form "
                        f"[\".../kvdex\", \"serve\"] without CMD")
    exposed = {p.split("/")[0] for i, a in stages[-1]["instrs"] if i == "EXPOSE" for p in a.split()}
    if listen_port is not None and str(listen_port) not in exposed:
        problems.append(f"Dockerfile: EXPOSE {sorted(exposed)} lacks the KVDEX_LISTEN port "
                        f"{listen_port}")
    return problems


# ---- Running the container's start command against a stub kvdex ---------------------------

_STUB = """#!/usr/bin/python3
import json, os, sys
with open(%r, "w") as fh:
    json.dump({"argv": sys.argv, "pid": os.getpid(),
               "env": {k: v for k, v in os.environ.items() if k.startswith("KVDEX_")}}, fh)
"""


def service_link_env(docs, namespace):
    """The variables kubelet injects for each ClusterIP Service when enableServiceLinks is on."""
    env = {}
    for d in docs:
        spec = d.get("spec") or {}
        if d.get("kind") != "Service" or (d.get("metadata") or {}).get("namespace") != namespace:
            continue
        if spec.get("clusterIP") == "None" or spec.get("type") == "ExternalName":
            continue
        name = d["metadata"]["name"].upper().replace("-", "_")
        ports = spec.get("ports") or []
        env[name + "_SERVICE_HOST"] = "10.0.0.1"
        if ports:
            env[name + "_SERVICE_PORT"] = str(ports[0].get("port"))
            env[name + "_PORT"] = f"tcp://10.0.0.1:{ports[0].get('port')}"
        for p in ports:
            proto = p.get("protocol", "TCP")
            base = f"{name}_PORT_{p.get('port')}_{proto}"
            env[base] = f"{proto.lower()}://10.0.0.1:{p.get('port')}"
            env[base + "_PROTO"], env[base + "_PORT"] = proto.lower(), str(p.get("port"))
            env[base + "_ADDR"] = "10.0.0.1"
            if p.get("name"):
                env[f"{name}_SERVICE_PORT_{p['name'].upper().replace('-', '_')}"] = str(p["port"])
    return env


def container_env(docs, pod, c, namespace, problems, limits=None):
    """The environment kubelet would give container `c` (service links, envFrom, env)."""
    limits = limits if limits is not None else ((c.get("resources") or {}).get("limits") or {})
    requests = (c.get("resources") or {}).get("requests") or {}
    env = {}
    if pod.get("enableServiceLinks", True) is not False:
        env.update(service_link_env(docs, namespace))
    maps = {d["metadata"]["name"]: d.get("data") or {} for d in docs
            if d.get("kind") == "ConfigMap" and (d.get("metadata") or {}).get("namespace") == namespace}
    for src in c.get("envFrom") or []:
        ref = src.get("configMapRef")
        if ref is None:
            continue
        if ref.get("name") not in maps:
            if not ref.get("optional"):
                problems.append(f"envFrom: ConfigMap {ref.get('name')!r} is not in the manifests")
            continue
        prefix = src.get("prefix", "")
        env.update({prefix + k: str(v) for k, v in maps[ref["name"]].items()})
    for e in c.get("env") or []:
        name, vf = e.get("name"), e.get("valueFrom")
        if not vf:
            env[name] = k8s_expand(str(e.get("value", "")), env)
        elif "configMapKeyRef" in vf:
            ref = vf["configMapKeyRef"]
            if ref.get("key") in maps.get(ref.get("name"), {}):
                env[name] = str(maps[ref["name"]][ref["key"]])
            elif not ref.get("optional"):
                problems.append(f"env {name}: ConfigMap key {ref.get('name')}/{ref.get('key')} missing")
        elif "resourceFieldRef" in vf:
            ref = vf["resourceFieldRef"]
            res, div = ref.get("resource", ""), str(ref.get("divisor", "1"))
            kind, _, what = res.partition(".")
            if ref.get("containerName") not in (None, c.get("name")):
                problems.append(f"env {name}: resourceFieldRef names another container")
            valid = MEMORY_DIVISORS if what == "memory" else CPU_DIVISORS if what == "cpu" else None
            if valid is None or kind not in ("limits", "requests"):
                problems.append(f"env {name}: resourceFieldRef {res!r} is not limits/requests "
                                f".memory/.cpu")
                continue
            if div not in valid:
                problems.append(f"env {name}: divisor {div!r} for {res} is rejected by the API "
                                f"server (allowed: {sorted(valid)})")
                continue
            have = (limits if kind == "limits" else requests).get(what)
            if have is None:
                problems.append(f"env {name}: {res} is not set on the container, so it would "
                                f"be the node's allocatable {what}")
                continue
            env[name] = str(math.ceil(quantity(have) / quantity(div)))
        elif "fieldRef" in vf:
            env[name] = "fieldref:" + vf["fieldRef"].get("fieldPath", "")
        else:
            env[name] = "secret"
    return env


def run_start_command(c, env, image_ep, image_cmd):
    """Runs what the container would run, with kvdex replaced by a recording stub.
    Returns (record or None, why): record = {"argv", "env", "pid", "shell_pid"}."""
    if c.get("command"):
        argv = list(c["command"]) + list(c.get("args") or [])
    else:
        argv = list(image_ep or []) + list(c.get("args") if c.get("args") else image_cmd or [])
    argv = [k8s_expand(str(a), env) for a in argv]
    if not argv:
        return None, "the container has no command and the image no entrypoint"
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "record.json")
        stub = os.path.join(tmp, "bin", "kvdex")
        os.makedirs(os.path.dirname(stub))
        with open(stub, "w") as fh:
            fh.write(_STUB % out)
        os.chmod(stub, 0o755)
        run_env = dict(env, PATH=os.path.dirname(stub) + ":/usr/bin:/bin", HOME="/",
                       HOSTNAME="kvdex-0")
        base = os.path.basename(argv[0])
        if base in ("sh", "bash", "dash"):
            cmd = ["/bin/sh", *argv[1:]]
        elif base == "kvdex":
            cmd = [stub, *argv[1:]]
        else:
            return None, f"the container runs {argv[0]!r}, neither kvdex nor /bin/sh"
        proc = subprocess.Popen(cmd, env=run_env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        _, err = proc.communicate(timeout=30)
        if not os.path.exists(out):
            return None, (f"the start command {shlex.join(argv)!r} never ran kvdex "
                          f"(rc {proc.returncode}: {err.strip()[:300]})")
        with open(out) as fh:
            rec = json.load(fh)
    # Equal when kvdex replaced the shell (exec), so SIGTERM reaches kvdex itself.
    rec["shell_pid"] = proc.pid
    return rec, None


# ---- The manifests -------------------------------------------------------------------------

def _find(docs, kind, name=None):
    return [d for d in docs if d.get("kind") == kind and
            (name is None or (d.get("metadata") or {}).get("name") == name)]


def _subset(sel, labels):
    return bool(sel) and all(labels.get(k) == v for k, v in sel.items())


def _prestop_seconds(c):
    pre = (c.get("lifecycle") or {}).get("preStop") or {}
    if "sleep" in pre:
        return int(pre["sleep"].get("seconds", 0))
    cmd = (pre.get("exec") or {}).get("command") or []
    m = re.search(r"\bsleep\s+(\d+)", " ".join(map(str, cmd)))
    return int(m.group(1)) if m else 0


def simulate(docs, dockerfile_text, limits=None):
    """(container env record, problems) for the kvdex container; limits overrides its
    resources.limits for the downward API (to see whether settings follow them)."""
    problems = []
    sts = _find(docs, "StatefulSet", STATEFULSET)
    if not sts:
        return None, ["no StatefulSet kvdex"]
    pod = ((sts[0].get("spec") or {}).get("template") or {}).get("spec") or {}
    cs = [c for c in pod.get("containers") or [] if c.get("name") == CONTAINER]
    if not cs:
        return None, ["StatefulSet kvdex: no container named kvdex"]
    ns = (sts[0].get("metadata") or {}).get("namespace")
    env = container_env(docs, pod, cs[0], ns, problems, limits)
    ep, cmd = image_command(parse_dockerfile(dockerfile_text))
    rec, why = run_start_command(cs[0], env, ep, cmd)
    if why:
        problems.append("StatefulSet kvdex: " + why)
    return rec, problems


# ---- Probes and files from Secrets --------------------------------------------------------

PROBE_HANDLERS = ("exec", "httpGet", "tcpSocket", "grpc")
# What the metrics endpoint answers for kubelet (workers/metrics_http.c).
HTTP_PROBE_PATHS = {"readinessProbe": ("/readyz",), "livenessProbe": ("/healthz",),
                    "startupProbe": ("/readyz", "/healthz")}
TLS_FILES = ("KVDEX_TLS_CERT", "KVDEX_TLS_KEY", "KVDEX_TLS_CLIENT_CA")
SECRET_FILES = TLS_FILES + ("KVDEX_AUTH_FILE",)


def served_tls(final, rec, settings):
    """{KVDEX_TLS_*/KVDEX_AUTH_FILE: path} as kvdex would see them: the environment, then
    any flag on its command line (--tls-cert X or --tls-cert=X) over it; empty ones left out."""
    flags = {settings[e]["flag"]: e for e in SECRET_FILES if e in settings}
    out = {e: final.get(e, "") for e in SECRET_FILES}
    argv = (rec or {}).get("argv") or []
    i = 2
    while i < len(argv):
        name, eq, val = argv[i].partition("=")
        if name in flags:
            if not eq and i + 1 < len(argv):
                val, i = argv[i + 1], i + 1
            out[flags[name]] = val
        i += 1
    return {e: v for e, v in out.items() if v}


def _host_port(addr):
    m = re.fullmatch(r"(.*):(\d+)", addr or "")
    return (m.group(1).strip("[]"), int(m.group(2))) if m else (None, None)


def check_probes(c, ports, metrics_listen, tls):
    """Problems of the kvdex container's probes. Plaintext: gRPC health probes on the `grpc`
    port. TLS: kubelet's grpc: probe cannot do TLS, so httpGet on the metrics port."""
    problems = []
    numbers = set(ports.values())
    tls_on = bool(tls.get("KVDEX_TLS_CERT") or tls.get("KVDEX_TLS_KEY"))
    m_host, m_port = _host_port(metrics_listen)
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        probe = c.get(kind)
        if probe is None:
            if kind != "startupProbe":
                problems.append(f"container kvdex: no {kind}")
            continue
        handlers = [h for h in PROBE_HANDLERS if probe.get(h) is not None]
        if len(handlers) > 1:
            problems.append(f"container kvdex: {kind} has {len(handlers)} handlers "
                            f"({', '.join(handlers)}); the API server takes one (a patch that "
                            f"adds one must set the other to null)")
        if tls_on:
            if "grpc" in handlers:
                problems.append(f"container kvdex: {kind} is a grpc: probe but the gRPC port "
                                f"serves TLS (KVDEX_TLS_CERT): kubelet's gRPC probe speaks "
                                f"plaintext only and would always fail; use httpGet on the "
                                f"metrics port")
            hg = probe.get("httpGet")
            if hg is None:
                problems.append(f"container kvdex: {kind} is not an httpGet probe on the "
                                f"metrics port (with TLS the probes go to /readyz and /healthz "
                                f"there)")
                continue
            ref = hg.get("port")
            num = ports.get(ref) if isinstance(ref, str) else ref
            if num not in numbers:
                problems.append(f"container kvdex: {kind} port {ref!r} is not a container port")
            if not metrics_listen:
                problems.append(f"container kvdex: {kind} needs the metrics endpoint, but "
                                f"KVDEX_METRICS_LISTEN is empty (off)")
            elif num != m_port or num != ports.get("metrics"):
                problems.append(f"container kvdex: {kind} httpGet port {ref!r} is not the "
                                f"metrics port (container port `metrics` "
                                f"{ports.get('metrics')}, KVDEX_METRICS_LISTEN "
                                f"{metrics_listen!r})")
            want = HTTP_PROBE_PATHS[kind]
            if hg.get("path") not in want:
                problems.append(f"container kvdex: {kind} httpGet path {hg.get('path')!r} is "
                                f"not {' or '.join(want)}")
            if str(hg.get("scheme", "HTTP")).upper() != "HTTP":
                problems.append(f"container kvdex: {kind} httpGet scheme "
                                f"{hg.get('scheme')!r}: the metrics endpoint is plain HTTP")
            if m_host in ("127.0.0.1", "localhost", "::1"):
                problems.append(f"KVDEX_METRICS_LISTEN={metrics_listen!r} is loopback only: "
                                f"kubelet probes the pod IP")
            continue
        if "grpc" not in handlers:
            if kind != "startupProbe":
                problems.append(f"container kvdex: {kind} is not a gRPC health probe")
            action = probe.get("httpGet") or probe.get("tcpSocket") or {}
            ref = action.get("port")
            if action and not (ref in ports if isinstance(ref, str) else ref in numbers):
                problems.append(f"container kvdex: {kind} port {ref!r} is not a container port")
            continue
        gp = probe["grpc"].get("port")
        if not isinstance(gp, int):
            problems.append(f"container kvdex: {kind} grpc port {gp!r} must be a number "
                            f"(the grpc probe takes no port names)")
        elif gp != ports.get("grpc"):
            problems.append(f"container kvdex: {kind} grpc port {gp} is not the `grpc` "
                            f"container port {ports.get('grpc')}")
        if probe["grpc"].get("service", "") not in ("", "kvdex.v1.KVStore", "kvdex.v1.Retrieval",
                                                    "grpc.health.v1.Health"):
            problems.append(f"container kvdex: {kind} asks for an unknown service "
                            f"{probe['grpc'].get('service')!r}")
    return problems


def check_tls_files(pod, c, files, docs):
    """Problems with the files kvdex reads from Secrets: each path lies in a read-only
    Secret volume mount of the container, names a key the volume projects, and is readable
    by the user kvdex runs as. Also the flag pairs --tls-cert/--tls-key and the CA's need of TLS."""
    problems = []
    if bool(files.get("KVDEX_TLS_CERT")) != bool(files.get("KVDEX_TLS_KEY")):
        problems.append("KVDEX_TLS_CERT and KVDEX_TLS_KEY must be set together")
    if files.get("KVDEX_TLS_CLIENT_CA") and not files.get("KVDEX_TLS_CERT"):
        problems.append("KVDEX_TLS_CLIENT_CA (mTLS) needs KVDEX_TLS_CERT and KVDEX_TLS_KEY")
    volumes = {v.get("name"): v for v in pod.get("volumes") or []}
    for vm in c.get("volumeMounts") or []:
        if vm.get("name") not in volumes:
            problems.append(f"container kvdex: volumeMount {vm.get('mountPath')!r} names no "
                            f"volume {vm.get('name')!r}")
    sc = dict(pod.get("securityContext") or {}, **(c.get("securityContext") or {}))
    uid, fs_group = sc.get("runAsUser"), (pod.get("securityContext") or {}).get("fsGroup")
    secrets = {(d.get("metadata") or {}).get("name"): d for d in docs if d.get("kind") == "Secret"}
    for env, path in sorted(files.items()):
        where = f"{env}={path}"
        if not path.startswith("/"):
            problems.append(f"{where} is not an absolute path (mount the Secret and name the "
                            f"file in it)")
            continue
        under = [vm for vm in c.get("volumeMounts") or []
                 if path == vm.get("mountPath") or
                 path.startswith(str(vm.get("mountPath", "")).rstrip("/") + "/")]
        if not under:
            problems.append(f"{where} is not under any volumeMount of container kvdex "
                            f"(mounts: {[vm.get('mountPath') for vm in c.get('volumeMounts') or []]})")
            continue
        vm = max(under, key=lambda m: len(m.get("mountPath", "")))
        secret = (volumes.get(vm.get("name")) or {}).get("secret")
        if secret is None:
            problems.append(f"{where}: the volume {vm.get('name')!r} mounted at "
                            f"{vm.get('mountPath')} is not a Secret volume")
            continue
        if vm.get("readOnly") is not True:
            problems.append(f"{where}: volumeMount {vm.get('mountPath')} is not readOnly")
        if vm.get("subPath"):
            key = vm["subPath"] if path == vm["mountPath"] else None
        else:
            key = path[len(vm["mountPath"].rstrip("/")) + 1:]
        items = secret.get("items")
        mode = secret.get("defaultMode", 0o644)
        if items is not None:
            hit = [it for it in items if it.get("path") == key]
            if not hit:
                problems.append(f"{where}: the Secret volume {vm.get('name')!r} projects only "
                                f"{[it.get('path') for it in items]} at {vm.get('mountPath')}")
                continue
            mode, key = hit[0].get("mode", mode), hit[0].get("key")
        elif not key or not re.fullmatch(r"[-._a-zA-Z0-9]+", key):
            problems.append(f"{where}: {key!r} under {vm.get('mountPath')} is not a key of "
                            f"Secret {secret.get('secretName')!r} (Secret keys are flat names)")
            continue
        known = secrets.get(secret.get("secretName"))
        if known is not None and key not in set((known.get("data") or {})) | \
                set((known.get("stringData") or {})):
            problems.append(f"{where}: Secret {secret.get('secretName')!r} has no key {key!r}")
        readable = uid == 0 or mode & 0o004 or (fs_group is not None and mode & 0o040)
        if not readable:
            problems.append(f"{where}: mode {mode:#o} of the Secret file is not readable by "
                            f"uid {uid} (files are root-owned, group fsGroup "
                            f"{fs_group}): set fsGroup with mode 0440, or 0444")
    return problems


def validate(docs, dockerfile_text, settings):
    """Every problem found, as sentences; [] when the deployment is sound."""
    problems = []
    seen = set()
    for d in docs:
        if not isinstance(d, dict):
            problems.append(f"a document is not a mapping: {d!r:.60}")
            continue
        meta = d.get("metadata") or {}
        for field, val in (("apiVersion", d.get("apiVersion")), ("kind", d.get("kind")),
                           ("metadata.name", meta.get("name"))):
            if not val:
                problems.append(f"{d.get('kind', '?')} {meta.get('name', '?')}: no {field}")
        key = (d.get("kind"), meta.get("namespace"), meta.get("name"))
        if key in seen:
            problems.append(f"{key[0]} {key[2]} is defined twice")
        seen.add(key)
        want = {"StatefulSet": "apps/v1", "Service": "v1", "ConfigMap": "v1",
                "PodDisruptionBudget": "policy/v1"}.get(d.get("kind"))
        if want and d.get("apiVersion") != want:
            problems.append(f"{d.get('kind')} {meta.get('name')}: apiVersion "
                            f"{d.get('apiVersion')}, not {want}")
    docs = [d for d in docs if isinstance(d, dict)]

    sts = _find(docs, "StatefulSet", STATEFULSET)
    if len(sts) != 1:
        return problems + [f"want one StatefulSet {STATEFULSET}, found {len(sts)}"]
    spec = sts[0].get("spec") or {}
    tmpl = spec.get("template") or {}
    labels = (tmpl.get("metadata") or {}).get("labels") or {}
    pod = tmpl.get("spec") or {}
    cs = [c for c in pod.get("containers") or [] if c.get("name") == CONTAINER]
    if not cs:
        return problems + ["StatefulSet kvdex: no container named kvdex"]
    c = cs[0]

    # StatefulSet, headless Service, selectors.
    if spec.get("serviceName") != HEADLESS:
        problems.append(f"StatefulSet kvdex: serviceName {spec.get('serviceName')!r}, "
                        f"not the headless Service {HEADLESS!r}")
    reps = spec.get("replicas")
    if not isinstance(reps, int) or reps < MIN_REPLICAS:
        problems.append(f"StatefulSet kvdex: replicas {reps!r} < {MIN_REPLICAS}")
    sel = spec.get("selector") or {}
    if sel.get("matchExpressions") or not _subset(sel.get("matchLabels"), labels):
        problems.append(f"StatefulSet kvdex: selector {sel} does not match the template "
                        f"labels {labels}")
    if not c.get("image"):
        problems.append("StatefulSet kvdex: container has no image")
    ports = {}
    for p in c.get("ports") or []:
        if p.get("name") in ports:
            problems.append(f"container port name {p.get('name')!r} is used twice")
        ports[p.get("name")] = p.get("containerPort")
    numbers = set(ports.values())

    def port_exists(ref):
        return ref in ports if isinstance(ref, str) else ref in numbers

    headless = _find(docs, "Service", HEADLESS)
    client = _find(docs, "Service", CLIENT)
    if not headless:
        problems.append(f"no Service {HEADLESS}")
    elif (headless[0].get("spec") or {}).get("clusterIP") != "None":
        problems.append(f"Service {HEADLESS}: clusterIP is not None (not headless)")
    elif (headless[0].get("spec") or {}).get("publishNotReadyAddresses") is not True:
        problems.append(f"Service {HEADLESS}: publishNotReadyAddresses is not true")
    if not client:
        problems.append(f"no client Service {CLIENT}")
    for svc in _find(docs, "Service"):
        sname, sspec = svc["metadata"]["name"], svc.get("spec") or {}
        if not _subset(sspec.get("selector"), labels):
            problems.append(f"Service {sname}: selector {sspec.get('selector')} does not "
                            f"select the kvdex pods {labels}")
        if not sspec.get("ports"):
            problems.append(f"Service {sname}: no ports")
        for p in sspec.get("ports") or []:
            target = p.get("targetPort", p.get("port"))
            if not port_exists(target):
                problems.append(f"Service {sname}: targetPort {target!r} is not a container "
                                f"port {ports}")

    # The environment kvdex starts with, and the command that starts it.
    rec, sim_problems = simulate(docs, dockerfile_text)
    problems += sim_problems
    final = dict(rec["env"]) if rec else {}
    if rec:
        if os.path.basename(rec["argv"][0]) != "kvdex" or rec["argv"][1:] != ["serve"]:
            problems.append(f"container kvdex runs {rec['argv'][1:]}, not `kvdex serve` "
                            f"alone (settings go in KVDEX_* variables, not flags)")
        if rec["pid"] != rec["shell_pid"]:
            problems.append("container kvdex: the shell does not exec kvdex, so SIGTERM "
                            "would not reach it (use `exec kvdex serve`)")
    links = set()
    if pod.get("enableServiceLinks", True) is not False:
        links = {n for n in service_link_env(docs, (sts[0].get("metadata") or {}).get("namespace"))
                 if n.startswith("KVDEX_")}
        if links:
            problems.append(f"enableServiceLinks is not false: Service {CLIENT} injects "
                            f"{', '.join(sorted(links))} among the KVDEX_* settings")
    for name, value in sorted(final.items()):
        s = settings.get(name)
        if name in links and s is None:
            continue
        if s is None:
            problems.append(f"{name} is not a kvdex setting (docs/CLI.md)")
            continue
        if "serve" not in s["used_by"]:
            problems.append(f"{name} is not a `serve` setting (used by {', '.join(s['used_by'])})")
            continue
        if s["unit"] == "bytes":
            b = kvdex_size(value)
            if b is None:
                problems.append(f"{name}={value!r} is not a size")
            elif b != "%" and s["lo"] is not None and not s["lo"] <= b <= s["hi"]:
                problems.append(f"{name}={value!r} is out of range {s['lo']}..{s['hi']}")
        elif s["lo"] is not None:
            if not re.fullmatch(r"-?\d+", value) or not s["lo"] <= int(value) <= s["hi"]:
                problems.append(f"{name}={value!r} is not an integer in {s['lo']}..{s['hi']}")
        elif "|" in s["unit"] and value not in s["unit"].split("|"):
            problems.append(f"{name}={value!r} is not one of {s['unit']}")

    def effective(name):
        return final.get(name, (settings.get(name) or {}).get("default"))

    listen = effective("KVDEX_LISTEN") or ""
    m = re.fullmatch(r".*:(\d+)", listen)
    listen_port = int(m.group(1)) if m else None
    if listen_port is None or listen_port == 0:
        problems.append(f"KVDEX_LISTEN={listen!r} has no fixed port")
    elif ports.get("grpc") != listen_port:
        problems.append(f"container port `grpc` {ports.get('grpc')} is not the KVDEX_LISTEN "
                        f"port {listen_port}")

    # Probes and TLS files.
    tls = served_tls(final, rec, settings)
    problems += check_probes(c, ports, effective("KVDEX_METRICS_LISTEN") or "", tls)
    problems += check_tls_files(pod, c, tls, docs)

    # Drain and termination.
    if "KVDEX_DRAIN_MS" not in final:
        problems.append("KVDEX_DRAIN_MS is not set explicitly (the grace period depends on it)")
    drain = effective("KVDEX_DRAIN_MS")
    grace = pod.get("terminationGracePeriodSeconds")
    pre = _prestop_seconds(c)
    if not isinstance(grace, int):
        problems.append("terminationGracePeriodSeconds is not set")
    elif drain and re.fullmatch(r"\d+", drain) and \
            grace < pre + math.ceil(int(drain) / 1000) + GRACE_MARGIN_S:
        problems.append(f"terminationGracePeriodSeconds {grace} < preStop {pre} s + drain "
                        f"{int(drain) / 1000:g} s + {GRACE_MARGIN_S} s margin")

    # Memory: --memory derived from limits.memory, with headroom.
    res = c.get("resources") or {}
    limit = (res.get("limits") or {}).get("memory")
    if limit is None or (res.get("requests") or {}).get("memory") is None:
        problems.append("container kvdex: resources.requests.memory and limits.memory must be set")
    mem = final.get("KVDEX_MEMORY")
    if mem is None:
        problems.append(f"KVDEX_MEMORY is not set: the default {settings['KVDEX_MEMORY']['default']}"
                        f" is of the node's RAM; derive it from limits.memory")
    elif kvdex_size(mem) == "%":
        problems.append(f"KVDEX_MEMORY={mem!r}: a percentage is of the node's RAM, not of the "
                        f"container's limit; derive it from limits.memory")
    elif limit is not None and isinstance(kvdex_size(mem), int):
        lim = quantity(limit)
        cap = kvdex_size(mem)
        if cap > lim * Fraction(MAX_MEMORY_SHARE):
            problems.append(f"KVDEX_MEMORY={mem} leaves less than {1 - MAX_MEMORY_SHARE:.0%} of "
                            f"limits.memory {limit} for everything but the stored K/V")
        twice = dict(res.get("limits") or {}, memory=str(int(lim * 2)))
        rec2, _ = simulate(docs, dockerfile_text, limits=twice)
        cap2 = kvdex_size((rec2 or {}).get("env", {}).get("KVDEX_MEMORY"))
        if not isinstance(cap2, int) or not 1.5 * cap < cap2 <= 2.5 * cap:
            problems.append(f"KVDEX_MEMORY={mem} is not derived from limits.memory (with the "
                            f"limit doubled it is {cap2})")
    if effective("KVDEX_THREADS") in ("0", None):
        problems.append("KVDEX_THREADS is 0 (one per node CPU); derive it from limits.cpu")

    # PodDisruptionBudget and anti-affinity.
    pdbs = _find(docs, "PodDisruptionBudget")
    if not pdbs:
        problems.append("no PodDisruptionBudget")
    for pdb in pdbs:
        pspec = pdb.get("spec") or {}
        if pspec.get("maxUnavailable") != 1:
            problems.append(f"PodDisruptionBudget {pdb['metadata']['name']}: maxUnavailable "
                            f"{pspec.get('maxUnavailable')!r}, not 1")
        psel = pspec.get("selector") or {}
        if psel.get("matchExpressions") or not _subset(psel.get("matchLabels"), labels):
            problems.append(f"PodDisruptionBudget {pdb['metadata']['name']}: selector {psel} "
                            f"does not match the kvdex pods {labels}")
    anti = (pod.get("affinity") or {}).get("podAntiAffinity") or {}
    terms = list(anti.get("requiredDuringSchedulingIgnoredDuringExecution") or [])
    terms += [t.get("podAffinityTerm") or {} for t in
              anti.get("preferredDuringSchedulingIgnoredDuringExecution") or []]
    if not any(t.get("topologyKey") == "kubernetes.io/hostname" and
               _subset((t.get("labelSelector") or {}).get("matchLabels"), labels) for t in terms):
        problems.append("StatefulSet kvdex: no pod anti-affinity on kubernetes.io/hostname "
                        "selecting the kvdex pods")

    problems += check_dockerfile(dockerfile_text, listen_port)
    return problems


def metrics_setting(settings):
    """The env name of --metrics-listen if docs/CLI.md has it, else None."""
    return next((env for env, s in settings.items() if s["flag"] == "--metrics-listen"), None)


def kustomizations(k8s):
    """deploy/k8s and each overlay under deploy/k8s/overlays/ (directories)."""
    out = [k8s]
    odir = os.path.join(k8s, "overlays")
    if os.path.isdir(odir):
        out += [os.path.join(odir, d) for d in sorted(os.listdir(odir))
                if os.path.isfile(os.path.join(odir, d, "kustomization.yaml"))]
    return out


def main(argv):
    root = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
    cli_md, k8s, dockerfile = (argv[1:4] if len(argv) >= 4 else
                               [os.path.join(root, p) for p in
                                ("docs/CLI.md", "deploy/k8s", "deploy/Dockerfile")])
    if os.path.isfile(k8s):  # .../kustomization.yaml
        k8s = os.path.dirname(k8s)
    targets = argv[4:] or kustomizations(k8s)
    with open(cli_md) as fh:
        settings = parse_cli_md(fh.read())
    with open(dockerfile) as fh:
        df = fh.read()
    total = 0
    for target in targets:
        try:
            problems = validate(render(target), df, settings)
        except RenderError as e:
            problems = [str(e)]
        for p in problems:
            shown = os.path.relpath(target, root)
            print(f"{target if shown.startswith('..') else shown}: {p}")
        total += len(problems)
    print("ok" if not total else f"{total} problem(s)")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
