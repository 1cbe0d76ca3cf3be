"""Plots people would rather look at than read, as PNG bytes (matplotlib, headless)."""

import base64
import io
from collections.abc import Sequence


def _figure(width: float = 6.0, height: float = 3.2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=90)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def markdown_image(png: bytes, alt: str) -> str:
    """Return markdown showing a PNG inline (a data URL, rendered by Dagster's metadata view)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"


def loss_curve(history: Sequence[tuple[int, float, float]], selected_epochs: Sequence[int] = ()) -> bytes:
    """Return a PNG of training and validation loss per epoch, selected checkpoints marked."""
    fig, ax = _figure()
    epochs = [h[0] + 1 for h in history]
    ax.plot(epochs, [h[1] for h in history], marker="o", ms=3, label="train loss")
    ax.plot(epochs, [h[2] for h in history], marker="o", ms=3, label="validation loss")
    chosen = [h for h in history if h[0] in set(selected_epochs)]
    if chosen:
        ax.scatter([h[0] + 1 for h in chosen], [h[2] for h in chosen], s=90, facecolors="none",
                   edgecolors="crimson", linewidths=2, zorder=5, label="selected checkpoint")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean loss")
    losses = [v for h in history for v in h[1:] if v > 0]
    if losses and max(losses) / min(losses) > 20:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def histogram(values: Sequence[float], title: str, xlabel: str) -> bytes:
    """Return a PNG histogram of values (log-scaled counts)."""
    fig, ax = _figure()
    ax.hist(values, bins=50, color="steelblue")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    return _png(fig)


def proponents_opponents(rows: Sequence[dict]) -> bytes:
    """Return a PNG grid: per test sample, the sample itself, its top proponents and top opponents.

    Each row: {"test": picture, "test_label": str, "proponents": [(picture, caption)], "opponents": [...]},
    a picture being a 2-D array (an image) or a string (shown as text).
    """
    k = max(max(len(r["proponents"]), len(r["opponents"])) for r in rows)
    cols = 1 + 2 * k
    _figure(1, 1)  # selects the headless backend
    import matplotlib.pyplot as plt

    plt.close("all")
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.25 * cols, 1.45 * len(rows)), dpi=90, squeeze=False)
    for i, r in enumerate(rows):
        cells = [(r["test"], f"test: {r['test_label']}", "black")]
        cells += [(p, c, "green") for p, c in r["proponents"]] + [(None, "", None)] * (k - len(r["proponents"]))
        cells += [(p, c, "crimson") for p, c in r["opponents"]] + [(None, "", None)] * (k - len(r["opponents"]))
        for j, (pic, caption, color) in enumerate(cells):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if pic is None:
                ax.axis("off")
                continue
            if isinstance(pic, str):
                ax.text(0.5, 0.5, pic, ha="center", va="center", wrap=True, fontsize=6)
            else:
                ax.imshow(pic, cmap="gray_r")
            ax.set_title(caption, fontsize=7, color=color)
            for side in ax.spines.values():
                side.set_edgecolor(color)
                side.set_linewidth(2)
    axes[0][1].annotate("proponents →", (0, 1.35), xycoords="axes fraction", fontsize=8, color="green")
    axes[0][1 + k].annotate("opponents →", (0, 1.35), xycoords="axes fraction", fontsize=8, color="crimson")
    return _png(fig)
