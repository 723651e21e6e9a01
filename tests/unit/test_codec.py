"""cluster.transport.codec: exact round trips, and one clear CodecError for every malformed input (fuzzed)."""

import pickle

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.transport import codec
from cluster.transport.codec import CodecError, decode, encode
from cluster.types import Response, Rollout, ScoredGroup

FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

i32 = st.integers(-(2**31), 2**31 - 1)
f32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
text = st.text(max_size=20)
meta_leaf = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | text
meta = st.dictionaries(text, st.recursive(meta_leaf, lambda c: st.lists(c, max_size=3)
                                          | st.dictionaries(text, c, max_size=3), max_leaves=8), max_size=4)


@st.composite
def groups(draw) -> ScoredGroup:
    g = draw(st.integers(0, 5))
    responses = []
    for _ in range(g):
        n = draw(st.integers(0, 40))
        responses.append(Response(
            token_ids=np.array(draw(st.lists(i32, min_size=n, max_size=n)), dtype=np.int32),
            logprobs=np.array(draw(st.lists(f32, min_size=n, max_size=n)), dtype=np.float32),
            text=draw(text), finish_reason=draw(st.sampled_from(["stop", "length"]))))
    per = st.lists(f32, min_size=g, max_size=g).map(lambda v: np.array(v, dtype=np.float32))
    ro = Rollout(group_id=draw(text), prompt_id=draw(text),
                 prompt_ids=np.array(draw(st.lists(i32, max_size=30)), dtype=np.int32), prompt=draw(text),
                 responses=responses, version=draw(st.integers(0, 2**63 - 1)), generator_id=draw(text),
                 gold=draw(st.none() | text), meta=draw(meta),
                 timing=draw(st.dictionaries(text, st.floats(allow_nan=False), max_size=3)))
    return ScoredGroup(ro, draw(per), draw(per), draw(st.lists(st.none() | text, min_size=g, max_size=g)),
                       draw(st.dictionaries(text, per, max_size=3)))


def small(g: int = 3, length: int = 7, **meta) -> ScoredGroup:
    rng = np.random.default_rng(0)
    rs = [Response(rng.integers(0, 50000, length).astype(np.int32), rng.standard_normal(length).astype(np.float32),
                   text=f"resp {j}", finish_reason="length" if j else "stop") for j in range(g)]
    ro = Rollout("gen0-17", "train-3", np.arange(5, dtype=np.int32), "What is 2+2?", rs, 4, "gen0", gold="4",
                 meta={"task": "arith", **meta}, timing={"generate_s": 0.25})
    return ScoredGroup(ro, np.ones(g, np.float32), np.linspace(-1, 1, g).astype(np.float32), ["4"] * g,
                       {"correct": np.ones(g, np.float32)})


def bits(a: np.ndarray) -> tuple:
    return a.dtype.str, a.tobytes()


def assert_identical(a: ScoredGroup, b: ScoredGroup) -> None:
    ra, rb = a.rollout, b.rollout
    for f in ("group_id", "prompt_id", "prompt", "version", "generator_id", "gold", "meta", "timing"):
        assert getattr(ra, f) == getattr(rb, f), f
    assert bits(ra.prompt_ids) == bits(rb.prompt_ids)
    assert len(ra.responses) == len(rb.responses)
    for x, y in zip(ra.responses, rb.responses):
        assert bits(x.token_ids) == bits(y.token_ids) and bits(x.logprobs) == bits(y.logprobs)
        assert (x.text, x.finish_reason) == (y.text, y.finish_reason)
    assert bits(a.rewards) == bits(b.rewards) and bits(a.advantages) == bits(b.advantages)
    assert a.answers == b.answers
    assert a.components.keys() == b.components.keys()
    assert all(bits(a.components[k]) == bits(b.components[k]) for k in a.components)


@FUZZ
@given(groups())
def test_roundtrip_is_exact(g):
    out = decode(encode(g))
    assert_identical(out, g)
    assert encode(out) == encode(g)


def test_decoded_arrays_are_native_writable_contract_dtypes():
    out = decode(encode(small()))
    for a in [out.rollout.prompt_ids, out.rewards, *(r.token_ids for r in out.rollout.responses),
              *(r.logprobs for r in out.rollout.responses)]:
        assert a.dtype in (np.int32, np.float32) and a.dtype.isnative and a.flags.writeable
    out.rollout.responses[0].token_ids[0] = -1          # a view of its own buffer, not of the payload
    assert out.rollout.responses[0].token_ids[0] == -1


def test_edge_cases_roundtrip():
    empty = ScoredGroup(Rollout("g", "p", np.zeros(0, np.int32), "", [], 0), np.zeros(0, np.float32),
                        np.zeros(0, np.float32), [])
    assert_identical(decode(encode(empty)), empty)
    g = small(length=0)                                 # responses with no tokens
    assert_identical(decode(encode(g)), g)
    nan = small()
    nan.rollout.responses[1].logprobs[2] = np.nan
    nan.rollout.meta["x"] = float("nan")
    out = decode(encode(nan))
    assert np.isnan(out.rollout.responses[1].logprobs[2]) and out.rollout.meta["x"] != out.rollout.meta["x"]


def test_encode_casts_to_contract_dtypes_without_loss():
    g = small()
    g.rollout.responses[0].token_ids = g.rollout.responses[0].token_ids.astype(np.int64)
    g.rewards = g.rewards.astype(np.float64)
    g.rollout.prompt_ids = [1, 2, 3]
    out = decode(encode(g))
    assert out.rollout.responses[0].token_ids.dtype == np.int32 and out.rewards.dtype == np.float32
    assert out.rollout.prompt_ids.tolist() == [1, 2, 3]


@pytest.mark.parametrize("mutate, match", [
    (lambda g: g.rollout.meta.update(t=(1, 2)), r"rollout.meta\['t'\]: builtins.tuple"),
    (lambda g: g.rollout.meta.update(s={1}), r"rollout.meta\['s'\]: builtins.set"),
    (lambda g: g.rollout.meta.update(n=[1, np.int64(3)]), r"rollout.meta\['n'\]\[1\]: numpy.int64"),
    (lambda g: g.rollout.meta.update(b=b"raw"), r"rollout.meta\['b'\]: builtins.bytes"),
    (lambda g: g.rollout.meta.update(o=object()), r"rollout.meta\['o'\]: builtins.object"),
    (lambda g: g.rollout.meta.update({3: "x"}), r"key 3 is a int"),
    (lambda g: g.rollout.meta.update(big=2**64), r"does not fit 64 bits"),
    (lambda g: g.rollout.meta.update(deep=_nest(20)), r"deeper than 16"),
    (lambda g: setattr(g.rollout, "meta", []), r"rollout.meta: expected dict"),
    (lambda g: setattr(g.rollout.responses[1], "token_ids", np.array([2**40, 1], np.int64)),
     r"responses\[1\].token_ids: values .* do not fit int32"),
    (lambda g: setattr(g.rollout.responses[0], "token_ids", np.zeros(7, np.float32)),
     r"responses\[0\].token_ids: expected an integer array"),
    (lambda g: setattr(g.rollout.responses[2], "logprobs", np.zeros(6, np.float32)),
     r"responses\[2\]: 7 token_ids but 6 logprobs"),
    (lambda g: setattr(g.rollout, "prompt_ids", np.zeros((2, 2), np.int32)), r"prompt_ids: expected a 1-D"),
    (lambda g: setattr(g, "rewards", np.zeros(2, np.float32)), r"rewards: length 2, expected 3"),
    (lambda g: setattr(g, "answers", ["4", 4, None]), r"answers\[1\]: expected str"),
    (lambda g: setattr(g, "answers", ["4"]), r"answers: expected a list of 3"),
    (lambda g: g.components.update(bad=np.zeros(1, np.float32)), r"components\['bad'\]: length 1"),
    (lambda g: setattr(g.rollout.responses[0], "text", "a\ud800b"), r"responses\[0\].text: not encodable"),
    (lambda g: setattr(g.rollout, "version", -1), r"rollout.version: -1 is outside"),
    (lambda g: setattr(g.rollout, "version", True), r"rollout.version: expected int"),
    (lambda g: setattr(g.rollout, "group_id", 5), r"rollout.group_id: expected str"),
    (lambda g: g.rollout.timing.update(t="slow"), r"rollout.timing\['t'\]: expected a number"),
])
def test_encode_rejects_what_would_not_roundtrip(mutate, match):
    g = small()
    mutate(g)
    with pytest.raises(CodecError, match=match):
        encode(g)


def _nest(depth):
    x = 1
    for _ in range(depth):
        x = [x]
    return x


def _doc(**changes) -> bytes:
    d = msgpack.unpackb(encode(small()))
    for k, v in changes.items():
        if v is KeyError:
            del d[k]
        else:
            d[k] = v
    return msgpack.packb(d, use_bin_type=True)


@pytest.mark.parametrize("payload, match", [
    (_doc(schema=2), r"schema: version 2 is not supported"),
    (_doc(schema="1"), r"schema: version '1'"),
    (_doc(tokens=KeyError), r"missing keys \['tokens'\]"),
    (_doc(extra=1), r"unexpected keys \['extra'\]"),
    (_doc(tokens=b"\x00" * 85), r"tokens: 85 bytes is not a whole number of 4-byte int32"),
    (_doc(tokens=b"\x00" * 80), r"tokens: 20 int32 values, expected 21"),
    (_doc(logprobs=b"\x00" * 88), r"logprobs: 22 float32 values, expected 21"),
    (_doc(rewards=b"\x00" * 8), r"rewards: 2 float32 values, expected 3"),
    (_doc(rewards=[1.0, 1.0, 1.0]), r"rewards: expected bin, got list"),
    (_doc(version="4"), r"version: expected int, got str"),
    (_doc(version=True), r"version: expected int, got bool"),
    (_doc(version=-3), r"version: -3 is outside"),
    (_doc(version=2**64 - 1), r"version: \d+ is outside"),
    (_doc(lengths=[7, 7, -7]), r"lengths: expected non-negative ints"),
    (_doc(texts=["a"]), r"texts: length 1, expected 3"),
    (_doc(finish=["stop", None, "stop"]), r"finish\[1\]: expected str, got NoneType"),
    (_doc(answers=["4", 4, None]), r"answers\[1\]: expected str or nil"),
    (_doc(gold=3), r"gold: expected str or nil, got int"),
    (_doc(meta={"b": b"raw"}), r"meta\['b'\]: builtins.bytes"),
    (_doc(meta={"x": msgpack.ExtType(5, b"zz")}), r"not a valid msgpack document|ExtType"),
    (_doc(timing={"t": 1}), r"timing\['t'\]: expected float, got int"),
    (_doc(components={"c": [1.0]}), r"components\['c'\]: expected bin"),
    (msgpack.packb([1, 2]), r"expected a msgpack map, got list"),
    (msgpack.packb({1: 2}, strict_types=False), r"not a valid msgpack document"),
    (pickle.dumps(small()), r"not a valid msgpack document|expected a msgpack map"),
    (b"", r"not a valid msgpack document"),
    (encode(small()) + b"\x00", r"not a valid msgpack document \(ExtraData"),
])
def test_decode_names_what_is_wrong(payload, match):
    with pytest.raises(CodecError, match=match):
        decode(payload)


def test_decode_rejects_oversized_payloads_and_groups(monkeypatch):
    data = encode(small())
    monkeypatch.setattr(codec, "MAX_PAYLOAD_BYTES", len(data) - 1)
    with pytest.raises(CodecError, match=r"payload: \d+ bytes > limit"):
        decode(data)
    with pytest.raises(CodecError, match=r"encodes to \d+ bytes > limit"):
        encode(small())
    monkeypatch.setattr(codec, "MAX_PAYLOAD_BYTES", 1 << 20)
    monkeypatch.setattr(codec, "MAX_RESPONSES", 2)
    with pytest.raises(CodecError, match=r"lengths: 3 responses > limit 2"):
        decode(data)
    with pytest.raises(CodecError, match=r"3 responses > limit 2"):
        encode(small())
    with pytest.raises(CodecError, match="expected bytes"):
        decode("a str")
    with pytest.raises(CodecError, match="expected ScoredGroup"):
        encode(small().rollout)


def test_every_truncation_is_a_codec_error():
    data = encode(small(g=2, length=3, numbers=[1, 2, {"a": None}]))
    for n in range(len(data)):
        with pytest.raises(CodecError):
            decode(data[:n])


@FUZZ
@given(st.binary(max_size=2000))
def test_random_bytes_are_a_codec_error(data):
    with pytest.raises(CodecError):
        decode(data)


@FUZZ
@given(st.data())
def test_corrupted_bytes_decode_or_raise_codec_error(data):
    """Any byte overwritten: either still a valid group (e.g. inside an array) or a CodecError, nothing else."""
    payload = bytearray(encode(small(g=2, length=4, numbers=[1, 2.5])))
    for _ in range(data.draw(st.integers(1, 4))):
        payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(st.integers(0, 255))
    try:
        out = decode(bytes(payload))
    except CodecError:
        return
    assert isinstance(out, ScoredGroup)
    again = encode(out)                                 # what decodes is a valid, re-encodable group ...
    assert encode(decode(again)) == again               # ... whose bytes round-trip exactly
