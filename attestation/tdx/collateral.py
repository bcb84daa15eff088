"""Intel PCS collateral for TDX: TCB Info v3 ("TDX"), QE Identity v2 ("TD_QE"), CRLs and issuer chains.

The PCS signs the exact bytes of the `tcbInfo` / `enclaveIdentity` JSON value (ECDSA P-256, r||s hex in
`signature`). We therefore locate that value's byte span in the raw response with a small top-level scanner
and keep those bytes; nothing is ever re-serialized. Duplicate top-level keys are refused (that wrapper is
not signed); inside the signed value only Intel's signature decides.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from cryptography import x509

from ..errors import CollateralError, ParseError
from ..x509parse import load_pem_certificates
from .chain import load_crl

TCB_STATUSES = frozenset(
    {
        "UpToDate",
        "SWHardeningNeeded",
        "ConfigurationNeeded",
        "ConfigurationAndSWHardeningNeeded",
        "OutOfDate",
        "OutOfDateConfigurationNeeded",
        "Revoked",
    }
)
MAX_COLLATERAL_FILE = 1 << 20

_FMSPC_RE = re.compile(r"^[0-9a-fA-F]{12}$")
_TCB_FILE_RE = re.compile(r"^tcb_info_([0-9a-f]{12})\.json$")


# ---------------------------------------------------------------------------------------------- JSON


_DECODER = json.JSONDecoder()
_WS = " \t\n\r"


def split_signed_json(raw: bytes, body_key: str, what: str) -> tuple[bytes, dict, bytes]:
    """{"<body_key>": {...}, "signature": "<hex>"} -> (exact body bytes, parsed body, signature 64 B)."""
    if not isinstance(raw, (bytes, bytearray)):
        raise ParseError(f"{what} must be bytes")
    if len(raw) > MAX_COLLATERAL_FILE:
        raise ParseError(f"{what} is too large")
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise ParseError(f"{what} is not UTF-8") from None
    spans: dict[str, tuple[int, int, Any]] = {}
    try:
        pos = _skip(text, 0)
        if text[pos : pos + 1] != "{":
            raise ParseError(f"{what} is not a JSON object")
        pos = _skip(text, pos + 1)
        while True:
            if text[pos : pos + 1] != '"':
                raise ParseError(f"{what}: expected a member name at {pos}")
            key, pos = json.decoder.scanstring(text, pos + 1)
            pos = _skip(text, pos)
            if text[pos : pos + 1] != ":":
                raise ParseError(f"{what}: expected ':' at {pos}")
            start = _skip(text, pos + 1)
            value, end = _DECODER.raw_decode(text, start)
            if key in spans:
                raise ParseError(f"{what}: duplicate key {key!r}")
            spans[key] = (start, end, value)
            pos = _skip(text, end)
            if text[pos : pos + 1] == ",":
                pos = _skip(text, pos + 1)
                continue
            if text[pos : pos + 1] == "}":
                break
            raise ParseError(f"{what}: expected ',' or '}}' at {pos}")
        if _skip(text, pos + 1) != len(text):
            raise ParseError(f"{what}: trailing data after the JSON object")
    except (ValueError, IndexError, RecursionError) as exc:
        if isinstance(exc, ParseError):
            raise
        raise ParseError(f"{what} is not valid JSON: {exc}") from None
    if set(spans) != {body_key, "signature"}:
        raise ParseError(f"{what} must hold exactly '{body_key}' and 'signature', got {sorted(spans)}")
    start, end, body = spans[body_key]
    if not isinstance(body, dict):
        raise ParseError(f"{what}: '{body_key}' is not an object")
    signature = _hex(spans["signature"][2], f"{what} signature", 64)
    body_bytes = text[start:end].encode("utf-8")
    return body_bytes, body, signature


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WS:
        pos += 1
    return pos


def _hex(value: Any, what: str, size: int | None = None) -> bytes:
    if not isinstance(value, str) or len(value) % 2 or not re.fullmatch(r"[0-9a-fA-F]*", value):
        raise ParseError(f"{what} must be a hex string")
    out = bytes.fromhex(value)
    if size is not None and len(out) != size:
        raise ParseError(f"{what} must be {size} bytes, got {len(out)}")
    return out


def _int(obj: Mapping, key: str, what: str, limit: int = 0xFFFF) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
        raise ParseError(f"{what}: '{key}' must be an integer 0..{limit}")
    return value


def _str(obj: Mapping, key: str, what: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise ParseError(f"{what}: '{key}' must be a string")
    return value


def _time(obj: Mapping, key: str, what: str) -> datetime:
    text = _str(obj, key, what)
    if not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", text):
        raise ParseError(f"{what}: '{key}' is not an RFC 3339 UTC time")
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ParseError(f"{what}: '{key}' is not a valid time") from None


def _obj(value: Any, what: str) -> Mapping:
    if not isinstance(value, dict):
        raise ParseError(f"{what} must be an object")
    return value


def _list(value: Any, what: str) -> list:
    if not isinstance(value, list):
        raise ParseError(f"{what} must be a list")
    return value


def _status(obj: Mapping, what: str) -> str:
    status = _str(obj, "tcbStatus", what)
    if status not in TCB_STATUSES:
        raise ParseError(f"{what}: unknown tcbStatus {status!r}")
    return status


def _id_and_version(body: Mapping, what: str, want_id: str, want_version: int) -> tuple[str, int]:
    """The signed document's ``id`` and ``version``, refused unless they are the kind this module reads."""
    doc_id = _str(body, "id", what)
    version = _int(body, "version", what)
    if doc_id != want_id or version != want_version:
        raise ParseError(f"{what} must be id {want_id!r} version {want_version}, got id {doc_id!r} version {version}")
    return doc_id, version


def _advisories(obj: Mapping, what: str) -> tuple[str, ...]:
    ids = obj.get("advisoryIDs", [])
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ParseError(f"{what}: advisoryIDs must be a list of strings")
    return tuple(ids)


# ---------------------------------------------------------------------------------------------- TCB info


@dataclass(frozen=True)
class TcbLevel:
    sgx_components: tuple[int, ...]
    pcesvn: int
    tdx_components: tuple[int, ...]
    tcb_date: datetime
    status: str
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True)
class IsvTcbLevel:
    """One TCB level keyed by a single ISV SVN: a TDX module identity's or the QE identity's."""

    isvsvn: int
    tcb_date: datetime
    status: str
    advisory_ids: tuple[str, ...]


# The names each document's levels go by (same shape, same rules).
ModuleTcbLevel = IsvTcbLevel
QeTcbLevel = IsvTcbLevel


@dataclass(frozen=True)
class TdxModuleIdentity:
    id: str
    mrsigner: bytes
    attributes: bytes
    attributes_mask: bytes
    tcb_levels: tuple[IsvTcbLevel, ...]


@dataclass(frozen=True)
class TcbInfo:
    raw_body: bytes  # exact signed bytes of the tcbInfo value
    signature: bytes
    id: str
    version: int
    issue_date: datetime
    next_update: datetime
    fmspc: bytes
    pce_id: bytes
    tcb_type: int
    tcb_evaluation_data_number: int
    tdx_module: TdxModuleIdentity  # id "" and no levels: the legacy tdxModule entry
    tdx_module_identities: tuple[TdxModuleIdentity, ...]
    tcb_levels: tuple[TcbLevel, ...]


def _components(value: Any, what: str) -> tuple[int, ...]:
    items = _list(value, what)
    if len(items) != 16:
        raise ParseError(f"{what} must list 16 components, got {len(items)}")
    try:
        svns = tuple(c["svn"] for c in items)
    except (TypeError, KeyError):
        raise ParseError(f"{what}: every component must be an object with an 'svn'") from None
    if not all(type(v) is int and 0 <= v <= 255 for v in svns):
        raise ParseError(f"{what}: component SVNs must be integers 0..255")
    return svns


def _isv_tcb_levels(obj: Mapping, label: str, what: str, svn_limit: int) -> tuple[IsvTcbLevel, ...]:
    """`tcbLevels` of a module or QE identity; ``label`` prefixes the container names in errors."""
    levels = []
    for level in _list(obj.get("tcbLevels"), f"{label} tcbLevels"):
        level = _obj(level, f"{label} tcbLevel")
        levels.append(
            IsvTcbLevel(
                isvsvn=_int(_obj(level.get("tcb"), f"{label} tcb"), "isvsvn", what, svn_limit),
                tcb_date=_time(level, "tcbDate", what),
                status=_status(level, what),
                advisory_ids=_advisories(level, what),
            )
        )
    return tuple(levels)


def _module_identity(obj: Mapping, what: str, with_levels: bool) -> TdxModuleIdentity:
    levels = _isv_tcb_levels(obj, what, what, svn_limit=255) if with_levels else ()
    return TdxModuleIdentity(
        id=_str(obj, "id", what) if with_levels else "",
        mrsigner=_hex(obj.get("mrsigner"), f"{what} mrsigner", 48),
        attributes=_hex(obj.get("attributes"), f"{what} attributes", 8),
        attributes_mask=_hex(obj.get("attributesMask"), f"{what} attributesMask", 8),
        tcb_levels=levels,
    )


def parse_tcb_info(raw: bytes) -> TcbInfo:
    """PCS TCB info response bytes -> TcbInfo (TDX, version 3). ParseError on anything off."""
    body_bytes, body, signature = split_signed_json(raw, "tcbInfo", "TCB info")
    what = "TCB info"
    tcb_id, version = _id_and_version(body, what, "TDX", 3)
    fmspc = _hex(body.get("fmspc"), "TCB info fmspc", 6)
    pce_id = _hex(body.get("pceId"), "TCB info pceId", 2)
    module = _module_identity(_obj(body.get("tdxModule"), "tdxModule"), "tdxModule", with_levels=False)
    identities = tuple(
        _module_identity(_obj(m, "tdxModuleIdentity"), "tdxModuleIdentity", with_levels=True)
        for m in _list(body.get("tdxModuleIdentities", []), "tdxModuleIdentities")
    )
    levels = []
    for level in _list(body.get("tcbLevels"), "tcbLevels"):
        level = _obj(level, "tcbLevel")
        tcb = _obj(level.get("tcb"), "tcbLevel tcb")
        levels.append(
            TcbLevel(
                sgx_components=_components(tcb.get("sgxtcbcomponents"), "sgxtcbcomponents"),
                pcesvn=_int(tcb, "pcesvn", "tcbLevel"),
                tdx_components=_components(tcb.get("tdxtcbcomponents"), "tdxtcbcomponents"),
                tcb_date=_time(level, "tcbDate", "tcbLevel"),
                status=_status(level, "tcbLevel"),
                advisory_ids=_advisories(level, "tcbLevel"),
            )
        )
    if not levels:
        raise ParseError("TCB info has no tcbLevels")
    return TcbInfo(
        raw_body=body_bytes,
        signature=signature,
        id=tcb_id,
        version=version,
        issue_date=_time(body, "issueDate", what),
        next_update=_time(body, "nextUpdate", what),
        fmspc=fmspc,
        pce_id=pce_id,
        tcb_type=_int(body, "tcbType", what),
        tcb_evaluation_data_number=_int(body, "tcbEvaluationDataNumber", what, 0xFFFFFFFF),
        tdx_module=module,
        tdx_module_identities=identities,
        tcb_levels=tuple(levels),
    )


# ---------------------------------------------------------------------------------------------- QE identity


@dataclass(frozen=True)
class QeIdentity:
    raw_body: bytes
    signature: bytes
    id: str
    version: int
    issue_date: datetime
    next_update: datetime
    tcb_evaluation_data_number: int
    miscselect: int
    miscselect_mask: int
    attributes: bytes
    attributes_mask: bytes
    mrsigner: bytes
    isvprodid: int
    tcb_levels: tuple[IsvTcbLevel, ...]


def parse_qe_identity(raw: bytes) -> QeIdentity:
    """PCS QE identity response bytes -> QeIdentity (id TD_QE, version 2)."""
    body_bytes, body, signature = split_signed_json(raw, "enclaveIdentity", "QE identity")
    what = "QE identity"
    qe_id, version = _id_and_version(body, what, "TD_QE", 2)
    levels = _isv_tcb_levels(body, "QE", what, svn_limit=0xFFFF)
    if not levels:
        raise ParseError("QE identity has no tcbLevels")
    return QeIdentity(
        raw_body=body_bytes,
        signature=signature,
        id=qe_id,
        version=version,
        issue_date=_time(body, "issueDate", what),
        next_update=_time(body, "nextUpdate", what),
        tcb_evaluation_data_number=_int(body, "tcbEvaluationDataNumber", what, 0xFFFFFFFF),
        miscselect=int.from_bytes(_hex(body.get("miscselect"), "miscselect", 4), "big"),
        miscselect_mask=int.from_bytes(_hex(body.get("miscselectMask"), "miscselectMask", 4), "big"),
        attributes=_hex(body.get("attributes"), "QE attributes", 16),
        attributes_mask=_hex(body.get("attributesMask"), "QE attributesMask", 16),
        mrsigner=_hex(body.get("mrsigner"), "QE mrsigner", 32),
        isvprodid=_int(body, "isvprodid", what),
        tcb_levels=levels,
    )


# ---------------------------------------------------------------------------------------------- chains


def parse_issuer_chain(data: bytes, what: str) -> tuple[x509.Certificate, ...]:
    """URL-encoded PEM (as in PCS response headers) or plain PEM -> certificates (leaf first)."""
    if not isinstance(data, (bytes, bytearray)) or len(data) > MAX_COLLATERAL_FILE:
        raise ParseError(f"{what} must be bytes of a sane size")
    try:
        text = bytes(data).decode("ascii").strip()
    except UnicodeDecodeError:
        raise ParseError(f"{what} is not ASCII") from None
    try:
        if "%" in text:
            text = urllib.parse.unquote(text, errors="strict")
        pem = text.encode("ascii")
    except UnicodeError as exc:
        raise ParseError(f"{what} is not a PEM certificate chain: {exc}") from None
    return tuple(load_pem_certificates(pem, what))


# ---------------------------------------------------------------------------------------------- bundle


@dataclass(frozen=True)
class _Parsed:
    tcb_info: TcbInfo
    tcb_info_chain: tuple[x509.Certificate, ...]
    qe_identity: QeIdentity
    qe_identity_chain: tuple[x509.Certificate, ...]
    # read-only views: a parsed Collateral may be shared (attestation.verifier caches them by content)
    pck_crls: Mapping[str, tuple[x509.CertificateRevocationList, bytes]]  # ca -> (CRL, DER)
    pck_crl_chain_files: Mapping[str, bytes]
    root_ca_crl: tuple[x509.CertificateRevocationList, bytes] | None


@dataclass(frozen=True)
class Collateral:
    """Everything needed to appraise one FMSPC's quotes.

    The exact file bytes (collateral_to_files() names) are the only state; every parsed view is derived
    from them, so parsed values can never drift from the bytes whose signatures are checked.
    """

    files: tuple[tuple[str, bytes], ...]

    @cached_property
    def _parsed(self) -> _Parsed:
        return _parse_files(dict(self.files))

    @property
    def tcb_info(self) -> TcbInfo:
        return self._parsed.tcb_info

    @property
    def tcb_info_chain(self) -> tuple[x509.Certificate, ...]:
        return self._parsed.tcb_info_chain

    @property
    def qe_identity(self) -> QeIdentity:
        return self._parsed.qe_identity

    @property
    def qe_identity_chain(self) -> tuple[x509.Certificate, ...]:
        return self._parsed.qe_identity_chain

    @property
    def root_ca_crl(self) -> x509.CertificateRevocationList | None:
        return self._parsed.root_ca_crl[0] if self._parsed.root_ca_crl else None

    @property
    def root_ca_crl_der(self) -> bytes | None:
        return self._parsed.root_ca_crl[1] if self._parsed.root_ca_crl else None

    @property
    def fmspc(self) -> str:
        return self.tcb_info.fmspc.hex()

    def pck_crl(self, ca: str) -> x509.CertificateRevocationList | None:
        found = self._parsed.pck_crls.get(ca)
        return found[0] if found else None

    def pck_crl_der(self, ca: str) -> bytes | None:
        found = self._parsed.pck_crls.get(ca)
        return found[1] if found else None

    def pck_crl_chain(self, ca: str) -> tuple[x509.Certificate, ...] | None:
        """Issuer chain PCS sent with the PCK CRL (informational: verification uses the quote's own CA)."""
        raw = self._parsed.pck_crl_chain_files.get(ca)
        return parse_issuer_chain(raw, f"pck_crl_{ca}_chain.txt") if raw is not None else None

    @property
    def issued_at(self) -> datetime:
        """When the oldest of the documents Intel re-issues monthly was issued: TCB info, QE identity and the PCK
        CRLs (what ``max_collateral_age_days`` bounds). Each is signed on its own, so a host can pair fresh TCB
        info with a PCK CRL from before a revocation; the root CA CRL is re-issued yearly and not counted."""
        crls = [found[0].last_update_utc for found in self._parsed.pck_crls.values()]
        return min([self.tcb_info.issue_date, self.qe_identity.issue_date, *crls])


def collateral_to_files(c: Collateral) -> dict[str, bytes]:
    return dict(c.files)


def qvl_collateral_fields(c: Collateral, ca: str = "platform") -> dict[str, str | bytes]:
    """The collateral laid out as the fields of Intel QVL's ``QuoteCollateralV3`` (as dcap-qvl takes it).

    Same signed bytes, chains (URL-decoded PEM) and CRL files, so a peer verifier sees exactly our input.
    KeyError when the PCK CRL of ``ca`` or the root CA CRL is not in the collateral.
    """
    files = dict(c.files)
    tcb_name = next(n for n in files if _TCB_FILE_RE.match(n))
    return {
        "pck_crl_issuer_chain": urllib.parse.unquote(files[f"pck_crl_{ca}_chain.txt"].decode()),
        "root_ca_crl": files["root_ca.crl"],
        "pck_crl": files[f"pck_crl_{ca}.crl"],
        "tcb_info_issuer_chain": urllib.parse.unquote(files[tcb_name.replace(".json", "_chain.txt")].decode()),
        "tcb_info": c.tcb_info.raw_body.decode(),
        "tcb_info_signature": c.tcb_info.signature,
        "qe_identity_issuer_chain": urllib.parse.unquote(files["qe_identity_chain.txt"].decode()),
        "qe_identity": c.qe_identity.raw_body.decode(),
        "qe_identity_signature": c.qe_identity.signature,
    }


def _select(files: Mapping[str, bytes], fmspc: str | None) -> dict[str, bytes]:
    """The files that make up one FMSPC's collateral; CollateralError when essentials are missing."""
    if not isinstance(files, Mapping):
        raise ParseError("collateral files must be a mapping of name -> bytes")
    for name, data in files.items():
        if not isinstance(name, str) or not isinstance(data, (bytes, bytearray)):
            raise ParseError("collateral files must map str names to bytes")
        if len(data) > MAX_COLLATERAL_FILE:
            raise ParseError(f"collateral file {name} is too large")
    tcb_names = sorted(n for n in files if _TCB_FILE_RE.match(n))
    if fmspc is not None:
        if not isinstance(fmspc, str) or not _FMSPC_RE.match(fmspc):
            raise ParseError(f"FMSPC {fmspc!r} is not 12 hex digits")
        tcb_names = [n for n in tcb_names if n == f"tcb_info_{fmspc.lower()}.json"]
    if len(tcb_names) != 1:
        raise CollateralError(
            f"collateral must hold exactly one TCB info{' for FMSPC ' + fmspc if fmspc else ''}, "
            f"found {tcb_names or 'none'}"
        )
    tcb_name = tcb_names[0]
    chain_name = tcb_name.replace(".json", "_chain.txt")
    kept = [tcb_name, chain_name, "qe_identity.json", "qe_identity_chain.txt"]
    missing = [n for n in kept if n not in files]
    if missing:
        raise CollateralError(f"collateral is missing {missing}")
    for ca in ("platform", "processor"):
        if f"pck_crl_{ca}.crl" in files:
            kept.append(f"pck_crl_{ca}.crl")
            if f"pck_crl_{ca}_chain.txt" in files:
                kept.append(f"pck_crl_{ca}_chain.txt")
    if "root_ca.crl" in files:
        kept.append("root_ca.crl")
    return {n: bytes(files[n]) for n in kept}


def _parse_files(raw: Mapping[str, bytes]) -> _Parsed:
    files = _select(raw, None)
    tcb_name = next(n for n in files if _TCB_FILE_RE.match(n))
    chain_name = tcb_name.replace(".json", "_chain.txt")
    tcb_info = parse_tcb_info(files[tcb_name])
    if tcb_info.fmspc.hex() != _TCB_FILE_RE.match(tcb_name).group(1):
        raise ParseError(f"{tcb_name} holds TCB info for FMSPC {tcb_info.fmspc.hex()}")
    crls = {}
    chains = {}
    for ca in ("platform", "processor"):
        name = f"pck_crl_{ca}.crl"
        if name in files:
            crls[ca] = load_crl(files[name], name)
            if f"pck_crl_{ca}_chain.txt" in files:
                chains[ca] = files[f"pck_crl_{ca}_chain.txt"]
    root_crl = load_crl(files["root_ca.crl"], "root_ca.crl") if "root_ca.crl" in files else None
    tcb_chain = parse_issuer_chain(files[chain_name], chain_name)
    qe_chain_raw = files["qe_identity_chain.txt"]
    qe_chain = tcb_chain if qe_chain_raw == files[chain_name] else parse_issuer_chain(qe_chain_raw, "qe_identity_chain.txt")
    return _Parsed(
        tcb_info=tcb_info,
        tcb_info_chain=tcb_chain,
        qe_identity=parse_qe_identity(files["qe_identity.json"]),
        qe_identity_chain=qe_chain,
        pck_crls=MappingProxyType(crls),
        pck_crl_chain_files=MappingProxyType(chains),
        root_ca_crl=root_crl,
    )


def collateral_from_files(files: Mapping[str, bytes], fmspc: str | None = None) -> Collateral:
    """File name -> bytes (the names of load_collateral_dir) -> Collateral, parsed and checked eagerly.

    Missing essentials: CollateralError; malformed bytes: ParseError. Unrelated names are dropped.
    """
    selected = _select(files, fmspc)
    collateral = Collateral(files=tuple(sorted(selected.items())))
    collateral._parsed  # parse now: bad bytes fail here, not in the middle of a verification
    return collateral


def load_collateral_dir(path: Path, fmspc: str | None = None) -> Collateral:
    """A directory laid out like ../shared/vectors/tdx/collateral/<set>/ -> Collateral (for one FMSPC)."""
    path = Path(path)
    if not path.is_dir():
        raise CollateralError(f"collateral directory {path} does not exist")
    files: dict[str, bytes] = {}
    for entry in path.iterdir():
        name = entry.name
        if entry.is_file() and (
            _TCB_FILE_RE.match(name)
            or re.fullmatch(r"tcb_info_[0-9a-f]{12}_chain\.txt", name)
            or name in ("qe_identity.json", "qe_identity_chain.txt", "root_ca.crl")
            or re.fullmatch(r"pck_crl_(platform|processor)(_chain\.txt|\.crl)", name)
        ):
            if fmspc is not None and name.startswith("tcb_info_") and fmspc.lower() not in name:
                continue
            files[name] = entry.read_bytes()
    return collateral_from_files(files, fmspc.lower() if fmspc else None)
