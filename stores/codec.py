"""Compact, self-checking binary encoding of soft-label records and embedding vectors.

Both backends store bytes produced here, so a record written through Redis
decodes the same as one written through SQLite. No pickle (unsafe, Python only)
and no JSON floats (slow, large, lossy): a fixed little-endian header, raw
float32/float16 arrays and a CRC32 trailer, so truncation, a foreign blob or a
flipped bit raise :class:`CodecError` instead of yielding silent garbage.

Label record layout (little endian)::

    "SL" | fmt u8 | dtype u8 | n u32 | dim u32 | logit_scale f64
    | len(qid) u16 | len(version) u16 | len(ids) u32            (header, 28 bytes)
    | qid utf-8 | version utf-8 | candidate ids utf-8, NUL-separated
    | n x f32 scores | dim x (f16|f32) query embedding | crc32 u32 (of all before it)

Vector layout::

    "EV" | fmt u8 | dtype u8 | dim u32 | dim x (f16|f32) | crc32 u32
"""

from __future__ import annotations

import math
import re
import struct
import zlib
from collections.abc import Sequence
from typing import Literal

import numpy as np

from stores.base import SoftLabelRecord, StoreError

FORMAT_VERSION = 1
EmbeddingDtype = Literal["float16", "float32"]

_DTYPE_CODES: dict[str, int] = {"float16": 1, "float32": 2}
_CODE_DTYPES: dict[int, np.dtype] = {1: np.dtype("<f2"), 2: np.dtype("<f4")}
_LABEL_HEADER = struct.Struct("<2sBBIIdHHI")
_VECTOR_HEADER = struct.Struct("<2sBBI")
_CRC = struct.Struct("<I")
_LABEL_MAGIC = b"SL"
_VECTOR_MAGIC = b"EV"
_MAX_STR = 0xFFFF
_ID_SEP = "\x00"  # candidate ids are joined by NUL: one decode + split, no per-id work


class CodecError(StoreError, ValueError):
    """A blob is not a valid encoding (truncated, corrupted, foreign or newer format)."""


_VERSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_RESERVED_NAMES = frozenset({"text", "versions", "current", "pins"})


def check_version_name(version: str) -> str:
    """Reject version names that could collide with other keys or glob patterns.

    *Why*: Redis keys are ``{ns}:{version}:...`` and stale versions are found with
    ``SCAN MATCH {ns}:{version}:*``; a ``:`` or ``*`` in a name, or a name such as
    ``text``, would let one version's pattern match another's keys. Both backends
    apply the same rule so a store can move between them.
    """
    if not _VERSION_NAME.match(version) or version in _RESERVED_NAMES:
        raise ValueError(
            f"invalid teacher version name {version!r}: use 1-128 of [A-Za-z0-9._+-], "
            f"starting with a letter or digit, not one of {sorted(_RESERVED_NAMES)}"
        )
    return version


def _dtype_code(dtype: str) -> int:
    try:
        return _DTYPE_CODES[dtype]
    except KeyError:
        raise ValueError(f"embedding dtype must be float16 or float32, got {dtype!r}") from None


def _utf8(text: str, what: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > _MAX_STR:
        raise ValueError(f"{what} is longer than {_MAX_STR} bytes: {text[:40]!r}...")
    return raw


def _seal(body: bytes) -> bytes:
    return body + _CRC.pack(zlib.crc32(body))


def _unseal(blob: bytes, what: str) -> memoryview:
    """Check the CRC trailer and return the body; *why*: detect any corruption up front."""
    view = memoryview(blob)
    if len(view) < _CRC.size:
        raise CodecError(f"{what}: blob of {len(view)} bytes is too short")
    body = view[: -_CRC.size]
    (expected,) = _CRC.unpack(view[-_CRC.size :])
    if zlib.crc32(body) != expected:
        raise CodecError(f"{what}: checksum mismatch (corrupted or truncated blob)")
    return body


def _check_format(
    magic: bytes, fmt: int, dtype_code: int, expected_magic: bytes, what: str
) -> None:
    if magic != expected_magic:
        raise CodecError(f"{what}: bad magic {magic!r}, expected {expected_magic!r}")
    if fmt != FORMAT_VERSION:
        raise CodecError(
            f"{what}: unsupported format version {fmt} (this code reads {FORMAT_VERSION})"
        )
    if dtype_code not in _CODE_DTYPES:
        raise CodecError(f"{what}: unknown dtype code {dtype_code}")


def encode_label(record: SoftLabelRecord, dtype: EmbeddingDtype = "float16") -> bytes:
    """Encode one record; the query embedding is stored as ``dtype``."""
    code = _dtype_code(dtype)
    scores = np.asarray(record.scores, dtype="<f4").ravel()
    emb = np.asarray(record.query_embedding).ravel().astype(_CODE_DTYPES[code])
    n = len(record.candidate_ids)
    if scores.shape[0] != n:
        raise ValueError(
            f"record {record.query_id!r}: {n} candidate ids but {scores.shape[0]} scores"
        )
    if emb.shape[0] == 0:
        raise ValueError(f"record {record.query_id!r}: empty query embedding")
    joined = _ID_SEP.join(record.candidate_ids)
    if n and joined.count(_ID_SEP) != n - 1:
        raise ValueError(f"record {record.query_id!r}: a candidate id contains a NUL character")
    ids = joined.encode("utf-8")
    qid = _utf8(record.query_id, "query id")
    ver = _utf8(record.teacher_version, "teacher version")
    header = _LABEL_HEADER.pack(
        _LABEL_MAGIC,
        FORMAT_VERSION,
        code,
        n,
        emb.shape[0],
        float(record.logit_scale),
        len(qid),
        len(ver),
        len(ids),
    )
    return _seal(b"".join((header, qid, ver, ids, scores.tobytes(), emb.tobytes())))


def decode_label(blob: bytes) -> SoftLabelRecord:
    """Decode and validate one record; scores and query embedding come back as float32."""
    body = _unseal(blob, "label record")
    if len(body) < _LABEL_HEADER.size:
        raise CodecError(f"label record: {len(body)} bytes is shorter than its header")
    magic, fmt, code, n, dim, scale, qlen, vlen, ids_len = _LABEL_HEADER.unpack_from(body)
    _check_format(magic, fmt, code, _LABEL_MAGIC, "label record")
    emb_dtype = _CODE_DTYPES[code]
    pos = _LABEL_HEADER.size
    expected = pos + qlen + vlen + ids_len + 4 * n + emb_dtype.itemsize * dim
    if expected != len(body):
        raise CodecError(f"label record: body is {len(body)} bytes, header implies {expected}")
    strings = bytes(body[pos : pos + qlen + vlen + ids_len])
    pos += len(strings)
    try:
        qid = strings[:qlen].decode("utf-8")
        version = strings[qlen : qlen + vlen].decode("utf-8")
        candidate_ids = strings[qlen + vlen :].decode("utf-8").split(_ID_SEP) if n else []
    except UnicodeDecodeError as exc:
        raise CodecError(f"label record: invalid utf-8 in ids ({exc})") from exc
    if len(candidate_ids) != n:
        raise CodecError(f"label record: {len(candidate_ids)} candidate ids, header says {n}")
    scores = np.frombuffer(body, dtype="<f4", count=n, offset=pos).astype(np.float32)
    pos += 4 * n
    emb = np.frombuffer(body, dtype=emb_dtype, count=dim, offset=pos).astype(np.float32)
    return SoftLabelRecord(
        query_id=qid,
        teacher_version=version,
        candidate_ids=candidate_ids,
        scores=scores,
        query_embedding=emb,
        logit_scale=scale,
    )


def encode_vector(vector: np.ndarray, dtype: EmbeddingDtype = "float16") -> bytes:
    """Encode one embedding vector as ``dtype``."""
    code = _dtype_code(dtype)
    arr = np.asarray(vector).ravel().astype(_CODE_DTYPES[code])
    return _seal(
        _VECTOR_HEADER.pack(_VECTOR_MAGIC, FORMAT_VERSION, code, arr.shape[0]) + arr.tobytes()
    )


def encode_vectors(matrix: np.ndarray, dtype: EmbeddingDtype = "float16") -> list[bytes]:
    """Encode the rows of a 2-d matrix (one cast for the whole matrix)."""
    mat = np.asarray(matrix)
    if mat.ndim != 2:
        raise ValueError(f"embeddings must be a 2-d matrix, got shape {mat.shape}")
    code = _dtype_code(dtype)
    mat = np.ascontiguousarray(mat, dtype=_CODE_DTYPES[code])
    header = _VECTOR_HEADER.pack(_VECTOR_MAGIC, FORMAT_VERSION, code, mat.shape[1])
    return [_seal(header + row.tobytes()) for row in mat]


def decode_vector(blob: bytes, dim: int | None = None) -> np.ndarray:
    """Decode one vector to float32; ``dim`` (if given) must match the stored one."""
    body = _unseal(blob, "embedding")
    if len(body) < _VECTOR_HEADER.size:
        raise CodecError(f"embedding: {len(body)} bytes is shorter than its header")
    magic, fmt, code, stored_dim = _VECTOR_HEADER.unpack_from(body)
    _check_format(magic, fmt, code, _VECTOR_MAGIC, "embedding")
    dt = _CODE_DTYPES[code]
    if len(body) != _VECTOR_HEADER.size + stored_dim * dt.itemsize:
        raise CodecError(f"embedding: {len(body)} bytes does not match dim {stored_dim} ({dt})")
    if dim is not None and stored_dim != dim:
        raise CodecError(f"embedding: stored dim {stored_dim}, expected {dim}")
    return np.frombuffer(body, dtype=dt, offset=_VECTOR_HEADER.size).astype(np.float32)


def decode_vectors(blobs: Sequence[bytes | None], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode many optional blobs into ``(float32 [n, dim], found bool [n])``; missing rows are 0."""
    out = np.zeros((len(blobs), dim), dtype=np.float32)
    found = np.zeros(len(blobs), dtype=bool)
    for i, blob in enumerate(blobs):
        if blob is not None:
            out[i] = decode_vector(blob, dim)
            found[i] = True
    return out, found


def check_embeddings(version: str, dim: int, ids: Sequence[str], embeddings: np.ndarray) -> None:
    """Shape check before writing: one row of the version's ``dim`` per id."""
    shape = np.shape(embeddings)
    if len(shape) != 2 or shape[0] != len(ids) or shape[1] != dim:
        raise ValueError(
            f"version {version!r}: expected embeddings of shape ({len(ids)}, {dim}), got {shape}"
        )


def check_record(record: SoftLabelRecord, dim: int, logit_scale: float) -> None:
    """A record must match its version's dim and logit scale, else its soft labels lie."""
    got_dim = int(np.size(record.query_embedding))
    if got_dim != dim:
        raise ValueError(
            f"record {record.query_id!r}: query embedding dim {got_dim}, version "
            f"{record.teacher_version!r} has dim {dim}"
        )
    if not math.isclose(record.logit_scale, logit_scale, rel_tol=1e-6):
        raise ValueError(
            f"record {record.query_id!r}: logit_scale {record.logit_scale}, version "
            f"{record.teacher_version!r} has {logit_scale}"
        )
