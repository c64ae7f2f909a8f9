"""The benchmark's "provider": the test double FakeOpenAIServer, run in a process of its own.

    python -m benchmarks.fake_endpoint                          # instant successes
    python -m benchmarks.fake_endpoint --faults --seed 7        # the fault mix of benchmarks/faults.py
    python -m benchmarks.fake_endpoint --delay-ms 20            # successes after 20 ms (benchmarks/peers.py)

It prints its port on the first line of stdout and serves until its stdin is closed (the parent is
done or died) or `--seconds` pass. In its own process it never competes with the measured client
for the GIL. On exit it prints one JSON line about the calls it saw (see `Fates`), which the fault
suite compares with what the engine recorded.

This lives here rather than as a `--fault-mix` option of model_eval_tests/fake_openai_server.py so
the test double stays as the tests know it; we only choose its script.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

# python -m from the checkout works anyway; this keeps `python benchmarks/fake_endpoint.py` working too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_eval_tests.fake_openai_server import (  # noqa: E402
    FakeOpenAIServer,
    RequestInfo,
    Reply,
    always,
    garbage,
    hang,
    ok,
    random_mix,
    rate_limited,
    server_error,
)

# The fault mix of the brief: 30% of attempts answered 429 or 500, 5% hang far past the client's
# timeout, 5% are a 200 whose body is not JSON; the rest succeed. Drawn per attempt, so a retry of
# a failed call has the same chances again.
FAULT_SHARES: dict[Reply, float] = {
    rate_limited(retry_after=0.01): 0.15,
    server_error(500): 0.15,
    hang(3.0): 0.05,
    garbage(): 0.05,
}


class Fates:
    """Wraps the fault script to know, per distinct call, what the script had in store for it.

    `random_mix` decides each attempt by hashing (seed, body, attempt), so we can ask it about
    attempts that never happened: a call whose first `max_attempts` draws are all faults cannot
    succeed however well the client retries, any other call must. That gives the fault suite an
    exact expectation instead of a statistical one.

    It also keeps what was served to each call: an attempt that arrives after an OK was served
    means the client gave up on that OK (its timeout fired first, e.g. on a loaded machine), which
    shifts that call's later draws and explains a deviation from the expectation.
    """

    def __init__(self, script, max_attempts: int):
        self.script = script
        self.max_attempts = max_attempts
        self.lock = threading.Lock()
        self.first_info: dict[str, RequestInfo] = {}   # body key -> its first attempt
        self.served: dict[str, list[str]] = {}          # body key -> reply kinds, in order

    def __call__(self, info: RequestInfo) -> Reply:
        reply = self.script(info)
        with self.lock:
            self.first_info.setdefault(info.body_key, info)
            self.served.setdefault(info.body_key, []).append(reply.kind)
        return reply

    def summary(self) -> dict:
        doomed = first_faulty = 0
        with self.lock:
            firsts = list(self.first_info.values())
            served = [list(kinds) for kinds in self.served.values()]
        for info in firsts:
            draws = [self.script(RequestInfo(info.index, attempt, info.body_key, info.payload, info.authorization)).kind
                     for attempt in range(1, self.max_attempts + 1)]
            first_faulty += draws[0] != "ok"
            doomed += all(kind != "ok" for kind in draws)
        lost_ok = sum(kind == "ok" for kinds in served for kind in kinds[:-1])
        return {"calls": len(firsts), "doomed": doomed, "first_attempt_faulty": first_faulty, "lost_ok": lost_ok}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The fake OpenAI endpoint for the benchmarks (a test double).")
    parser.add_argument("--faults", action="store_true", help="answer with the fault mix instead of instant successes")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--max-attempts", type=int, default=4, help="attempts per call the client makes (for the summary)")
    parser.add_argument("--delay-ms", type=float, default=0.0,
                        help="answer every call after this long, like a fast provider (instant by default)")
    parser.add_argument("--seconds", type=float, default=1800.0, help="hard limit on how long it serves")
    args = parser.parse_args(argv)

    fates = Fates(random_mix(args.seed, FAULT_SHARES, otherwise=ok("PASS")), args.max_attempts) if args.faults else None
    # keep_records=False: the counters are all we need; a record per call would grow with the run.
    # A delayed success is the double's "hang" reply with a short wait: an OK answer after `delay`.
    success = hang(args.delay_ms / 1000) if args.delay_ms > 0 else ok("PASS")
    server = FakeOpenAIServer(fates or always(success), keep_records=False).start()
    print(server.port, flush=True)
    deadline = time.monotonic() + args.seconds
    # Stop when the parent closes our stdin or at the deadline, whichever comes first (bounded).
    watcher = threading.Thread(target=sys.stdin.read, daemon=True)
    watcher.start()
    while watcher.is_alive() and time.monotonic() < deadline:
        watcher.join(0.2)
    server.stop()
    summary = {"pid": os.getpid(), **server.stats(), **(fates.summary() if fates else {})}
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
