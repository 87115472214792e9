"""Draw a `make bench` result JSON as a PNG beside it: what a reader wants to see at a glance.

    python -m bench.plot bench/results/<card>-<date>.json     # writes <card>-<date>.png

Up to four panels, all from the one run in the file:
  decode tok/s against batch (log-log): the shard without adapters, with 1/8/32 adapters, and the
      transformers / transformers+PEFT baselines measured in the same run;
  roofline fraction against batch: the whole engine step and the model forward alone (graph replay),
      each = (bytes the step must read / measured copy bandwidth) / time;
  adapters against base: tok/s with N adapters divided by tok/s without, per batch;
  end to end: tok/s through gRPC over tok/s in process, per batch, overlap on and off.
matplotlib is only needed here (the `bench` extra); nothing else in the project imports it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path


def _decode_rows(rows: list[dict], system: str) -> dict[int, dict[int, dict]]:
    """{adapters: {batch: row}} for decode rows of one system without errors."""
    out: dict[int, dict[int, dict]] = defaultdict(dict)
    for r in rows:
        if r.get("kind") == "decode" and r.get("system") == system and r.get("error") is None:
            if r.get("overlap") is False:
                continue  # the overlap-off comparison rows are drawn by their own section when present
            out[r.get("adapters") or 0][r["batch"]] = r
    return out


def _adapters_label(n: int, by_batch: dict[int, dict]) -> str:
    """'8 adapters', or for the mixed_ranks section's rows, which ranks shared the batch."""
    if any(r.get("mixed_ranks") for r in by_batch.values()):
        return f"{n} adapters, ranks mixed"
    return f"{n} adapter{'s' if n > 1 else ''}"


def _e2e_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("kind") == "e2e" and r.get("error") is None and r.get("tok_s")]


def _panel_e2e(ax, rows: list[dict]) -> None:
    """gRPC tok/s over direct tok/s per batch, overlap on and off; a repeated batch is one dot a trial."""
    for overlap, color in ((True, "C0"), (False, "C3")):
        grpc = [r for r in rows if r.get("path") == "grpc" and r.get("overlap") is overlap]
        pts = [(r["batch"], r["ratio_vs_direct"]) for r in grpc if r.get("ratio_vs_direct")]
        if pts:
            ax.plot([b for b, _ in pts], [v for _, v in pts], marker="o", linestyle="none", color=color,
                    label=f"through gRPC / in process, overlap {'on' if overlap else 'off'}")  # fmt: skip
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.axhline(0.95, color="grey", linewidth=0.8, linestyle=":")
    batches = [r["batch"] for r in rows]
    ax.set(xscale="log", xlim=(min(batches) / 1.5, max(batches) * 1.5), ylim=(0, 1.1), xlabel="batch",
           ylabel="tok/s ratio", title="end to end: gRPC (shard process + router) / in process")  # fmt: skip
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def plot(result_path: Path, out_path: Path | None = None) -> Path:
    """Up to four panels: the three decode panels when the file has decode rows, the end-to-end panel when
    it has end-to-end rows (a run of some sections only draws what it has)."""
    import matplotlib

    matplotlib.use("Agg")  # no display anywhere this runs
    import matplotlib.pyplot as plt

    data = json.loads(result_path.read_text())
    rows = data["rows"]
    shard = _decode_rows(rows, "shard")
    baselines = {s: _decode_rows(rows, s) for s in ("transformers", "peft")}
    e2e = _e2e_rows(rows)
    if not shard.get(0) and not e2e:
        raise ValueError(f"{result_path}: no decode rows without adapters and no end-to-end rows to draw")
    n_panels = (3 if shard.get(0) else 0) + (1 if e2e else 0)
    fig, axes = plt.subplots(1, n_panels, figsize=(5.7 * n_panels, 5), squeeze=False)
    axes = list(axes[0])
    if e2e:
        _panel_e2e(axes.pop(), e2e)
    if shard.get(0):
        _decode_panels(axes, data, shard, baselines)
    commit = str(data.get("commit")).split(" ")[0]  # a hand-corrected field explains itself after the hash
    fig.suptitle(f"{data.get('device')}  commit {commit}", fontsize=10)
    fig.tight_layout()
    out = out_path or result_path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _decode_panels(axes, data: dict, shard: dict[int, dict[int, dict]], baselines: dict) -> None:
    color = {n: f"C{i}" for i, n in enumerate(sorted(shard))}  # one colour per adapter count, every panel

    ax = axes[0]
    for n, by_batch in sorted(shard.items()):
        b = sorted(by_batch)
        label = "shard, no adapter" if n == 0 else f"shard, {_adapters_label(n, by_batch)}"
        ax.plot(b, [by_batch[x]["tok_s"] for x in b], marker="o", color=color[n], label=label)
    for system, by_n in baselines.items():
        for n, by_batch in sorted(by_n.items()):
            b = sorted(by_batch)
            rate = [by_batch[x].get("decode_tok_s") or by_batch[x]["tok_s"] for x in b]
            label = system if n == 0 else f"{system}, {n} adapters"
            ax.plot(b, rate, marker="s", linestyle="--", label=label)
    ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="decode tok/s", title="decode throughput")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)

    ax = axes[1]
    base = shard.get(0, {})
    b = sorted(base)
    ax.plot(b, [base[x]["roofline_fraction"] for x in b], marker="o", color=color.get(0), label="engine step")
    fwd = [(x, base[x]["floor_ms"] / base[x]["forward_ms"]) for x in b if base[x].get("forward_ms")]
    if fwd:
        ax.plot([x for x, _ in fwd], [f for _, f in fwd], marker="^", color="black",
                label="model forward alone")
    for n, by_batch in sorted(shard.items()):
        if n:
            bb = sorted(by_batch)
            label = f"step, {_adapters_label(n, by_batch)} (their bytes counted)"
            ax.plot(bb, [by_batch[x]["roofline_fraction"] for x in bb], marker=".", linestyle=":",
                    color=color[n], label=label)  # fmt: skip
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set(xscale="log", ylim=(0, 1.05), xlabel="batch", ylabel="fraction of roofline",
           title=f"roofline (copy {data.get('bandwidth_GBps') or 0:.0f} GB/s, same run)")  # fmt: skip
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)

    ax = axes[2]
    for n, by_batch in sorted(shard.items()):
        if n:
            bb = [x for x in sorted(by_batch) if x in base]
            ax.plot(bb, [by_batch[x]["tok_s"] / base[x]["tok_s"] for x in bb], marker="o", color=color[n],
                    label=f"{_adapters_label(n, by_batch)} / no adapter")  # fmt: skip
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set(xscale="log", ylim=(0, 1.1), xlabel="batch", ylabel="tok/s ratio", title="adapters against base")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__.split("\n")[0])
    p.add_argument("result", type=Path, help="a bench/results/*.json written by `make bench`")
    p.add_argument("--out", type=Path, default=None, help="default: the JSON's path with .png")
    args = p.parse_args(argv)
    print(plot(args.result, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
