"""Is our standard-library HTTP layer the bottleneck at 512 concurrent streams? (issue 15)

The real HTTP layer (runtime/serve/http.py: App, make_server, /v1/completions, token-by-token SSE) in front of
a paced backend that behaves like the scheduler at a fixed decode rate: every STEP_MS it hands one token to
each running request (no model: what is measured is HTTP + JSON + SSE + threads), driven by the serving
benchmark's own client (runtime/loadgen.py: one thread per stream, streamed POST /v1/completions). Server
and client are separate processes. Prints offered vs delivered output tokens/s, the latencies, and the
server process's CPU time: tokens per server CPU-second is what the HTTP layer can deliver on one core
(one Python process), whatever the client machine adds.

    python docs/bench/2026-12-01-cpu-http/http512.py [CONCURRENCY ...] [--step-ms 30] [--tokens 128]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import threading
import time


def serve(port_q: mp.Queue, step_ms: float) -> None:
    from runtime import harmony
    from runtime.serve.http import App, make_server
    from runtime.serve.job import Defaults
    from runtime.serve.scheduler import Finish, Submission

    class Paced:
        """One token to every running request each step, like a decode step of the whole batch."""

        def __init__(self) -> None:
            self.running: list[Submission] = []
            self.lock = threading.Lock()
            self.steps = 0
            threading.Thread(target=self.loop, daemon=True).start()

        def submit(self, sub: Submission) -> None:
            with self.lock:
                self.running.append(sub)

        def loop(self) -> None:
            nxt = time.perf_counter()
            while True:
                nxt += step_ms / 1000
                time.sleep(max(0.0, nxt - time.perf_counter()))
                with self.lock:
                    subs, self.running = self.running, []
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
                self.steps += 1

        def stats(self) -> dict:
            return {"running": len(self.running), "steps": self.steps, "cpu_s": time.process_time()}

    harmony.encoding()
    app = App(Defaults("paced", 0.0, 1.0, "low"), max_len=100_000, render=lambda job: [1], backend=Paced(),
              end_ids=frozenset({200002, 200012}), ready=threading.Event())
    app.ready.set()
    server = make_server(app, "127.0.0.1", 0, timeout=600.0, max_connections=4096)
    port_q.put(server.server_address[1])
    server.serve_forever()


def main() -> None:
    from runtime import loadgen

    ap = argparse.ArgumentParser()
    ap.add_argument("concurrency", type=int, nargs="*", default=[64, 256, 512])
    ap.add_argument("--step-ms", type=float, default=30.0)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--client-processes", type=int, default=1, help="client processes sharing each point's requests")
    args = ap.parse_args()
    q: mp.Queue = mp.Queue()
    proc = mp.Process(target=serve, args=(q, args.step_ms), daemon=True)
    proc.start()
    port = q.get(timeout=120)
    endpoint = loadgen.Endpoint(f"http://127.0.0.1:{port}/v1", model="paced")
    def server_cpu() -> float:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=60) as r:
            return float(json.loads(r.read())["cpu_s"])

    for c in args.concurrency:
        work = [([1000 + i] * 64, args.tokens) for i in range(2 * c)]
        cpu0 = server_cpu()
        results, duration = loadgen.run_point(endpoint, work, c, None, seed=0, processes=args.client_processes)
        cpu = server_cpu() - cpu0
        m = loadgen.metrics(results, duration, {})
        offered = c * 1000 / args.step_ms  # tokens/s the paced backend produces with c streams running
        print(json.dumps({"concurrency": c, "client_processes": args.client_processes, "step_ms": args.step_ms,
                          "offered_tok_s": round(offered),
                          "delivered_tok_s": round(m["output_throughput"]), "failed": m["failed"],
                          "ttft_p50_ms": round(m["median_ttft_ms"], 1), "ttft_p99_ms": round(m["p99_ttft_ms"], 1),
                          "itl_p50_ms": round(m["median_itl_ms"], 1), "itl_p99_ms": round(m["p99_itl_ms"], 1),
                          "tpot_mean_ms": round(m["mean_tpot_ms"], 1), "server_cpu_s": round(cpu, 2),
                          # one Python process (the GIL): what its CPU time per token allows on one core
                          "server_capacity_tok_s": round(m["total_output_tokens"] / cpu) if cpu > 0 else None}),
              flush=True)
    proc.terminate()


if __name__ == "__main__":
    main()
