"""Suite-wide fixtures: caches in $FORKRL_CACHE, offline hub, and the tiny model built once per machine."""

import os

import pytest

from cluster.runtime import cache_dir, setup_env

setup_env()


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    """The warm-started tiny Qwen2 model of `forkrl models build-tiny` (cached across runs)."""
    from cluster.data.models import build_tiny

    return str(build_tiny(str(cache_dir("models", "tiny-arith")), task="arith"))


@pytest.fixture(scope="session")
def organism_model_dir() -> str:
    """The model organism of `forkrl models build-organism` (docs/organism.md; builtin:organism's cache)."""
    from cluster.data.models import build_organism

    return str(build_organism(str(cache_dir("models", "organism"))))


@pytest.fixture(scope="session")
def untrained_tiny_model_dir() -> str:
    """Same architecture and tokenizer, random weights (no SFT): fast to build, for plumbing tests."""
    from cluster.data.models import build_tiny

    return str(build_tiny(str(cache_dir("models", "tiny-random")), task="arith", sft_steps=0))
