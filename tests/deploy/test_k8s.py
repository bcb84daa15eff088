"""deploy/k8s: the Confidential Containers manifests validate against the Kubernetes schemas (kubernetes-validate
bundles them, so this runs offline; no cluster runs here), and keep the rules docs/deploy.md states."""

from __future__ import annotations

import base64
import gzip
import hashlib
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from enclave.config import load_settings
from enclave.initdata import parse_initdata
from enclave.sealing import public_key_text

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30.0"


def _documents() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def _one(kind: str) -> dict:
    (found,) = [d for d in _documents() if d["kind"] == kind]
    return found


def test_every_manifest_validates_strictly() -> None:
    docs = _documents()
    assert {d["kind"] for d in docs} == {"RuntimeClass", "ConfigMap", "Deployment", "Service"}
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_validator_refuses_a_broken_manifest() -> None:
    broken = _one("Deployment")
    broken["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    unknown = _one("Service")
    unknown["spec"]["loadBalancerTLS"] = True       # strict: an unknown field is an error, not ignored
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(unknown, KUBERNETES_VERSION, strict=True)


def test_confidential_pod_rules() -> None:
    assert {d["metadata"]["name"] for d in _documents() if d["kind"] == "RuntimeClass"} == {"kata-qemu-snp",
                                                                                           "kata-qemu-tdx"}
    pod = _one("Deployment")["spec"]["template"]
    spec = pod["spec"]
    assert spec["runtimeClassName"] in {"kata-qemu-snp", "kata-qemu-tdx"}
    assert "io.katacontainers.config.hypervisor.cc_init_data" in pod["metadata"]["annotations"]
    assert spec["automountServiceAccountToken"] is False and spec["enableServiceLinks"] is False
    for container in spec["containers"]:
        assert "@sha256:" in container["image"]                                   # pinned by digest
        assert not any(e["name"].startswith("CUBE_ENCLAVE__") for e in container.get("env", []))
        assert "envFrom" not in container
    enclave = next(c for c in spec["containers"] if c["name"] == "enclave")
    command = enclave["command"]                 # the image's entrypoint, configured from the init-data
    assert command[:6] == ["python", "-I", "-B", "-m", "enclave.main", "serve"] and not enclave.get("args")
    assert command[command.index("--initdata") + 1] == "/etc/cube/initdata.toml" and "--config" not in command
    mounts = {m["mountPath"]: m for m in enclave["volumeMounts"]}
    assert mounts["/etc/cube/initdata.toml"]["readOnly"] is True
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["data"]["emptyDir"]["medium"] == "Memory"                    # not on the node's disk
    assert all("secret" not in v and "hostPath" not in v for v in volumes.values())
    ollama = next(c for c in spec["containers"] if c["name"] == "ollama")
    assert {"name": "OLLAMA_HOST", "value": "127.0.0.1:11434"} in ollama["env"]
    assert _one("Service")["spec"]["ports"][0]["targetPort"] == "attested-tls"


def test_the_annotation_and_the_configmap_carry_exactly_the_committed_initdata() -> None:
    """The enclave hashes the ConfigMap's copy, Kata the annotation's: both must be initdata.toml's bytes."""
    raw = (K8S / "initdata.toml").read_bytes()
    annotation = _one("Deployment")["spec"]["template"]["metadata"]["annotations"][
        "io.katacontainers.config.hypervisor.cc_init_data"]
    assert gzip.decompress(base64.b64decode(annotation, validate=True)) == raw
    assert _one("ConfigMap")["data"]["initdata.toml"].encode() == raw
    check = subprocess.run([sys.executable, str(K8S / "render_initdata.py"), "--check"], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


def test_render_check_notices_an_initdata_edited_without_rerendering(tmp_path: Path) -> None:
    for name in ("initdata.toml", "configmap.yaml", "deployment.yaml", "render_initdata.py"):
        (tmp_path / name).write_bytes((K8S / name).read_bytes())
    (tmp_path / "initdata.toml").write_text((K8S / "initdata.toml").read_text().replace("port: 8443", "port: 8444"))
    script = [sys.executable, str(tmp_path / "render_initdata.py")]
    env = {"PYTHONPATH": str(K8S.parents[1])}
    stale = subprocess.run([*script, "--check"], capture_output=True, text=True, timeout=60, env=env)
    assert stale.returncode == 1 and "configmap.yaml, deployment.yaml" in stale.stdout
    rendered = subprocess.run(script, capture_output=True, text=True, timeout=60, env=env, check=True)
    digest = hashlib.sha384((tmp_path / "initdata.toml").read_bytes()).hexdigest()
    assert f"policy snp.host_data:  {digest[:64]}\n" in rendered.stdout
    assert f"policy tdx.mrconfigid: {digest}\n" in rendered.stdout
    assert subprocess.run([*script, "--check"], timeout=60, env=env).returncode == 0


def test_the_initdata_entry_is_a_valid_enclave_configuration(tmp_path: Path) -> None:
    initdata = parse_initdata((K8S / "initdata.toml").read_bytes(), "initdata.toml")
    assert initdata.binding.algorithm == "sha384"
    text = initdata.config.decode()
    key = public_key_text(X25519PrivateKey.generate().public_key())
    path = tmp_path / "enclave.yaml"
    path.write_text(text.replace("REPLACE-with-cube-admin-bootstrap-keygen-output", key))
    settings = load_settings(path, environ={})
    assert not settings.simulate and settings.bootstrap.operator_public_key == key
    assert [b.base_url for b in settings.backends] == ["http://127.0.0.1:11434"]
    assert settings.listen.port == 8443
