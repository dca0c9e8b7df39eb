"""Does streaming 256-512 answers slow the engine's steps down? (issue 15, max load)

The server is one Python process: the scheduler thread plans each step and hands out its tokens (host work that
holds the GIL), then waits for the GPU (the GIL released), while the stream writer thread (runtime/serve/streams.py)
turns every stream's new tokens into SSE events (~30 us of GIL time a token, docs/benchmarks.md). When the writer
holds the GIL, the scheduler's next plan waits for it: CPython hands the GIL over only every
sys.getswitchinterval() (5 ms by default), so each step can lose up to that much, at every step.

Here the real HTTP layer (App, make_server, /v1/completions streamed token by token) sits in front of a backend
that behaves like the scheduler (runtime/serve/scheduler.py): per step HOST_MS of pure-Python work (planning the
step and booking the last one's tokens: ~1 ms + ~1.5 ms at 512 rows), then the step "runs on the GPU" for GPU_MS
with the GIL released, during which one token goes to every running request (Submission.emit, as the real
scheduler hands out while the GPU runs). It reports
the steps per second reached against the 1 / (HOST_MS + GPU_MS) the backend alone reaches, for the default switch
interval and for the one given (`--switch-ms`), driven by the serving benchmark's client from another process.

    python docs/bench/2026-12-01-cpu-host/gil.py [CONCURRENCY ...] [--host-ms 2.5] [--gpu-ms 25] [--switch-ms 1]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import threading
import time


def busy(ms: float) -> None:
    """Pure-Python work (the GIL held) for about `ms` on an otherwise idle process."""
    end = time.thread_time() + ms / 1000
    x = 0
    while time.thread_time() < end:
        for i in range(200):
            x += i * i


def serve(port_q: mp.Queue, host_ms: float, gpu_ms: float, switch_ms: float | None) -> None:
    from runtime import harmony
    from runtime.serve.http import App, make_server
    from runtime.serve.job import Defaults
    from runtime.serve.scheduler import Finish, Submission

    if switch_ms:
        sys.setswitchinterval(switch_ms / 1000)

    class Stepped:
        """A step: HOST_MS of GIL-holding work, one token to every running request, GPU_MS with the GIL free."""

        def __init__(self) -> None:
            self.running: list[Submission] = []
            self.lock = threading.Lock()
            self.steps, self.busy_steps, self.busy_s = 0, 0, 0.0
            threading.Thread(target=self.loop, daemon=True).start()

        def submit(self, sub: Submission) -> None:
            with self.lock:
                self.running.append(sub)

        def loop(self) -> None:
            while True:
                t0 = time.perf_counter()
                with self.lock:
                    subs, self.running = self.running, []
                busy(host_ms)  # plan the step, book the last one's tokens (the critical path)
                launched = time.perf_counter()  # the step runs on the GPU from here; the tokens go out meanwhile
                keep = []
                for sub in subs:
                    if sub.cancelled:
                        continue
                    sub.tokens.append(220)
                    sub.emit([220])
                    if len(sub.tokens) >= sub.max_tokens:
                        sub.emit(Finish("length"))
                    else:
                        keep.append(sub)
                with self.lock:
                    self.running = keep + self.running
                time.sleep(max(0.0, gpu_ms / 1000 - (time.perf_counter() - launched)))  # the GPU: the GIL is free
                self.steps += 1
                if subs:
                    self.busy_steps += 1
                    self.busy_s += time.perf_counter() - t0

        def stats(self) -> dict:
            return {"running": len(self.running), "steps": self.busy_steps, "step_s": self.busy_s,
                    "cpu_s": time.process_time()}

    harmony.encoding()
    app = App(Defaults("stepped", 0.0, 1.0, "low"), max_len=100_000, render=lambda job: [1], backend=Stepped(),
              end_ids=frozenset({200002, 200012}), ready=threading.Event())
    app.ready.set()
    server = make_server(app, "127.0.0.1", 0, timeout=600.0, max_connections=4096)
    port_q.put(server.server_address[1])
    server.serve_forever()


def main() -> None:
    from runtime import loadgen

    ap = argparse.ArgumentParser()
    ap.add_argument("concurrency", type=int, nargs="*", default=[256, 512])
    ap.add_argument("--host-ms", type=float, default=2.5)
    ap.add_argument("--gpu-ms", type=float, default=25.0)
    ap.add_argument("--switch-ms", type=float, default=1.0)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    ideal = 1000 / (args.host_ms + args.gpu_ms)
    for switch in (None, args.switch_ms):
        q: mp.Queue = mp.Queue()
        proc = mp.Process(target=serve, args=(q, args.host_ms, args.gpu_ms, switch), daemon=True)
        proc.start()
        port = q.get(timeout=120)
        endpoint = loadgen.Endpoint(f"http://127.0.0.1:{port}/v1", model="stepped")

        def stats() -> dict:
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=60) as r:
                return json.loads(r.read())

        for c in args.concurrency:
            work = [([1000 + i] * 64, args.tokens) for i in range(2 * c)]
            s0 = stats()
            results, duration = loadgen.run_point(endpoint, work, c, None, seed=0)
            s1 = stats()
            m = loadgen.metrics(results, duration, {})
            rate = (s1["steps"] - s0["steps"]) / max(s1["step_s"] - s0["step_s"], 1e-9)
            print(json.dumps({"concurrency": c, "switch_ms": switch or 1000 * sys.getswitchinterval(),
                              "host_ms": args.host_ms, "gpu_ms": args.gpu_ms, "steps_per_s": round(rate, 2),
                              "ideal_steps_per_s": round(ideal, 2), "step_efficiency": round(rate / ideal, 3),
                              "delivered_tok_s": round(m["output_throughput"]), "failed": m["failed"],
                              "itl_p50_ms": round(m["median_itl_ms"], 1), "itl_p99_ms": round(m["p99_itl_ms"], 1)}),
                  flush=True)
        proc.terminate()


if __name__ == "__main__":
    main()
