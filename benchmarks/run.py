"""All of model_eval's benchmarks, measured in one run, printed as one table.

    python benchmarks/run.py            # the full run: ~5 minutes on the project's 2-core machine
    python benchmarks/run.py --quick    # a ~1 minute smoke run at about 1/10 of the sizes
    python benchmarks/run.py --only memory --memory-sizes 10000,100000   # one section again

Sections (see benchmarks/README.md for what each figure means, how it is measured and its target):

1 throughput  engine `run_model` on both call paths (litellm, the lean HTTP client) vs a bare
              `litellm.acompletion` loop at concurrency 32 and 64, against an instant fake endpoint:
              calls/s and CPU per call; then an unchanged re-run (nothing may be sent).
2 faults      ~2,000 calls against an endpoint that fails 40% of attempts (429, 500, hangs past the
              timeout, garbage), versus the same calls fault-free.
3 memory      peak RSS of `steps.evaluation.run_inference` for 10,000 and 100,000 cases, each in a fresh
              process, with the idle interpreter's RSS and the ingestion time beside it.
4 warehouse   metrics and recommendations over 1,000,000 score rows; scoring per row.
5 peers       `model-eval run` end to end against promptfoo and Inspect AI (when installed) on the same
              cases and a stub answering in 20 ms: 20 and 2,000 cases, concurrency 32 and 64.
6 publish     writing one run into a warehouse holding 1,000,000 result rows versus an empty one.
7 adaptive    calls an adaptive run makes against a full one of the same scripted suite, and whether
              both name the same champion per task.
8 gateway     `model-eval serve` against calling the endpoint directly: added p50/p99 latency at
              concurrency 1 and 8, calls/s at 32 and 64, CPU per call, every call logged.

The fake endpoint is the test double model_eval_tests/fake_openai_server.py, run in processes of
its own by benchmarks/fake_endpoint.py so it never competes with the measured client for the GIL.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

# `python benchmarks/run.py` puts benchmarks/ itself on sys.path; the package needs the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402  (sets the environment before litellm is imported)
from benchmarks import adaptive, faults, gateway, memory, peers, publish, throughput, warehouse  # noqa: E402

SECTIONS = ["throughput", "faults", "memory", "warehouse", "peers", "publish", "adaptive", "gateway"]

# Full sizes, and the --quick ones (about a tenth; the memory pair keeps its 10x step).
FULL = dict(calls=2000, concurrency=[32, 64], rounds=6, fault_calls=2000, memory_sizes=[10_000, 100_000],
            metric_rows=1_000_000, score_rows=100_000, peer_sizes=[20, 2000], peer_rounds=3, publish_rows=1_000_000,
            publish_rounds=3)
QUICK = dict(calls=300, concurrency=[32, 64], rounds=3, fault_calls=200, memory_sizes=[300, 3_000],
             metric_rows=100_000, score_rows=10_000, peer_sizes=[20], peer_rounds=1, publish_rows=100_000,
             publish_rounds=1)


def versions() -> str:
    found = []
    for name in ["model_eval", "litellm", "openai", "aiohttp", "duckdb", "polars", "great-expectations"]:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} -")
    return ", ".join(found)


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="about 1/10 of the sizes: a smoke run of ~1 minute")
    parser.add_argument("--only", choices=SECTIONS, action="append", help="run only this section (repeatable)")
    parser.add_argument("--calls", type=int, help="calls per side and concurrency in 1")
    parser.add_argument("--concurrency", type=int_list, help="comma-separated concurrencies for 1, e.g. 32,64")
    parser.add_argument("--rounds", type=int, help="interleaved rounds the calls of 1 are split into")
    parser.add_argument("--fault-calls", type=int, help="calls in 2")
    parser.add_argument("--seed", type=int, default=7, help="seed of the fault mix in 2")
    parser.add_argument("--memory-sizes", type=int_list, help="comma-separated case counts for 3, smallest first")
    parser.add_argument("--memory-client", choices=["http", "litellm"], default="http",
                        help="how run_inference calls the endpoint in 3 (litellm: ~15 min for 100,000 calls)")
    parser.add_argument("--memory-limit", type=float, default=300, help="seconds each memory child may take")
    parser.add_argument("--metric-rows", type=int, help="score rows in 4")
    parser.add_argument("--score-rows", type=int, help="rows scored in 4 (extrapolated to 1M)")
    parser.add_argument("--peer-sizes", type=int_list, help="comma-separated suite sizes (cases) for 5, e.g. 20,2000")
    parser.add_argument("--peer-rounds", type=int, help="timed runs per runner and size in 5 (the median is reported)")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="how long the stub takes to answer in 5")
    parser.add_argument("--publish-rows", type=int, help="result rows already in the warehouse in 6")
    parser.add_argument("--publish-rounds", type=int, help="timed runs per warehouse in 6")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the engine even when 1 passes")
    args = parser.parse_args(argv)
    size = {**(QUICK if args.quick else FULL),
            **{k: v for k, v in vars(args).items() if k in FULL and v is not None}}
    sections = args.only or SECTIONS

    started = time.perf_counter()
    load_before = load()
    figures: list[common.Figure] = []
    profile = None
    peer_versions: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="model_eval_bench_") as tmp:
        workdir = Path(tmp)
        if "throughput" in sections:
            print(f"1 throughput: {size['calls']:,} calls per side at concurrency {size['concurrency']}...", flush=True)
            result = throughput.measure(size["calls"], size["concurrency"], size["rounds"], workdir, args.profile)
            figures += result.figures()
            profile = result.profile
        if "faults" in sections:
            print(f"2 faults: {size['fault_calls']:,} calls with and without faults...", flush=True)
            figures += faults.measure(size["fault_calls"], args.seed, workdir).figures()
        if "memory" in sections:
            print(f"3 memory: {', '.join(f'{n:,}' for n in size['memory_sizes'])} cases, fresh processes...", flush=True)
            with common.Endpoint() as endpoint:
                figures += memory.measure(size["memory_sizes"], workdir, args.memory_limit, args.memory_client,
                                          endpoint.api_base).figures()
        if "warehouse" in sections:
            print(f"4 warehouse: {size['metric_rows']:,} score rows...", flush=True)
            figures += warehouse.measure(size["metric_rows"], size["score_rows"], workdir).figures()
        if "peers" in sections:
            print(f"5 peers: {', '.join(f'{n:,}' for n in size['peer_sizes'])} cases at concurrency {size['concurrency']}...",
                  flush=True)
            result = peers.measure(size["peer_sizes"], size["concurrency"], size["peer_rounds"], args.delay_ms, workdir)
            figures += result.figures()
            peer_versions = result.versions
        if "publish" in sections:
            print(f"6 publish: a run into an empty warehouse and one with {size['publish_rows']:,} result rows...", flush=True)
            figures += publish.measure(size["publish_rows"], size["publish_rounds"], workdir).figures()
        if "adaptive" in sections:
            print("7 adaptive: 8 models x 2 tasks x 500 cases x 3 repeats, full then adaptive...", flush=True)
            figures += adaptive.measure(workdir).figures()
        if "gateway" in sections:
            print(f"8 gateway: {size['calls']:,} calls per side, direct and through model-eval serve...", flush=True)
            figures += gateway.measure(size["calls"], 4, workdir).figures()

    print()
    print(f"model_eval benchmark{' (--quick)' if args.quick else ''}  "
          f"{dt.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"machine: {os.cpu_count()} cores, {platform.machine()}, {platform.system()} {platform.release()}, "
          f"python {platform.python_version()}")
    print(f"load average (1/5/15 min): {load_before} before, {load()} after (other work shares these cores)")
    print(f"versions: {versions()}")
    if peer_versions:
        print(f"peers: {', '.join(peer_versions.values())}")
    print("endpoint: fake OpenAI server (test double) in separate processes on 127.0.0.1")
    if args.quick:
        # Runs of a second or two on a shared machine: a ratio can move by 20% between runs.
        print("--quick: smoke sizes, the figures are noisy; judge the targets on the full run")
    print(common.format_table(figures))
    misses = [f.label for f in figures if f.ok is False]
    print(f"{len(misses)} MISS of {sum(f.ok is not None for f in figures)} targets; "
          f"total benchmark time {time.perf_counter() - started:.0f} s")
    if profile:
        print()
        print(profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
