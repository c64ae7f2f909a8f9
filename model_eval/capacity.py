"""What a model needs from the machine: the resident memory of the process serving it, and its file size.

The bundled llama.cpp server keeps one model in memory at a time and swaps on demand, so a model's
memory is the server process's resident set (VmRSS in /proc/<pid>/status) sampled *while that model
answers*: samples taken between calls may show another model, so only samples inside the time window
of one of its calls count, from the end of the partition's first call on (the swap happens inside that
one; steps/evaluation.py picks the windows). A window reaches WINDOW_GRACE_S past its call's end: the
server only swaps on another model's request, so a sample just after a call still shows this model, and
quick calls (a few milliseconds, shorter than the sampling interval) are measured too. The figure includes the server's own interpreter and runtime, because a
machine has to provide those too. Linux only: elsewhere, and for remote servers, memory is unknown.
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

# Output tokens per second of one call: its output over its whole wall time (the answer is not streamed,
# so prompt processing is included). NULL for a failed call or one without token counts.
OUTPUT_TOKENS_PER_S_SQL = "output_tokens * 1000.0 / nullif(latency_ms, 0)"
LISTEN_STATE = "0A"  # TCP_LISTEN in /proc/net/tcp
SAMPLE_INTERVAL_S = 0.05
WINDOW_GRACE_S = 2 * SAMPLE_INTERVAL_S


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == LISTEN_STATE and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def listening_pid(api_base: str) -> int | None:
    """The process listening on the (loopback) port of `api_base`, if it is ours to read; else None."""
    port = urlparse(api_base).port
    if port is None:
        return None
    targets = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    if not targets:
        return None
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                if os.readlink(fd.path) in targets:
                    return int(entry.name)
        except OSError:  # another user's process, or one that just exited
            continue
    return None


def resident_kb(pid: int) -> int | None:
    """VmRSS of a process in kB (None once it has exited)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class MemorySampler:
    """Samples a process's resident memory every `interval_s` in a background thread: (time.time(), kB)."""

    def __init__(self, pid: int, interval_s: float = SAMPLE_INTERVAL_S):
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-sampler-{pid}", daemon=True)

    def _sample(self) -> None:
        kb = resident_kb(self.pid)
        if kb is not None:
            self.samples.append((time.time(), kb))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        # One last sample right after the calls ended: a partition whose calls all finished between two
        # periodic samples still gets one inside its grace window.
        self._sample()


def peak_in_windows(samples: list[tuple[float, int]], windows: list[tuple[float, float]]) -> tuple[int, int] | None:
    """The highest sample taken inside any of the windows (each reaching WINDOW_GRACE_S past its end), and
    how many samples were inside; None if none was.

    `samples` must be in time order (as a sampler records them)."""
    times = [t for t, _ in samples]
    peak, inside = None, 0
    for start, end in windows:
        for index in range(bisect.bisect_left(times, start), bisect.bisect_right(times, end + WINDOW_GRACE_S)):
            inside += 1
            peak = samples[index][1] if peak is None else max(peak, samples[index][1])
    return None if peak is None else (peak, inside)


LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


@contextmanager
def memory_sampler(spec) -> Iterator[MemorySampler | None]:
    """Sample the process serving a local model while the block runs; None for a remote model, or when the
    server's process cannot be found or read (memory is then unknown)."""
    host = urlparse(spec.api_base or "").hostname
    pid = listening_pid(spec.api_base) if spec.local_model and host in LOOPBACK_HOSTS else None
    if pid is None:
        yield None
        return
    with MemorySampler(pid) as sampler:
        yield sampler


def model_file_mb(local_model: str) -> float | None:
    """Size of a bundled model's GGUF file in MB (2**20 bytes); None if it cannot be located."""
    from model_eval.local_models import local_model_path

    try:
        return local_model_path(local_model).stat().st_size / 2**20
    except Exception:  # noqa: BLE001 - a model that cannot be located has no known size
        return None


NEWEST_MEASUREMENTS = """
SELECT model, local_model, max(peak_rss_mb), eval_run_id FROM model_resources WHERE peak_rss_mb IS NOT NULL
GROUP BY model, local_model, eval_run_id, measured_at
QUALIFY row_number() OVER (PARTITION BY model, local_model ORDER BY measured_at DESC) = 1"""


def measured_memory_mb(warehouse_file: Path, specs) -> dict[str, tuple[float, str]]:
    """model -> (peak resident MB over its tasks, eval run id) from its newest measured eval run, for the
    local models among `specs` (a measurement of another local model under the same name does not count)."""
    from model_eval import warehouse
    from model_eval.duckdb_files import table_exists

    local = {spec.name: spec.local_model for spec in specs if spec.local_model}
    if not local or not warehouse_file.exists():
        return {}
    with warehouse.read_connection(warehouse_file) as conn:
        if not table_exists(conn, "model_resources"):  # a warehouse from before capacity was measured
            return {}
        rows = conn.sql(NEWEST_MEASUREMENTS).fetchall()
    return {model: (peak, run) for model, local_model, peak, run in rows if local.get(model) == local_model}
