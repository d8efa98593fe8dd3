"""PNG plots of a segment search: the gate trajectory and the landscape of hard-cut KL."""

from __future__ import annotations

from pathlib import Path

from layercut.gate import SearchResult


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def search_plots(found: SearchResult, folder: Path) -> dict[str, Path]:
    """Write ``gate_trajectory.png`` (when the gate ran) and ``kl_landscape.png`` (when cuts were scored)."""
    plt = _pyplot()
    written = {}
    if found.trajectory and "starts" in found.trajectory[0]:
        steps = [row["step"] for row in found.trajectory]
        figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
        profiles = len(found.trajectory[0]["starts"])
        for profile in range(profiles):
            for notch in range(len(found.trajectory[0]["starts"][profile])):
                top.plot(steps, [row["starts"][profile][notch] for row in found.trajectory], lw=1)
            bottom.plot(steps, [row["loss"][profile] for row in found.trajectory], lw=1)
        top.set_ylabel("notch start (layer)")
        top.set_title(f"gate search: chosen {', '.join(f'[{s}:{e})' for s, e in found.segments)}")
        tau = top.twinx()
        tau.plot(steps, [row["tau"] for row in found.trajectory], "k--", lw=1)
        tau.set_ylabel("temperature τ (dashed)")
        bottom.set_ylabel("KL per profile (nats/token)")
        bottom.set_xlabel("step")
        bottom.set_yscale("log")
        figure.tight_layout()
        written["gate_trajectory.png"] = folder / "gate_trajectory.png"
        figure.savefig(written["gate_trajectory.png"], dpi=110)
        plt.close(figure)
    single = {int(key.split(":")[0]): value for key, value in found.landscape.items() if " " not in key and key}
    if single:
        figure, axis = plt.subplots(figsize=(7, 3.5))
        starts = sorted(single)
        axis.bar(starts, [single[s] for s in starts], color="tab:blue")
        chosen = found.segments[0][0] if len(found.segments) == 1 else None
        if chosen in single:
            axis.bar([chosen], [single[chosen]], color="tab:red", label="chosen")
            axis.legend()
        axis.set_xlabel("segment start (layer)")
        kl = found.method in ("clp", "exhaustive")
        axis.set_ylabel("hard-cut KL (nats/token)" if kl else f"{found.method} score")
        axis.set_title(f"{found.method}: {'KL of each scored cut' if kl else 'score by start layer'}")
        figure.tight_layout()
        written["kl_landscape.png"] = folder / "kl_landscape.png"
        figure.savefig(written["kl_landscape.png"], dpi=110)
        plt.close(figure)
    return written
