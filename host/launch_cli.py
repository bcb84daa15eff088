"""``cube-host measure`` and ``cube-host qemu-cmd``: operator tooling for booting the enclave VM.

    cube-host image build [--config enclave.yaml] [--out DIR] [--simulate] [--source-date-epoch N]
    cube-host measure --ovmf OVMF.fd --image DIR --vcpus N [--policy-out FILE]   (kernel, initrd, command line
                      and HOST_DATA from the image's manifest)
    cube-host measure --ovmf OVMF.fd [--kernel K --initrd I --append TEXT] --vcpus N
                      [--vcpu-type EPYC-v4] [--guest-features 0x1] [--policy-out FILE [--force]]
                      [--firmware-only]   (needed for --policy-out without --kernel: not for production)
    cube-host measure --tdx --ovmf OVMF.fd (--image DIR | --kernel K [--initrd I --append TEXT]) --memory 8G
                      [--config FILE] [--page-order single|two-pass] [--json] [--policy-out FILE [--force]]
    cube-host qemu-cmd --platform snp|tdx|sim --ovmf OVMF.fd [--image DIR | --kernel ...] --memory 8G --vcpus 4
                      [--vsock-cid N] [--forward HOSTPORT:GUESTPORT ...] [--disk FILE] [--json] [--measure]

Both only compute and print; neither starts a VM. Errors are LaunchError (a ValueError), which
``host.cli`` turns into exit code 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .image import BuiltImage, load_image
from .launch import PortForward, VmSpec, parse_memory_mib, qemu_argv, shell_line
from .measure_tdx import add_tdx_measure_options, run_measure_tdx
from .measure import (
    DEFAULT_GUEST_FEATURES,
    DEFAULT_VCPU_TYPE,
    LaunchError,
    SnpLaunch,
    snp_measurement,
    snp_policy_yaml,
    write_policy,
)


def _int_auto(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (use 0x.. for hex)") from None


def _add_snp_inputs(p: argparse.ArgumentParser, *, ovmf_required: bool = True, vcpus_required: bool = True) -> None:
    p.add_argument("--ovmf", type=Path, required=ovmf_required, help="OVMF firmware image (SEV/SNP build for snp)")
    p.add_argument("--image", type=Path, default=None,
                   help="a built image's directory (`cube-host image build`): its kernel, initrd, command line "
                        "and configuration digest (HOST_DATA / MRCONFIGID)")
    p.add_argument("--kernel", type=Path, default=None)
    p.add_argument("--initrd", type=Path, default=None)
    p.add_argument("--append", default=None, help="kernel command line")
    p.add_argument("--vcpus", type=_int_auto, required=vcpus_required)
    p.add_argument("--vcpu-type", default=DEFAULT_VCPU_TYPE, help="QEMU -cpu model the VMSAs are measured with")
    p.add_argument("--guest-features", type=_int_auto, default=DEFAULT_GUEST_FEATURES,
                   help="SEV_FEATURES of the VMSAs (default 0x1; e.g. 0x21 when the host enables DebugSwap)")


def add_launch_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p_measure = sub.add_parser("measure", help="expected SEV-SNP launch measurement or, with --tdx, MRTD and TDX "
                                               "boot events (and a policy pinning them)")
    _add_snp_inputs(p_measure, vcpus_required=False)  # SNP needs --vcpus (checked); TDX does not use it
    add_tdx_measure_options(p_measure)
    p_measure.add_argument("--policy-out", type=Path, default=None, help="write a ready SNP policy YAML here")
    p_measure.add_argument("--policy-name", default=None,
                           help="policy name (default snp-enclave; snp-firmware-only with --firmware-only)")
    p_measure.add_argument("--firmware-only", action="store_true",
                           help="without --kernel: write the firmware-only policy anyway, marked not for production "
                                "(the attested client refuses it unless allow_unmeasured: true is added)")
    p_measure.add_argument("--force", action="store_true", help="replace an existing --policy-out file")

    p_qemu = sub.add_parser("qemu-cmd", help="print the QEMU command line for the enclave VM (never runs it)")
    p_qemu.add_argument("--platform", choices=["snp", "tdx", "sim"], required=True,
                        help="sim: a plain VM for machines without SEV-SNP/TDX (its evidence proves nothing)")
    _add_snp_inputs(p_qemu, ovmf_required=False)
    p_qemu.add_argument("--memory", default="8G", help="guest RAM, e.g. 8G or 10240M")
    p_qemu.add_argument("--disk", type=Path, default=None,
                        help="raw data disk (virtio; the image keeps only its state there, never code)")
    p_qemu.add_argument("--accel", choices=["kvm", "tcg"], default="kvm", help="tcg: software emulation (sim only)")
    p_qemu.add_argument("--vsock-cid", type=_int_auto, default=None)
    p_qemu.add_argument("--forward", action="append", default=[], metavar="HOSTPORT:GUESTPORT",
                        help="user-mode network port forward on 127.0.0.1 (repeatable)")
    p_qemu.add_argument("--qgs-port", type=_int_auto, default=4050, help="TDX quote generation service vsock port")
    p_qemu.add_argument("--name", default="cube-ai-vm")
    p_qemu.add_argument("--qemu", default="qemu-system-x86_64", help="QEMU binary to name in the command")
    p_qemu.add_argument("--json", action="store_true", help='print {"argv": [...], "measurement": ...}')
    p_qemu.add_argument("--measure", action="store_true", help="also print the expected SNP measurement")


def _image(args: argparse.Namespace) -> BuiltImage | None:
    """The image of ``--image``, which then decides kernel, initrd and command line (none may be given too)."""
    if args.image is None:
        return None
    given = [flag for flag, value in (("--kernel", args.kernel), ("--initrd", args.initrd), ("--append", args.append))
             if value is not None]
    if given:
        raise LaunchError(f"--image: {', '.join(given)} cannot be combined with it (the image's manifest decides "
                          "kernel, initrd and command line, which the measurement covers)")
    image = load_image(args.image)
    args.kernel, args.initrd, args.append = image.kernel, image.initrd, image.cmdline
    return image


def _snp_launch(args: argparse.Namespace) -> SnpLaunch:
    return SnpLaunch(ovmf=args.ovmf, vcpus=args.vcpus, vcpu_type=args.vcpu_type, kernel=args.kernel,
                     initrd=args.initrd, append=args.append, guest_features=args.guest_features)


def run_measure(args: argparse.Namespace) -> int:
    image = _image(args)
    if args.tdx:
        return run_measure_tdx(args, config_sha256=image.host_data if image is not None else None)
    launch = _snp_launch(args)
    measurement = snp_measurement(launch)
    if args.policy_out is not None:
        write_policy(args.policy_out, snp_policy_yaml(measurement, launch, name=args.policy_name,
                                                      firmware_only=args.firmware_only,
                                                      host_data=image.host_data if image else None),
                     overwrite=args.force)
    print(measurement.hex())
    return 0


def run_qemu_cmd(args: argparse.Namespace) -> int:
    image = _image(args)
    if image is not None and image.simulate != (args.platform == "sim"):
        raise LaunchError(f"--image {args.image}: built {'with' if image.simulate else 'without'} --simulate, so it "
                          f"boots with --platform {'sim' if image.simulate else 'snp or tdx'} only")
    if args.measure and args.platform != "snp":
        raise LaunchError("--measure: only SNP launch measurements can be precomputed here "
                          "(a TD's MRTD comes from the TDX module; read it from a quote)")
    spec = VmSpec(platform=args.platform, ovmf=args.ovmf, memory_mib=parse_memory_mib(args.memory),
                  vcpus=args.vcpus, kernel=args.kernel, initrd=args.initrd, append=args.append,
                  vcpu_type=args.vcpu_type, guest_features=args.guest_features, disk=args.disk,
                  vsock_cid=args.vsock_cid, forwards=tuple(PortForward.parse(f) for f in args.forward),
                  name=args.name, qemu=args.qemu, qgs_port=args.qgs_port, accel=args.accel,
                  host_data=image.host_data if image is not None and args.platform != "sim" else None)
    argv = qemu_argv(spec)
    measurement = snp_measurement(spec.snp_launch()).hex() if args.measure else None
    if args.json:
        print(json.dumps({"platform": args.platform, "argv": argv, "measurement": measurement}, indent=1))
    else:
        if measurement is not None:
            print(f"# expected SNP launch measurement: {measurement}")
        print(shell_line(argv))
    return 0


def add_image_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    from .image_build import DEFAULT_DATA_DEVICE, DEFAULT_EPOCH, DEFAULT_KERNEL_PACKAGE, default_project

    p_image = sub.add_parser("image", help="build the enclave VM image (kernel + initramfs holding the app)")
    image_sub = p_image.add_subparsers(dest="image_command", required=True)
    p_build = image_sub.add_parser("build", help="build it (Debian apt/dpkg-deb and pip; reproducible)")
    project = default_project()
    p_build.add_argument("--config", type=Path, default=project / "image" / "enclave.yaml",
                         help="the enclave configuration baked in (its SHA-256 becomes HOST_DATA)")
    p_build.add_argument("--out", type=Path, default=project / "image" / "out")
    p_build.add_argument("--simulate", action="store_true",
                         help="cube.simulate=1 on the command line: the simulated platform, for machines without "
                              "SEV-SNP/TDX (the evidence then proves nothing)")
    p_build.add_argument("--data-device", default=DEFAULT_DATA_DEVICE, help="the data disk as the guest sees it")
    p_build.add_argument("--kernel-package", default=DEFAULT_KERNEL_PACKAGE)
    p_build.add_argument("--source-date-epoch", type=int, default=None,
                         help=f"file times in the image (default $SOURCE_DATE_EPOCH, else {DEFAULT_EPOCH})")
    p_build.add_argument("--deb-cache", type=Path, default=None, help="where downloaded .deb files are kept")


def run_image_build(args: argparse.Namespace) -> int:
    import os

    from .image_build import DEFAULT_EPOCH, ImageRecipe, build_image, default_project

    epoch = args.source_date_epoch
    if epoch is None:
        epoch = int(os.environ.get("SOURCE_DATE_EPOCH", DEFAULT_EPOCH))
    manifest = build_image(ImageRecipe(config=args.config, out=args.out, project=default_project(),
                                       simulate=args.simulate, data_device=args.data_device,
                                       kernel_package=args.kernel_package, source_date_epoch=epoch,
                                       deb_cache=args.deb_cache))
    print(json.dumps({k: manifest[k] for k in ("image_id", "kernel", "initrd", "cmdline", "config")}, indent=1))
    return 0


def run_launch_command(args: argparse.Namespace) -> int:
    if args.command == "image":
        return run_image_build(args)
    if args.command == "measure":
        return run_measure(args)
    return run_qemu_cmd(args)
