"""Draw the autoscaling timeline that ``tests/cluster/test_cluster_containers.py`` records.

The test drives two clients against the predictor's Service on the real node until the HPA that
KServe made scales the predictor to two ready replicas, stops them, and waits for the scale-down.
It leaves ``.medseg/results/autoscale-timeline.json``: samples (seconds since the load started,
the HPA's current and desired replicas, ready pods, each pod's CPU from metrics-server in
millicores, the mean latency of the last 10 s) and every request's latency.

Usage: ``python scripts/plot_autoscale.py [TIMELINE] [OUT.png]`` (defaults: that file and
``docs/images/autoscale-timeline.png``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TIMELINE = ROOT / ".medseg" / "results" / "autoscale-timeline.json"
DEFAULT_OUT = ROOT / "docs" / "images" / "autoscale-timeline.png"


def plot(timeline: Path, out: Path) -> None:
    """Write a three-panel PNG: replicas, CPU per pod, request latency, on one time axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(timeline.read_text())
    samples = data["samples"]
    t = [s["t"] for s in samples]
    fig, (ax_r, ax_c, ax_l) = plt.subplots(3, 1, sharex=True, figsize=(8, 7))
    ax_r.step(t, [s["replicas"] for s in samples], where="post", label="HPA current")
    ax_r.step(t, [s["desired"] for s in samples], where="post", ls="--", label="HPA desired")
    ax_r.step(t, [s["ready"] for s in samples], where="post", ls=":", label="ready pods")
    ax_r.set_ylabel("replicas")
    ax_r.set_yticks([0, 1, 2])
    ax_r.legend(loc="upper right")
    pods = sorted({p for s in samples for p in s["cpu_m"]})
    for i, pod in enumerate(pods):
        ax_c.plot(t, [s["cpu_m"].get(pod) for s in samples], marker=".", label=f"pod {i + 1}")
    ax_c.set_ylabel("CPU (millicores)")
    ax_c.legend(loc="upper right")
    lat = data["latencies"]
    ax_l.plot([a for a, _ in lat], [b for _, b in lat], ".", ms=3)
    ax_l.set_ylabel("latency (s)")
    ax_l.set_xlabel("seconds since the load started")
    end = next((s["t"] for s in samples if s["phase"] == "idle"), None)
    for ax in (ax_r, ax_c, ax_l):
        if end is not None:
            ax.axvline(end, color="grey", lw=0.8)
    fig.suptitle("KServe HPA on the real node: 2 clients, then none")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv: list[str]) -> int:
    """Command-line entry."""
    timeline = Path(argv[1]) if len(argv) > 1 else DEFAULT_TIMELINE
    out = Path(argv[2]) if len(argv) > 2 else DEFAULT_OUT
    if not timeline.is_file():
        print(f"plot_autoscale: no timeline at {timeline} (run the cluster tests)", file=sys.stderr)
        return 1
    plot(timeline, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
