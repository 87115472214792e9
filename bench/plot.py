"""Draw a `make bench` result JSON as a PNG beside it: what a reader wants to see at a glance.

    python -m bench.plot bench/results/<card>-<date>.json     # writes <card>-<date>.png

Three panels, all from the one run in the file:
  decode tok/s against batch (log-log): the shard without adapters, with 1/8/32 adapters, and the
      transformers / transformers+PEFT baselines measured in the same run;
  roofline fraction against batch: the whole engine step and the model forward alone (graph replay),
      each = (bytes the step must read / measured copy bandwidth) / time;
  adapters against base: tok/s with N adapters divided by tok/s without, per batch.
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


def plot(result_path: Path, out_path: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display anywhere this runs
    import matplotlib.pyplot as plt

    data = json.loads(result_path.read_text())
    rows = data["rows"]
    shard = _decode_rows(rows, "shard")
    baselines = {s: _decode_rows(rows, s) for s in ("transformers", "peft")}
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
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

    fig.suptitle(f"{data.get('device')}  commit {data.get('commit')}", fontsize=10)
    fig.tight_layout()
    out = out_path or result_path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__.split("\n")[0])
    p.add_argument("result", type=Path, help="a bench/results/*.json written by `make bench`")
    p.add_argument("--out", type=Path, default=None, help="default: the JSON's path with .png")
    args = p.parse_args(argv)
    print(plot(args.result, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
