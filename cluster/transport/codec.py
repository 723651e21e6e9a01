"""ScoredGroup <-> bytes for the trajectory stream: msgpack plus raw little-endian array bytes. No pickle.

The learner decodes what any process with write access to the stream put there, so decoding must never
execute code, allocate without bound, or hand back an object that breaks the learner later. One msgpack map
per group (schema `SCHEMA_VERSION`):

    schema, group_id, prompt_id, prompt, prompt_ids <i4 bytes, version, generator_id, gold, meta, timing,
    lengths [G] ints, tokens <i4 bytes [sum L], logprobs <f4 bytes [sum L], texts [G], finish [G],
    rewards <f4 [G], advantages <f4 [G], answers [G], components {name: <f4 [G]}

The G responses' tokens and logprobs travel as two concatenated blobs split by `lengths`: two large `bin`
objects instead of 2G small ones. `decode` checks every key, type, dtype size and length, and raises
`CodecError` naming the field for anything else (truncated, random, newer schema, oversized, wrong length).
Encoding casts arrays to the contract dtypes (int32 ids, float32 values; integers out of int32 range are an
error, never a silent wrap) and rejects meta that msgpack cannot round-trip exactly (tuples, bytes, numpy
scalars, non-str keys), so `decode(encode(g))` equals `g` field for field.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

from cluster.types import Response, Rollout, ScoredGroup

SCHEMA_VERSION = 1
MAX_PAYLOAD_BYTES = 64 << 20   # one group; 64 responses x 32k tokens is ~17 MiB
MAX_RESPONSES = 4096
MAX_META_DEPTH = 16
_I4, _F4 = np.dtype("<i4"), np.dtype("<f4")
_NATIVE = {"i": np.dtype(np.int32), "f": np.dtype(np.float32)}
_I32_MIN, _I32_MAX = np.iinfo(np.int32).min, np.iinfo(np.int32).max
_I64_MIN, _U64_MAX = -(1 << 63), (1 << 64) - 1

_FIELDS = {  # key -> type check name; decode requires exactly these keys
    "schema": "int", "group_id": "str", "prompt_id": "str", "prompt": "str", "prompt_ids": "bin",
    "version": "int", "generator_id": "str", "gold": "str?", "meta": "dict", "timing": "dict",
    "lengths": "list", "tokens": "bin", "logprobs": "bin", "texts": "list", "finish": "list",
    "rewards": "bin", "advantages": "bin", "answers": "list", "components": "dict",
}


class CodecError(ValueError):
    """A ScoredGroup that cannot be encoded, or bytes that are not a valid encoded ScoredGroup."""


# ---------------------------------------------------------------------------------------------- encode

def encode(group: ScoredGroup) -> bytes:
    """Serialize one group; raises CodecError naming the offending field."""
    if not isinstance(group, ScoredGroup):
        raise CodecError(f"group: expected ScoredGroup, got {type(group).__name__}")
    ro = group.rollout
    if not isinstance(ro, Rollout):
        raise CodecError(f"rollout: expected Rollout, got {type(ro).__name__}")
    g = len(ro.responses)
    if g > MAX_RESPONSES:
        raise CodecError(f"rollout.responses: {g} responses > limit {MAX_RESPONSES}")
    toks, lps = [], []
    for i, r in enumerate(ro.responses):
        t = _array(r.token_ids, _I4, f"rollout.responses[{i}].token_ids")
        lp = _array(r.logprobs, _F4, f"rollout.responses[{i}].logprobs")
        if len(t) != len(lp):
            raise CodecError(f"rollout.responses[{i}]: {len(t)} token_ids but {len(lp)} logprobs")
        toks.append(t)
        lps.append(lp)
    obj = {
        "schema": SCHEMA_VERSION,
        "group_id": _str(ro.group_id, "rollout.group_id"),
        "prompt_id": _str(ro.prompt_id, "rollout.prompt_id"),
        "prompt": _str(ro.prompt, "rollout.prompt"),
        "prompt_ids": _array(ro.prompt_ids, _I4, "rollout.prompt_ids").tobytes(),
        "version": _version(ro.version, "rollout.version"),
        "generator_id": _str(ro.generator_id, "rollout.generator_id"),
        "gold": None if ro.gold is None else _str(ro.gold, "rollout.gold"),
        "meta": _check_meta(_dict(ro.meta, "rollout.meta"), "rollout.meta", 0),
        "timing": _timing(_dict(ro.timing, "rollout.timing"), "rollout.timing"),
        "lengths": [len(t) for t in toks],
        "tokens": b"".join(t.tobytes() for t in toks),
        "logprobs": b"".join(x.tobytes() for x in lps),
        "texts": [_str(r.text, f"rollout.responses[{i}].text") for i, r in enumerate(ro.responses)],
        "finish": [_str(r.finish_reason, f"rollout.responses[{i}].finish_reason")
                   for i, r in enumerate(ro.responses)],
        "rewards": _per_response(group.rewards, g, "rewards"),
        "advantages": _per_response(group.advantages, g, "advantages"),
        "answers": _answers(group.answers, g),
        "components": _components(group.components, g),
    }
    try:
        data = msgpack.packb(obj, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:  # checked above; kept so nothing escapes unnamed
        raise CodecError(f"group {ro.group_id!r}: {e}") from None
    if len(data) > MAX_PAYLOAD_BYTES:
        raise CodecError(f"group {ro.group_id!r} encodes to {len(data)} bytes > limit {MAX_PAYLOAD_BYTES}")
    return data


def _str(x: Any, name: str) -> str:
    if type(x) is not str:
        raise CodecError(f"{name}: expected str, got {type(x).__name__}")
    if not x.isascii():  # msgpack would fail on a lone surrogate without naming the field
        try:
            x.encode("utf-8")
        except UnicodeEncodeError as e:
            raise CodecError(f"{name}: not encodable as UTF-8 ({e.reason} at index {e.start})") from None
    return x


def _version(x: Any, name: str) -> int:
    if type(x) is not int and not isinstance(x, np.integer):
        raise CodecError(f"{name}: expected int, got {type(x).__name__}")
    if not 0 <= int(x) <= _U64_MAX >> 1:
        raise CodecError(f"{name}: {int(x)} is outside 0..2^63-1")
    return int(x)


def _array(x: Any, dtype: np.dtype, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise CodecError(f"{name}: expected a 1-D array, got shape {a.shape}")
    if dtype.kind == "i":
        empty_list = a.size == 0 and a.dtype.kind == "f"   # np.asarray([]) is float64
        if a.dtype.kind not in "iu" and not empty_list:
            raise CodecError(f"{name}: expected an integer array (int32), got dtype {a.dtype}")
        if a.size and not np.can_cast(a.dtype, np.int32):
            lo, hi = int(a.min()), int(a.max())
            if lo < _I32_MIN or hi > _I32_MAX:
                raise CodecError(f"{name}: values {lo}..{hi} do not fit int32")
    elif a.dtype.kind not in "fiu":
        raise CodecError(f"{name}: expected a float array (float32), got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=dtype)


def _per_response(x: Any, g: int, name: str) -> bytes:
    a = _array(x, _F4, name)
    if len(a) != g:
        raise CodecError(f"{name}: length {len(a)}, expected {g} (one per response)")
    return a.tobytes()


def _answers(x: Any, g: int) -> list:
    if not isinstance(x, list) or len(x) != g:
        raise CodecError(f"answers: expected a list of {g} (one per response), got "
                         f"{type(x).__name__} of length {len(x) if hasattr(x, '__len__') else '?'}")
    return [None if a is None else _str(a, f"answers[{i}]") for i, a in enumerate(x)]


def _components(x: Any, g: int) -> dict:
    return {_str(k, f"components key {k!r}"): _per_response(v, g, f"components[{k!r}]")
            for k, v in _dict(x, "components").items()}


def _dict(x: Any, name: str) -> dict:
    if not isinstance(x, dict):
        raise CodecError(f"{name}: expected dict, got {type(x).__name__}")
    return x


def _timing(x: Any, name: str) -> dict:
    out = {}
    for k, v in x.items():
        _str(k, f"{name} key {k!r}")
        if type(v) not in (int, float) and not isinstance(v, (np.floating, np.integer)):
            raise CodecError(f"{name}[{k!r}]: expected a number, got {type(v).__name__}")
        out[k] = float(v)
    return out


def _check_meta(x: Any, name: str, depth: int) -> Any:
    """Meta must be exactly what msgpack gives back: None, bool, int (int64/uint64), float, str, list, dict
    with str keys. Returns x unchanged."""
    if depth > MAX_META_DEPTH:
        raise CodecError(f"{name}: nested deeper than {MAX_META_DEPTH} levels")
    t = type(x)
    if t is str:
        return _str(x, name)
    if x is None or t in (bool, float):
        return x
    if t is int:
        if not _I64_MIN <= x <= _U64_MAX:
            raise CodecError(f"{name}: integer {x} does not fit 64 bits")
        return x
    if t is list:
        for i, v in enumerate(x):
            _check_meta(v, f"{name}[{i}]", depth + 1)
        return x
    if t is dict:
        for k, v in x.items():
            if type(k) is not str:
                raise CodecError(f"{name}: key {k!r} is a {type(k).__name__}, only str keys round-trip")
            _str(k, f"{name} key")
            _check_meta(v, f"{name}[{k!r}]", depth + 1)
        return x
    raise CodecError(f"{name}: {t.__module__}.{t.__qualname__} is not msgpack-able without loss "
                     "(allowed: None, bool, int, float, str, list, dict with str keys)")


# ---------------------------------------------------------------------------------------------- decode

def decode(data: bytes | bytearray | memoryview) -> ScoredGroup:
    """Parse bytes written by `encode`; raises CodecError (never anything else) on any defect."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"payload: expected bytes, got {type(data).__name__}")
    if len(data) > MAX_PAYLOAD_BYTES:
        raise CodecError(f"payload: {len(data)} bytes > limit {MAX_PAYLOAD_BYTES}")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True,
                              max_ext_len=0, max_map_len=1 << 16)
    except Exception as e:  # msgpack raises ValueError, FormatError, StackError, UnicodeDecodeError, ...
        raise CodecError(f"payload: not a valid msgpack document ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise CodecError(f"payload: expected a msgpack map, got {type(obj).__name__}")
    schema = obj.get("schema")
    if schema != SCHEMA_VERSION or type(schema) is not int:
        raise CodecError(f"schema: version {schema!r} is not supported (this reader understands "
                         f"{SCHEMA_VERSION})")
    if set(obj) != set(_FIELDS):
        missing, extra = sorted(set(_FIELDS) - set(obj)), sorted(map(str, set(obj) - set(_FIELDS)))
        raise CodecError(f"payload: missing keys {missing}, unexpected keys {extra}")
    for key, kind in _FIELDS.items():
        _expect(obj[key], kind, key)

    lengths = obj["lengths"]
    g = len(lengths)
    if g > MAX_RESPONSES:
        raise CodecError(f"lengths: {g} responses > limit {MAX_RESPONSES}")
    if any(type(n) is not int or n < 0 for n in lengths):
        raise CodecError("lengths: expected non-negative ints")
    total = sum(lengths)
    tokens = _blob(obj["tokens"], _I4, total, "tokens")
    logprobs = _blob(obj["logprobs"], _F4, total, "logprobs")
    for key in ("texts", "finish"):
        _str_list(obj[key], g, key, optional=False)
    _str_list(obj["answers"], g, "answers", optional=True)
    version = obj["version"]
    if not 0 <= version <= _U64_MAX >> 1:
        raise CodecError(f"version: {version} is outside 0..2^63-1")
    _check_meta(obj["meta"], "meta", 0)
    for k, v in obj["timing"].items():
        if type(v) is not float:
            raise CodecError(f"timing[{k!r}]: expected float, got {type(v).__name__}")
    components = {}
    for k, v in obj["components"].items():
        _expect(v, "bin", f"components[{k!r}]")
        components[k] = _blob(v, _F4, g, f"components[{k!r}]")

    responses, start = [], 0
    for n, text, fin in zip(lengths, obj["texts"], obj["finish"]):
        responses.append(Response(token_ids=tokens[start:start + n], logprobs=logprobs[start:start + n],
                                  text=text, finish_reason=fin))
        start += n
    rollout = Rollout(
        group_id=obj["group_id"], prompt_id=obj["prompt_id"],
        prompt_ids=_blob(obj["prompt_ids"], _I4, None, "prompt_ids"), prompt=obj["prompt"],
        responses=responses, version=version, generator_id=obj["generator_id"], gold=obj["gold"],
        meta=obj["meta"], timing=obj["timing"])
    return ScoredGroup(rollout=rollout, rewards=_blob(obj["rewards"], _F4, g, "rewards"),
                       advantages=_blob(obj["advantages"], _F4, g, "advantages"),
                       answers=obj["answers"], components=components)


_KINDS = {"int": (int,), "str": (str,), "str?": (str, type(None)), "bin": (bytes,), "list": (list,),
          "dict": (dict,)}


def _expect(x: Any, kind: str, name: str) -> None:
    if type(x) not in _KINDS[kind]:  # exact types: a bool is not an int here
        raise CodecError(f"{name}: expected {kind.rstrip('?')}{' or nil' if kind == 'str?' else ''}, "
                         f"got {type(x).__name__}")


def _blob(b: bytes, dtype: np.dtype, n: int | None, name: str) -> np.ndarray:
    """Raw little-endian bytes -> a writable native array of n elements (n=None: any whole number)."""
    if len(b) % dtype.itemsize:
        raise CodecError(f"{name}: {len(b)} bytes is not a whole number of {dtype.itemsize}-byte "
                         f"{dtype.name} values")
    if n is not None and len(b) != n * dtype.itemsize:
        raise CodecError(f"{name}: {len(b) // dtype.itemsize} {dtype.name} values, expected {n}")
    return np.frombuffer(b, dtype=dtype).astype(_NATIVE[dtype.kind])


def _str_list(x: list, g: int, name: str, optional: bool) -> None:
    if len(x) != g:
        raise CodecError(f"{name}: length {len(x)}, expected {g} (one per response)")
    for i, s in enumerate(x):
        if not (type(s) is str or (optional and s is None)):
            raise CodecError(f"{name}[{i}]: expected str{' or nil' if optional else ''}, "
                             f"got {type(s).__name__}")
