"""Evidence bundles: one self-describing CBOR object carrying everything a verifier needs.

Wire form (IETF RATS CMW, draft-ietf-rats-msg-wrap, "cbor-record")::

    [ "application/vnd.cube-ai.evidence+cbor", bstr .cbor payload, 4 ]      ; ind 4 = evidence

The payload is a CBOR map with text keys::

    {
      "v": 1,                              ; format version (EVIDENCE_FORMAT_VERSION)
      "platform": "snp" | "tdx" | "sim",
      "report": bstr,                      ; SNP/sim report or TDX quote
      ? "certificates": [* bstr],          ; DER: VEK, ASK|ASVK, ARK (SNP/sim)
      ? "collateral": {* text => bstr},    ; TDX: collateral_to_files() names and "ccel.bin"; SNP/sim: "crl.der" only
      ? "product": text,
      ? "binding": {* text => bstr / text / uint / bool},   ; e.g. scheme + nonce
    }

Decoding is strict: a size limit, definite lengths only, no duplicate keys, no tags, exact
types, bounded list/map lengths, unknown keys refused.  Any malformed input raises
EvidenceError and nothing else.

The JSON form (for ``Accept: application/json``) carries the same fields with bytes as
standard base64; binding values that are bytes are written as ``{"base64": "..."}`` so they
stay distinguishable from text.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import cbor2

from .errors import EvidenceError

EVIDENCE_MEDIA_TYPE = "application/vnd.cube-ai.evidence+cbor"
EVIDENCE_FORMAT_VERSION = 1
CMW_IND_EVIDENCE = 4  # CMW "ind" bitmask: bit 2 = evidence

MAX_EVIDENCE_BYTES = 256 * 1024
MAX_REPORT_BYTES = 64 * 1024
MAX_CERTIFICATES = 8
MAX_CERTIFICATE_BYTES = 16 * 1024
MAX_COLLATERAL_FILES = 16
MAX_COLLATERAL_FILE_BYTES = 128 * 1024
MAX_BINDING_ENTRIES = 8
MAX_BINDING_BYTES = 1024
MAX_BINDING_TEXT = 256
MAX_PRODUCT_CHARS = 64
_MAX_DEPTH = 8

PLATFORMS = ("snp", "tdx", "sim")
_COLLATERAL_NAME = re.compile(r"[a-z0-9_]{1,64}\.(json|txt|crl|pem|der|bin)")
_BINDING_KEY = re.compile(r"[a-z0-9_.-]{1,32}")
_PRODUCT = re.compile(r"[A-Za-z0-9 ()_.,+-]{1,%d}" % MAX_PRODUCT_CHARS)
SNP_CRL_FILE = "crl.der"  # SNP/sim collateral: the KDS CRL of the product (DER, signed by the ARK)
# TDX: the CC event log (ACPI CCEL area, trailing padding removed). Unauthenticated by itself: its only
# authority is that it replays to the quote's signed RTMRs, which the verifier checks whenever it is present.
TDX_CCEL_FILE = "ccel.bin"
_PAYLOAD_KEYS = frozenset({"v", "platform", "report", "certificates", "collateral", "product", "binding"})


@dataclass(frozen=True)
class Evidence:
    """Attestation evidence from one platform, ready to be verified anywhere."""

    platform: str
    report: bytes
    certificates: tuple[bytes, ...] = ()
    collateral: Mapping[str, bytes] = field(default_factory=dict)
    product: str | None = None
    binding: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Normalise containers to immutable forms and validate everything once, here, so an
        # Evidence object is valid by construction whether built locally or decoded.
        if isinstance(self.certificates, (list, tuple)):
            object.__setattr__(self, "certificates", tuple(self.certificates))
        if isinstance(self.collateral, Mapping):
            object.__setattr__(self, "collateral", MappingProxyType(dict(self.collateral)))
        if isinstance(self.binding, Mapping):
            object.__setattr__(self, "binding", MappingProxyType(dict(self.binding)))
        _validate(self)

    def to_payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = {"v": EVIDENCE_FORMAT_VERSION, "platform": self.platform, "report": bytes(self.report)}
        if self.certificates:
            payload["certificates"] = [bytes(c) for c in self.certificates]
        if self.collateral:
            payload["collateral"] = {k: bytes(v) for k, v in self.collateral.items()}
        if self.product is not None:
            payload["product"] = self.product
        if self.binding:
            payload["binding"] = dict(self.binding)
        return payload


def _is_bytes(value: Any) -> bool:
    return type(value) is bytes


def _check_blob(value: Any, label: str, limit: int, *, may_be_empty: bool = False) -> None:
    if not _is_bytes(value) or not (value or may_be_empty):
        raise EvidenceError(f"{label}: must be {'bytes' if may_be_empty else 'non-empty bytes'}")
    if len(value) > limit:
        raise EvidenceError(f"{label}: {len(value)} bytes exceeds the limit of {limit}")


def _check_count(items: Any, label: str, limit: int, unit: str = "entries") -> None:
    if len(items) > limit:
        raise EvidenceError(f"{label}: more than {limit} {unit}")


def _validate(e: Evidence) -> None:
    if type(e.platform) is not str or e.platform not in PLATFORMS:
        raise EvidenceError(f"platform: must be one of {', '.join(PLATFORMS)}, got {e.platform!r:.40}")
    _check_blob(e.report, "report", MAX_REPORT_BYTES)
    if type(e.certificates) is not tuple:
        raise EvidenceError("certificates: must be a sequence of DER bytes")
    _check_count(e.certificates, "certificates", MAX_CERTIFICATES)
    for i, cert in enumerate(e.certificates):
        _check_blob(cert, f"certificates[{i}]", MAX_CERTIFICATE_BYTES)
    if not isinstance(e.collateral, Mapping):
        raise EvidenceError("collateral: must be a mapping of file name to bytes")
    _check_count(e.collateral, "collateral", MAX_COLLATERAL_FILES, "files")
    for name, blob in e.collateral.items():
        if type(name) is not str or not _COLLATERAL_NAME.fullmatch(name):
            raise EvidenceError(f"collateral: bad file name {name!r:.80}")
        _check_blob(blob, f"collateral[{name}]", MAX_COLLATERAL_FILE_BYTES, may_be_empty=True)
    if e.platform != "tdx" and not set(e.collateral) <= {SNP_CRL_FILE}:
        raise EvidenceError(f"collateral: {e.platform} evidence carries at most the AMD CRL ({SNP_CRL_FILE!r})")
    if e.product is not None and (type(e.product) is not str or not _PRODUCT.fullmatch(e.product)):
        raise EvidenceError(f"product: must be up to {MAX_PRODUCT_CHARS} plain characters, got {e.product!r:.80}")
    if not isinstance(e.binding, Mapping):
        raise EvidenceError("binding: must be a mapping")
    _check_count(e.binding, "binding", MAX_BINDING_ENTRIES)
    for key, value in e.binding.items():
        if type(key) is not str or not _BINDING_KEY.fullmatch(key):
            raise EvidenceError(f"binding: bad key {key!r:.80}")
        if type(value) is bool:
            continue
        if type(value) is int:
            if not 0 <= value < 2**63:
                raise EvidenceError(f"binding[{key}]: integer out of range")
        elif type(value) is bytes:
            if len(value) > MAX_BINDING_BYTES:
                raise EvidenceError(f"binding[{key}]: more than {MAX_BINDING_BYTES} bytes")
        elif type(value) is str:
            if len(value) > MAX_BINDING_TEXT:
                raise EvidenceError(f"binding[{key}]: more than {MAX_BINDING_TEXT} characters")
        else:
            raise EvidenceError(f"binding[{key}]: must be bytes, text, an unsigned integer or a boolean")


class _TagRefused(Exception):
    pass


def _refuse_tag(decoder: Any, tag: Any = None) -> Any:
    raise _TagRefused()


# Tags cbor2 decodes natively (dates, bignums, sets, self-describe, ...) are refused like any other
# tag: none belongs in an evidence bundle.
_REFUSE_NATIVE_TAGS = {n: _refuse_tag for n in (*range(0, 300), *range(1000, 1010), 55799)}


def _strict_cbor(data: bytes, what: str) -> Any:
    """Decode exactly one CBOR item: definite lengths, no duplicate keys, no trailing bytes, no tags."""

    fp = io.BytesIO(data)
    try:
        decoder = cbor2.CBORDecoder(
            fp,
            tag_hook=_refuse_tag,
            semantic_decoders=_REFUSE_NATIVE_TAGS,
            max_depth=_MAX_DEPTH,
            allow_indefinite=False,
            allow_duplicate_keys=False,
            strict_hashable_types=True,
        )
        value = decoder.decode()
    except _TagRefused:
        raise EvidenceError(f"{what}: CBOR tags are not allowed") from None
    except RecursionError:
        raise EvidenceError(f"{what}: nested too deeply") from None
    except Exception as exc:  # cbor2 raises CBORDecodeError and, for odd inputs, ValueError etc.
        # cbor2 may wrap the refusal raised from a hook
        if isinstance(exc.__cause__ or exc.__context__, _TagRefused):
            raise EvidenceError(f"{what}: CBOR tags are not allowed") from None
        raise EvidenceError(f"{what}: not well-formed CBOR ({type(exc).__name__}: {str(exc)[:120]})") from None
    if fp.tell() != len(data):
        raise EvidenceError(f"{what}: {len(data) - fp.tell()} trailing bytes after the CBOR item")
    return value


def encode_cmw(evidence: Evidence) -> bytes:
    """Evidence -> CBOR CMW record ``[media-type, bstr, 4]``."""
    payload = cbor2.dumps(evidence.to_payload(), canonical=True)
    record = cbor2.dumps([EVIDENCE_MEDIA_TYPE, payload, CMW_IND_EVIDENCE])
    if len(record) > MAX_EVIDENCE_BYTES:
        raise EvidenceError(f"evidence: {len(record)} bytes exceeds the limit of {MAX_EVIDENCE_BYTES}")
    return record


def decode_cmw(data: bytes) -> Evidence:
    """CBOR CMW record -> Evidence; strict, EvidenceError on anything off."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise EvidenceError("evidence: must be bytes")
    data = bytes(data)
    if not data:
        raise EvidenceError("evidence: empty")
    if len(data) > MAX_EVIDENCE_BYTES:
        raise EvidenceError(f"evidence: {len(data)} bytes exceeds the limit of {MAX_EVIDENCE_BYTES}")
    record = _strict_cbor(data, "CMW record")
    if type(record) is not list or len(record) != 3:
        raise EvidenceError("CMW record: must be an array [media-type, value, ind]")
    media_type, value, ind = record
    if type(media_type) is not str:
        raise EvidenceError("CMW record: media type must be text")
    if media_type != EVIDENCE_MEDIA_TYPE:
        raise EvidenceError(f"CMW record: unsupported media type {media_type!r:.80}")
    if type(value) is not bytes:
        raise EvidenceError("CMW record: value must be a byte string")
    if type(ind) is not int or ind != CMW_IND_EVIDENCE:
        raise EvidenceError(f"CMW record: ind must be {CMW_IND_EVIDENCE} (evidence)")
    return _from_payload(_strict_cbor(value, "evidence payload"))


def _check_top_level(value: Any, what: str, kind: str, allowed: frozenset[str]) -> None:
    """Both wire forms: a map/object holding no key outside ``allowed``."""
    if type(value) is not dict:
        raise EvidenceError(f"{what}: must be {kind}")
    unknown = set(value) - allowed
    if unknown:
        raise EvidenceError(f"{what}: unknown key {sorted(map(str, unknown))[0]!r:.60}")


def _from_payload(payload: Any) -> Evidence:
    _check_top_level(payload, "evidence payload", "a map", _PAYLOAD_KEYS)
    version = payload.get("v")
    if type(version) is not int or version != EVIDENCE_FORMAT_VERSION:
        raise EvidenceError(f"evidence payload: format version must be {EVIDENCE_FORMAT_VERSION}")
    for key in ("platform", "report"):
        if key not in payload:
            raise EvidenceError(f"evidence payload: missing {key}")
    certificates = payload.get("certificates", [])
    if type(certificates) is not list:
        raise EvidenceError("certificates: must be an array of byte strings")
    if "certificates" in payload and not certificates:
        raise EvidenceError("certificates: present but empty (omit it instead)")
    collateral = payload.get("collateral", {})
    if type(collateral) is not dict:
        raise EvidenceError("collateral: must be a map")
    binding = payload.get("binding", {})
    if type(binding) is not dict:
        raise EvidenceError("binding: must be a map")
    return Evidence(
        platform=payload["platform"],
        report=payload["report"],
        certificates=tuple(certificates),
        collateral=collateral,
        product=payload.get("product"),
        binding=binding,
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str) -> bytes:
    if type(text) is not str:
        raise EvidenceError(f"{what}: must be a base64 string")
    if len(text) > MAX_EVIDENCE_BYTES * 2:
        raise EvidenceError(f"{what}: too long")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise EvidenceError(f"{what}: not valid base64") from exc


def evidence_to_json(e: Evidence) -> dict:
    """Evidence -> JSON-ready dict (bytes as base64)."""
    out: dict[str, Any] = {
        "media_type": EVIDENCE_MEDIA_TYPE,
        "v": EVIDENCE_FORMAT_VERSION,
        "platform": e.platform,
        "report": _b64(e.report),
        "certificates": [_b64(c) for c in e.certificates],
        "collateral": {k: _b64(v) for k, v in e.collateral.items()},
        "product": e.product,
        "binding": {k: ({"base64": _b64(v)} if type(v) is bytes else v) for k, v in e.binding.items()},
    }
    return out


_JSON_KEYS = frozenset({"media_type", "v", "platform", "report", "certificates", "collateral", "product", "binding"})


def evidence_from_json(d: dict) -> Evidence:
    """JSON dict -> Evidence; same strictness as decode_cmw."""
    _check_top_level(d, "evidence JSON", "an object", _JSON_KEYS)
    if d.get("media_type", EVIDENCE_MEDIA_TYPE) != EVIDENCE_MEDIA_TYPE:
        raise EvidenceError("evidence JSON: unsupported media_type")
    version = d.get("v")
    if type(version) is not int or version != EVIDENCE_FORMAT_VERSION:
        raise EvidenceError(f"evidence JSON: v must be {EVIDENCE_FORMAT_VERSION}")
    if "platform" not in d or "report" not in d:
        raise EvidenceError("evidence JSON: platform and report are required")
    certs = d.get("certificates", [])
    if type(certs) is not list or len(certs) > MAX_CERTIFICATES:
        raise EvidenceError(f"certificates: must be a list of at most {MAX_CERTIFICATES} base64 strings")
    collateral = d.get("collateral", {})
    if type(collateral) is not dict or len(collateral) > MAX_COLLATERAL_FILES:
        raise EvidenceError(f"collateral: must be an object of at most {MAX_COLLATERAL_FILES} entries")
    binding_in = d.get("binding", {})
    if type(binding_in) is not dict or len(binding_in) > MAX_BINDING_ENTRIES:
        raise EvidenceError(f"binding: must be an object of at most {MAX_BINDING_ENTRIES} entries")
    binding: dict[str, Any] = {}
    for key, value in binding_in.items():
        if type(value) is dict:
            if set(value) != {"base64"}:
                raise EvidenceError(f"binding[{key}]: an object value must be {{\"base64\": ...}}")
            binding[key] = _unb64(value["base64"], f"binding[{key}]")
        elif type(value) is float:
            raise EvidenceError(f"binding[{key}]: floats are not allowed")
        else:
            binding[key] = value
    product = d.get("product")
    return Evidence(
        platform=d["platform"],
        report=_unb64(d["report"], "report"),
        certificates=tuple(_unb64(c, f"certificates[{i}]") for i, c in enumerate(certs)),
        collateral={k: _unb64(v, f"collateral[{k}]") for k, v in collateral.items()},
        product=product,
        binding=binding,
    )
