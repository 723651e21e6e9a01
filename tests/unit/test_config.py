import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import Config, ConfigError, load_config, parse_overrides

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_validate_and_overrides_apply():
    cfg = load_config(None, ["learner.lr=1e-6", "algorithm.top_entropy_ratio=0.2", "run.name=x"])
    assert cfg.learner.lr == 1e-6
    assert cfg.algorithm.top_entropy_ratio == 0.2
    assert cfg.run.name == "x"
    demo = load_config(ROOT / "configs" / "demo.yaml", ["learner.lr=2e-6"])
    assert demo.learner.lr == 2e-6 and demo.rollout.prompts_per_step == 16   # the override, then the file


def test_demo_yaml_is_the_embedded_default():
    """configs/demo.yaml spells out what `forkrl train` with no config runs: the two must never drift."""
    assert load_config(ROOT / "configs" / "demo.yaml").model_dump() == load_config(None).model_dump()


def test_overrides_parse_yaml_scalars():
    assert parse_overrides(["a.b=1e-6", "a.c=true", "d=null", "e=[1, 2]", "f=abc"]) == {
        "a": {"b": 1e-6, "c": True}, "d": None, "e": [1, 2], "f": "abc"}
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_overrides(["learner.lr"])


@pytest.mark.parametrize("override, needle", [
    ("learner.lr=-1", "learner.lr"),
    ("learner.lrr=1", "learner.lrr: unknown key (did you mean learner.lr?)"),
    ("lerner.lr=1", "lerner: unknown key"),
    ("algorithm.top_entropy_ratio=0", "algorithm.top_entropy_ratio"),
    ("algorithm.top_entropy_ratio=1.5", "algorithm.top_entropy_ratio"),
    ("algorithm.entropy_scope=batch", "algorithm.entropy_scope"),
    ("rollout.temperature=nan", "rollout.temperature"),
    ("learner.zero_stage=4", "learner.zero_stage"),
])
def test_bad_values_name_the_field(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="ttrl_vote"):
        load_config(None, ["reward.ttrl=true", "reward.ttrl_vote=4", "rollout.group_size=8"])
    with pytest.raises(ConfigError, match="mini_batches"):
        load_config(None, ["rollout.prompts_per_step=10", "learner.mini_batches=3"])
    with pytest.raises(ConfigError, match="train_path"):
        load_config(None, ["data.task=file"])


def test_every_field_documented():
    def walk(model, prefix):
        for name, f in model.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, Config.__mro__[1]):  # a Section
                yield from walk(ann, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}", f.description
    undocumented = [k for k, d in walk(Config, "") if not d]
    assert not undocumented


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_cli_check():
    exe = [sys.executable, "-m", "cluster.cli"]
    ok = subprocess.run(exe + ["check", str(ROOT / "configs/demo.yaml")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "top_entropy_ratio" in ok.stdout
    for bad, needle in (("learner.lr=-1", "learner.lr"), ("learner.lrr=1", "learner.lrr")):
        r = subprocess.run(exe + ["check", str(ROOT / "configs/demo.yaml"), bad], capture_output=True, text=True)
        assert r.returncode != 0 and needle in r.stderr
    help_ = subprocess.run(exe + ["--help"], capture_output=True, text=True).stdout
    for sub in ("train", "check", "models", "grade", "bench", "dashboards", "experiment"):
        assert sub in help_


# Read only by the config's own validator, which is the point: the vote uses all G samples, and the field
# makes a recipe state N_vote explicitly (docs/algorithms.md 4.1).
VALIDATED_ONLY = {"reward.ttrl_vote"}


def test_every_config_field_is_read_by_the_code():
    """Each `section.field` is read somewhere outside cluster/config.py (as `.field`): a field nothing reads
    would be a setting that silently does nothing."""
    import re

    from pydantic import BaseModel

    source = "\n".join(p.read_text() for d in ("cluster", "actors", "learner", "reward")
                       for p in (ROOT / d).rglob("*.py") if p != ROOT / "cluster" / "config.py")
    unread = []
    for section, field in Config.model_fields.items():
        assert issubclass(field.annotation, BaseModel), section
        for name in field.annotation.model_fields:
            if f"{section}.{name}" not in VALIDATED_ONLY and not re.search(rf"\.{name}\b", source):
                unread.append(f"{section}.{name}")
    assert not unread, f"config fields no code reads: {unread}"
    assert VALIDATED_ONLY <= {f"{s}.{n}" for s, f in Config.model_fields.items() for n in f.annotation.model_fields}
