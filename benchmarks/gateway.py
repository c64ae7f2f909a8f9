"""8: the gateway's overhead: the same calls sent straight to the instant fake endpoint and through a
real `model-eval serve` process (routing, the lean HTTP client, the call log written per call).

    python -m benchmarks.gateway [--calls 2000]

Three processes share the 2 cores: the endpoint (benchmarks/fake_endpoint.py), the gateway, and this
client (one aiohttp session). Latency at concurrency 8 alternates the two sides in rounds so drift of
the shared machine weighs on both alike; added p50/p99 = through the gateway minus direct. Throughput
is calls/s through the gateway at concurrency 32 and 64 (direct beside it for scale).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import yaml

from benchmarks.common import REPO, Endpoint, Figure

TARGET_ADDED_P50_MS = 2.0
TARGET_CALLS_PER_S = 500.0
BODY = {"messages": [{"role": "user", "content": "Is 2+2=4? Answer PASS or FAIL."}], "max_tokens": 8}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class GatewayProcess:
    """`model-eval serve --no-auth` on a project whose one task routes to the endpoint."""

    def __init__(self, api_base: str, workdir: Path):
        workdir.mkdir(parents=True, exist_ok=True)
        registry = workdir / "models.yaml"
        registry.write_text(yaml.safe_dump({"models": [{"name": "bench", "model": "openai/fake", "api_base": api_base,
                                                        "price_per_million": {"input": 1.0, "output": 2.0}}]}))
        warehouse = workdir / "warehouse" / "model_eval.duckdb"
        sys.path.insert(0, str(REPO))
        from model_eval.registry import load_registry
        from model_eval.router import write_snapshot

        spec = load_registry(registry).get("bench")
        write_snapshot(warehouse.parent / "assignments.json",
                       {"bench": {**spec.routing_record(), "candidate": None, "stage": "full", "traffic_share": 1.0}})
        self.port = _free_port()
        self.log_dir = warehouse.parent / "production_log"
        env = {**os.environ, "MODEL_EVAL_REGISTRY": str(registry), "MODEL_EVAL_WAREHOUSE": str(warehouse), "no_proxy": "127.0.0.1"}
        env = {k: v for k, v in env.items() if not k.startswith("MODEL_EVAL_API")}
        self.proc = subprocess.Popen([sys.executable, "-m", "model_eval.cli", "serve", "--no-auth", "--port", str(self.port),
                                      "--rate-limit", "0"], env=env, cwd=REPO, stdout=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(self.base + "/v1/health", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise RuntimeError("the gateway did not start")
                time.sleep(0.1)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@dataclass
class Side:
    latencies_ms: list[float] = field(default_factory=list)
    calls: int = 0
    seconds: float = 0.0

    def quantile(self, q: float) -> float:
        return statistics.quantiles(self.latencies_ms, n=1000, method="inclusive")[round(q * 1000) - 1]


async def _run(session: aiohttp.ClientSession, url: str, body: bytes, calls: int, concurrency: int, side: Side) -> None:
    remaining = calls

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{url}: HTTP {response.status}")
            side.latencies_ms.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    side.seconds += time.perf_counter() - started
    side.calls += calls


@dataclass
class GatewayResult:
    direct_c1: Side
    gateway_c1: Side
    direct_c8: Side
    gateway_c8: Side
    throughput: dict[int, tuple[float, float]]   # concurrency -> (direct calls/s, gateway calls/s)
    gateway_cpu_ms: float
    logged: int
    expected_logged: int

    def figures(self) -> list[Figure]:
        added50 = self.gateway_c8.quantile(0.5) - self.direct_c8.quantile(0.5)
        added99 = self.gateway_c8.quantile(0.99) - self.direct_c8.quantile(0.99)
        out = [Figure("gateway c=1: added p50 (no queueing)",
                      f"{self.gateway_c1.quantile(0.5) - self.direct_c1.quantile(0.5):.2f} ms"),
               Figure("gateway c=8: p50 direct / through gateway",
                      f"{self.direct_c8.quantile(0.5):.2f} / {self.gateway_c8.quantile(0.5):.2f} ms"),
               Figure("gateway c=8: added p50", f"{added50:.2f} ms", f"<= {TARGET_ADDED_P50_MS:g} ms", added50 <= TARGET_ADDED_P50_MS),
               Figure("gateway c=8: p99 direct / through gateway",
                      f"{self.direct_c8.quantile(0.99):.2f} / {self.gateway_c8.quantile(0.99):.2f} ms"),
               Figure("gateway c=8: added p99", f"{added99:.2f} ms")]
        for concurrency, (direct, through) in sorted(self.throughput.items()):
            out.append(Figure(f"gateway c={concurrency}: calls/s through (direct)", f"{through:,.0f} ({direct:,.0f})",
                              f">= {TARGET_CALLS_PER_S:g}", through >= TARGET_CALLS_PER_S))
        out.append(Figure("gateway: CPU per call in the gateway process", f"{self.gateway_cpu_ms:.2f} ms"))
        out.append(Figure("gateway: calls in its call log / made", f"{self.logged:,} / {self.expected_logged:,}", "equal",
                          self.logged == self.expected_logged))
        return out


def measure(calls: int, rounds: int, workdir: Path) -> GatewayResult:
    with Endpoint() as endpoint:
        gateway = GatewayProcess(endpoint.api_base, workdir / "gateway")
        try:
            return asyncio.run(_measure(endpoint.api_base, gateway, calls, rounds))
        finally:
            gateway.close()


async def _measure(api_base: str, gateway: GatewayProcess, calls: int, rounds: int) -> GatewayResult:
    direct_url, gateway_url = api_base + "/chat/completions", gateway.base + "/v1/chat/completions"
    direct_body = json.dumps({"model": "fake", **BODY}).encode()
    gateway_body = json.dumps({"model": "task/bench", **BODY}).encode()
    connector = aiohttp.TCPConnector(limit=0)
    made = 0
    async with aiohttp.ClientSession(connector=connector) as session:
        for url, body in ((direct_url, direct_body), (gateway_url, gateway_body)):   # warm-up: pools, imports
            await _run(session, url, body, 200, 64, Side())
        made += 200
        alone = {"direct": Side(), "gateway": Side()}   # one call at a time: the overhead without any queue
        for name, url, body in (("direct", direct_url, direct_body), ("gateway", gateway_url, gateway_body)):
            await _run(session, url, body, max(200, calls // 4), 1, alone[name])
        made += alone["gateway"].calls
        direct, through = Side(), Side()
        per_round = max(1, calls // rounds)
        for index in range(rounds):
            order = [(direct_url, direct_body, direct), (gateway_url, gateway_body, through)]
            for url, body, side in (order if index % 2 == 0 else order[::-1]):
                await _run(session, url, body, per_round, 8, side)
        made += through.calls
        throughput = {}
        cpu_before, gateway_calls = gateway.cpu_seconds(), 0
        for concurrency in (32, 64):
            sides = {"direct": Side(), "gateway": Side()}
            for index in range(rounds):
                order = [("direct", direct_url, direct_body), ("gateway", gateway_url, gateway_body)]
                for name, url, body in (order if index % 2 == 0 else order[::-1]):
                    await _run(session, url, body, per_round, concurrency, sides[name])
            throughput[concurrency] = (sides["direct"].calls / sides["direct"].seconds,
                                       sides["gateway"].calls / sides["gateway"].seconds)
            gateway_calls += sides["gateway"].calls
        cpu_ms = (gateway.cpu_seconds() - cpu_before) * 1000 / gateway_calls
        made += gateway_calls
    logged = sum(sum(1 for _ in f.open()) for f in gateway.log_dir.glob("calls-*.jsonl"))
    return GatewayResult(alone["direct"], alone["gateway"], direct, through, throughput, cpu_ms, logged, made)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import format_table

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per side at each concurrency")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds the calls are split into")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="model_eval_gateway_bench_") as tmp:
        result = measure(args.calls, args.rounds, Path(tmp))
    print(f"load average (1/5/15 min): {' '.join(f'{v:.2f}' for v in load_before)} before, "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())} after; {os.cpu_count()} cores")
    print(format_table(result.figures()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
