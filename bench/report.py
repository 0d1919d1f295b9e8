"""Plots for docs/BENCHMARKS.md from the figures the benchmarks saved in bench/out/*.json.

    python -m bench.report            # after `make bench` (or any single benchmark)

A benchmark that has not run is left out; its plot keeps the last one drawn.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.harness import OUT, ROOT  # noqa: E402

DOCS = ROOT / "docs" / "bench"


def load(name: str) -> dict | None:
    path = OUT / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def figure(title: str, ncols: int = 1):
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 3.8), dpi=100, squeeze=False)
    fig.suptitle(title)
    return fig, axes[0]


def finish(fig, name: str) -> Path:
    DOCS.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    path = DOCS / f"{name}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def bars(ax, labels, values, ylabel: str, fmt: str = "{:.0f}"):
    rects = ax.bar(labels, values, color=["#4c72b0", "#dd8452", "#55a868", "#c44e52"][:len(values)])
    ax.bar_label(rects, labels=[fmt.format(v) for v in values])
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


def overhead() -> Path | None:
    runs = {m: load(f"overhead-{m}") for m in ("tiny", "small")}
    runs = {m: r for m, r in runs.items() if r}
    if not runs:
        return None
    fig, (rate, ttft) = figure("Overhead: direct in-process decode vs API -> Redis -> worker -> SSE", 2)
    width, xs = 0.38, range(len(runs))
    med = statistics.median
    rate.bar([x - width / 2 for x in xs], [med(r["direct_rates"]) for r in runs.values()], width, label="direct")
    rate.bar([x + width / 2 for x in xs], [med(r["path_rates"]) for r in runs.values()], width, label="through inferq")
    rate.set_xticks(list(xs), [f"{m} model\nratio {r['ratio']:.2f}" for m, r in runs.items()])
    rate.set_ylabel("decode tokens/s (median)")
    rate.set_yscale("log")
    rate.legend()
    ttft.bar([x - width / 2 for x in xs], [med(r["direct_ttft_ms"]) for r in runs.values()], width, label="direct")
    ttft.bar([x + width / 2 for x in xs], [med(r["path_ttft_ms"]) for r in runs.values()], width,
             label="through inferq")
    ttft.set_xticks(list(xs), [f"{m} model\n+{med(r['added_ttft_ms']):.1f} ms" for m, r in runs.items()])
    ttft.set_ylabel("time to first token, ms (median)")
    ttft.legend()
    return finish(fig, "overhead")


def fanout() -> Path | None:
    data = load("fanout")
    if not data:
        return None
    fig, (ax,) = figure(f"Fan-out: one job to N SSE clients, one API process ({data['model']} model)")
    # One line per kind of client; rows saved before there were kinds are "requests".
    for kind in dict.fromkeys(r.get("kind", "requests") for r in data["rows"]):
        rows = [r for r in data["rows"] if r.get("kind", "requests") == kind]
        clients = [r["clients"] for r in rows]
        ax.plot(clients, [r["p50"] for r in rows], "o-", label=f"p50, {kind} clients")
        ax.plot(clients, [r["p99"] for r in rows], "s-", label=f"p99, {kind} clients")
        for r in rows:
            ax.annotate(f"{r['missed']} missed", (r["clients"], r["p99"]), textcoords="offset points",
                        xytext=(4, 6))
    ax.axhline(50, color="grey", linestyle="--", label="target p99 50 ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("concurrent SSE clients")
    ax.set_ylabel("event ts -> client receipt, ms")
    ax.legend()
    ax.grid(alpha=0.3)
    return finish(fig, "fanout")


def enqueue() -> Path | None:
    data = load("enqueue")
    if not data:
        return None
    fig, (ax,) = figure("Enqueue: jobs/s accepted")
    labels = ["RQ Queue.enqueue\n1 client"] + [f"POST /v1/jobs\n{r['clients']} clients" for r in data["api"]]
    bars(ax, labels, [data["rq_enqueue"]] + [r["rate"] for r in data["api"]], "jobs/s")
    return finish(fig, "enqueue")


def scaleout() -> Path | None:
    data = load("scaleout")
    if not data:
        return None
    rows = data["rows"]
    fig, (ax,) = figure(f"Scale-out: N workers on one Redis ({data['model']} model, "
                        f"--parallel {data['parallel']})")
    workers = [r["workers"] for r in rows]
    ax.plot(workers, [r["ceiling_tok_s"] for r in rows], "o-", label="tok/s one Redis core carries")
    ax.plot(workers, [r["rate"] for r in rows], "s-", label="tok/s measured (2 shared cores)")
    ax.plot(workers, [r["floor_ceiling_tok_s"] for r in rows], ":", color="grey",
            label="floor: one XADD a token")
    moved = data.get("events_cluster_rows") or []
    if moved:  # the queue's Redis core once the job logs are on an events cluster
        ax.plot([r["workers"] for r in moved], [r["ceiling_tok_s"] for r in moved], "^--",
                label="queue Redis core, logs on a cluster")
    for r in rows:
        ax.annotate(f"{r['cpu_us_per_token']:.0f} µs/tok", (r["workers"], r["ceiling_tok_s"]),
                    textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(workers, [str(w) for w in workers])
    ax.set_xlim(min(workers) / 1.3, max(workers) * 1.3)
    ax.set_yscale("log")
    ax.set_xlabel("workers")
    ax.set_ylabel("tokens/s")
    per_gpu = data.get("gpu_worker_tok_s", 1000)
    gpus = ax.secondary_yaxis("right", functions=(lambda y: y / per_gpu, lambda n: n * per_gpu))
    gpus.set_ylabel(f"GPU workers at {per_gpu:,} tok/s")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    ax.grid(alpha=0.3)
    return finish(fig, "scaleout")


def peer() -> Path | None:
    data = load("peer")
    if not data:
        return None
    rows, med = data["rows"], statistics.median
    fig, (single, ttft, agg) = figure(f"Peer: llama_cpp.server vs inferq, {data['model']} model, "
                                      f"{data['threads']} thread(s) per model copy", 3)
    names = list(rows)
    bars(single, names, [med(rows[n]["rates"]) for n in names], "single-stream decode tokens/s", "{:.1f}")
    bars(ttft, names, [med(rows[n]["ttfts"]) for n in names], "time to first token, ms", "{:.1f}")
    agg_labels = ["llama_cpp.server"] + [f"inferq {w} worker(s)" for w in rows["inferq"]["agg"]]
    agg_values = [rows["llama_cpp.server"]["agg"]["1"]] + list(rows["inferq"]["agg"].values())
    bars(agg, agg_labels, agg_values, f"{data['clients']} clients: aggregate tokens/s", "{:.1f}")
    agg.tick_params(axis="x", labelsize=8)
    return finish(fig, "peer")


def batching() -> Path | None:
    data = load("batching")
    if not data:
        return None
    fig, (rate, ttft) = figure(f"Continuous batching: {data['model']} model, {data['slots']} slots, "
                               f"{data['threads']} threads", 2)
    for name, by_clients in data["rows"].items():
        clients = sorted(by_clients, key=int)
        rate.plot([int(c) for c in clients], [by_clients[c]["rate"] for c in clients], marker="o", label=name)
        ttft.plot([int(c) for c in clients], [by_clients[c]["ttft_p50"] for c in clients], marker="o", label=name)
    for ax, ylabel in ((rate, "aggregate tokens/s"), (ttft, "TTFT p50, ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ttft.set_yscale("log")
    rate.legend(fontsize=8)
    return finish(fig, "batching")


def main() -> None:
    for plot in (overhead, fanout, enqueue, scaleout, peer, batching):
        path = plot()
        print(f"{plot.__name__:10} {path.relative_to(ROOT) if path else 'no figures yet (run the benchmark)'}")


if __name__ == "__main__":
    main()
