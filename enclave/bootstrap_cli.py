"""The operator's side of the sealed bootstrap PAT: make the X25519 key pair, open the sealed PAT.

    cube-admin bootstrap keygen --out operator.key      # private key (0600); prints the public key
    cube-admin bootstrap open --key operator.key [FILE]  # the PAT, from FILE or standard input

``register`` adds the same two commands under another CLI's sub-parsers (e.g. ``cube-admin bootstrap``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from attestation.keyfile import KeyFileError, read_private_file
from enclave.sealing import SealError, load_private_key, open_sealed, public_key_text


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``bootstrap keygen|open`` to ``sub``; the parsed namespace is run by ``run``."""
    group = sub.add_parser("bootstrap", help="operator key pair and the sealed bootstrap API key")
    actions = group.add_subparsers(dest="bootstrap_action", required=True)
    keygen = actions.add_parser("keygen", help="make an operator X25519 key pair; prints the public key")
    keygen.add_argument("--out", type=Path, required=True, help="private key file to create (0600)")
    opener = actions.add_parser("open", help="print the bootstrap API key sealed to your operator key")
    opener.add_argument("--key", type=Path, required=True, help="operator private key file (0600)")
    opener.add_argument("sealed", type=Path, nargs="?", help="sealed file (default: standard input)")
    return group


def _keygen(out: Path) -> int:
    key = X25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        print(f"cube bootstrap: {out} exists; not overwriting a key", file=sys.stderr)
        return 2
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    print("# add to the enclave's configuration file (part of the measured image):")
    print("bootstrap:")
    print(f"  operator_public_key: {public_key_text(key.public_key())}")
    return 0


def _open(key_file: Path, sealed: Path | None) -> int:
    try:
        key = load_private_key(read_private_file(key_file, "operator private key"))
        blob = sealed.read_text() if sealed is not None else sys.stdin.read()
        print(open_sealed(blob, key).decode())
    except (SealError, KeyFileError, UnicodeDecodeError) as e:
        print(f"cube bootstrap: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"cube bootstrap: cannot read {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    return 0


def run(args: argparse.Namespace) -> int:
    if args.bootstrap_action == "keygen":
        return _keygen(args.out)
    return _open(args.key, args.sealed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cube-admin bootstrap",
                                     description="operator key pair and the sealed bootstrap API key")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    return run(parser.parse_args(["bootstrap", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
