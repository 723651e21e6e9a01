"""The files a config names (model.path, data.train_path, data.eval_path), looked for before a run starts.

`forkrl train` reads them in the driver, so a missing one is an error naming its field before the run directory
or any process exists; `forkrl check` looks for them too unless told they live on the cluster (`--remote`).
"""

from __future__ import annotations

import re
from pathlib import Path

from cluster.config import Config, ConfigError

BUILTIN = "builtin:"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def named_paths(cfg: Config) -> list[tuple[str, str]]:
    """(dotted field, path) of every file or directory the config reads (builtin models are none)."""
    out = [] if cfg.model.path.startswith(BUILTIN) else [("model.path", cfg.model.path)]
    if cfg.data.task == "file":
        out += [(f"data.{k}", v) for k, v in (("train_path", cfg.data.train_path),
                                               ("eval_path", cfg.data.eval_path)) if v]
    return out


def check_paths(cfg: Config, remote: bool = False) -> list[str]:
    """Raise ConfigError naming every local path that is missing (a model directory needs its config.json);
    return one note per path that was not looked for (`remote`, or a URL)."""
    notes, missing = [], []
    for field, path in named_paths(cfg):
        if remote or _URL.match(path):
            notes.append(f"{field} {path!r}: not checked (a {'cluster' if remote else 'remote'} path)")
        elif field == "model.path":
            p = Path(path)
            if not p.exists():
                missing.append(f"model.path {path!r} does not exist")
            elif not (p / "config.json").is_file():
                missing.append(f"model.path {path!r} is not an HF checkpoint directory (no config.json)")
        elif not Path(path).is_file():
            missing.append(f"{field} {path!r} does not exist")
    if missing:
        raise ConfigError("; ".join(missing) + (" (use builtin:tiny, builtin:organism, builtin:smollm2 or a local HF "
                                                 "directory)"
                                                 if any(m.startswith("model.path") for m in missing) else ""))
    return notes
