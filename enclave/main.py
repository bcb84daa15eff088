"""``cube-enclave serve``: the enclave service over HTTPS, bootstrapping the first superadmin PAT."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from enclave.config import ConfigError, Settings, load_server_secret, load_settings

CERT_FILE_NAME = "server-cert.pem"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cube-enclave", description="Cube AI enclave service")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the service over HTTPS")
    serve.add_argument("--simulate", action="store_true", help="simulated confidential platform (development)")
    serve.add_argument("--config", type=Path, help="YAML configuration (default config/enclave.yaml)")
    serve.add_argument("--host", help="listen address (default from config: 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default from config: 8443)")
    serve.add_argument("--data-dir", type=Path, help="where the SQLite store, server secret and cert PEM live")
    serve.add_argument("--pat-file", type=Path,
                       help="write the bootstrap PAT to this file (0600) instead of printing it")
    return parser


def settings_from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Settings:
    overrides: dict[str, Any] = {}
    if args.simulate:
        overrides["simulate"] = True
    if args.data_dir is not None:
        overrides["data_dir"] = str(args.data_dir)
    listen: dict[str, Any] = {}
    if args.host is not None:
        listen["host"] = args.host
    if args.port is not None:
        listen["port"] = args.port
    if listen:
        overrides["listen"] = listen
    return load_settings(args.config, environ=environ, overrides=overrides)


async def _prepare(settings: Settings):
    from enclave.bootstrap import bootstrap_if_empty
    from enclave.store import open_store

    secret = load_server_secret(settings)
    store = await open_store(settings)
    try:
        boot = await bootstrap_if_empty(store, settings, secret)
        domains = await store.list_domains()
        default = next((d for d in domains if d.name == settings.bootstrap.domain_name), None)
        return boot, default
    finally:
        await store.close()


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)


SIM_POLICY_FILE_NAME = "sim-policy.yaml"


def banner(settings: Settings, *, base: str, cert_path: Path, policy_path: Path | None, domain_id: str | None,
           token: str | None, pat_file: Path | None, first_start: bool) -> str:
    did = domain_id or "<domain-id>"
    mode = "simulation mode: the evidence proves nothing about hardware" if settings.simulate else "confidential mode"
    lines = [f"Cube AI enclave on {base} ({mode})",
             "TLS key generated in memory; its certificate carries evidence bound to it (id-pe-cmw)."]
    if first_start and token and pat_file is None:
        lines += ["", "Bootstrap superadmin API key (shown once; store it now):", f"  {token}"]
        auth = f"Authorization: Bearer {token}"
        key_expr = repr(token)
    elif first_start and pat_file is not None:
        lines += ["", f"Bootstrap superadmin API key written to {pat_file} (mode 0600)."]
        auth = f"Authorization: Bearer $(cat {pat_file})"
        key_expr = f"open({str(pat_file)!r}).read().strip()"
    else:
        lines += ["", "Store already initialised; use an existing API key (export CUBE_TOKEN=...)."]
        auth = "Authorization: Bearer $CUBE_TOKEN"
        key_expr = "os.environ['CUBE_TOKEN']"
    if not settings.backends:
        lines += ["", "No backends configured: the models list is empty until you add some to the config "
                      "(backends: [{name, kind: ollama|vllm, base_url}])."]
    policy_arg = f" --policy {policy_path}" if policy_path else " --policy <your-policy.yaml>"
    policy_expr = repr(str(policy_path)) if policy_path else "'<your-policy.yaml>'"
    if policy_path:
        lines += ["", f"Policy that trusts this installation's simulated platform: {policy_path}"]
    lines += ["", "Verify the enclave before any key leaves this machine:",
              f"  cube-attest verify-url {base}{policy_arg}",
              "", "  # openai-python through the attested client (verifies, pins the key, then sends the key)",
              "  import os",
              "  from attestation.atls.client import openai_client",
              "  from attestation.policy import load_policy",
              f"  client = openai_client('{base}/proxy/{did}/v1', api_key={key_expr},",
              f"                         policy=load_policy({policy_expr}))",
              "  print([m.id for m in client.models.list()])",
              "", "  # curl, trusting the current certificate as is (no attestation; re-read it after a key rotation)",
              f'  curl --cacert {cert_path} -H "{auth}" {base}/proxy/{did}/v1/models',
              "", f"Admin CLI (attested): cube-admin --url {base}{policy_arg} --token ... users list"]
    return "\n".join(lines)


def _collateral_clients(settings: Settings) -> tuple[Any, Any]:
    """(KdsClient, PcsClient) for the revocation data real evidence carries; None where unset or simulated.

    Few attempts and short timeouts: a fetch runs under the provider lock, in the path of attestation
    requests; both cache on disk until the objects' nextUpdate.
    """
    if settings.simulate:
        return None, None
    a = settings.attestation
    kds = pcs = None
    if a.kds_url:
        from attestation.snp.kds import KdsClient

        kds = KdsClient(base_url=a.kds_url, cache_dir=settings.data_dir / "kds", max_attempts=2, timeout=5.0)
    if a.pcs_url:
        from attestation.tdx.pcs import PcsClient

        pcs = PcsClient(base_url=a.pcs_url, cache_dir=settings.data_dir / "pcs", max_retries=1, timeout=5.0)
    return kds, pcs


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from attestation.errors import AttestationError
    from attestation.policy import sim_policy_yaml
    from attestation.providers import detect_provider
    from enclave.app import create_app
    from enclave.attestation_api import attestation_router
    from enclave.limits import http_protocol_for
    from enclave.logs import configure_logging, uvicorn_log_config
    from enclave.tls import TlsManager, uvicorn_config

    settings = settings_from_args(args)
    configure_logging(settings.log_level, json_format=settings.log_json)
    boot, default_domain = asyncio.run(_prepare(settings))
    sim_dir = settings.attestation.sim_dir or settings.data_dir / "sim"
    kds, pcs = _collateral_clients(settings)
    try:
        provider = detect_provider(simulate=settings.simulate, sim_dir=sim_dir, kds=kds, pcs=pcs)
    except AttestationError as e:
        print(f"cube-enclave: {e}", file=sys.stderr)
        return 2
    cert_path = settings.data_dir / CERT_FILE_NAME
    tls = TlsManager(provider, hostnames=settings.tls.hostnames,
                     rotate_every=settings.attestation.rotate_every_seconds,
                     on_rotate=lambda material: _write_public(cert_path, material.certificate))
    try:
        tls.start()
    except AttestationError as e:
        hint = ""
        if kds is not None or pcs is not None:
            hint = ("\ncube-enclave: the AMD CRL / Intel collateral come from attestation.kds_url / pcs_url (default: the "
                    "host agent's mirror, `cube-host serve`, at 10.0.2.2:7080); start it, point them elsewhere, or set null")
        print(f"cube-enclave: cannot obtain attestation evidence: {e}{hint}", file=sys.stderr)
        return 2
    policy_path = None
    fingerprint = getattr(provider, "fingerprint", None)
    if settings.simulate and fingerprint:
        policy_path = settings.data_dir / SIM_POLICY_FILE_NAME
        policy_path.write_text(sim_policy_yaml(fingerprint))
    token = boot.token if boot else None
    if boot and args.pat_file is not None:
        _write_private(args.pat_file, boot.token + "\n")
    host = settings.listen.host
    shown = "localhost" if host in ("127.0.0.1", "::1", "localhost") else host
    base = f"https://{shown}:{settings.listen.port}"
    print(banner(settings, base=base, cert_path=cert_path, policy_path=policy_path,
                 domain_id=default_domain.id if default_domain else None,
                 token=token, pat_file=args.pat_file, first_start=boot is not None), flush=True)
    app = create_app(settings, extra_routers=[attestation_router(tls, per_connection_rate=settings.attestation.rate_limit)])
    config = uvicorn_config(tls, app, host=host, port=settings.listen.port, log_config=uvicorn_log_config(),
                            proxy_headers=False, server_header=False, timeout_graceful_shutdown=10,
                            http=http_protocol_for(settings.limits))
    try:
        uvicorn.Server(config).run()
    finally:
        tls.stop()
    return 0


def _write_public(path: Path, certificate: Any) -> None:
    """Write the current server certificate (public) for tools that trust it directly, e.g. curl --cacert."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from attestation.fetch import atomic_write

    atomic_write(path, certificate.public_bytes(Encoding.PEM))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
    except ConfigError as e:
        print(f"cube-enclave: configuration error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
