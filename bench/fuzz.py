"""Mutation fuzzing of every attestation parser: only the library's own errors may escape.

    python bench/fuzz.py --iterations N [--seed S] [--only NAME]

Seeds are the real vectors in ../shared/vectors (reports, quotes, TDX event logs, PCK certificates,
collateral, VCEK/VLEK certificates) plus the example policies and a few evidence bundles.  Each input is a seed
mutated by bit flips, byte overwrites, truncation, insertion, duplication of a slice, a splice with
another seed, or plain random bytes.  Any exception that is not an AttestationError is a bug: it is
printed with the input (hex) and the exit status is 1.  Inputs/second per parser are printed.

Besides the parsers, ``verify_snp`` / ``verify_tdx`` run whole verify_evidence() calls on mutated
real evidence: there an "error" verdict (an unexpected exception inside a verifier, caught by
verify_evidence) or an accepted mutation counts as an escape.  ``verify_snp_certs`` /
``verify_tdx_collateral`` do the same with the report or quote intact and one certificate (VCEK, ASK,
ARK) or one collateral file damaged; there only an "error" verdict counts, since some bytes are
legitimately unchecked (a PCK CRL issuer chain, the unused CRL, the unsigned outer copy of a
certificate's signature algorithm).  ``attested_certificate`` mutates the DER of real attested TLS
server certificates (sim evidence in the id-pe-cmw extension) and runs the attested client's
certificate path on them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
VECTORS = ROOT.parent / "shared" / "vectors"

from attestation.errors import AttestationError  # noqa: E402

PCK_EXTENSION_OID = "1.2.840.113741.1.13.1"


@dataclass
class Target:
    name: str
    seeds: list[bytes]
    call: Callable[[bytes], Any]
    count: int = 0
    seconds: float = 0.0
    failures: list[tuple[bytes, str]] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=dict)


def mutate(rng: random.Random, data: bytes, seeds: list[bytes]) -> bytes:
    buf = bytearray(data)
    # Half the inputs keep the seed's length: fixed-size formats then get past their size checks
    # and the field parsers behind them are exercised.
    ops = (0, 1, 7) if rng.random() < 0.5 else tuple(range(8))
    for _ in range(rng.choice((1, 1, 1, 2, 3, 8))):
        op = rng.choice(ops)
        n = len(buf)
        if op == 0 and n:  # bit flip
            i = rng.randrange(n)
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:  # byte overwrite with an interesting value
            buf[rng.randrange(n)] = rng.choice((0x00, 0xFF, 0x7F, 0x80, 0x01, rng.randrange(256)))
        elif op == 2 and n:  # truncate
            del buf[rng.randrange(n):]
        elif op == 3:  # insert random bytes
            i = rng.randrange(n + 1)
            buf[i:i] = rng.randbytes(rng.choice((1, 2, 4, 8, 64)))
        elif op == 4 and n:  # duplicate a slice
            i = rng.randrange(n)
            j = min(n, i + rng.randrange(1, 64))
            buf[i:i] = buf[i:j]
        elif op == 5 and n:  # delete a slice
            i = rng.randrange(n)
            del buf[i:i + rng.randrange(1, 32)]
        elif op == 6:  # splice with another seed
            other = rng.choice(seeds)
            cut = rng.randrange(n + 1)
            ocut = rng.randrange(len(other) + 1)
            buf = buf[:cut] + bytearray(other[ocut:])
        elif op == 7 and n >= 4:  # overwrite a little-endian length-like field
            i = rng.randrange(n - 3)
            buf[i:i + 4] = rng.choice((0, 1, 0xFFFFFFFF, 0x7FFFFFFF, len(buf), rng.randrange(1 << 32))).to_bytes(4, "little")
    return bytes(buf)


def _read(rel: str) -> bytes:
    path = VECTORS / rel
    raw = path.read_bytes()
    if path.suffix == ".hex":
        return bytes.fromhex("".join(raw.decode().split()))
    return raw


def build_targets() -> list[Target]:
    from cryptography import x509

    from attestation.evidence import Evidence, decode_cmw, encode_cmw, evidence_from_json, evidence_to_json
    from attestation.policy import policy_from_yaml
    from attestation.snp.certs import (amd_extension_values, cert_der, load_certificate, load_certificates,
                                       parse_vek_extension_values, parse_vek_extensions)
    from attestation.snp.certtable import build_cert_table, parse_cert_table
    from attestation.snp.report import parse_report
    from attestation.tdx.collateral import parse_qe_identity, parse_tcb_info
    from attestation.tdx.eventlog import boot_state, parse_event_log, replay
    from attestation.tdx.pck import parse_pck_extension
    from attestation.tdx.quote import parse_quote

    reports = [_read(p) for p in ("snp/virtee-sev--report_milan.hex", "snp/go-sev-guest--attestation.bin",
                                  "snp/trustee--test-report.bin", "snp/trustee--test-vlek-report.bin")]
    quotes = [p.read_bytes() for p in sorted((VECTORS / "tdx").glob("*.dat")) + [VECTORS / "tdx/trustee--td-quote.bin"]
              if "nonce" not in p.name]

    pck_values = []
    for q in quotes:
        leaf = parse_quote(q).sig_data.pck_chain[0]
        ext = leaf.extensions.get_extension_for_oid(x509.ObjectIdentifier(PCK_EXTENSION_OID))
        pck_values.append(ext.value.value)

    tcb_infos = sorted({p.read_bytes() for p in (VECTORS / "tdx/collateral").glob("*/tcb_info_*[0-9a-f].json")})
    qe_ids = sorted({p.read_bytes() for p in (VECTORS / "tdx/collateral").glob("*/qe_identity.json")})

    eventlogs = [p.read_bytes() for p in sorted((VECTORS / "tdx/eventlog").glob("*.bin"))]

    def eventlog_call(data: bytes) -> Any:
        log = parse_event_log(data)
        replay(log)
        return boot_state(log)  # BootStateError (an AttestationError) on a duplicate separator

    veks = []
    for rel in ("snp/virtee-sev--vcek_milan.der", "snp/virtee-sev--vcek_turin.der", "snp/trustee--test-vcek.der",
                "snp/trustee--test-vlek.der", "snp/trustee--test-vcek-invalid-new.der"):
        veks.append(amd_extension_values(load_certificate(_read(rel))))
    vek_oids = sorted({oid for v in veks for oid in v})

    certs = [_read("snp/trustee--test-vcek.der")]
    bundles = [
        encode_cmw(Evidence("snp", reports[0], tuple(certs), product="Milan-B0",
                            binding={"scheme": "cube-ai/atls/v1", "nonce": bytes(32)})),
        encode_cmw(Evidence("tdx", quotes[0], collateral={"qe_identity.json": qe_ids[0]})),
    ]
    tables = [build_cert_table({"VCEK": certs[0], "ASK": b"\x30\x82" + bytes(40), "ARK": b"\x30" * 9})]
    policies = [p.read_bytes() for p in sorted((ROOT / "config" / "policies").glob("*.yaml"))]

    # The VEK target mutates one extension value of one real certificate: the input is
    # <index byte><oid index byte><value bytes>, so mutation keeps hitting the value parser.
    vek_seeds = [bytes([i, vek_oids.index(oid)]) + value for i, v in enumerate(veks) for oid, value in v.items()]

    def vek_call(data: bytes) -> Any:
        if len(data) < 2:
            return None
        values = dict(veks[data[0] % len(veks)])
        values[vek_oids[data[1] % len(vek_oids)]] = data[2:]
        return parse_vek_extension_values(values)

    cert_seeds = [_read(rel) for rel in ("snp/virtee-sev--vcek_milan.der", "snp/virtee-sev--vcek_turin.der",
                                         "snp/trustee--test-vlek.der")]

    def vek_cert_call(data: bytes) -> Any:
        return parse_vek_extensions(load_certificate(data))

    json_seeds = [json.dumps(evidence_to_json(decode_cmw(b))).encode() for b in bundles]

    def evidence_json_call(data: bytes) -> Any:
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):
            return None  # not JSON at all: the HTTP layer refuses it before us
        return evidence_from_json(doc)

    # Whole verification of mutated real evidence: verify_evidence never raises, so an "error"
    # verdict (an unexpected exception inside a verifier) is what counts as an escape here.
    from attestation.tdx.collateral import collateral_to_files, load_collateral_dir
    from attestation.verifier import verify_evidence

    snp_certs = tuple(cert_der(c) for rel in ("snp/virtee-sev--vcek_milan.der", "snp/virtee-sev--cert_chain_milan")
                      for c in load_certificates(_read(rel)))
    v5 = _read("tdx/go-tdx-guest--quote_v5_sample.dat")
    v5_files = collateral_to_files(load_collateral_dir(VECTORS / "tdx/collateral/pcs-2026-02", fmspc="90c06f000000"))
    snp_at = datetime(2023, 4, 5, tzinfo=timezone.utc)
    tdx_at = datetime(2026, 2, 3, tzinfo=timezone.utc)

    def tdx_meaning(raw: bytes) -> tuple:
        """What a quote asserts: its signed bytes and signatures, the QE data, and of each PCK certificate
        the signed TBS bytes and the signature value. Quotes that differ only outside that (PEM
        whitespace or base64 padding bits, padding after the signature data, the unused-bits byte of a
        certificate's signature BIT STRING, which cryptography ignores) are the same evidence."""
        q = parse_quote(raw)
        sd = q.sig_data
        return (q.signed_bytes, sd.signature, sd.attestation_key, sd.qe_report.raw, sd.qe_report_signature,
                sd.qe_auth_data, tuple((c.tbs_certificate_bytes, c.signature) for c in sd.pck_chain))

    v5_meaning = tdx_meaning(v5)

    def verify_call(platform: str, data: bytes) -> Any:
        if not data:
            return None
        if platform == "snp":
            evidence = Evidence("snp", data, snp_certs)
            verdict = verify_evidence(evidence, at=snp_at)
        else:
            evidence = Evidence("tdx", data, collateral=v5_files)
            verdict = verify_evidence(evidence, at=tdx_at)
        if verdict.status == "error":
            raise RuntimeError(f"internal verifier fault: {verdict.error}")
        if verdict.ok and data not in (reports[0], v5):
            if platform == "snp" or tdx_meaning(data) != v5_meaning:
                raise RuntimeError("a mutated report was accepted")
        return verdict

    # <slot byte><bytes>: the slot picks which certificate / collateral file the mutated bytes replace.
    collateral_names = sorted(v5_files)

    def verify_snp_certs_call(data: bytes) -> Any:
        if len(data) < 2:
            return None
        certs = list(snp_certs)
        certs[data[0] % len(certs)] = data[1:]
        verdict = verify_evidence(Evidence("snp", reports[0], tuple(certs)), at=snp_at)
        if verdict.status == "error":
            raise RuntimeError(f"internal verifier fault: {verdict.error}")
        return verdict

    def verify_tdx_collateral_call(data: bytes) -> Any:
        if not data:
            return None
        files = dict(v5_files)
        files[collateral_names[data[0] % len(collateral_names)]] = data[1:]
        verdict = verify_evidence(Evidence("tdx", v5, collateral=files), at=tdx_at)
        if verdict.status == "error":
            raise RuntimeError(f"internal verifier fault: {verdict.error}")
        return verdict

    def policy_call(data: bytes) -> Any:
        return policy_from_yaml(data.decode("utf-8", "replace"))

    attested_certs, attested_cert_call = _attested_certificate_target()

    return [
        Target("snp_report", reports, parse_report),
        Target("tdx_quote", quotes, parse_quote),
        Target("tdx_eventlog", eventlogs, eventlog_call),
        Target("pck_extension", pck_values, parse_pck_extension),
        Target("tcb_info_json", tcb_infos, parse_tcb_info),
        Target("qe_identity_json", qe_ids, parse_qe_identity),
        Target("vek_extensions", vek_seeds, vek_call),
        Target("vek_certificate", cert_seeds, vek_cert_call),
        Target("snp_cert_table", tables, parse_cert_table),
        Target("evidence_cmw", bundles, decode_cmw),
        Target("policy_yaml", policies, policy_call),
        Target("evidence_json", json_seeds, evidence_json_call),
        Target("verify_snp", [reports[0]], lambda d: verify_call("snp", d)),
        Target("verify_tdx", [v5], lambda d: verify_call("tdx", d)),
        Target("verify_snp_certs", [bytes([i]) + c for i, c in enumerate(snp_certs)], verify_snp_certs_call),
        Target("verify_tdx_collateral", [bytes([i]) + v5_files[n] for i, n in enumerate(collateral_names)],
               verify_tdx_collateral_call),
        Target("attested_certificate", attested_certs, attested_cert_call),
    ]


def _attested_certificate_target() -> tuple[list[bytes], Callable[[bytes], Any]]:
    """Seeds: DER of real attested server certificates (P-256 and P-384 keys, sim evidence bound to each
    key, made by make_attested_certificate exactly as the enclave makes them). The call runs
    evidence_from_certificate on what cryptography's plain loader accepts (its lazily decoded fields,
    SAN included, still unread), then the attested client's own path: load_der_certificate, the SPKI,
    the CBOR CMW evidence and its binding."""
    import atexit
    import dataclasses
    import os
    import tempfile
    from datetime import timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from attestation.atls.binding import binding_parameters, nonce_from_binding, report_data_for, spki_der_of
    from attestation.atls.certificate import evidence_from_certificate, make_attested_certificate
    from attestation.evidence import decode_cmw, encode_cmw
    from attestation.providers import SimProvider
    from attestation.x509parse import CRYPTOGRAPHY_PARSE_ERRORS, load_der_certificate

    workdir = tempfile.TemporaryDirectory(prefix="cube-fuzz-sim-")
    atexit.register(workdir.cleanup)
    provider = SimProvider(Path(workdir.name) / "sim")
    not_after = datetime.now(timezone.utc) + timedelta(days=1)
    seeds = []
    for curve in (ec.SECP256R1(), ec.SECP384R1()):
        key = ec.generate_private_key(curve)
        nonce = os.urandom(32)
        evidence = provider.get_evidence(report_data_for(spki_der_of(key), nonce))
        cmw = encode_cmw(dataclasses.replace(evidence, binding=binding_parameters(nonce)))
        cert = make_attested_certificate(key, cmw, ["localhost", "127.0.0.1"], not_after)
        seeds.append(cert.public_bytes(serialization.Encoding.DER))

    def client_path(data: bytes) -> Any:
        try:
            lazy = x509.load_der_x509_certificate(data)
        except CRYPTOGRAPHY_PARSE_ERRORS:
            lazy = None  # refused up front: load_der_certificate below must say so as a ParseError
        if lazy is not None:
            try:
                decode_cmw(evidence_from_certificate(lazy))
            except AttestationError:
                pass
        cert = load_der_certificate(data, "server certificate")
        spki_der_of(cert)
        evidence = decode_cmw(evidence_from_certificate(cert))
        return nonce_from_binding(evidence.binding)

    def call(data: bytes) -> Any:
        # The certificate is mostly evidence bytes, so byte-level mutation rarely lands on a tag of the
        # small structures around it (names, SAN, key usage). Each input is therefore also tried with
        # one tag retagged, the position and new tag drawn from a hash of the input (reproducible).
        tags = _der_tag_offsets(data)
        if tags:
            pick = random.Random(hashlib.sha256(data).digest())
            at = pick.choice(tags)
            tag = pick.choice((0x80 | pick.randrange(9), 0xA0 | pick.randrange(9), pick.randrange(256)))
            try:
                client_path(data[:at] + bytes([tag]) + data[at + 1:])
            except AttestationError:
                pass
        return client_path(data)

    return seeds, call


def _der_tag_offsets(data: bytes, start: int = 0, end: int | None = None, depth: int = 0) -> list[int]:
    """Offsets of the tag bytes of every DER TLV in data[start:end], descending into constructed values
    and into OCTET STRINGs whose content is itself DER (X.509 extension values). Best effort: stops at
    the first thing that is not DER."""
    end = len(data) if end is None else end
    found: list[int] = []
    i = start
    while i + 2 <= end and depth < 12:
        tag, first = data[i], data[i + 1]
        if tag & 0x1F == 0x1F:
            break  # multi-byte tags do not occur in certificates
        if first < 0x80:
            length, body = first, i + 2
        else:
            n = first & 0x7F
            if n == 0 or n > 3 or i + 2 + n > end:
                break
            length, body = int.from_bytes(data[i + 2:i + 2 + n], "big"), i + 2 + n
        if body + length > end:
            break
        found.append(i)
        if tag & 0x20 or tag == 0x04:
            inner = _der_tag_offsets(data, body, body + length, depth + 1)
            if tag & 0x20 or (inner and _der_spans(data, body, body + length)):
                found.extend(inner)
        i = body + length
    return found


def _der_spans(data: bytes, start: int, end: int) -> bool:
    """Whether data[start:end] is exactly one DER TLV (so an OCTET STRING holds DER, not opaque bytes)."""
    if end - start < 2:
        return False
    first = data[start + 1]
    if first < 0x80:
        return start + 2 + first == end
    n = first & 0x7F
    return 0 < n <= 3 and start + 2 + n + int.from_bytes(data[start + 2:start + 2 + n], "big") == end


def run(iterations: int, seed: int, only: str | None = None, skip: tuple[str, ...] = ()) -> list[Target]:
    targets = [t for t in build_targets() if (only is None or t.name == only) and t.name not in skip]
    if not targets:
        raise SystemExit(f"no parser named {only!r}")
    rng = random.Random(seed)
    per_target = max(1, iterations // len(targets))
    for target in targets:
        start = time.perf_counter()
        for i in range(per_target):
            if i % 16 == 15:
                data = rng.randbytes(rng.randrange(0, 2048))
            else:
                data = mutate(rng, rng.choice(target.seeds), target.seeds)
            try:
                target.call(data)
            except AttestationError:
                pass
            except Exception as exc:  # noqa: BLE001 - the point of the fuzzer
                kind = f"{type(exc).__module__}.{type(exc).__name__}"
                target.kinds[kind] = target.kinds.get(kind, 0) + 1
                if len(target.failures) < 20:
                    target.failures.append((data, traceback.format_exc(limit=4)))
            target.count += 1
        target.seconds = time.perf_counter() - start
    return targets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=100_000, help="total inputs across all parsers")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--only", help="fuzz one parser by name")
    parser.add_argument("--skip", action="append", default=[], help="leave out a parser (repeatable)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    warnings.simplefilter("ignore")
    logging.getLogger("attestation").setLevel(logging.CRITICAL)  # the verifier logs its internal faults
    targets = run(args.iterations, seed, args.only, tuple(args.skip))
    print(f"seed {seed}")
    print(f"{'parser':<22} {'inputs':>9} {'seconds':>8} {'inputs/s':>10} {'escapes':>8}")
    total = 0
    bad = 0
    for t in targets:
        rate = t.count / t.seconds if t.seconds else float("inf")
        escapes = sum(t.kinds.values())
        print(f"{t.name:<22} {t.count:>9} {t.seconds:>8.2f} {rate:>10.0f} {escapes:>8}")
        for kind, n in sorted(t.kinds.items()):
            print(f"    escaped: {kind} x{n}")
        total += t.count
        bad += escapes
    print(f"total inputs: {total}")
    for t in targets:
        for data, tb in t.failures[:3]:
            print(f"\n[{t.name}] non-library exception for input ({len(data)} bytes) {data[:256].hex()}")
            print(tb)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
