"""``cube-enclave serve``: the enclave service over HTTPS, bootstrapping the first superadmin PAT."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from enclave.config import ConfigError, Settings, check_database_transport, load_settings

if TYPE_CHECKING:   # imported where used: they pull in the store and the web stack
    from collections.abc import Callable

    from enclave.bootstrap import Delivered, PatDelivery
    from enclave.instance import Instance
    from enclave.platform_secrets import PlatformSecrets

CERT_FILE_NAME = "server-cert.pem"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cube-enclave", description="Cube AI enclave service")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the service over HTTPS")
    serve.add_argument("--simulate", action="store_true", help="simulated confidential platform (development)")
    source = serve.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, help="YAML configuration (default config/enclave.yaml)")
    source.add_argument("--initdata", type=Path,
                        help="Confidential Containers: the pod's init-data TOML as the guest sees it; the "
                             "configuration is its [data] entry cube-enclave.yaml, the launch binds its digest")
    serve.add_argument("--host", help="listen address (default from config: 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default from config: 8443)")
    serve.add_argument("--data-dir", type=Path, help="where the SQLite store, server secret and cert PEM live")
    serve.add_argument("--pat-file", type=Path,
                       help="write the bootstrap PAT to this file (0600) instead of printing it; with "
                            "bootstrap.operator_public_key configured, the sealed PAT goes there instead (a launch "
                            "argument never gets the plain key away from the configured operator)")
    serve.add_argument("--backend", action="append", default=[], metavar="KIND=URL",
                       help="with --simulate: serve the models of a running Ollama or vLLM, e.g. "
                            "--backend ollama=http://127.0.0.1:11434 (repeatable; replaces the configured backends)")
    serve.add_argument("--join", action="append", default=[], metavar="https://PEER[:PORT]",
                       help="obtain the platform secrets from a running replica over mutually attested TLS "
                            "(repeatable: tried in order); both sides appraise each other under the join policy")
    return parser


def backends_from_args(values: list[str]) -> list[dict[str, str]]:
    """``KIND=URL`` arguments as backend entries named after their kind (``ollama``, ``ollama-2``, ...)."""
    entries: list[dict[str, str]] = []
    for value in values:
        kind, sep, url = value.partition("=")
        if not sep or kind not in ("ollama", "vllm") or not url:
            raise ConfigError(f"--backend {value!r}: expected KIND=URL with KIND ollama or vllm, e.g. "
                              "ollama=http://127.0.0.1:11434")
        same = sum(1 for entry in entries if entry["kind"] == kind)
        entries.append({"name": kind if not same else f"{kind}-{same + 1}", "kind": kind, "base_url": url})
    return entries


# The settings a launch flag may set outside simulation: where the data lives and where to listen. Everything
# else comes from the configuration file, whose SHA-256 the launch evidence carries (enclave/config_binding.py).
LAUNCH_SETTINGS = frozenset({"data_dir", "listen"})


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
    if args.backend:
        # Where prompts go is part of what a confidential deployment measures (its configuration), never a
        # launch argument the host chooses: the flag exists for development.
        if not args.simulate:
            raise ConfigError("--backend is for development with --simulate; list backends in the configuration")
        overrides["backends"] = backends_from_args(args.backend)
    beyond = sorted(set(overrides) - LAUNCH_SETTINGS - {"simulate"})
    if beyond and not args.simulate:   # fail closed should a flag be added without thinking of the binding
        raise ConfigError(f"launch flags may set only {', '.join(sorted(LAUNCH_SETTINGS))} outside simulation, "
                          f"not {', '.join(beyond)}: put it in the configuration file")
    if getattr(args, "initdata", None) is not None:   # Confidential Containers: enclave/initdata.py
        from enclave.initdata import read_initdata

        initdata = read_initdata(args.initdata)
        return load_settings(initdata.path, environ=environ, overrides=overrides, content=initdata.config,
                             initdata=initdata.binding)
    return load_settings(args.config, environ=environ, overrides=overrides)


def platform_secrets(settings: Settings, provider: Any,
                     obtain: Callable[[], PlatformSecrets] | None = None) -> tuple[PlatformSecrets, str]:
    """The platform secrets (sealed in data_dir, from a peer through ``obtain``, or fresh) and their origin.

    Fresh secrets are refused over a database that holds rows: the sealed state was lost or removed (by the
    host, perhaps), and new secrets would make every row unusable while looking like a working installation.
    """
    from enclave.sealed_state import platform_secrets_for
    from enclave.store import database_in_use, database_tls_context

    in_use = asyncio.run(database_in_use(settings.effective_database_url(), schema=settings.database_schema,
                                         tls=database_tls_context(settings)))
    return platform_secrets_for(settings, provider, obtain=obtain, generate=not in_use)


async def _prepare(settings: Settings, delivery: PatDelivery | None, keys: PlatformSecrets,
                   origin: str) -> tuple[Delivered | None, Any]:
    """Open the store, bootstrap it when empty and hand the PAT over as ``delivery`` says.

    Returns (what the banner says about the PAT or None when the store was initialised already, default domain).
    """
    from enclave.bootstrap import (REFUSAL, BootstrapRefused, bootstrap_if_empty, deliver_or_revoke,
                                   recover_if_locked_out)
    from enclave.sealed_state import FROM_LEGACY
    from enclave.store import open_store

    store = await open_store(settings, keys.row_mac_key())
    try:
        if origin == FROM_LEGACY:   # simulation only: the rows of the installation just migrated
            print(f"cube-enclave: adopted {await store.adopt_rows_without_mac()} rows written before row MACs "
                  "(simulation); API keys issued before this version must be issued again", file=sys.stderr)
        if delivery is None and await store.count_users() == 0:
            raise BootstrapRefused(REFUSAL)
        delivered = None
        pat_key = keys.pat_hmac_key()
        boot = await bootstrap_if_empty(store, settings, pat_key)
        if boot is not None:
            delivered = await deliver_or_revoke(store, boot, delivery, settings)
        elif delivery is not None and (recovery := await recover_if_locked_out(store, settings, pat_key)):
            delivered = await deliver_or_revoke(store, recovery, delivery, settings, what="Recovery")
        domains = await store.list_domains()
        default = next((d for d in domains if d.name == settings.bootstrap.domain_name), None)
        return delivered, default
    finally:
        await store.close()


SIM_POLICY_FILE_NAME = "sim-policy.yaml"


def banner(settings: Settings, *, base: str, cert_path: Path, policy_path: Path | None, domain_id: str | None,
           delivered: Delivered | None) -> str:
    """What to do next. Only attested paths are suggested (cube-attest, cube-admin and the python client, all
    with a policy); curl is shown in simulation mode only, marked as checking no attestation, since its
    --cacert file lies on a disk the host can write."""
    did = domain_id or "<domain-id>"
    mode = "simulation mode: the evidence proves nothing about hardware" if settings.simulate else "confidential mode"
    lines = [f"Cube AI enclave on {base} ({mode})",
             "TLS key generated in memory; its certificate carries evidence bound to it (id-pe-cmw)."]
    if delivered is not None:
        lines += ["", *delivered.lines]
        shell_key, python_key = delivered.shell_key, delivered.python_key
    else:
        lines += ["", "Store already initialised; use an existing API key (export CUBE_TOKEN=...)."]
        shell_key, python_key = "$CUBE_TOKEN", "os.environ['CUBE_TOKEN']"
    lines += ["", f"Domain {settings.bootstrap.domain_name!r} (the bootstrap superadmin administers it): "
                  f"id {did}; `cube-admin ... domains list` lists every domain with its id."]
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
              f"  client = openai_client('{base}/proxy/{did}/v1', api_key={python_key},",
              f"                         policy=load_policy({policy_expr}))",
              "  print([m.id for m in client.models.list()])",
              "", f"Admin CLI (attested): cube-admin --url {base}{policy_arg} --token {shell_key} users list"]
    if settings.simulate:
        lines += ["", "  # curl (simulation only): NO attestation check, it trusts the certificate file as is "
                      "(re-read it after a key rotation)",
                  f'  curl --cacert {cert_path} -H "Authorization: Bearer {shell_key}" {base}/proxy/{did}/v1/models']
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
    from enclave.bootstrap import BootstrapRefused
    from enclave.instance import InstanceError, claim
    from enclave.join.protocol import JoinError
    from enclave.logs import configure_logging

    settings = settings_from_args(args)
    check_database_transport(settings)
    configure_logging(settings.log_level, json_format=settings.log_json)
    try:   # before anything is written: a second instance must leave the running one's files alone
        instance = claim(settings.data_dir, settings.listen.host, settings.listen.port)
    except InstanceError as e:
        print(f"cube-enclave: {e}", file=sys.stderr)
        return 2
    try:
        return _serve_claimed(args, settings, instance)
    except BootstrapRefused as e:
        print(f"cube-enclave: {e}", file=sys.stderr)
        return 2
    except JoinError as e:
        print(f"cube-enclave: join: {e}", file=sys.stderr)
        return 2
    finally:
        instance.release()


def _serve_claimed(args: argparse.Namespace, settings: Settings, instance: Instance) -> int:
    import uvicorn

    from attestation.errors import AttestationError
    from attestation.policy import sim_policy_yaml
    from attestation.providers import EvidenceProvider, detect_provider
    from enclave.app import create_app
    from enclave.attestation_api import attestation_router
    from enclave.bootstrap import choose_delivery
    from enclave.config_binding import ConfigBindingError, enforce_config_binding
    from enclave.limits import http_protocol_for
    from enclave.logs import uvicorn_log_config
    from enclave.join.startup import join_serving, joiner_obtain, peer_policy
    from enclave.sealed_state import SealedStateError
    from enclave.signer import AttestedSigner
    from enclave.tls import TlsManager, uvicorn_config

    delivery = choose_delivery(settings, args.pat_file)
    sim_dir = settings.attestation.sim_dir or settings.data_dir / "sim"
    kds, pcs = _collateral_clients(settings)
    try:
        provider: EvidenceProvider = detect_provider(simulate=settings.simulate, sim_dir=sim_dir, kds=kds, pcs=pcs,
                                                     sim_host_data=_sim_host_data(settings))
    except AttestationError as e:
        print(f"cube-enclave: {e}", file=sys.stderr)
        return 2
    try:
        enforce_config_binding(provider, settings)   # before the store is opened or anything is served
    except ConfigBindingError as e:
        print(f"cube-enclave: refusing to serve: {e}", file=sys.stderr)
        return 2
    except AttestationError as e:
        print(_no_evidence(e, kds, pcs), file=sys.stderr)
        return 2
    obtain: Callable[[], PlatformSecrets] | None = None
    if args.join:   # a new replica: the secrets from an attested peer (never the host or a file); JoinError: serve()
        join_policy = peer_policy(settings, provider, joining=True)
        obtain = joiner_obtain(settings, provider, join_policy, args.join)
    try:   # the provider first: the secrets are sealed under its key
        keys, origin = platform_secrets(settings, provider, obtain=obtain)
    except SealedStateError as e:
        print(f"cube-enclave: {e}", file=sys.stderr)
        return 2
    delivered, default_domain = asyncio.run(_prepare(settings, delivery, keys, origin))
    cert_path = settings.data_dir / CERT_FILE_NAME
    tls = TlsManager(provider, hostnames=settings.tls.hostnames,
                     rotate_every=settings.attestation.rotate_every_seconds,
                     on_rotate=lambda material: _write_public(cert_path, material.certificate))
    try:
        tls.start()
    except AttestationError as e:
        print(_no_evidence(e, kds, pcs), file=sys.stderr)
        return 2
    if not args.join:   # serving joins only: the policy from the evidence in this replica's certificate
        try:
            join_policy = peer_policy(settings, provider, joining=False, own=tls.current.evidence)
        except BaseException:
            tls.stop()
            raise
    policy_path = None
    fingerprint = getattr(provider, "fingerprint", None)
    if settings.simulate and fingerprint:
        policy_path = settings.data_dir / SIM_POLICY_FILE_NAME
        policy_path.write_text(sim_policy_yaml(fingerprint))
    host = settings.listen.host
    shown = "localhost" if host in ("127.0.0.1", "::1", "localhost") else host
    base = f"https://{shown}:{instance.port}"
    print(banner(settings, base=base, cert_path=cert_path, policy_path=policy_path,
                 domain_id=default_domain.id if default_domain else None, delivered=delivered), flush=True)
    join_routers, body_gates = join_serving(settings, join_policy, lambda: keys, kds=kds, pcs=pcs)
    app = create_app(settings, extra_routers=[attestation_router(tls, per_connection_rate=settings.attestation.rate_limit),
                                              *join_routers], body_gates=body_gates, platform_secrets=keys,
                     signer=AttestedSigner(provider))
    config = uvicorn_config(tls, app, host=host, port=settings.listen.port, log_config=uvicorn_log_config(),
                            proxy_headers=False, server_header=False, timeout_graceful_shutdown=10,
                            http=http_protocol_for(settings.limits))
    try:
        uvicorn.Server(config).run(sockets=[instance.socket])
    finally:
        tls.stop()
    return 0


def _sim_host_data(settings: Settings) -> bytes:
    """What the simulated launch puts in HOST_DATA unless CUBE_SIM_HOST_DATA says otherwise: the bound digest."""
    file = settings.config_file
    return file.initdata.launch_value(32) if file.initdata is not None else file.sha256


def _no_evidence(error: Exception, kds: Any, pcs: Any) -> str:
    """The message for evidence that could not be obtained, with where its collateral comes from."""
    hint = ""
    if kds is not None or pcs is not None:
        hint = ("\ncube-enclave: the AMD CRL / Intel collateral come from attestation.kds_url / pcs_url (default: the "
                "host agent's mirror, `cube-host serve`, at 10.0.2.2:7080); start it, point them elsewhere, or set null")
    return f"cube-enclave: cannot obtain attestation evidence: {error}{hint}"


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
