"""The demo's drawing surface: an image on which the user drags boxes or clicks points (a ``gr.HTML`` component).

The browser shows a rendered copy of the image (regions and answer boxes already drawn on it by the server) and
reports each gesture as a ``"region"`` event whose data is ``{"box": [x1, y1, x2, y2], "kind": "box" | "point"}``,
normalised to ``[0, 1]`` by the displayed image's width and height, which is the original image's frame (the copy
is a uniform rescale of the original). A drag of at least :data:`MIN_DRAG_PX` screen pixels is a box; a shorter
one is a point, sent as a zero-size box that :func:`region_from_event` turns into a small box.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping
from typing import Any

from PIL import Image

from serve import InputError
from serve.boxes import Box, check_box

#: The rendered copy's long side in pixels (small images are enlarged so labels stay legible).
DISPLAY_SIDE = 640
#: A shorter drag than this, in screen pixels, is a click (a point).
MIN_DRAG_PX = 4
#: A point becomes a box of this side, as a fraction of the image's width and height, centred on the point.
POINT_BOX_SIDE = 0.06
#: How far outside ``[0, 1]`` a reported coordinate may be (rounding at the image border) before it is rejected.
BORDER_TOLERANCE = 0.02

EVENT_NAME = "region"

CANVAS_TEMPLATE = """
<div class="cloc-stage">
  {{#if value}}
    <img class="cloc-image" src="${value}" alt="the image; drag to draw a box, click for a point"
         draggable="false" />
    <div class="cloc-band"></div>
  {{else}}
    <div class="cloc-empty">Upload an image (or pick an example) to start.</div>
  {{/if}}
</div>
"""

CANVAS_CSS = """
.cloc-stage { position: relative; display: inline-block; width: 100%; user-select: none; touch-action: none; }
.cloc-image { display: block; width: 100%; height: auto; cursor: crosshair; outline: 1px solid #bbb; }
.cloc-band { position: absolute; display: none; border: 2px dashed #ff2d95; background: rgba(255, 45, 149, 0.12);
             pointer-events: none; }
.cloc-empty { padding: 4em 1em; text-align: center; border: 2px dashed #999; border-radius: 8px; color: #777; }
"""

# `element` and `trigger` are provided by gr.HTML. Coordinates are normalised by the <img>'s on-screen box.
CANVAS_JS = """
const MIN_DRAG = __MIN_DRAG__;
let start = null;
const image = () => element.querySelector('img.cloc-image');
const band = () => element.querySelector('.cloc-band');
const clamp = (v) => Math.min(1, Math.max(0, v));
function where(ev) {
  const img = image();
  if (!img) return null;
  const r = img.getBoundingClientRect();
  if (!r.width || !r.height) return null;
  return { x: (ev.clientX - r.left) / r.width, y: (ev.clientY - r.top) / r.height, sx: ev.clientX, sy: ev.clientY };
}
function hideBand() { const b = band(); if (b) b.style.display = 'none'; }
element.addEventListener('pointerdown', (ev) => {
  if (ev.button !== 0) return;
  const p = where(ev);
  if (!p || p.x < 0 || p.x > 1 || p.y < 0 || p.y > 1) return;
  ev.preventDefault();
  start = p;
  if (element.setPointerCapture) element.setPointerCapture(ev.pointerId);
});
element.addEventListener('pointermove', (ev) => {
  if (!start) return;
  const b = band(), img = image();
  if (!b || !img) return;
  const r = img.getBoundingClientRect(), stage = b.parentElement.getBoundingClientRect();
  const x = Math.min(r.right, Math.max(r.left, ev.clientX)), y = Math.min(r.bottom, Math.max(r.top, ev.clientY));
  b.style.left = (Math.min(start.sx, x) - stage.left) + 'px';
  b.style.top = (Math.min(start.sy, y) - stage.top) + 'px';
  b.style.width = Math.abs(x - start.sx) + 'px';
  b.style.height = Math.abs(y - start.sy) + 'px';
  b.style.display = 'block';
});
element.addEventListener('pointerup', (ev) => {
  if (!start) return;
  const s = start, p = where(ev) || s;
  start = null;
  hideBand();
  const drag = Math.hypot(ev.clientX - s.sx, ev.clientY - s.sy) >= MIN_DRAG;
  const box = drag
    ? [Math.min(s.x, p.x), Math.min(s.y, p.y), Math.max(s.x, p.x), Math.max(s.y, p.y)].map(clamp)
    : [s.x, s.y, s.x, s.y];
  trigger('__EVENT__', { box: box, kind: drag ? 'box' : 'point' });
});
element.addEventListener('pointercancel', () => { start = null; hideBand(); });
""".replace("__MIN_DRAG__", str(MIN_DRAG_PX)).replace("__EVENT__", EVENT_NAME)


def region_from_event(data: Mapping[str, Any]) -> Box:
    """The normalised ``xyxy`` box of one canvas event; a point becomes a :data:`POINT_BOX_SIDE` box around it.

    Raises:
        InputError: the data is malformed, or the gesture lies outside the image.
    """
    raw = data.get("box") if isinstance(data, Mapping) else None
    if not isinstance(raw, (list, tuple)) or len(raw) != 4:
        raise InputError(f"a region needs 4 coordinates, got {raw!r}")
    try:
        values = [float(v) for v in raw]
    except (TypeError, ValueError) as error:
        raise InputError(f"a region needs 4 numbers, got {raw!r}") from error
    if not all(math.isfinite(v) and -BORDER_TOLERANCE <= v <= 1 + BORDER_TOLERANCE for v in values):
        raise InputError("that region lies outside the image; draw inside it")
    if data.get("kind") == "point" or (values[0] == values[2] and values[1] == values[3]):
        cx, cy = (values[0] + values[2]) / 2, (values[1] + values[3]) / 2
        half = POINT_BOX_SIDE / 2
        values = [cx - half, cy - half, cx + half, cy + half]
    # A gesture is clipped to the image (a drag that leaves it, a point box at its edge); numbers from clients are
    # refused instead (check_box).
    return check_box([min(max(v, 0.0), 1.0) for v in values], where="the drawn region")


def display_copy(image: Image.Image, side: int = DISPLAY_SIDE) -> Image.Image:
    """An RGB copy with long side ``side`` (a uniform rescale, so normalised boxes are unchanged)."""
    rgb = image.convert("RGB")
    scale = side / max(rgb.size)
    size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
    small = max(rgb.size) * 4 <= side  # tiny synthetic images: keep their pixels crisp
    return rgb.resize(size, Image.Resampling.NEAREST if small else Image.Resampling.BICUBIC)


def to_data_url(image: Image.Image) -> str:
    """A PNG ``data:`` URL (what the canvas's ``value`` holds)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


__all__ = [
    "CANVAS_CSS",
    "CANVAS_JS",
    "CANVAS_TEMPLATE",
    "DISPLAY_SIDE",
    "EVENT_NAME",
    "POINT_BOX_SIDE",
    "display_copy",
    "region_from_event",
    "to_data_url",
]
