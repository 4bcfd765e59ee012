"""The A-TRICE trade-off on the validation split: clean vs worst-case accuracy at th_g = 0.03.

Reads results/atrice-tuning.json (written by scripts/tune_atrice.py --summarize) and draws one
point per configuration (mean over the seeds it ran on), the vanilla and VA baselines, and the
issue's target region (worst >= vanilla + 30 and >= VA + 10 points, clean within 3 points of
vanilla). Usage: python scripts/plot_atrice_tradeoff.py [results/atrice-tuning.json] [out.png]
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str = "results/atrice-tuning.json", out: str = "results/atrice-tradeoff.png"):
    r = json.load(open(src))
    b = r["baselines"]
    van_c, van_w = 100 * b["vanilla"]["mean_clean"], 100 * b["vanilla"]["mean_worst"]
    va_w = 100 * b["va"]["mean_worst"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.axvspan(van_c - 3, van_c + 1, ymin=0, ymax=1, color="green", alpha=0.06)
    ax.axhline(max(van_w + 30, va_w + 10), color="green", ls="--", lw=0.8)
    ax.text(van_c - 2.9, max(van_w + 30, va_w + 10) + 0.8, "target", color="green", fontsize=8)
    for c in r["tradeoff"]:
        x, y = 100 * c["clean"], 100 * c["worst"]
        mark = "o" if len(c["seeds"]) == 3 else "x"
        ax.plot(x, y, mark, color="C2" if c["name"] == r["chosen"] else "C0")
        ax.annotate(
            f"α{c['alpha']:g} b{c['th_g']:g} e{c['epochs']}"
            + (f" cw{c['clean_weight']:g}" if c["clean_weight"] else "")
            + (" trades" if c["adv_loss"] == "trades" else "")
            + (" sel.flwc" if c["select"] == "flwc" else ""),
            (x, y),
            fontsize=6,
            xytext=(3, 2),
            textcoords="offset points",
        )
    ax.plot(van_c, van_w, "s", color="k", label="vanilla")
    ax.plot(100 * b["va"]["mean_clean"], va_w, "^", color="grey", label="VA")
    ax.set_xlabel("clean accuracy on val (%)")
    ax.set_ylabel("worst case at th_g = 0.03 on val (%)")
    ax.set_title("A-TRICE fine-tunes, FMNIST LeNet 4-bit (o: 3 seeds, x: seed 0)", fontsize=9)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"written: {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
