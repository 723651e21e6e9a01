"""Manifest codec and bucket planning of the weight sync (pure, no process group)."""

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.transport.weightsync import _ALIGN, Manifest, SyncError, TensorSpec, plan_buckets

DTYPES = ["float32", "bfloat16", "float16", "int64", "int8", "bool"]

specs_st = st.lists(st.builds(TensorSpec, name=st.text(min_size=1, max_size=8),
                              shape=st.lists(st.integers(0, 40), max_size=3).map(tuple),
                              dtype=st.sampled_from(DTYPES)), max_size=30)


@settings(max_examples=100, deadline=None)
@given(specs=specs_st, bucket_bytes=st.integers(1, 4096))
def test_plan_buckets_places_every_tensor_once_aligned_without_overlap(specs, bucket_bytes):
    buckets = plan_buckets(specs, bucket_bytes)
    placed = [i for b in buckets for i, _ in b.entries]
    assert placed == list(range(len(specs)))          # every tensor, in send order, exactly once
    for b in buckets:
        assert b.entries
        end = 0
        for i, off in b.entries:
            assert off % _ALIGN == 0 and off >= end   # aligned for any dtype view, no overlap
            end = off + specs[i].nbytes
        assert b.nbytes == end
        # a bucket exceeds the size only when it holds one tensor that is larger on its own
        assert b.nbytes <= bucket_bytes or len(b.entries) == 1


def test_plan_buckets_packs_greedily():
    specs = [TensorSpec(f"t{i}", (16,), "float32") for i in range(5)]  # 64 bytes each
    buckets = plan_buckets(specs, 128)
    assert [len(b.entries) for b in buckets] == [2, 2, 1]
    assert [off for _, off in buckets[0].entries] == [0, 64]
    assert plan_buckets([], 128) == []


@settings(max_examples=100, deadline=None)
@given(specs=specs_st, version=st.integers(0, 2**62), bucket_bytes=st.integers(1, 2**40))
def test_manifest_roundtrip(specs, version, bucket_bytes):
    m = Manifest(version, bucket_bytes, tuple(specs))
    assert Manifest.decode(m.encode()) == m


def test_spec_of_tensor():
    s = TensorSpec.of("w", torch.zeros(3, 4, dtype=torch.bfloat16))
    assert s == TensorSpec("w", (3, 4), "bfloat16") and s.nbytes == 24
    with pytest.raises(SyncError, match="'c'.*complex64"):
        TensorSpec.of("c", torch.zeros(2, dtype=torch.complex64))


@pytest.mark.parametrize("payload, match", [
    (b"\xc1garbage", "not a msgpack map"),
    (msgpack.packb({"version": 1, "bucket_bytes": 8}), "not a msgpack map"),
    (msgpack.packb({"version": "1", "bucket_bytes": 8, "tensors": []}), "bad version"),
    (msgpack.packb({"version": 1, "bucket_bytes": 0, "tensors": []}), "bucket_bytes"),
    (msgpack.packb({"version": 1, "bucket_bytes": 8, "tensors": [["a", [2], "float32"], ["b", [-1], "float32"]]}),
     "tensor row 1"),
    (msgpack.packb({"version": 1, "bucket_bytes": 8, "tensors": [["a", [2], "object"]]}), "tensor row 0"),
])
def test_manifest_decode_rejects_bad_input_naming_the_problem(payload, match):
    with pytest.raises(SyncError, match=match):
        Manifest.decode(payload)


def test_backend_resolution_never_picks_nccl_without_a_gpu():
    from cluster.transport.weightsync import resolve_backend

    assert resolve_backend("gloo") == "gloo"
    assert resolve_backend("auto") == ("nccl" if torch.cuda.is_available() else "gloo")
    if not torch.cuda.is_available():
        with pytest.raises(SyncError, match="'nccl' but this process sees no GPU"):
            resolve_backend("nccl")


def test_group_rejects_a_rank_outside_the_world_before_any_network():
    from cluster.transport.weightsync import BroadcastGroup

    with pytest.raises(SyncError, match="rank 2 outside world of size 2"):
        BroadcastGroup("127.0.0.1", 1, 2, 2, 1.0, "gloo")
    with pytest.raises(SyncError, match="need >= 2 ranks"):
        BroadcastGroup("127.0.0.1", 1, 0, 1, 1.0, "gloo")
