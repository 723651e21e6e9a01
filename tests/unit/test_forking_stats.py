"""Forking-aware sampling's configuration and step statistics (no engine): Sampling.train and
rollout_stats' generator/forking_* keys."""

import math

import numpy as np
import pytest

from actors.generator import Forking, Sampling
from cluster.config import ConfigError, RolloutConfig, load_config
from cluster.driver.stepstats import rollout_stats
from cluster.types import Response, Rollout


def rollout(timing):
    r = Response(np.arange(3, dtype=np.int32), np.zeros(3, np.float32), "", "stop")
    return Rollout("g", "p", np.arange(2, dtype=np.int32), "", [r], 0, timing=timing)


def test_off_by_default_and_the_dotted_override_turns_it_on():
    assert Sampling.train(RolloutConfig()).forking is None
    cfg = load_config(None, ["rollout.forking_temperature.high=1.2", "rollout.temperature=0.9"])
    s = Sampling.train(cfg.rollout)
    assert s.forking == Forking(1.2, 0.9, 0.672) and s.temperature == 0.9     # low defaults to rollout.temperature
    live = load_config(None, ["rollout.forking_temperature.high=1.2", "rollout.forking_temperature.threshold=live",
                              "rollout.forking_temperature.live_start=0.5"]).rollout
    assert Sampling.train(live).forking.threshold == 0.5 and Sampling.train(live, 0.25).forking.threshold == 0.25
    with pytest.raises(ConfigError):
        load_config(None, ["rollout.forking_temperature.high=1.2", "rollout.backend=hf"])
    with pytest.raises(ConfigError):
        load_config(None, ["rollout.forking_temperature.threshold=sometimes"])
    with pytest.raises(ValueError):
        Forking(0.0, 1.0, 0.5)


def test_rollout_stats_report_the_share_and_entropy_at_t_high():
    assert "generator/forking_high_share" not in rollout_stats([rollout({})], 0)
    st = rollout_stats([rollout({"forking_positions": 6.0, "forking_high": 2.0, "forking_high_entropy_sum": 3.0}),
                        rollout({"forking_positions": 4.0, "forking_high": 0.0, "forking_high_entropy_sum": 0.0})], 0)
    assert st["generator/forking_high_share"] == pytest.approx(0.2)
    assert st["generator/forking_high_entropy"] == pytest.approx(1.5)
    none = rollout_stats([rollout({"forking_positions": 4.0, "forking_high": 0.0})], 0)
    assert none["generator/forking_high_share"] == 0.0 and math.isnan(none["generator/forking_high_entropy"])
