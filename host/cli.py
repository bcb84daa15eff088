"""``cube-host``: the host agent's command line.

    cube-host relay --listen 0.0.0.0:8443 --target tcp:10.0.0.2:8443|vsock:3:8443 [--target ...] [limits]
                    [--control SOCKET]   several targets: least connections among the healthy ones
    cube-host relay drain|resume|add|remove|status [TARGET] --control SOCKET [--wait S] [--json]
    cube-host serve --config config/host.yaml       verification API + collateral cache (+ relay if configured)
    cube-host status [--config FILE] [--policy NAME] [--enclave ID] [--json]
    cube-host measure --ovmf FILE [--kernel K --initrd I --append TEXT] --vcpus N [--policy-out FILE]
    cube-host qemu-cmd --platform snp|tdx|sim --ovmf FILE ... [--json] [--measure]   (prints, never runs QEMU)
    cube-host image build [--config FILE] [--out DIR] [--simulate]   (the enclave VM image; see host/image_build.py)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from attestation.errors import PolicyError

from .config import ConfigError, HealthSettings, HostConfig, RelaySettings, load_config
from .relay import HealthCheck, Relay, RelayError, RelayLimits, parse_listen, parse_target

if TYPE_CHECKING:  # pragma: no cover
    from .relay_control import ControlServer

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "host.yaml"
log = logging.getLogger("cube.host")


def _raise_fd_limit() -> None:
    """Each relayed connection holds two sockets (and two pipes with the splice pump)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = hard if hard != resource.RLIM_INFINITY else 1 << 16
        if soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):
        pass


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass


def _make_relay(settings: RelaySettings) -> Relay:
    from .metrics import RELAYS

    health = settings.health
    check = None if health.probe == "none" else HealthCheck(
        probe=health.probe, interval=health.interval, timeout=health.timeout,
        unhealthy_after=health.unhealthy_after, healthy_after=health.healthy_after)
    relay = Relay(parse_listen(settings.listen), [parse_target(t) for t in settings.all_targets()],
                  RelayLimits(max_connections=settings.max_connections, max_per_source=settings.max_per_source,
                              max_per_network=settings.max_per_network,
                              connect_timeout=settings.connect_timeout,
                              first_byte_timeout=settings.first_byte_timeout, idle_timeout=settings.idle_timeout,
                              half_close_timeout=settings.half_close_timeout, buffer_bytes=settings.buffer_bytes),
                  pump=settings.pump, health=check)
    RELAYS.relays.append(relay)
    return relay


async def _start_control(relay: Relay, settings: RelaySettings) -> "ControlServer | None":
    if settings.control_socket is None:
        return None
    from .relay_control import ControlServer

    control = ControlServer(relay, settings.control_socket)
    await control.start()
    return control


async def _run_relay(settings: RelaySettings, metrics_listen: str | None) -> None:
    relay = _make_relay(settings)
    if metrics_listen:
        from prometheus_client import start_http_server

        from .metrics import REGISTRY

        host, port = parse_listen(metrics_listen)
        start_http_server(port, addr=host, registry=REGISTRY)
    stop = asyncio.Event()
    _stop_on_signals(stop)
    address = await relay.start()
    control = await _start_control(relay, settings)
    print(f"cube-host relay: {address[0]}:{address[1]} -> {', '.join(settings.all_targets())} ({relay.pump} pump, "
          f"max {settings.max_connections} connections)", flush=True)
    await stop.wait()
    print(f"cube-host relay: stopping, draining for up to {settings.shutdown_grace:g}s", flush=True)
    if control is not None:
        await control.stop()
    await relay.stop(settings.shutdown_grace)


async def _serve(config: HostConfig) -> None:
    import uvicorn

    from .verify_service import create_app

    app = create_app(config)
    host, port = parse_listen(config.listen)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False,
                                           lifespan="on", loop="none"))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    stop = asyncio.Event()
    _stop_on_signals(stop)
    relay = _make_relay(config.relay) if config.relay is not None else None
    control = None
    if relay is not None:
        address = await relay.start()
        control = await _start_control(relay, config.relay)  # type: ignore[arg-type]
        print(f"cube-host relay: {address[0]}:{address[1]} -> {', '.join(config.relay.all_targets())}",  # type: ignore[union-attr]
              flush=True)
    serving = asyncio.ensure_future(server.serve())
    print(f"cube-host serve: http://{host}:{port} (policies: {', '.join(config.policies)}; "
          f"verification results are advisory: the host is not trusted)", flush=True)
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({serving, stopper}, return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    if control is not None:
        await control.stop()
    if relay is not None:
        await relay.stop(config.relay.shutdown_grace)  # type: ignore[union-attr]
    await serving
    stopper.cancel()


def _print_status(state: dict, policy: str | None, enclave: str | None, as_json: bool) -> int:
    policies = state.get("policies", {})
    if policy is not None:
        if policy not in policies:
            print(f"nothing verified yet for policy {policy!r}", file=sys.stderr)
            return 1
        policies = {policy: policies[policy]}
    rows = []
    for name, slot in policies.items():
        entries = list(slot.get("enclaves", {}).values()) if enclave is None else \
            [e for e in slot.get("enclaves", {}).values() if e.get("enclave") == enclave]
        for entry in reversed(entries):
            rows.append({"policy": name, **entry})
    if enclave is not None and not rows:
        print(f"nothing verified yet for enclave {enclave!r}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("nothing verified yet")
        return 0
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        for r in rows:
            print(f"{r['policy']}\t{r['enclave']}\t{r['ear_status']}\t{r['at']}\t{r.get('error') or ''}")
        return 0
    table = Table(title="last verification per policy and enclave (advisory: the host is not trusted)")
    for col in ("policy", "enclave", "status", "verdict", "when", "error"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["policy"], r["enclave"], r["ear_status"], str(r.get("verdict")), r["at"], r.get("error") or "")
    Console().print(table)
    return 0


def _relay_action(args: argparse.Namespace) -> int:
    """``cube-host relay drain|resume|add|remove|status``: one request to a running relay's control socket."""
    from .relay_control import ControlError, control_request

    request: dict = {"op": args.relay_action}
    if args.relay_action != "status":
        request["target"] = args.action_target
    if args.relay_action == "drain" and args.wait:
        request["wait"] = args.wait
    try:
        answer = control_request(args.action_control, request)
    except ControlError as exc:
        print(f"cube-host: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(answer, indent=1))
    elif answer.get("ok"):
        for t in answer.get("targets", []):
            print(f"{t['target']}\t{t['state']}\t{t['open']} open\t{t['connections']} total")
    if not answer.get("ok"):
        print(f"cube-host: relay refused: {answer.get('error')}", file=sys.stderr)
        return 1
    if answer.get("open"):
        print(f"cube-host: {args.action_target} still has {answer['open']} open connections", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cube-host", description="Cube AI host agent (untrusted host side)")
    sub = parser.add_subparsers(dest="command", required=True)

    p_relay = sub.add_parser("relay", help="relay raw TCP from a public address to the enclave")
    p_relay.add_argument("--listen", default="0.0.0.0:8443")
    p_relay.add_argument("--target", action="append", default=[],
                         help="tcp:HOST:PORT or vsock:CID:PORT (repeat for several replicas)")
    p_relay.add_argument("--max-connections", type=int, default=1024)
    p_relay.add_argument("--max-per-source", type=int, default=64, help="open connections per client address")
    p_relay.add_argument("--max-per-network", type=int, default=256, help="open connections per IPv6 /48")
    p_relay.add_argument("--connect-timeout", type=float, default=5.0)
    p_relay.add_argument("--first-byte-timeout", type=float, default=10.0)
    p_relay.add_argument("--idle-timeout", type=float, default=300.0)
    p_relay.add_argument("--half-close-timeout", type=float, default=30.0)
    p_relay.add_argument("--buffer-bytes", type=int, default=1 << 20)
    p_relay.add_argument("--pump", choices=["splice", "copy", "streams"], default=None)
    p_relay.add_argument("--grace", type=float, default=10.0, help="seconds to drain on shutdown")
    p_relay.add_argument("--metrics", default=None, metavar="HOST:PORT", help="serve /metrics there")
    p_relay.add_argument("--health-probe", choices=["tcp", "tls", "none"], default="tcp",
                         help="probe targets with a TCP connect or a TLS handshake (not judged: the client attests)")
    p_relay.add_argument("--health-interval", type=float, default=2.0)
    p_relay.add_argument("--health-timeout", type=float, default=2.0, help="seconds a probe may take")
    p_relay.add_argument("--unhealthy-after", type=int, default=3, help="failures in a row before leaving")
    p_relay.add_argument("--healthy-after", type=int, default=2, help="good probes in a row before returning")
    p_relay.add_argument("--control", type=Path, default=None, metavar="SOCKET",
                         help="Unix socket (owner-only) for drain/resume/add/remove/status")
    actions = p_relay.add_subparsers(dest="relay_action", metavar="ACTION")
    for action, what in (("drain", "no new connections to TARGET; open ones finish"),
                         ("resume", "put a drained TARGET back in the rotation"),
                         ("add", "add a TARGET"), ("remove", "remove a drained TARGET with no open connection"),
                         ("status", "list the targets")):
        p_action = actions.add_parser(action, help=what)
        if action != "status":
            p_action.add_argument("action_target", metavar="TARGET")
        p_action.add_argument("--control", dest="action_control", type=Path, required=True, metavar="SOCKET")
        p_action.add_argument("--json", action="store_true")
        if action == "drain":
            p_action.add_argument("--wait", type=float, default=0.0,
                                  help="seconds to wait for its open connections to finish")

    p_serve = sub.add_parser("serve", help="verification API, collateral cache, health and metrics")
    p_serve.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p_serve.add_argument("--listen", default=None, help="override the config's listen HOST:PORT")

    p_status = sub.add_parser("status", help="what the agent verified last, and when")
    p_status.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p_status.add_argument("--data-dir", type=Path, default=None)
    p_status.add_argument("--policy", default=None)
    p_status.add_argument("--enclave", default=None, help="e.g. snp:<measurement hex>")
    p_status.add_argument("--json", action="store_true")

    from .launch_cli import add_image_commands, add_launch_commands, run_launch_command

    add_launch_commands(sub)
    add_image_commands(sub)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "relay" and args.relay_action:
            return _relay_action(args)
        if args.command == "relay":
            if not args.target:
                raise ConfigError("relay: give --target (repeat it for several replicas)")
            health = HealthSettings(probe=args.health_probe, interval=args.health_interval, timeout=args.health_timeout,
                                    unhealthy_after=args.unhealthy_after, healthy_after=args.healthy_after)
            settings = RelaySettings(listen=args.listen, targets=args.target, health=health,
                                     control_socket=args.control, max_connections=args.max_connections,
                                     max_per_source=args.max_per_source, max_per_network=args.max_per_network,
                                     connect_timeout=args.connect_timeout,
                                     first_byte_timeout=args.first_byte_timeout, idle_timeout=args.idle_timeout,
                                     half_close_timeout=args.half_close_timeout, buffer_bytes=args.buffer_bytes,
                                     pump=args.pump, shutdown_grace=args.grace)
            parse_listen(settings.listen)
            for target in settings.all_targets():
                parse_target(target)
            _raise_fd_limit()
            _install_uvloop()
            asyncio.run(_run_relay(settings, args.metrics))
            return 0
        if args.command == "serve":
            config = load_config(args.config)
            if args.listen:
                parse_listen(args.listen)
                config.listen = args.listen
            _raise_fd_limit()
            _install_uvloop()
            asyncio.run(_serve(config))
            return 0
        if args.command == "status":
            from .status import read_status

            data_dir = args.data_dir or load_config(args.config).data_dir
            return _print_status(read_status(data_dir), args.policy, args.enclave, args.json)
        if args.command in ("measure", "qemu-cmd", "image"):
            return run_launch_command(args)
    except (ConfigError, RelayError, PolicyError, ValueError) as exc:
        print(f"cube-host: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"cube-host: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
