"""deploy/ as an operator applies it: deploy/k8s renders (tests/deploy/deploy_check.py does
the part of kustomize it uses) and passes every rule of docs/DEPLOY.md against docs/CLI.md's
settings table, deploy/Dockerfile builds `kvdex serve`, and broken variants are caught.
Usage: deploy_test.py CLI_MD KUSTOMIZATION_DIR DOCKERFILE"""
import copy
import os
import sys
import tempfile
import unittest

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deploy_check as dc  # noqa: E402
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "py"))
import junit_main  # noqa: E402  (tests/py: the shared runner that writes test.xml)

CLI_MD = K8S = DOCKERFILE = None


def _load():
    with open(CLI_MD) as fh:
        settings = dc.parse_cli_md(fh.read())
    with open(DOCKERFILE) as fh:
        dockerfile = fh.read()
    return settings, dc.render(K8S), dockerfile


def _one(docs, kind, name):
    found = dc._find(docs, kind, name)
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def _container(docs):
    pod = _one(docs, "StatefulSet", "kvdex")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "kvdex")


class DeployTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.settings, cls.docs, cls.dockerfile = _load()

    def problems(self, docs=None, dockerfile=None):
        return dc.validate(docs if docs is not None else self.docs,
                           dockerfile if dockerfile is not None else self.dockerfile,
                           self.settings)

    def mutated(self, fn):
        """Problems of a copy of the manifests changed by fn(docs)."""
        docs = copy.deepcopy(self.docs)
        fn(docs)
        return self.problems(docs)

    def assertCaught(self, problems, *fragments):
        text = "\n".join(problems)
        for f in fragments:
            self.assertIn(f, text, f"validator did not report {f!r}; it said:\n{text}")

    # ---- the real deployment ------------------------------------------------------------

    def test_settings_table_parsed(self):
        for env in ("KVDEX_LISTEN", "KVDEX_MEMORY", "KVDEX_DRAIN_MS", "KVDEX_THREADS"):
            self.assertIn(env, self.settings)
            self.assertIn("serve", self.settings[env]["used_by"])
        self.assertEqual(self.settings["KVDEX_DRAIN_MS"]["unit"], "ms")

    def test_renders(self):
        kinds = sorted((d["kind"], d["metadata"]["name"]) for d in self.docs)
        self.assertEqual(kinds, [("ConfigMap", "kvdex-config"),
                                 ("PodDisruptionBudget", "kvdex"),
                                 ("Service", "kvdex"), ("Service", "kvdex-headless"),
                                 ("StatefulSet", "kvdex")])
        for d in self.docs:
            self.assertTrue(d.get("apiVersion") and d.get("kind") and d["metadata"].get("name"))

    def test_deployment_is_sound(self):
        self.assertEqual(self.problems(), [])

    def test_start_command_runs_kvdex_serve(self):
        rec, problems = dc.simulate(self.docs, self.dockerfile)
        self.assertEqual(problems, [])
        self.assertEqual(rec["argv"][1:], ["serve"])
        self.assertEqual(rec["pid"], rec["shell_pid"], "kvdex must replace the shell (exec)")
        cm = _one(self.docs, "ConfigMap", "kvdex-config")["data"]
        self.assertEqual(rec["env"]["KVDEX_DRAIN_MS"], cm["KVDEX_DRAIN_MS"])
        self.assertEqual(rec["env"]["KVDEX_LISTEN"], cm["KVDEX_LISTEN"])

    def test_memory_and_threads_follow_limits(self):
        c = _container(self.docs)
        limit = dc.quantity(c["resources"]["limits"]["memory"])
        rec, _ = dc.simulate(self.docs, self.dockerfile)
        cap = dc.kvdex_size(rec["env"]["KVDEX_MEMORY"])
        self.assertLess(cap, limit)
        self.assertGreater(cap, limit / 2)
        self.assertEqual(int(rec["env"]["KVDEX_THREADS"]),
                         -(-dc.quantity(c["resources"]["limits"]["cpu"]) // 1))
        rec, _ = dc.simulate(self.docs, self.dockerfile, limits={"memory": "64Gi", "cpu": "16"})
        self.assertEqual(rec["env"]["KVDEX_THREADS"], "16")
        self.assertAlmostEqual(dc.kvdex_size(rec["env"]["KVDEX_MEMORY"]) / (64 << 30),
                               cap / limit, places=3)

    def test_probe_and_service_ports(self):
        c = _container(self.docs)
        grpc = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
        listen = _one(self.docs, "ConfigMap", "kvdex-config")["data"]["KVDEX_LISTEN"]
        self.assertEqual(grpc, int(listen.rsplit(":", 1)[1]))
        for probe in ("readinessProbe", "livenessProbe"):
            self.assertEqual(c[probe]["grpc"]["port"], grpc)
        for name in ("kvdex", "kvdex-headless"):
            ports = _one(self.docs, "Service", name)["spec"]["ports"]
            self.assertIn("grpc", [p["targetPort"] for p in ports])

    def test_dockerfile(self):
        self.assertEqual(dc.check_dockerfile(self.dockerfile, 50051), [])
        ep, cmd = dc.image_command(dc.parse_dockerfile(self.dockerfile))
        self.assertEqual((os.path.basename(ep[0]), ep[1:], cmd), ("kvdex", ["serve"], None))

    def test_metrics_port(self):
        env = dc.metrics_setting(self.settings)
        if env is None:
            self.skipTest("docs/CLI.md has no --metrics-listen yet (METRICS comments in "
                          "deploy/k8s mark where it goes)")
        rec, _ = dc.simulate(self.docs, self.dockerfile)
        self.assertIn(env, rec["env"], f"docs/CLI.md has --metrics-listen: set {env} in "
                                       f"deploy/k8s/configmap.yaml (see the METRICS comments)")
        port = int(rec["env"][env].rsplit(":", 1)[1])
        ports = {p["name"]: p["containerPort"] for p in _container(self.docs)["ports"]}
        self.assertEqual(ports.get("metrics"), port, "container port `metrics` missing or wrong")

    # ---- the validator catches broken variants -------------------------------------------

    def test_rejects_wrong_probe_port(self):
        def f(docs):
            _container(docs)["readinessProbe"]["grpc"]["port"] = 50052
        self.assertCaught(self.mutated(f), "readinessProbe grpc port 50052")

    def test_rejects_named_grpc_probe_port(self):
        def f(docs):
            _container(docs)["livenessProbe"]["grpc"]["port"] = "grpc"
        self.assertCaught(self.mutated(f), "must be a number")

    def test_rejects_listen_port_mismatch(self):
        def f(docs):
            _one(docs, "ConfigMap", "kvdex-config")["data"]["KVDEX_LISTEN"] = "0.0.0.0:6000"
        self.assertCaught(self.mutated(f), "not the KVDEX_LISTEN port 6000", "EXPOSE")

    def test_rejects_unknown_setting(self):
        def f(docs):
            _one(docs, "ConfigMap", "kvdex-config")["data"]["KVDEX_DRAIN_SECONDS"] = "10"
        self.assertCaught(self.mutated(f), "KVDEX_DRAIN_SECONDS is not a kvdex setting")

    def test_rejects_setting_serve_ignores(self):
        def f(docs):
            _container(docs)["env"].append({"name": "KVDEX_TOKENS", "value": "1024"})
        self.assertCaught(self.mutated(f), "KVDEX_TOKENS is not a `serve` setting")

    def test_rejects_bad_setting_value(self):
        def f(docs):
            _one(docs, "ConfigMap", "kvdex-config")["data"]["KVDEX_DRAIN_MS"] = "10s"
        self.assertCaught(self.mutated(f), "KVDEX_DRAIN_MS='10s' is not an integer")

    def test_rejects_service_links(self):
        def f(docs):
            del _one(docs, "StatefulSet", "kvdex")["spec"]["template"]["spec"]["enableServiceLinks"]
        self.assertCaught(self.mutated(f), "enableServiceLinks is not false", "KVDEX_SERVICE_HOST")

    def test_rejects_short_grace_period(self):
        def f(docs):
            _one(docs, "StatefulSet", "kvdex")["spec"]["template"]["spec"][
                "terminationGracePeriodSeconds"] = 12
        self.assertCaught(self.mutated(f), "terminationGracePeriodSeconds 12 <")

    def test_rejects_grace_shorter_than_raised_drain(self):
        def f(docs):
            _one(docs, "ConfigMap", "kvdex-config")["data"]["KVDEX_DRAIN_MS"] = "60000"
        self.assertCaught(self.mutated(f), "terminationGracePeriodSeconds 30 <")

    def test_rejects_implicit_drain(self):
        def f(docs):
            del _one(docs, "ConfigMap", "kvdex-config")["data"]["KVDEX_DRAIN_MS"]
        self.assertCaught(self.mutated(f), "KVDEX_DRAIN_MS is not set explicitly")

    def test_rejects_memory_percentage(self):
        def f(docs):
            c = _container(docs)
            c.pop("command")
            c.pop("args")
            _one(docs, "ConfigMap", "kvdex-config")["data"]["KVDEX_MEMORY"] = "75%"
        self.assertCaught(self.mutated(f), "a percentage is of the node's RAM")

    def test_rejects_fixed_memory(self):
        def f(docs):
            c = _container(docs)
            c["args"] = ["export KVDEX_MEMORY=6G; exec kvdex serve"]
        self.assertCaught(self.mutated(f), "is not derived from limits.memory")

    def test_rejects_memory_without_headroom(self):
        def f(docs):
            _one(docs, "ConfigMap", "kvdex-config")["data"]["POD_MEMORY_CAP_PERCENT"] = "100"
        self.assertCaught(self.mutated(f), "leaves less than 5%")

    def test_rejects_invalid_divisor(self):
        def f(docs):
            for e in _container(docs)["env"]:
                if "resourceFieldRef" in e.get("valueFrom", {}):
                    if e["valueFrom"]["resourceFieldRef"]["resource"] == "limits.memory":
                        e["valueFrom"]["resourceFieldRef"]["divisor"] = "4Mi"
        self.assertCaught(self.mutated(f), "divisor '4Mi'")

    def test_rejects_missing_memory_limit(self):
        def f(docs):
            del _container(docs)["resources"]["limits"]["memory"]
        self.assertCaught(self.mutated(f), "limits.memory is not set on the container")

    def test_rejects_kvdex_not_execd(self):
        def f(docs):
            c = _container(docs)
            c["args"] = [c["args"][0].replace("exec kvdex serve", "kvdex serve; echo stopped")]
        self.assertCaught(self.mutated(f), "does not exec kvdex")

    def test_rejects_flags_in_command(self):
        def f(docs):
            c = _container(docs)
            c["args"] = [c["args"][0].replace("exec kvdex serve", "exec kvdex serve --drain 1")]
        self.assertCaught(self.mutated(f), "not `kvdex serve` alone")

    def test_rejects_selector_mismatches(self):
        def f(docs):
            _one(docs, "Service", "kvdex")["spec"]["selector"] = {"app": "other"}
            _one(docs, "PodDisruptionBudget", "kvdex")["spec"]["selector"]["matchLabels"] = \
                {"app": "other"}
            _one(docs, "StatefulSet", "kvdex")["spec"]["selector"]["matchLabels"] = \
                {"app": "other"}
        self.assertCaught(self.mutated(f), "Service kvdex: selector",
                          "PodDisruptionBudget kvdex: selector", "StatefulSet kvdex: selector")

    def test_rejects_statefulset_shape(self):
        def f(docs):
            spec = _one(docs, "StatefulSet", "kvdex")["spec"]
            spec["serviceName"] = "kvdex"
            spec["replicas"] = 2
            _one(docs, "Service", "kvdex-headless")["spec"]["publishNotReadyAddresses"] = False
        self.assertCaught(self.mutated(f), "serviceName 'kvdex'", "replicas 2 < 3",
                          "publishNotReadyAddresses is not true")

    def test_rejects_unknown_target_port(self):
        def f(docs):
            _one(docs, "Service", "kvdex")["spec"]["ports"][0]["targetPort"] = "grcp"
        self.assertCaught(self.mutated(f), "targetPort 'grcp' is not a container port")

    def test_rejects_pdb_and_affinity(self):
        def f(docs):
            _one(docs, "PodDisruptionBudget", "kvdex")["spec"]["maxUnavailable"] = 2
            del _one(docs, "StatefulSet", "kvdex")["spec"]["template"]["spec"]["affinity"]
        self.assertCaught(self.mutated(f), "maxUnavailable 2, not 1", "no pod anti-affinity")

    def test_rejects_missing_fields(self):
        def f(docs):
            del _one(docs, "ConfigMap", "kvdex-config")["apiVersion"]
            del _one(docs, "PodDisruptionBudget", "kvdex")["metadata"]["name"]
        self.assertCaught(self.mutated(f), "ConfigMap kvdex-config: no apiVersion",
                          "PodDisruptionBudget ?: no metadata.name")

    def test_rejects_dockerfile_entrypoint(self):
        bad = self.dockerfile.replace('"serve"]', '"demo"]')
        self.assertNotEqual(bad, self.dockerfile)
        self.assertCaught(self.problems(dockerfile=bad), "Dockerfile: entrypoint")
        shell_form = self.dockerfile.replace('ENTRYPOINT ["/usr/local/bin/kvdex", "serve"]',
                                             "ENTRYPOINT kvdex serve")
        self.assertCaught(dc.check_dockerfile(shell_form), "not exec-form")

    def test_renderer_subset(self):
        with self.assertRaises(dc.RenderError):
            with tempfile.TemporaryDirectory() as tmp:
                with open(os.path.join(tmp, "kustomization.yaml"), "w") as fh:
                    yaml.safe_dump({"resources": [], "patchesStrategicMerge": ["x.yaml"]}, fh)
                dc.render(tmp)
        with open(os.path.join(K8S, "kustomization.yaml")) as fh:
            k = yaml.safe_load(fh)
        with tempfile.TemporaryDirectory() as tmp:
            overlay = dict(resources=[os.path.abspath(K8S)], namespace="inference",
                           commonLabels={"team": "llm"},
                           images=[{"name": k["images"][0]["newName"],
                                    "newName": "registry.example/kvdex", "newTag": "v1"}])
            with open(os.path.join(tmp, "kustomization.yaml"), "w") as fh:
                yaml.safe_dump(overlay, fh)
            docs = dc.render(tmp)
        self.assertTrue(all(d["metadata"]["namespace"] == "inference" for d in docs))
        self.assertEqual(_container(docs)["image"], "registry.example/kvdex:v1")
        self.assertEqual(self.problems(docs), [])


TLS = "overlays/tls"  # under K8S


def _overlay_variant(tmp, edits=None, kustomization=None):
    """A copy of deploy/k8s/overlays/tls in tmp whose base is the real deploy/k8s;
    edits = {file: fn(text) -> text}; kustomization = fn(dict) to change its fields."""
    src = os.path.join(K8S, TLS)
    for name in os.listdir(src):
        with open(os.path.join(src, name)) as fh:
            text = fh.read()
        if name == "kustomization.yaml":
            k = yaml.safe_load(text)
            k["resources"] = [os.path.abspath(K8S) if r == "../.." else r for r in k["resources"]]
            if kustomization:
                kustomization(k)
            text = yaml.safe_dump(k)
        elif edits and name in edits:
            new = edits[name](text)
            assert new != text, f"edit of {name} changed nothing"
            text = new
        with open(os.path.join(tmp, name), "w") as fh:
            fh.write(text)
    return tmp


class TlsOverlayTest(unittest.TestCase):
    """deploy/k8s/overlays/tls: the base plus a Secret mount, KVDEX_TLS_* and HTTP probes."""

    @classmethod
    def setUpClass(cls):
        cls.settings, cls.base, cls.dockerfile = _load()
        cls.docs = dc.render(os.path.join(K8S, TLS))

    def problems(self, docs):
        return dc.validate(docs, self.dockerfile, self.settings)

    def mutated(self, fn):
        docs = copy.deepcopy(self.docs)
        fn(docs)
        return self.problems(docs)

    def variant(self, edits=None, kustomization=None):
        """Problems of an edited copy of the overlay, rendered from its files."""
        with tempfile.TemporaryDirectory() as tmp:
            return self.problems(dc.render(_overlay_variant(tmp, edits, kustomization)))

    def assertCaught(self, problems, *fragments):
        text = "\n".join(problems)
        for f in fragments:
            self.assertIn(f, text, f"validator did not report {f!r}; it said:\n{text}")

    def _cm(self, docs):
        return _one(docs, "ConfigMap", "kvdex-config")["data"]

    def _pod(self, docs):
        return _one(docs, "StatefulSet", "kvdex")["spec"]["template"]["spec"]

    # ---- the overlay as shipped ---------------------------------------------------------

    def test_overlay_is_sound(self):
        self.assertEqual(self.problems(self.docs), [])
        self.assertEqual(sorted((d["kind"], d["metadata"]["name"]) for d in self.docs),
                         sorted((d["kind"], d["metadata"]["name"]) for d in self.base))

    def test_overlay_sets_tls_files_from_the_secret(self):
        rec, problems = dc.simulate(self.docs, self.dockerfile)
        self.assertEqual(problems, [])
        self.assertEqual(rec["argv"][1:], ["serve"])
        self.assertEqual(rec["env"]["KVDEX_TLS_CERT"], "/etc/kvdex/tls/tls.crt")
        self.assertEqual(rec["env"]["KVDEX_TLS_KEY"], "/etc/kvdex/tls/tls.key")
        self.assertNotIn("KVDEX_TLS_CLIENT_CA", rec["env"])
        c, pod = _container(self.docs), self._pod(self.docs)
        self.assertIn({"name": "tls", "mountPath": "/etc/kvdex/tls", "readOnly": True},
                      c["volumeMounts"])
        vol = next(v for v in pod["volumes"] if v["name"] == "tls")
        self.assertEqual(vol["secret"]["secretName"], "kvdex-tls")
        self.assertEqual(vol["secret"]["defaultMode"], 0o440)
        self.assertEqual(pod["securityContext"]["fsGroup"], 10001)
        # The rest of the base is kept: the merge touched only what the patch names.
        self.assertEqual(pod["securityContext"]["runAsUser"], 10001)
        self.assertEqual(c["image"], _container(self.base)["image"])
        self.assertEqual(c["env"], _container(self.base)["env"])

    def test_overlay_probes_are_http_with_base_timings(self):
        c, base = _container(self.docs), _container(self.base)
        for kind, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            self.assertNotIn("grpc", c[kind])
            self.assertEqual(c[kind]["httpGet"], {"path": path, "port": "metrics"})
            timing = {k: v for k, v in base[kind].items() if k != "grpc"}
            self.assertEqual({k: v for k, v in c[kind].items() if k != "httpGet"}, timing)
        self.assertIn("grpc", base["readinessProbe"], "rendering the overlay changed the base")

    def test_overlay_mtls(self):
        def f(docs):
            self._cm(docs)["KVDEX_TLS_CLIENT_CA"] = "/etc/kvdex/tls/ca.crt"
        self.assertEqual(self.mutated(f), [])
        with open(os.path.join(K8S, TLS, "configmap-tls.yaml")) as fh:
            self.assertIn('# KVDEX_TLS_CLIENT_CA: "/etc/kvdex/tls/ca.crt"', fh.read())

    # ---- broken TLS variants ----------------------------------------------------------------

    def test_rejects_tls_with_grpc_probes_kept(self):
        # The patch adds httpGet but forgets `grpc: null`: both handlers, grpc still there.
        problems = self.variant({"statefulset-tls.yaml":
                                 lambda t: t.replace("            grpc: null\n", "")})
        self.assertCaught(problems, "readinessProbe is a grpc: probe but the gRPC port serves TLS",
                          "livenessProbe has 2 handlers (httpGet, grpc)")

    def test_rejects_tls_without_probe_patch(self):
        def drop_probes(text):
            a = text.index("          # kubelet's grpc: probe")
            return text[:a] + text[text.index("      volumes:"):]
        self.assertCaught(self.variant({"statefulset-tls.yaml": drop_probes}),
                          "readinessProbe is a grpc: probe", "livenessProbe is not an httpGet probe")

    def test_rejects_cert_outside_the_mount(self):
        problems = self.variant({"configmap-tls.yaml": lambda t: t.replace(
            '"/etc/kvdex/tls/tls.crt"', '"/etc/ssl/kvdex/tls.crt"')})
        self.assertCaught(problems, "KVDEX_TLS_CERT=/etc/ssl/kvdex/tls.crt is not under any "
                                    "volumeMount")

    def test_rejects_ca_outside_the_mount(self):
        def f(docs):
            self._cm(docs)["KVDEX_TLS_CLIENT_CA"] = "/etc/kvdex/ca.crt"
        self.assertCaught(self.mutated(f), "KVDEX_TLS_CLIENT_CA=/etc/kvdex/ca.crt is not under")

    def test_rejects_probe_on_wrong_port(self):
        def f(docs):
            _container(docs)["readinessProbe"]["httpGet"]["port"] = "grpc"
            _container(docs)["livenessProbe"]["httpGet"]["port"] = 9091
        self.assertCaught(self.mutated(f), "readinessProbe httpGet port 'grpc' is not the "
                                           "metrics port", "livenessProbe port 9091 is not a "
                                           "container port")

    def test_rejects_probe_on_wrong_port_from_files(self):
        problems = self.variant({"statefulset-tls.yaml": lambda t: t.replace(
            "path: /healthz\n              port: metrics", "path: /healthz\n              port: 50051")})
        self.assertCaught(problems, "livenessProbe httpGet port 50051 is not the metrics port")

    def test_rejects_wrong_probe_path_and_scheme(self):
        def f(docs):
            _container(docs)["livenessProbe"]["httpGet"]["path"] = "/metrics"
            _container(docs)["readinessProbe"]["httpGet"]["scheme"] = "HTTPS"
        self.assertCaught(self.mutated(f), "livenessProbe httpGet path '/metrics' is not /healthz",
                          "readinessProbe httpGet scheme 'HTTPS'")

    def test_rejects_probes_without_metrics_endpoint(self):
        def f(docs):
            self._cm(docs)["KVDEX_METRICS_LISTEN"] = ""
        self.assertCaught(self.mutated(f), "KVDEX_METRICS_LISTEN is empty")

        def g(docs):
            self._cm(docs)["KVDEX_METRICS_LISTEN"] = "127.0.0.1:9090"
        self.assertCaught(self.mutated(g), "is loopback only")

    def test_rejects_cert_without_key(self):
        def f(docs):
            del self._cm(docs)["KVDEX_TLS_KEY"]
        self.assertCaught(self.mutated(f), "KVDEX_TLS_CERT and KVDEX_TLS_KEY must be set together")

        def g(docs):
            del self._cm(docs)["KVDEX_TLS_KEY"]
            del self._cm(docs)["KVDEX_TLS_CERT"]
            self._cm(docs)["KVDEX_TLS_CLIENT_CA"] = "/etc/kvdex/tls/ca.crt"
        self.assertCaught(self.mutated(g), "KVDEX_TLS_CLIENT_CA (mTLS) needs KVDEX_TLS_CERT")

    def test_rejects_bad_mounts(self):
        def writable(docs):
            _container(docs)["volumeMounts"][0]["readOnly"] = False
        self.assertCaught(self.mutated(writable), "volumeMount /etc/kvdex/tls is not readOnly")

        def not_secret(docs):
            vol = next(v for v in self._pod(docs)["volumes"] if v["name"] == "tls")
            vol.pop("secret")
            vol["emptyDir"] = {}
        self.assertCaught(self.mutated(not_secret), "is not a Secret volume")

        def unreadable(docs):
            next(v for v in self._pod(docs)["volumes"] if v["name"] == "tls")[
                "secret"]["defaultMode"] = 0o400
        self.assertCaught(self.mutated(unreadable), "mode 0o400 of the Secret file is not "
                                                    "readable by uid 10001")

        def no_fsgroup(docs):
            del self._pod(docs)["securityContext"]["fsGroup"]
        self.assertCaught(self.mutated(no_fsgroup), "mode 0o440")

        def items(docs):
            next(v for v in self._pod(docs)["volumes"] if v["name"] == "tls")["secret"][
                "items"] = [{"key": "tls.crt", "path": "tls.crt"}]
        self.assertCaught(self.mutated(items), "KVDEX_TLS_KEY=/etc/kvdex/tls/tls.key: the Secret "
                                               "volume 'tls' projects only ['tls.crt']")

        def nested(docs):
            self._cm(docs)["KVDEX_TLS_KEY"] = "/etc/kvdex/tls/keys/tls.key"
        self.assertCaught(self.mutated(nested), "'keys/tls.key' under /etc/kvdex/tls is not a key")

        def dangling(docs):
            _container(docs)["volumeMounts"][0]["name"] = "certs"
        self.assertCaught(self.mutated(dangling), "names no volume 'certs'")

    def test_rejects_missing_secret_key(self):
        def f(docs):
            docs.append({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                         "metadata": {"name": "kvdex-tls"},
                         "data": {"tls.crt": "", "tls.key": ""}})
            self._cm(docs)["KVDEX_TLS_CLIENT_CA"] = "/etc/kvdex/tls/ca.crt"
        self.assertCaught(self.mutated(f), "Secret 'kvdex-tls' has no key 'ca.crt'")

    def test_tls_flags_on_the_command_line_are_checked_too(self):
        def f(docs):
            c = _container(docs)
            c["args"] = [c["args"][0].replace("exec kvdex serve",
                                              "exec kvdex serve --tls-cert=/tmp/server.pem")]
        self.assertCaught(self.mutated(f), "not `kvdex serve` alone",
                          "KVDEX_TLS_CERT=/tmp/server.pem is not under any volumeMount")

    def test_plaintext_base_keeps_grpc_probes(self):
        # Without TLS, an httpGet probe is still refused: the base checks the gRPC server.
        docs = copy.deepcopy(self.base)
        _container(docs)["readinessProbe"] = {"httpGet": {"path": "/readyz", "port": "metrics"}}
        self.assertCaught(self.problems(docs), "readinessProbe is not a gRPC health probe")

    # ---- the renderer: patches ------------------------------------------------------------

    def test_strategic_merge(self):
        dst = {"spec": {"containers": [{"name": "a", "args": ["x", "y"], "env": [
                   {"name": "A", "value": "1"}], "volumeMounts": [{"name": "v", "mountPath": "/m"}],
                   "probe": {"grpc": {"port": 1}, "periodSeconds": 5}},
                   {"name": "b", "image": "b"}],
               "volumes": [{"name": "v", "emptyDir": {}}]}}
        dc.strategic_merge(dst, {"spec": {"containers": [
            {"name": "a", "args": ["z"], "env": [{"name": "A", "value": "2"}, {"name": "B"}],
             "volumeMounts": [{"name": "w", "mountPath": "/m", "readOnly": True}],
             "probe": {"grpc": None, "httpGet": {"port": 2}}},
            {"name": "c", "image": "c"}],
            "volumes": [{"name": "w", "secret": {"secretName": "s"}}]}}, "t")
        a, b, c = dst["spec"]["containers"]
        self.assertEqual((a["name"], b, c), ("a", {"name": "b", "image": "b"},
                                              {"name": "c", "image": "c"}))
        self.assertEqual(a["args"], ["z"])
        self.assertEqual(a["env"], [{"name": "A", "value": "2"}, {"name": "B"}])
        self.assertEqual(a["volumeMounts"], [{"name": "w", "mountPath": "/m", "readOnly": True}])
        self.assertEqual(a["probe"], {"httpGet": {"port": 2}, "periodSeconds": 5})
        self.assertEqual([v["name"] for v in dst["spec"]["volumes"]], ["v", "w"])

    def test_renderer_refuses_what_it_does_not_implement(self):
        def refused(fragment, edits=None, kustomization=None):
            with tempfile.TemporaryDirectory() as tmp:
                with self.assertRaises(dc.RenderError) as cm:
                    dc.render(_overlay_variant(tmp, edits, kustomization))
            self.assertIn(fragment, str(cm.exception))

        refused("'patchesStrategicMerge'", kustomization=lambda k: k.update(
            patchesStrategicMerge=k.pop("patches")))
        refused("understands only {path: FILE}", kustomization=lambda k: k["patches"][0].update(
            target={"kind": "ConfigMap"}))
        refused("understands only {path: FILE}", kustomization=lambda k: k["patches"].append(
            {"patch": "- op: remove\n  path: /spec/replicas\n"}))
        refused("JSON 6902", edits={"configmap-tls.yaml": lambda t:
                                    "- op: remove\n  path: /data/KVDEX_LOG_LEVEL\n"})
        refused("matches 0 resources", edits={"configmap-tls.yaml": lambda t:
                                              t.replace("name: kvdex-config", "name: kvdex-conf")})
        refused("matches 0 resources", edits={"statefulset-tls.yaml": lambda t:
                                              t.replace("apps/v1", "apps/v1beta2")})
        refused("directive $patch", edits={"statefulset-tls.yaml": lambda t: t.replace(
            "          readinessProbe:\n", "          readinessProbe:\n            $patch: replace\n")})
        refused("merges the list 'ports'", edits={"statefulset-tls.yaml": lambda t: t.replace(
            "          volumeMounts:\n", "          ports:\n            - {name: x, containerPort: 1}\n"
            "          volumeMounts:\n")})
        refused("needs its merge key 'mountPath'", edits={"statefulset-tls.yaml": lambda t:
                                                         t.replace("mountPath: /etc/kvdex/tls",
                                                                   "path: /etc/kvdex/tls")})
        refused("does not exist", kustomization=lambda k: k["patches"].append({"path": "no.yaml"}))
        with tempfile.TemporaryDirectory() as tmp:
            os.mkdir(os.path.join(tmp, "empty"))
            with open(os.path.join(tmp, "kustomization.yaml"), "w") as fh:
                yaml.safe_dump({"resources": ["empty"]}, fh)
            with self.assertRaises(dc.RenderError) as cm:
                dc.render(tmp)
            self.assertIn("directory without kustomization.yaml", str(cm.exception))

    def test_overlay_of_the_overlay(self):
        # An operator's own overlay on top (namespace, image) keeps TLS and stays sound.
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, "kustomization.yaml"), "w") as fh:
                yaml.safe_dump({"resources": [os.path.abspath(os.path.join(K8S, TLS))],
                                "namespace": "inference",
                                "images": [{"name": "kvdex", "newName": "registry.example/kvdex",
                                            "newTag": "v2"}]}, fh)
            docs = dc.render(tmp)
        self.assertEqual(self.problems(docs), [])
        self.assertEqual(_container(docs)["image"], "registry.example/kvdex:v2")
        self.assertIn("httpGet", _container(docs)["livenessProbe"])

    def test_auth_file_recipe_of_deploy_md(self):
        # docs/DEPLOY.md 10.6: an operator's overlay on overlays/tls adding --auth-file.
        files = {
            "kustomization.yaml": {"resources": [os.path.abspath(os.path.join(K8S, TLS))],
                                   "patches": [{"path": "auth-config.yaml"},
                                               {"path": "auth.yaml"}]},
            "auth-config.yaml": {"apiVersion": "v1", "kind": "ConfigMap",
                                 "metadata": {"name": "kvdex-config"},
                                 "data": {"KVDEX_AUTH_FILE": "/etc/kvdex/auth/auth.txt"}},
            "auth.yaml": {"apiVersion": "apps/v1", "kind": "StatefulSet",
                          "metadata": {"name": "kvdex"},
                          "spec": {"template": {"spec": {
                              "containers": [{"name": "kvdex", "volumeMounts": [
                                  {"name": "auth", "mountPath": "/etc/kvdex/auth",
                                   "readOnly": True}]}],
                              "volumes": [{"name": "auth", "secret": {
                                  "secretName": "kvdex-auth", "defaultMode": 288}}]}}}},
        }
        with tempfile.TemporaryDirectory() as tmp:
            for name, doc in files.items():
                with open(os.path.join(tmp, name), "w") as fh:
                    yaml.safe_dump(doc, fh)
            docs = dc.render(tmp)
        self.assertEqual(self.problems(docs), [])
        c = _container(docs)
        self.assertEqual(sorted(m["mountPath"] for m in c["volumeMounts"]),
                         ["/etc/kvdex/auth", "/etc/kvdex/tls"])
        self._cm(docs)["KVDEX_AUTH_FILE"] = "/etc/kvdex/auth.txt"
        self.assertCaught(self.problems(docs), "KVDEX_AUTH_FILE=/etc/kvdex/auth.txt is not under")

    def test_main_checks_every_overlay(self):
        self.assertEqual(dc.kustomizations(K8S), [K8S, os.path.join(K8S, "overlays", "tls")])


if __name__ == "__main__":
    CLI_MD, K8S, DOCKERFILE = (os.path.abspath(p) for p in sys.argv[1:4])
    if os.path.isfile(K8S):  # deploy/k8s/kustomization.yaml
        K8S = os.path.dirname(K8S)
    result = junit_main.run("deploy")
    sys.exit(0 if result.wasSuccessful() else 1)
