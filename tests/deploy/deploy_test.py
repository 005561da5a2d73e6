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
                    yaml.safe_dump({"resources": [], "patches": [{"path": "x.yaml"}]}, fh)
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


class _RecordingResult(unittest.TextTestResult):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.passed = []

    def addSuccess(self, test):
        super().addSuccess(test)
        self.passed.append(test)


def _write_junit(result):
    path = os.environ.get("XML_OUTPUT_FILE")
    if not path:
        return
    from xml.sax.saxutils import escape, quoteattr
    rows = [(t, "") for t in result.passed]
    rows += [(t, f"<failure message='failed'>{escape(tb)}</failure>")
             for t, tb in result.failures + result.errors]
    rows += [(t, f"<skipped message={quoteattr(why)}/>") for t, why in result.skipped]
    with open(path, "w") as fh:
        fh.write('<?xml version="1.0" encoding="UTF-8"?>\n<testsuites>\n'
                 f'<testsuite name="deploy" tests="{len(rows)}">\n')
        for t, body in rows:
            fh.write(f'<testcase classname="DeployTest" name={quoteattr(t._testMethodName)}>'
                     f'{body}</testcase>\n')
        fh.write("</testsuite>\n</testsuites>\n")


if __name__ == "__main__":
    CLI_MD, K8S, DOCKERFILE = (os.path.abspath(p) for p in sys.argv[1:4])
    if os.path.isfile(K8S):  # deploy/k8s/kustomization.yaml
        K8S = os.path.dirname(K8S)
    prog = unittest.main(argv=[sys.argv[0], "-v"], exit=False,
                         testRunner=unittest.TextTestRunner(resultclass=_RecordingResult,
                                                            verbosity=2))
    _write_junit(prog.result)
    sys.exit(0 if prog.result.wasSuccessful() else 1)
