"""The evaluation report: one self-contained HTML page with embedded PNGs.

Per-case table (worst mean Dice first), overlays of prediction against ground truth on three
planes through the tumour, training curves, and the metric conventions. Images are drawn with
matplotlib's Agg backend and embedded as base64, so the page opens anywhere (the KFP UI
included) without other files.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from medseg.evaluation.evaluate import EvalResult

__all__ = ["curves_figure", "curves_png", "display_channel", "overlay_png", "write_report"]

#: The channel :func:`display_channel` picks when the caller names none (BraTS's FLAIR).
DISPLAY_CHANNEL = "flair"


def _figure(rows: int, cols: int, size: tuple[float, float], layout: str | None = None) -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    return plt.subplots(rows, cols, figsize=size, squeeze=False, layout=layout)


def _png(fig: Any) -> bytes:
    from matplotlib import pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _planes(volume: np.ndarray, centre: tuple[int, int, int]) -> list[np.ndarray]:
    x, y, z = centre
    return [volume[:, :, z].T, volume[:, y, :].T, volume[x, :, :].T]


def display_channel(
    image: np.ndarray, channels: Sequence[str], name: str = DISPLAY_CHANNEL
) -> np.ndarray:
    """The volume ``[X, Y, Z]`` of channel ``name`` of an image ``[C, X, Y, Z]`` in ``channels``.

    ``channels`` is the order recorded with the model (``model.yaml`` ``data.channels``): no
    position is assumed.

    Raises:
        ValueError: If ``channels`` has no ``name`` or does not fit the image.
    """
    if len(channels) != image.shape[0] or name not in channels:
        raise ValueError(
            f"channels {list(channels)} do not name the {image.shape[0]} channels of the image "
            f"with a {name}"
        )
    return image[list(channels).index(name)]


def overlay_png(
    case_id: str,
    image: np.ndarray,
    channels: Sequence[str],
    truth: np.ndarray,
    pred: np.ndarray,
    *,
    colours: Sequence[tuple[int, tuple[float, float, float]]],
    centre: int,
    display: str,
    legend: str,
) -> bytes:
    """Ground truth (top row) and prediction (bottom row) over one channel on three planes.

    The task says what to draw (:meth:`medseg.tasks.Task.overlay_png`).

    Args:
        case_id: Shown in the title.
        image: The case ``[C, X, Y, Z]``, on the grid of the masks.
        channels: The order of ``image``'s channels (the model's ``data.channels``).
        truth: Region masks ``[R, X, Y, Z]``.
        pred: Predicted region masks, same shape.
        colours: (region index, RGB) in drawing order, the last on top.
        centre: The region whose centre the planes cross.
        display: The channel drawn under the masks.
        legend: Names the colours in the title.

    The planes (axial, coronal, sagittal) cross the centre of the true ``centre`` region, else of
    the predicted one, else of the volume.
    """
    image = display_channel(image, channels, display)
    mask = truth[centre] if truth[centre].any() else pred[centre]
    middle = (
        tuple(round(float(c)) for c in np.argwhere(mask).mean(axis=0))
        if mask.any()
        else tuple(s // 2 for s in image.shape)
    )
    lo, hi = np.percentile(image, [1, 99]) if image.size else (0.0, 1.0)
    fig, axes = _figure(2, 3, (9, 6))
    for row, (title, masks) in enumerate((("ground truth", truth), ("prediction", pred))):
        for col, (plane, name) in enumerate(
            zip(_planes(image, middle), ("axial", "coronal", "sagittal"), strict=True)  # type: ignore[arg-type]
        ):
            ax = axes[row][col]
            ax.imshow(plane, cmap="gray", origin="lower", vmin=lo, vmax=hi)
            rgba = np.zeros((*plane.shape, 4))
            for index, rgb in colours:
                m = _planes(masks[index], middle)[col].astype(bool)  # type: ignore[arg-type]
                rgba[m, :3] = rgb
                rgba[m, 3] = 0.45
            ax.imshow(rgba, origin="lower")
            ax.set_title(f"{title} · {name}", fontsize=9)
            ax.axis("off")
    fig.suptitle(f"{case_id}  ({legend})", fontsize=10)
    return _png(fig)


def curves_png(history: list[dict[str, Any]]) -> bytes:
    """Loss and learning rate (left), validation Dice per region (right), by epoch."""
    return _png(curves_figure(history))


def curves_figure(history: list[dict[str, Any]]) -> Any:
    """The training-curves figure (a matplotlib ``Figure``; :func:`curves_png` renders it).

    The constrained layout engine places every axis label and tick label, the right-hand
    learning-rate axis of the left panel included, so that nothing overlaps.
    """
    fig, axes = _figure(1, 2, (10, 3.5), layout="constrained")
    epochs = [h["epoch"] for h in history]
    ax = axes[0][0]
    ax.plot(epochs, [h["loss"] for h in history], label="Dice loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    lr_ax = ax.twinx()
    lr_ax.plot(epochs, [h["lr"] for h in history], color="grey", linestyle=":", label="lr")
    lr_ax.set_ylabel("learning rate")
    ax = axes[0][1]
    for key in _dice_keys(history):
        points = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker=".", label=key[5:].upper())
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation Dice")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    return fig


def _dice_keys(history: list[dict[str, Any]]) -> list[str]:
    """The validation Dice keys of the records (``dice_*``), in the order the first holds them."""
    keys: dict[str, None] = {}
    for h in history:
        keys |= dict.fromkeys(k for k in h if k.startswith("dice_"))
    return list(keys)


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def write_report(
    result: EvalResult, overlays: dict[str, bytes], history: list[dict[str, Any]]
) -> str:
    """The report page as an HTML string."""
    esc = html.escape
    gate = (
        "no gate"
        if result.threshold is None
        else f"{'PASSED' if result.passed else 'FAILED'}: mean Dice {result.dice_mean:.4f} "
        f"{'≥' if result.passed else '<'} {result.threshold}"
    )
    regions = list(result.dice)
    head = "".join(f"<th>Dice {r}</th>" for r in regions) + "".join(
        f"<th>HD95 {r} (mm)</th>" for r in regions
    )
    rows = []
    for c in result.cases:
        cells = "".join(f"<td>{c.dice[r]:.4f}</td>" for r in regions)
        cells += "".join(f"<td>{c.hd95[r]:.2f}</td>" for r in regions)
        rows.append(f"<tr><td>{esc(c.case_id)}</td><td>{c.dice_mean:.4f}</td>{cells}</tr>")
    mean_cells = "".join(f"<td>{result.dice[r]:.4f}</td>" for r in regions)
    mean_cells += "".join(f"<td>{result.hd95[r]:.2f}</td>" for r in regions)
    rows.append(f"<tr class='mean'><td>mean</td><td>{result.dice_mean:.4f}</td>{mean_cells}</tr>")
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>medseg evaluation: {esc(result.model)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "tr.mean{font-weight:bold}img{max-width:100%}</style></head><body>",
        "<h1>medseg evaluation</h1>",
        f"<p>Model <code>{esc(result.model)}</code> on dataset <code>{esc(result.dataset)}</code>,"
        f" split <code>{esc(result.split)}</code>, {len(result.cases)} cases.</p>",
        f"<p id='gate'><b>Quality gate</b>: {esc(gate)}</p>",
        f"<p id='definition'><b>Metric</b>: {esc(result.definition)}; scored label maps: "
        f"<code>{esc(result.predictions)}</code>.</p>",
        "<h2>Per case (worst first)</h2>",
        f"<table id='cases'><tr><th>case</th><th>mean Dice</th>{head}</tr>{''.join(rows)}</table>",
        f"<p><b>Conventions</b>: {esc(result.conventions)}</p>",
    ]
    if result.missing:
        parts.append(
            f"<p id='missing'><b>No prediction</b> (scored as empty): "
            f"{esc(', '.join(result.missing))}</p>"
        )
    if history:
        parts += ["<h2>Training curves</h2>", _img(curves_png(history), "training curves")]
    if overlays:
        parts.append("<h2>Overlays (worst cases first)</h2>")
        parts += [f"<h3>{esc(k)}</h3>{_img(v, f'overlay {k}')}" for k, v in overlays.items()]
    parts.append("</body></html>")
    return "\n".join(parts)
