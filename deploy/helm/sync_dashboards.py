"""Copy the Grafana dashboards (dashboards/*.json) into the chart, which Helm cannot read outside itself.

    python deploy/helm/sync_dashboards.py          # copy, removing chart copies whose source is gone
    python deploy/helm/sync_dashboards.py --check  # exit 1 and list the differences instead

Run it after regenerating the dashboards (`forkrl dashboards export`); the chart test fails while the
copies differ. Standard library only.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "dashboards"
TARGET = REPO / "deploy" / "helm" / "forkrl" / "dashboards"


def differences(source: Path = SOURCE, target: Path = TARGET) -> list[str]:
    """What a sync would change: one line per missing, stale or extra file (empty = in sync)."""
    src = {p.name: p.read_bytes() for p in sorted(source.glob("*.json"))}
    dst = {p.name: p.read_bytes() for p in sorted(target.glob("*.json"))}
    out = [f"missing in chart: {n}" for n in src if n not in dst]
    out += [f"differs: {n}" for n in src if n in dst and src[n] != dst[n]]
    out += [f"no longer in dashboards/: {n}" for n in dst if n not in src]
    return out


def sync(source: Path = SOURCE, target: Path = TARGET) -> list[str]:
    changes = differences(source, target)
    target.mkdir(parents=True, exist_ok=True)
    for p in target.glob("*.json"):
        if not (source / p.name).is_file():
            p.unlink()
    for p in source.glob("*.json"):
        shutil.copyfile(p, target / p.name)
    return changes


def main(argv: list[str]) -> int:
    if argv == ["--check"]:
        diff = differences()
        for line in diff:
            print(line, file=sys.stderr)
        return 1 if diff else 0
    if argv:
        print(__doc__, file=sys.stderr)
        return 2
    for line in sync():
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
