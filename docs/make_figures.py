"""Draw the figures of the documentation into docs/_static/.

    python docs/make_figures.py

``rf_box.png``: the receptive fields of one output cell of three ResNet-18 stages, drawn on
scikit-image's photograph of Chelsea the cat. The boxes come from
:func:`camkit.receptive_field`; the part of a box that lies outside the image (in the
padding) is drawn over a grey margin. The figure is committed, so building the docs needs
neither torchvision nor scikit-image.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from skimage.data import chelsea
from torchvision.models import resnet18

import camkit
from camkit.receptive_field import LayerField

OUT = Path(__file__).resolve().parent / "_static"
# The cell of each stage whose receptive field is centred nearest to the cat's left eye.
POINT = (115, 170)  # (row, column) in the image
LAYERS = (  # name, BGR colour
    ("layer2", (80, 200, 60)),
    ("layer3", (0, 200, 255)),
    ("layer4", (60, 60, 230)),
)
MARGIN = 140  # grey border, in image pixels, that shows where boxes leave the image
FONT = cv2.FONT_HERSHEY_SIMPLEX


def _cell_nearest(field: LayerField, point: tuple[int, int]) -> tuple[int, int]:
    """The cell whose receptive field is centred nearest to ``point``."""
    rows, cols = field.output_size
    return min(
        ((i, j) for i in range(rows) for j in range(cols)),
        key=lambda cell: sum((c - p) ** 2 for c, p in zip(field.center(*cell), point)),
    )


def rf_box_figure() -> np.ndarray:
    image = chelsea()  # (300, 451, 3) RGB
    height, width = image.shape[:2]
    model = resnet18(weights=None).eval()
    rf = camkit.receptive_field(model, input_size=(3, height, width))

    canvas = np.full((height + 2 * MARGIN, width + 2 * MARGIN, 3), 200, np.uint8)
    canvas[MARGIN:MARGIN + height, MARGIN:MARGIN + width] = cv2.cvtColor(
        image, cv2.COLOR_RGB2BGR
    )
    drawn = []  # (colour, box, cell patch), the largest field first
    legend = []
    for name, colour in LAYERS:
        field = rf[name]
        cell = _cell_nearest(field, POINT)
        box = field.box(*cell, clip=False)  # rows top:bottom, columns left:right
        # The cell itself: the stride x stride patch around the centre of its field.
        stride_r, stride_c = field.stride
        cr, cc = field.center(*cell)
        patch = (
            (round(cc - stride_c / 2) + MARGIN, round(cr - stride_r / 2) + MARGIN),
            (round(cc + stride_c / 2) + MARGIN, round(cr + stride_r / 2) + MARGIN),
        )
        drawn.insert(0, (colour, box, patch))
        size_r, size_c = field.size
        legend.append(
            (f"{name} cell {cell}: field {size_r} x {size_c} px, stride {stride_r}", colour)
        )
    filled = canvas.copy()
    for colour, _, patch in drawn:
        cv2.rectangle(filled, *patch, colour, -1)
    canvas = cv2.addWeighted(canvas, 0.5, filled, 0.5, 0)
    for colour, box, patch in drawn:
        cv2.rectangle(canvas, *patch, colour, 1)
        cv2.rectangle(
            canvas,
            (box.left + MARGIN, box.top + MARGIN),
            (box.right - 1 + MARGIN, box.bottom - 1 + MARGIN),
            colour,
            3,
            cv2.LINE_AA,
        )
    cv2.rectangle(
        canvas, (MARGIN, MARGIN), (MARGIN + width - 1, MARGIN + height - 1), (255, 255, 255), 1
    )

    lines = [*legend, ("grey: outside the image (the padding)", (90, 90, 90))]
    strip = np.full((16 + 30 * len(lines), canvas.shape[1], 3), 255, np.uint8)
    for k, (text, colour) in enumerate(lines):
        top = 10 + 30 * k
        cv2.rectangle(strip, (14, top + 2), (34, top + 20), colour, -1)
        cv2.putText(strip, text, (46, top + 18), FONT, 0.6, (40, 40, 40), 1, cv2.LINE_AA)
    return np.vstack([canvas, strip])


def main() -> None:
    torch.manual_seed(0)
    OUT.mkdir(exist_ok=True)
    path = OUT / "rf_box.png"
    cv2.imwrite(str(path), rf_box_figure(), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
