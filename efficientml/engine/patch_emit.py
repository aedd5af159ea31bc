"""C for patch-based inference (:mod:`.patch`): the two data-movement kernels its graphs add
(``patch_copy``: a window copy with a fill code for positions outside the image; ``patch_fill``: those
positions of a tile reset in place), their emitters registered in the generator's op-kind table, and
:func:`share_constants`, which folds each per-patch conv's ``const`` arrays into its first patch's."""

from __future__ import annotations

import re
from typing import Any

from efficientml.engine import codegen
from efficientml.engine.lower import Graph, Op

_C_HELPERS = r"""/* patch-based inference (efficientml.engine.patch) */
static int32_t eml_max3(int32_t a, int32_t b, int32_t c) { return a > b ? (a > c ? a : c) : (b > c ? b : c); }
static int32_t eml_min3(int32_t a, int32_t b, int32_t c) { return a < b ? (a < c ? a : c) : (b < c ? b : c); }

/* dst (c, dh, dw) with image origin (dy, dx) <- src (c, sh, sw) at origin (sy, sx) where both cover a
 * position inside the h x w image; `fill` elsewhere (fill < 0: left as it is) */
static void eml_patch_copy(int32_t c, const uint8_t *src, int32_t sh, int32_t sw, int32_t sy, int32_t sx,
                           uint8_t *dst, int32_t dh, int32_t dw, int32_t dy, int32_t dx, int32_t h, int32_t w,
                           int32_t fill) {
    int32_t y0 = eml_max3(sy, dy, 0), y1 = eml_min3(sy + sh, dy + dh, h);
    int32_t x0 = eml_max3(sx, dx, 0), x1 = eml_min3(sx + sw, dx + dw, w);
    if (fill >= 0) memset(dst, fill, (size_t)c * dh * dw);
    if (y0 >= y1 || x0 >= x1) return;
    for (int32_t k = 0; k < c; k++)
        for (int32_t y = y0; y < y1; y++)
            memcpy(dst + ((int64_t)k * dh + y - dy) * dw + (x0 - dx),
                   src + ((int64_t)k * sh + y - sy) * sw + (x0 - sx), (size_t)(x1 - x0));
}

/* the positions of tile t (c, th, tw) at image origin (ty, tx) outside the h x w image <- fill */
static void eml_patch_fill(int32_t c, uint8_t *t, int32_t th, int32_t tw, int32_t ty, int32_t tx, int32_t h,
                           int32_t w, uint8_t fill) {
    int32_t left = -tx > 0 ? -tx : 0, right = tx + tw - w > 0 ? tx + tw - w : 0;
    if (left > tw) left = tw;
    if (right > tw - left) right = tw - left;
    for (int32_t k = 0; k < c; k++)
        for (int32_t i = 0; i < th; i++) {
            uint8_t *row = t + ((int64_t)k * th + i) * tw;
            if (ty + i < 0 || ty + i >= h) { memset(row, fill, (size_t)tw); continue; }
            memset(row, fill, (size_t)left);
            memset(row + tw - right, fill, (size_t)right);
        }
}
"""


def _helpers(e: Any) -> None:
    if _C_HELPERS not in e.decls:
        e.decls.insert(0, _C_HELPERS)


def _emit_copy(e: Any, tag: str, op: Op) -> None:
    _helpers(e)
    p = op.params
    s, d = ", ".join(map(str, p["src"])), ", ".join(map(str, p["dst"]))
    e.calls.append(f"    eml_patch_copy({p['c']}, {e.a(op.ins[0])}, {s}, {e.a(op.out)}, {d}, "
                   f"{p['image'][0]}, {p['image'][1]}, {p['fill']});")


def _emit_fill(e: Any, tag: str, op: Op) -> None:
    _helpers(e)
    p = op.params
    e.calls.append(f"    eml_patch_fill({p['c']}, {e.a(op.out)}, {', '.join(map(str, p['tile']))}, "
                   f"{p['image'][0]}, {p['image'][1]}, {p['fill']});")


# the generator's registry of emitters, keyed by op kind (these two kinds are made only by this module)
codegen._EMIT.setdefault("patch_copy", _emit_copy)
codegen._EMIT.setdefault("patch_fill", _emit_fill)

_DECL = re.compile(r"^static const (\w+) L(\d+)_(\w+)(\[\d+\])? = (\{.*?\});\n", re.S | re.M)


def share_constants(c_source: str, graph: Graph) -> str:
    """``c_source`` (generated from ``graph``, a patched graph) with every ``const`` array or struct of a
    per-patch op (``L<i>_<name>``) that repeats the one of the same name of the first patch's copy of
    that op removed, and its uses renamed to it: one copy of each conv's weights for all patches."""
    first: dict[int, int] = {}                       # original op index -> op index of its first copy
    canon: dict[int, int] = {}                       # op index of a copy -> op index of the first copy
    for i, op in enumerate(graph.ops):
        if "patch_of" in op.params:
            canon[i] = first.setdefault(op.params["patch_of"], i)
    seen: dict[tuple[int, str], tuple[str, ...]] = {}
    rename: dict[str, str] = {}
    parts, pos = [], 0
    for m in _DECL.finditer(c_source):
        i, name = int(m.group(2)), m.group(3)
        if i not in canon:
            continue
        key, body = (canon[i], name), (m.group(1), m.group(4) or "", m.group(5))
        if canon[i] == i:
            seen[key] = body
        elif seen.get(key) == body:                  # the same emitter path wrote the same constants
            rename[f"L{i}_{name}"] = f"L{canon[i]}_{name}"
            parts.append(c_source[pos:m.start()])
            pos = m.end()
    if not rename:
        return c_source
    text = "".join(parts) + c_source[pos:]
    return re.sub(r"\bL\d+_\w+\b", lambda m: rename.get(m.group(0), m.group(0)), text)
