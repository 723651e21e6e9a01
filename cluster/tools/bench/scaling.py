"""`forkrl bench scaling`: how cost grows (issue 23 item 6). Four sweeps; `--case` runs one of them.

group        step time of a real `forkrl train` run (e2e.vs_trl's forkrl side: sync loop, 2 threads per actor,
             16 arith prompts per step, float32, one update per step) against the group size G = 4, 8, 16, 32,
             at L = 64 new tokens. Trained tokens/s go beside it.
length       the same against the response length L = 64, 256, 1024 new tokens, at G = 8.
             Both run on the tiny model's weights with its stop token removed (`fixed_length_model`), so every
             response is exactly L tokens and a step trains 16 x G x L tokens: the sweep measures the cost of
             that many tokens, not of however long the model chose to answer.
queue        put throughput (groups/s) of N = 1, 4, 16, 64 producer processes, each a real
             `cluster.transport.queue.Producer` putting PUTS groups of 8 x 1024 tokens (bench queue's
             `realistic_group`) into one embedded Valkey; nothing consumes (max_undelivered is above the total,
             so no producer waits). Time: from the producers' common start (a barrier) to the last put.
weight-sync  one real sync (`WeightSender` -> `WeightReceiver` over gloo, SYNC_BYTES of float32 tensors in
             sync.bucket_mb buckets) against n = 1, 2, 4 receiver processes. Time: the slowest receiver's, from
             the manifest's arrival to its last tensor (as bench weight-sync's `full`, without vLLM's reload);
             the median of REPEATS warm syncs. Beside it the cost model of gloo's broadcast, a binomial tree
             (gloo/broadcast.cc): ceil(log2(n + 1)) rounds, each passing the whole buffer one hop, so
             T(n) = ceil(log2(n + 1)) * T(1), with T(1) = S / B calibrated by the 1-receiver point of the same run.

Every row: value = the measured point, baseline = the linear extrapolation from the sweep's smallest point
(y_0 * x / x_0, measured in the same run), so ratio = measured / linear; `growth` says how the whole sweep
grows (`growth()`). FORKRL_BENCH_QUICK=1 runs a reduced sweep (G = 4, L = 64, 1 and 4 producers, 1 and 2
receivers, fewer steps and rounds). A PNG per sweep goes to $FORKRL_BENCH_OUT (default docs/performance/).
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from cluster.tools.bench import row

QUICK = os.environ.get("FORKRL_BENCH_QUICK") == "1"
GROUPS = (4,) if QUICK else (4, 8, 16, 32)
LENGTHS = (64,) if QUICK else (64, 256, 1024)
PRODUCERS = (1, 4) if QUICK else (1, 4, 16, 64)
RECEIVERS = (1, 2) if QUICK else (1, 2, 4)
GROUP_AT, LENGTH_AT = 8, 64          # the fixed coordinate of the length and the group sweep (e2e's G and L)
STEPS = 3 if QUICK else 4            # train steps per point; the first is warm-up and not counted
PUTS = 8 if QUICK else 32            # groups per producer
QUEUE_SHAPE = "8x1024"               # bench queue's case: responses x tokens
ROUNDS = 1 if QUICK else 3           # counted rounds of the queue sweep (after one warm-up round)
SYNC_BYTES = (32 if QUICK else 256) << 20
REPEATS = 3 if QUICK else 5          # warm syncs per receiver count (after one cold sync)
TOLERANCE = 0.10                     # |measured / linear - 1| within this is "linear"
SWEEPS = ("group", "length", "queue", "weight-sync")
HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[3]


# ------------------------------------------------------------------------------ linearity (pure, unit-tested)

def _check(xs: Sequence[float], ys: Sequence[float]) -> None:
    if not xs or len(xs) != len(ys):
        raise ValueError(f"need as many points as values, at least one (got {len(xs)} x, {len(ys)} y)")
    if len(set(xs)) != len(xs) or min(xs) <= 0:
        raise ValueError(f"x values must be distinct and positive: {list(xs)}")
    if not all(math.isfinite(y) and y >= 0 for y in ys):
        raise ValueError(f"y values must be finite and >= 0: {list(ys)}")


def linear_prediction(xs: Sequence[float], ys: Sequence[float]) -> list[float]:
    """The linear extrapolation from the smallest x: y_0 * x / x_0 at every x (in the order given)."""
    _check(xs, ys)
    x0 = min(xs)
    y0 = ys[list(xs).index(x0)]
    return [y0 * x / x0 for x in xs]


def linearity(xs: Sequence[float], ys: Sequence[float]) -> list[float]:
    """measured / linear prediction at every x; 1 at the smallest x. Where the prediction is 0 (y_0 = 0):
    1 if the measured value is 0 too, else inf."""
    return [y / p if p else (1.0 if y == 0 else math.inf) for y, p in zip(ys, linear_prediction(xs, ys))]


def growth(xs: Sequence[float], ys: Sequence[float], tolerance: float = TOLERANCE) -> str:
    """How y grows with x against the line through the origin and the smallest point:
    "one point"; "linear" when the largest x is within `tolerance` of the line (a middle point off it and
    back is noise); otherwise "sub-linear, bends at X" or "super-linear, bends at X", X being the first x from
    which every larger x lies beyond the tolerance on that side."""
    r = [v for _, v in sorted(zip(xs, linearity(xs, ys)))]
    order = sorted(xs)
    if len(r) == 1:
        return "one point"
    side = 1 if r[-1] > 1 else -1
    if side * (r[-1] - 1) <= tolerance:
        return "linear"
    k = len(r) - 1
    while k > 1 and side * (r[k - 1] - 1) > tolerance:
        k -= 1
    return f"{'super' if side > 0 else 'sub'}-linear, bends at {order[k]:g}"


def tree_broadcast_model(receivers: Sequence[int], t1: float) -> list[float]:
    """Seconds of gloo's binomial-tree broadcast to n receivers (world n + 1) given T(1): ceil(log2(n + 1))
    rounds, each passing the whole buffer one hop at the 1-receiver rate."""
    return [n.bit_length() * t1 for n in receivers]   # int.bit_length(n) == ceil(log2(n + 1)) for n >= 1


# ------------------------------------------------------------------------------------------------ the rows

def _rows(metric: str, unit: str, sweep: str, xs: list, ys: list[float], cases: list[str],
          extras: list[dict], xlabel: str, model: list[float] | None = None) -> Iterator[dict]:
    """One row per point, the sweep's growth on each; writes the sweep's plot."""
    linear, label = linear_prediction(xs, ys), growth(xs, ys)
    plot = _plot(sweep, xlabel, f"{metric} ({unit})", xs, {"measured": ys, "linear": linear,
                                                          **({"tree model": model} if model else {})})
    for i, x in enumerate(xs):
        yield row(metric, ys[i], linear[i], unit, cases[i], "report", sweep=sweep, x=x, growth=label,
                  plot=plot, **extras[i])


def _plot(sweep: str, xlabel: str, ylabel: str, xs: list, series: dict[str, list[float]]) -> str | None:
    """log-log plot of the sweep into $FORKRL_BENCH_OUT (default docs/performance/); None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(os.environ.get("FORKRL_BENCH_OUT") or ROOT / "docs" / "performance")
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    for name, ys in series.items():
        ax.plot(xs, ys, marker="o" if name == "measured" else None, linestyle="-" if name == "measured" else "--",
                label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.set(xlabel=xlabel, ylabel=ylabel, title=f"bench scaling: {sweep}")
    ax.legend()
    fig.tight_layout()
    path = out / f"scaling-{sweep}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


# ----------------------------------------------------------------------------------- group and length sweeps

def fixed_length_model(max_new_tokens: int) -> str:
    """The tiny model (builtin:tiny) with its stop token removed and room for max_new_tokens: the same
    weights, so every response runs to rollout.max_new_tokens. RoPE has no parameters, so a longer
    max_position_embeddings is the same function on the positions the model was trained on."""
    import json
    import shutil

    from cluster.config import DataConfig
    from cluster.data.models import resolve_model
    from cluster.runtime import cache_dir

    src = resolve_model("builtin:tiny")
    positions = DataConfig().max_prompt_tokens + max_new_tokens
    out = cache_dir("bench", f"tiny-fixed-length-{positions}")
    if (out / "config.json").is_file():
        return str(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)

    def edit(name: str, **changes) -> None:
        f = tmp / name
        if f.is_file():
            d = json.loads(f.read_text())
            d.update(changes)
            f.write_text(json.dumps(d, indent=1))   # null, not absent: a tokenizer class has a default EOS

    edit("config.json", max_position_embeddings=positions, eos_token_id=None)
    edit("generation_config.json", eos_token_id=None)
    edit("tokenizer_config.json", eos_token=None)
    edit("special_tokens_map.json", eos_token=None)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return str(out)


def _step_point(model: str, g: int, length: int) -> dict:
    import numpy as np

    from cluster.tools.bench.e2e import SYNC_LOOP, train_run

    with tempfile.TemporaryDirectory() as d:
        rows = train_run(model, [f"run.steps={STEPS}", *SYNC_LOOP, f"rollout.group_size={g}",
                                 f"rollout.max_new_tokens={length}"], Path(d) / "run")[1:]
    mean = lambda key: round(float(np.mean([r[key] for r in rows])), 4)   # noqa: E731
    return {"step_s": float(np.mean([r["time/step_s"] for r in rows])),
            "trained_tokens_per_s": sum(r["learner/tokens"] for r in rows) / sum(r["time/step_s"] for r in rows),
            "tokens_per_step": mean("learner/tokens"), "response_length_mean": mean("response/length_mean"),
            "truncated_share": mean("response/truncated_share"),
            "phases": {k: mean(f"time/{k}_s") for k in ("generate", "grade", "train", "sync")}}


def step_sweep(sweep: str, cache: dict) -> Iterator[dict]:
    from cluster.tools.bench.e2e import PROMPTS

    points = [(g, LENGTH_AT) for g in GROUPS] if sweep == "group" else [(GROUP_AT, n) for n in LENGTHS]
    model = fixed_length_model(max(LENGTHS))
    for p in points:
        if p not in cache:            # (G 8, L 64) is on both sweeps: measured once per run
            cache[p] = _step_point(model, *p)
    res = [cache[p] for p in points]
    xs = [g if sweep == "group" else n for g, n in points]
    extras = [{k: v for k, v in r.items() if k != "step_s"} | {"prompts": PROMPTS, "steps_counted": STEPS - 1}
              for r in res]
    yield from _rows("scaling.step_time", "s/step", sweep, xs, [r["step_s"] for r in res],
                     [f"G={g},L={n}" for g, n in points], extras,
                     "group size G" if sweep == "group" else "max new tokens L")


# --------------------------------------------------------------------------------------------- queue sweep

def _producer(url: str, password: str, run_id: str, index: int, puts: int, cfg: dict, barrier, out) -> None:
    """One producer process: its own groups, its own connection; puts them all from the common start."""
    import numpy as np

    from cluster.config import QueueConfig
    from cluster.tools.bench.queue import CASES, realistic_group
    from cluster.transport.queue import Producer, QueueAddress

    g, length = CASES[QUEUE_SHAPE]
    rng = np.random.default_rng(index)
    groups = [realistic_group(index * puts + i, g, length, rng) for i in range(puts)]
    with Producer(QueueAddress(url, run_id, password), QueueConfig(**cfg)) as p:
        barrier.wait()
        t0 = time.monotonic()
        for x in groups:
            p.put(x)
        out.put((t0, time.monotonic()))


def _put_rate(ctx, server, name: str, n: int) -> float:
    """Groups/s of n producer processes putting PUTS groups each into a fresh run on `server`."""
    from cluster.transport.queue import QueueAddress, delete_run, setup_run

    total = n * PUTS
    cfg = {"max_undelivered": total + 1, "maxlen": total + 2}
    addr = QueueAddress(server.url, name, server.password)
    setup_run(addr)
    barrier, out = ctx.Barrier(n, timeout=600), ctx.Queue()
    procs = [ctx.Process(target=_producer, args=(server.url, server.password, name, i, PUTS, cfg, barrier, out))
             for i in range(n)]
    try:
        for p in procs:
            p.start()
        spans = [out.get(timeout=600) for _ in procs]
        for p in procs:
            p.join(60)
        if any(p.exitcode for p in procs):
            raise RuntimeError(f"a producer of {name} failed (exit codes {[p.exitcode for p in procs]})")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        delete_run(addr)
    return total / (max(t for _, t in spans) - min(t for t, _ in spans))


def queue_sweep() -> Iterator[dict]:
    import multiprocessing

    from cluster.transport.valkey import start_valkey

    ctx = multiprocessing.get_context("forkserver")   # children forked from a clean server: no inherited threads
    ctx.set_forkserver_preload(["cluster.tools.bench.scaling", "cluster.tools.bench.queue"])
    server = start_valkey()
    try:
        rates: dict[int, list[float]] = {n: [] for n in PRODUCERS}
        for r in range(ROUNDS + 1):                   # round 0 warms up and is not counted
            for n in PRODUCERS:                       # interleaved: a drift in load hits every N alike
                rate = _put_rate(ctx, server, f"scaling-{r}-{n}", n)
                if r:
                    rates[n].append(rate)
        info = server.client().info("server")
        name = f"valkey {info['valkey_version']}" if "valkey_version" in info else f"redis {info.get('redis_version')}"
    finally:
        server.stop()
    xs = list(PRODUCERS)
    extras = [{"rounds": [round(v, 1) for v in rates[n]], "puts_per_producer": PUTS, "groups": QUEUE_SHAPE,
               "server": name} for n in xs]
    yield from _rows("scaling.queue_throughput", "groups/s", "queue", xs, [statistics.median(rates[n]) for n in xs],
                     [f"producers={n}" for n in xs], extras, "producer processes")


# --------------------------------------------------------------------------------------- weight-sync sweep

def _receiver(port: int, rank: int, world: int, sync: dict, syncs: int, out) -> None:
    """One receiver process: the generator's end of the sync, consuming every tensor as it arrives."""
    import torch

    from cluster.config import SyncConfig
    from cluster.transport.weightsync import WeightReceiver

    torch.set_num_threads(1)
    rx = WeightReceiver(HOST, port, rank, world, SyncConfig(**sync))
    for _ in range(syncs):
        m = rx.receive_manifest()
        t0 = time.perf_counter()
        for _ in rx.tensors(m, copy=False):
            pass
        out.put(time.perf_counter() - t0)
    rx.close()


def _sync_time(ctx, named, sync, n: int) -> list[float]:
    """Per warm sync, the slowest of n receivers' seconds."""
    from cluster.transport.weightsync import WeightSender, free_port

    port, out = free_port(HOST), ctx.Queue()
    procs = [ctx.Process(target=_receiver, args=(port, rank, n + 1, sync.model_dump(), REPEATS + 1, out))
             for rank in range(1, n + 1)]
    try:
        for p in procs:
            p.start()
        sender = WeightSender(HOST, port, n + 1, sync)   # returns once every receiver has joined
        times = []
        for version in range(REPEATS + 1):
            sender.send(version, named)
            times.append(max(out.get(timeout=sync.timeout_s) for _ in procs))
        sender.close()
        for p in procs:
            p.join(60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    return times[1:]                                      # the first sync allocates the receive buffers


def weight_sync_sweep() -> Iterator[dict]:
    import multiprocessing

    import torch

    from cluster.config import SyncConfig
    from cluster.transport.weightsync import TensorSpec, bucket_bytes, plan_buckets

    sync = SyncConfig(backend="gloo")
    named = [(f"layer{i}.weight", torch.randn(SYNC_BYTES // 8 // 4)) for i in range(8)]   # 8 float32 tensors
    buckets = len(plan_buckets([TensorSpec.of(k, t) for k, t in named], bucket_bytes(sync)))
    ctx = multiprocessing.get_context("spawn")
    runs = {n: _sync_time(ctx, named, sync, n) for n in RECEIVERS}
    xs = list(RECEIVERS)
    ys = [statistics.median(runs[n]) for n in xs]
    model = tree_broadcast_model(xs, ys[0])
    extras = [{"model_s": model[i], "model_ratio": ys[i] / model[i] if model[i] else float("nan"),
               "model": "binomial tree (gloo::broadcast): ceil(log2(n+1)) * T(1), T(1) measured here",
               "bandwidth_gb_s": SYNC_BYTES / ys[0] / 1e9, "syncs_s": [round(t, 4) for t in runs[n]],
               "bytes": SYNC_BYTES, "buckets": buckets, "bucket_mb": sync.bucket_mb} for i, n in enumerate(xs)]
    yield from _rows("scaling.weight_sync_time", "s", "weight-sync", xs, ys, [f"receivers={n}" for n in xs],
                     extras, "gloo receivers", model=model)


def run(case: str | None = None) -> Iterator[dict]:
    if case is not None and case not in SWEEPS:
        raise KeyError(f"unknown scaling case {case!r}; choose from {', '.join(SWEEPS)}")
    cache: dict = {}
    for sweep in SWEEPS:
        if case not in (None, sweep):
            continue
        if sweep in ("group", "length"):
            yield from step_sweep(sweep, cache)
        elif sweep == "queue":
            yield from queue_sweep()
        else:
            yield from weight_sync_sweep()
