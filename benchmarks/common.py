"""What every benchmark module shares: the environment, the endpoint process, requests, figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

# Before litellm, Great Expectations or Dagster are imported anywhere: litellm's bundled price map
# (no network), and no telemetry. Child processes inherit these.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # model_eval_tests (the fake server) is not installed, only checked out

from model_eval.inference import CallRequest  # noqa: E402
from model_eval.registry import ModelSpec  # noqa: E402
from model_eval.response_cache import cache_key  # noqa: E402

PARAMS = {"max_tokens": 8}


# ---------------------------------------------------------------- the endpoint, in another process
class Endpoint:
    """benchmarks/fake_endpoint.py as a child process; closing its stdin stops it."""

    def __init__(self, faults: bool = False, seed: int = 7, max_attempts: int = 4, limit_s: float = 1800,
                 delay_ms: float = 0.0):
        command = [sys.executable, "-m", "benchmarks.fake_endpoint", "--seconds", str(limit_s), "--delay-ms", str(delay_ms)]
        if faults:
            command += ["--faults", "--seed", str(seed), "--max-attempts", str(max_attempts)]
        self.proc = subprocess.Popen(command, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.summary: dict | None = None
        port = self.proc.stdout.readline().strip()
        if not port.isdigit():
            self.close()
            raise RuntimeError(f"fake endpoint did not report a port (got {port!r})")
        self.api_base = f"http://127.0.0.1:{port}/v1"

    def stats(self) -> dict:
        with urllib.request.urlopen(self.api_base.removesuffix("/v1") + "/_fake/stats", timeout=10) as response:
            return json.load(response)

    def sent(self) -> int:
        """Chat-completion requests the server has received so far."""
        return self.stats()["total"]

    def close(self) -> dict | None:
        """Stop the server; returns the summary it prints on the way out (see fake_endpoint.Fates)."""
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        # Its stdout holds two short lines (port, summary): well under a pipe's buffer, so the
        # child never blocked on writing it and reading after it exited is safe.
        out = self.proc.stdout.read() if self.proc.stdout else ""
        lines = [line for line in out.splitlines() if line.startswith("{")]
        self.summary = json.loads(lines[-1]) if lines else None
        return self.summary

    def __enter__(self) -> "Endpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- a model and its calls
def make_spec(api_base: str, concurrency: int, *, timeout_s: float = 30.0, max_attempts: int = 3) -> ModelSpec:
    return ModelSpec(name="bench", litellm_model="openai/fake", provider="openai", family="fake", api_base=api_base,
                     price_input_per_million=1.0, price_output_per_million=2.0, max_concurrency=concurrency,
                     timeout_s=timeout_s, max_attempts=max_attempts)


def make_requests(spec: ModelSpec, calls: int, repeats: int = 2, salt: str = "") -> list[CallRequest]:
    """`calls` requests as (calls / repeats) cases x repeats, like a golden set with repeats.

    Repeats of a case send the same body, as in a real evaluation. (The fault suite uses one repeat:
    the fake server counts attempts per body, and its fault script draws per (body, attempt).)
    """
    requests = []
    for i in range(calls // repeats):
        messages = [{"role": "system", "content": "Answer with one word only, PASS or FAIL."},
                    {"role": "user", "content": f"{salt}Summary {i}: is it faithful to the posting? PASS or FAIL:"}]
        for repeat in range(repeats):
            requests.append(CallRequest("grading", "v1", f"case-{i:05d}", repeat, messages, dict(PARAMS),
                                        cache_key(spec.config_hash, messages, PARAMS, repeat)))
    return requests


# ---------------------------------------------------------------- the report
@dataclass(frozen=True)
class Figure:
    """One line of the printed table. `ok` is None for figures reported without a target."""

    label: str
    value: str
    target: str = ""
    ok: bool | None = None

    @property
    def result(self) -> str:
        return "" if self.ok is None else ("PASS" if self.ok else "MISS")


def format_table(figures: list[Figure]) -> str:
    rows = [("figure", "value", "target", "result")] + [(f.label, f.value, f.target, f.result) for f in figures]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    line = "  ".join("{:<%d}" % w for w in widths)
    out = [line.format(*rows[0]), line.format(*("-" * w for w in widths))]
    out += [line.format(*row).rstrip() for row in rows[1:]]
    return "\n".join(out)
