"""Procedural street scenes in perspective, drawn into an image, a labelIds map and an
instanceIds map with the same polygons (so labels are exact). Used by layouts.py."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Cityscapes label ids (cityscapesscripts.helpers.labels) of the things drawn here.
ID = dict(ego=1, static=4, road=7, sidewalk=8, building=11, wall=12, fence=13, pole=17,
          light=19, sign=20, vegetation=21, terrain=22, sky=23, person=24, rider=25, car=26,
          truck=27, bus=28, train=31, motorcycle=32, bicycle=33)


class Canvas:
    """An RGB image, a labelIds map and an instanceIds map, drawn together."""

    def __init__(self, h: int, w: int, rng: np.random.Generator):
        self.h, self.w, self.rng = h, w, rng
        self.img = Image.new("RGB", (w, h))
        self.lab = Image.new("L", (w, h))
        self.inst = Image.new("I", (w, h))
        self._d = [ImageDraw.Draw(self.img), ImageDraw.Draw(self.lab), ImageDraw.Draw(self.inst)]
        self._count: dict[int, int] = {}

    def new_instance(self, label: int) -> int:
        self._count[label] = self._count.get(label, -1) + 1
        return label * 1000 + self._count[label]

    def color(self, base: tuple[int, int, int], jitter: int = 18) -> tuple[int, int, int]:
        c = np.asarray(base) + self.rng.integers(-jitter, jitter + 1, 3)
        return tuple(int(v) for v in np.clip(c, 0, 255))

    def poly(self, pts, label: int, color, inst: int | None = None) -> None:
        pts = [(float(x), float(y)) for x, y in pts]
        img, lab, ins = self._d
        img.polygon(pts, fill=color)
        lab.polygon(pts, fill=label)
        ins.polygon(pts, fill=inst if inst is not None else label)

    def rect(self, x0, y0, x1, y1, label: int, color, inst: int | None = None) -> None:
        self.poly([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], label, color, inst)

    def ellipse(self, box, label: int, color, inst: int | None = None) -> None:
        img, lab, ins = self._d
        img.ellipse(box, fill=color)
        lab.ellipse(box, fill=label)
        ins.ellipse(box, fill=inst if inst is not None else label)

    def line(self, pts, label: int, color, width: int, inst: int | None = None) -> None:
        width = max(1, int(round(width)))
        img, lab, ins = self._d
        img.line(pts, fill=color, width=width)
        lab.line(pts, fill=label, width=width)
        ins.line(pts, fill=inst if inst is not None else label, width=width)

    def paint(self, pts, color) -> None:
        """Texture only (lane markings, windows): the image changes, the labels do not."""
        self._d[0].polygon([(float(x), float(y)) for x, y in pts], fill=color)


@dataclass(frozen=True)
class Domain:
    """How one generated domain looks: where its camera sits and what light it sees. The
    Cityscapes-layout set is CITYSCAPES (its images are unchanged by the other domains' knobs);
    the other layouts' sets are shifted from it in these controlled ways (docs/study.md)."""

    horizon: tuple[float, float] = (0.36, 0.5)  # horizon row as a share of the height: camera height and pitch
    zoom: float = 1.0  # apparent size of the road and of every object: < 1 is a wider field of view
    hood: float = 0.3  # share of images showing the ego vehicle's bonnet (dashcams: most)
    conditions: dict[str, float] = field(default_factory=lambda: {"day": 1.0})  # illumination -> share
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)  # the camera's colour balance (palette)
    jpeg: bool = False  # stored as JPEG (the layout's format): block artefacts are part of the texture


CITYSCAPES = Domain()
DOMAINS = {
    "cityscapes": CITYSCAPES,
    # dashcams behind the windscreen: lower, wider, warmer, often at dusk, night or in rain
    "bdd100k": Domain(horizon=(0.5, 0.62), zoom=0.7, hood=0.75, tint=(1.08, 0.98, 0.85), jpeg=True,
                      conditions={"day": 0.3, "dusk": 0.25, "night": 0.25, "rain": 0.2}),
    # a roof camera of a taller car: higher horizon, overcast, cool palette
    "nuimages": Domain(horizon=(0.3, 0.42), zoom=0.85, hood=0.0, tint=(0.88, 0.98, 1.12), jpeg=True,
                       conditions={"day": 0.4, "dusk": 0.2, "night": 0.2, "rain": 0.2}),
}


class Scene:
    """Perspective geometry: horizon `yh`, vanishing point `xv`, ground depth from y."""

    def __init__(self, cv: Canvas, domain: Domain = CITYSCAPES):
        r, h, w = cv.rng, cv.h, cv.w
        self.cv, self.h, self.w, self.zoom = cv, h, w, domain.zoom
        self.yh = h * r.uniform(*domain.horizon)
        self.xv = w * r.uniform(0.38, 0.62)
        self.road_half = w * r.uniform(0.35, 0.6) * domain.zoom  # road half-width at the bottom edge
        self.walk = w * r.uniform(0.12, 0.3) * domain.zoom  # sidewalk width at the bottom edge

    def scale(self, y: float) -> float:
        """Apparent size of a 1-unit object standing at image row y (0 at the horizon)."""
        return max(y - self.yh, 0.0) / (self.h - self.yh)

    def px(self, y: float) -> float:
        """Height in pixels of a 1-unit object standing at image row y."""
        return self.scale(y) * self.h * self.zoom

    def edge_x(self, y: float, offset: float) -> float:
        """x of a line through the vanishing point that is `offset` px from xv at the bottom."""
        return self.xv + offset * self.scale(y)


def draw_sky(sc: Scene, light: float) -> None:
    cv, r = sc.cv, sc.cv.rng
    top = np.array([r.integers(60, 120), r.integers(110, 170), r.integers(180, 240)]) * light
    bottom = np.array([190, 205, 225]) * light
    for y in range(0, int(sc.yh) + 2, 2):
        t = y / max(sc.yh, 1)
        c = tuple(int(v) for v in np.clip(top * (1 - t) + bottom * t, 0, 255))
        cv.rect(0, y, sc.w, y + 2, ID["sky"], c)
    for _ in range(r.integers(0, 4)):  # clouds are sky too
        cx, cy = r.uniform(0, sc.w), r.uniform(0, sc.yh * 0.7)
        rx, ry = r.uniform(20, 70) * sc.w / 512, r.uniform(5, 15) * sc.h / 256
        cv.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), ID["sky"], cv.color((235, 238, 242), 8))


def draw_facades(sc: Scene, side: int) -> None:
    """Buildings along one side (-1 left, +1 right), with walls, fences and terrain in front."""
    cv, r = sc.cv, sc.cv.rng
    outer = side * (sc.road_half + sc.walk)
    terrain = r.random() < 0.35
    if terrain:
        outer += side * sc.w * r.uniform(0.05, 0.15)
    s = 2.5  # start beyond the image edge so the nearest facade covers the corner
    while s > 0.02:  # towards the vanishing point
        s_next = s * r.uniform(0.45, 0.8)
        height = sc.h * r.uniform(0.6, 1.6)
        x0, x1 = sc.xv + outer * s, sc.xv + outer * s_next
        yb0, yb1 = sc.yh + (sc.h - sc.yh) * s, sc.yh + (sc.h - sc.yh) * s_next
        if r.random() < 0.15:  # a gap in the row: a park (hedge and trees), no facade
            hedge = height * 0.3
            cv.poly([(x0, yb0), (x1, yb1), (x1, yb1 - hedge * s_next), (x0, yb0 - hedge * s)],
                    ID["vegetation"], cv.color((50, 95, 45), 15))
            draw_tree(sc, x0 + (x1 - x0) * 0.5, (yb0 + yb1) / 2, big=True)
        else:
            base = cv.color(tuple(int(v) for v in r.integers(70, 200, 3)), 10)
            cv.poly([(x0, yb0), (x1, yb1), (x1, yb1 - height * s_next), (x0, yb0 - height * s)],
                    ID["building"], base)
            glass = cv.color((50, 60, 75), 15)
            for fy in np.arange(0.15, 0.9, r.uniform(0.12, 0.2)):
                for fx in np.arange(0.1, 0.85, r.uniform(0.15, 0.3)):
                    q = [(fx, fy), (fx + 0.08, fy), (fx + 0.08, fy + 0.07), (fx, fy + 0.07)]
                    cv.paint([(x0 + (x1 - x0) * u, (yb0 - height * s * v) * (1 - u)
                               + (yb1 - height * s_next * v) * u) for u, v in q], glass)
        s = s_next
    if terrain:  # grass strip between sidewalk and buildings
        inner = side * (sc.road_half + sc.walk)
        cv.poly([(sc.xv + inner, sc.h), (sc.xv + outer, sc.h), (sc.xv, sc.yh), (sc.xv, sc.yh)],
                ID["terrain"], cv.color((110, 140, 60), 20))
    if r.random() < 0.4:  # a low wall or fence along part of the side
        label = ID["wall"] if r.random() < 0.5 else ID["fence"]
        color = cv.color((150, 140, 130) if label == ID["wall"] else (120, 110, 90), 20)
        sa, sb = r.uniform(0.3, 1.0), r.uniform(0.08, 0.25)
        edge = side * (sc.road_half + sc.walk * 0.95)
        ha = sc.h * r.uniform(0.12, 0.25)
        pa = (sc.xv + edge * sa, sc.yh + (sc.h - sc.yh) * sa)
        pb = (sc.xv + edge * sb, sc.yh + (sc.h - sc.yh) * sb)
        cv.poly([pa, pb, (pb[0], pb[1] - ha * sb), (pa[0], pa[1] - ha * sa)], label, color)
        if label == ID["fence"]:  # vertical slats: texture inside the fence region
            for t in np.linspace(0, 1, 14):
                x = pa[0] + (pb[0] - pa[0]) * t
                y = pa[1] + (pb[1] - pa[1]) * t
                hh = ha * (sa + (sb - sa) * t)
                cv.paint([(x, y), (x + 1, y), (x + 1, y - hh), (x, y - hh)], cv.color((80, 70, 60)))


def draw_ground(sc: Scene) -> None:
    cv, r = sc.cv, sc.cv.rng
    h, xv, yh = sc.h, sc.xv, sc.yh
    gray = int(r.integers(70, 120))
    cv.poly([(xv - sc.road_half, h), (xv + sc.road_half, h), (xv, yh), (xv, yh)],
            ID["road"], cv.color((gray, gray, gray + 5), 6))
    walk = cv.color((170, 160, 150), 20)
    for side in (-1, 1):
        a, b = side * sc.road_half, side * (sc.road_half + sc.walk)
        cv.poly([(xv + a, h), (xv + b, h), (xv, yh), (xv, yh)], ID["sidewalk"], walk)
    paint = cv.color((230, 230, 220), 10)
    for lane in r.choice([-0.33, 0.0, 0.33], size=r.integers(1, 3), replace=False):
        off = lane * sc.road_half
        for k in range(8):  # dashed markings, shrinking towards the horizon
            s0, s1 = 0.9 ** (3 * k), 0.9 ** (3 * k + 1.5)
            y0, y1 = yh + (h - yh) * s0, yh + (h - yh) * s1
            half = sc.w * 0.006
            cv.paint([(xv + off * s0 - half * s0, y0), (xv + off * s0 + half * s0, y0),
                      (xv + off * s1 + half * s1, y1), (xv + off * s1 - half * s1, y1)], paint)


def draw_tree(sc: Scene, x: float, y: float, big: bool = False) -> None:
    cv, r = sc.cv, sc.cv.rng
    s = sc.px(y) * (1.3 if big else 1.0)
    cv.rect(x - 0.02 * s, y - 0.45 * s, x + 0.02 * s, y, ID["vegetation"], cv.color((90, 70, 50)))
    green = (int(r.integers(40, 90)), int(r.integers(90, 150)), int(r.integers(30, 70)))
    for _ in range(r.integers(3, 7)):
        cx, cy = x + r.normal(0, 0.12) * s, y - r.uniform(0.45, 0.8) * s
        rad = r.uniform(0.1, 0.22) * s
        cv.ellipse((cx - rad, cy - rad, cx + rad, cy + rad), ID["vegetation"], cv.color(green, 15))


def draw_pole(sc: Scene, x: float, y: float, top: str | None) -> None:
    cv, r = sc.cv, sc.cv.rng
    s = sc.px(y)
    hgt, half = s * r.uniform(0.7, 1.0), max(0.006 * s, 0.5)
    cv.rect(x - half, y - hgt, x + half, y, ID["pole"], cv.color((110, 110, 115)))
    if top == "sign":
        size = 0.06 * s
        cy = y - hgt + size
        color = cv.color([(200, 30, 30), (30, 60, 170), (220, 190, 40)][r.integers(0, 3)], 15)
        if r.random() < 0.5:
            cv.ellipse((x - size, cy - size, x + size, cy + size), ID["sign"], color)
        else:
            cv.poly([(x - size, cy + size), (x + size, cy + size), (x, cy - size)], ID["sign"], color)
    elif top == "light":
        bw, bh = 0.035 * s, 0.11 * s
        y0 = y - hgt
        cv.rect(x - bw, y0, x + bw, y0 + bh, ID["light"], cv.color((30, 30, 30), 8))
        lit = r.integers(0, 3)
        for k, c in enumerate([(230, 40, 30), (240, 190, 30), (40, 220, 90)]):
            cy = y0 + bh * (k + 0.5) / 3
            rad = bw * 0.6
            cv._d[0].ellipse((x - rad, cy - rad, x + rad, cy + rad),
                             fill=c if k == lit else (60, 60, 60))


def draw_vehicle(sc: Scene, kind: str, x: float, y: float) -> None:
    cv, r = sc.cv, sc.cv.rng
    s = sc.px(y)
    label = ID[kind]
    inst = cv.new_instance(label)
    w, hgt = {"car": (0.55, 0.35), "truck": (0.75, 0.7), "bus": (0.85, 0.75),
              "train": (1.2, 0.7)}[kind]
    w, hgt = w * s * r.uniform(0.9, 1.1), hgt * s
    body = cv.color(tuple(int(v) for v in r.integers(30, 230, 3)), 5)
    if kind == "train":
        body = cv.color((200, 190, 60), 20)
    x0, x1 = x - w / 2, x + w / 2
    if kind == "car":
        cv.rect(x0, y - hgt * 0.55, x1, y - hgt * 0.1, label, body, inst)
        cv.poly([(x0 + w * 0.15, y - hgt * 0.55), (x1 - w * 0.15, y - hgt * 0.55),
                 (x1 - w * 0.25, y - hgt), (x0 + w * 0.25, y - hgt)], label, body, inst)
        cv.paint([(x0 + w * 0.22, y - hgt * 0.58), (x1 - w * 0.22, y - hgt * 0.58),
                  (x1 - w * 0.28, y - hgt * 0.92), (x0 + w * 0.28, y - hgt * 0.92)],
                 cv.color((40, 50, 60), 10))
    else:
        cv.rect(x0, y - hgt, x1, y - hgt * 0.08, label, body, inst)
        if kind in ("bus", "train"):  # a row of side windows
            cv.paint([(x0 + w * 0.05, y - hgt * 0.9), (x1 - w * 0.05, y - hgt * 0.9),
                      (x1 - w * 0.05, y - hgt * 0.6), (x0 + w * 0.05, y - hgt * 0.6)],
                     cv.color((40, 55, 70), 10))
        if kind == "truck":
            cv.paint([(x0 + w * 0.05, y - hgt * 0.85), (x0 + w * 0.3, y - hgt * 0.85),
                      (x0 + w * 0.3, y - hgt * 0.6), (x0 + w * 0.05, y - hgt * 0.6)],
                     cv.color((40, 55, 70), 10))
    wheel = 0.09 * s
    for wx in (x0 + w * 0.2, x1 - w * 0.2):
        cv.ellipse((wx - wheel, y - 2 * wheel, wx + wheel, y), label, (20, 20, 20), inst)


def draw_person(sc: Scene, x: float, y: float, label: int, inst: int | None = None) -> None:
    cv, r = sc.cv, sc.cv.rng
    s = sc.px(y) * r.uniform(0.85, 1.05)
    inst = inst if inst is not None else cv.new_instance(label)
    coat = cv.color(tuple(int(v) for v in r.integers(20, 220, 3)), 5)
    legs = cv.color((40, 40, 60), 15)
    head = 0.045 * s
    cv.rect(x - 0.04 * s, y - 0.25 * s, x - 0.01 * s, y, label, legs, inst)
    cv.rect(x + 0.01 * s, y - 0.25 * s, x + 0.04 * s, y, label, legs, inst)
    cv.rect(x - 0.06 * s, y - 0.52 * s, x + 0.06 * s, y - 0.24 * s, label, coat, inst)
    cv.ellipse((x - head, y - 0.52 * s - 2 * head, x + head, y - 0.52 * s), label,
               cv.color((210, 170, 140), 25), inst)


def draw_two_wheeler(sc: Scene, kind: str, x: float, y: float) -> None:
    cv = sc.cv
    s = sc.px(y)
    label = ID[kind]
    inst = cv.new_instance(label)
    rad = (0.1 if kind == "bicycle" else 0.12) * s
    color = cv.color((30, 30, 30), 10) if kind == "bicycle" else cv.color((150, 20, 20), 40)
    for wx in (x - 0.16 * s, x + 0.16 * s):
        cv._d[0].ellipse((wx - rad, y - 2 * rad, wx + rad, y), outline=color, width=max(1, int(0.02 * s)))
        cv._d[1].ellipse((wx - rad, y - 2 * rad, wx + rad, y), outline=label, width=max(1, int(0.02 * s)))
        cv._d[2].ellipse((wx - rad, y - 2 * rad, wx + rad, y), outline=inst, width=max(1, int(0.02 * s)))
    if kind == "motorcycle":
        cv.poly([(x - 0.16 * s, y - rad), (x + 0.16 * s, y - rad), (x + 0.08 * s, y - 2.2 * rad),
                 (x - 0.1 * s, y - 2.2 * rad)], label, color, inst)
    else:
        cv.line([(x - 0.16 * s, y - rad), (x, y - 2 * rad), (x + 0.16 * s, y - rad)], label,
                color, 0.02 * s, inst)
    if cv.rng.random() < 0.85:  # most two-wheelers have a rider
        draw_person(sc, x, y - 1.6 * rad, ID["rider"])


def render(h: int, w: int, seed: int, split: str, index: int,
           domain: Domain = CITYSCAPES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One scene -> (RGB uint8 (h,w,3), labelIds uint8 (h,w), instanceIds uint16 (h,w)).

    Longer than 80 lines on purpose: one random stream draws the scene's layers in a fixed order, and
    splitting it would make the order of the draws (which every generated dataset's bytes depend on)
    harder to see and to keep."""
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, index])
    cv = Canvas(h, w, rng)
    sc = Scene(cv, domain)
    light = rng.uniform(0.55, 1.15)
    draw_sky(sc, light)
    cv.rect(sc.xv - w * 0.12, sc.yh - h * 0.06, sc.xv + w * 0.12, sc.yh + 1,
            ID["building"], cv.color((150, 150, 160), 30))  # the far end of the street
    for side in (-1, 1):
        draw_facades(sc, side)
    draw_ground(sc)

    # Objects, drawn far to near. Rare classes are forced in some images so all 19 exist.
    force = index % 10
    objects: list[tuple[float, str, float]] = []  # (y of ground contact, kind, x)

    def on_road(lane_lo: float = -0.8, lane_hi: float = 0.8) -> tuple[float, float]:
        s = rng.uniform(0.12, 0.95)
        y = sc.yh + (h - sc.yh) * s
        return y, sc.xv + rng.uniform(lane_lo, lane_hi) * sc.road_half * s

    def on_walk(side: int | None = None) -> tuple[float, float]:
        side = side if side is not None else int(rng.choice([-1, 1]))
        s = rng.uniform(0.1, 0.95)
        off = side * (sc.road_half + sc.walk * rng.uniform(0.2, 0.9))
        return sc.yh + (h - sc.yh) * s, sc.xv + off * s

    for _ in range(rng.integers(1, 7)):
        y, x = on_road()
        objects.append((y, "car", x))
    for kind, p, slot in (("truck", 0.3, 1), ("bus", 0.25, 2), ("train", 0.08, 3),
                          ("motorcycle", 0.25, 4), ("bicycle", 0.4, 5)):
        if rng.random() < p or force == slot:
            y, x = on_road(-0.9, 0.9) if kind != "bicycle" else on_walk()
            objects.append((y, kind, x))
    for _ in range(rng.integers(0, 6) + (2 if force == 6 else 0)):
        y, x = on_walk()
        objects.append((y, "person", x))
    for _ in range(rng.integers(2, 7)):
        side = int(rng.choice([-1, 1]))
        s = rng.uniform(0.15, 1.0)
        off = side * (sc.road_half + sc.walk * 0.1)
        top = rng.choice(["sign", "light", None, None], p=[0.35, 0.2, 0.25, 0.2])
        if force == 7 and top is None:
            top = "light"
        objects.append((sc.yh + (h - sc.yh) * s, f"pole:{top}", sc.xv + off * s))
    for _ in range(rng.integers(0, 4)):
        y, x = on_walk()
        objects.append((y, "tree", x))

    for y, kind, x in sorted(objects):
        if kind in ("car", "truck", "bus", "train"):
            draw_vehicle(sc, kind, x, y)
        elif kind in ("motorcycle", "bicycle"):
            draw_two_wheeler(sc, kind, x, y)
        elif kind == "person":
            draw_person(sc, x, y, ID["person"])
        elif kind == "tree":
            draw_tree(sc, x, y)
        else:
            top = kind.split(":")[1]
            draw_pole(sc, x, y, None if top == "None" else top)

    if rng.random() < domain.hood:  # the ego vehicle's bonnet: ignored in evaluation, as in Cityscapes
        hood = h * rng.uniform(0.04, 0.1)
        cv.poly([(0, h), (w, h), (w * 0.85, h - hood), (w * 0.15, h - hood)], ID["ego"],
                cv.color((40, 40, 45), 10))

    # Lighting, soft shadows and sensor noise: the image only, never the labels.
    img = cv.img.filter(ImageFilter.GaussianBlur(0.6))
    arr = np.asarray(img, dtype=np.float32)
    shade = rng.uniform(0.65, 1.15, size=(4, 8)).astype(np.float32)
    shade = np.asarray(Image.fromarray(shade).resize((w, h), Image.BILINEAR))
    tint = rng.uniform(0.9, 1.1, size=3).astype(np.float32)
    arr = arr * shade[..., None] * tint * rng.uniform(0.8, 1.15)
    arr += rng.normal(0, rng.uniform(2, 8), size=arr.shape).astype(np.float32)
    if domain != CITYSCAPES:  # its own generator: the Cityscapes-layout images stay as they were
        arr = illuminate(arr, domain, np.random.default_rng([seed, 0 if split == "train" else 1, index, 1]))
    rgb = np.clip(arr, 0, 255).astype(np.uint8)
    return rgb, np.asarray(cv.lab, dtype=np.uint8), np.asarray(cv.inst, dtype=np.uint16)


def illuminate(arr: np.ndarray, domain: Domain, rng: np.random.Generator) -> np.ndarray:
    """The domain's colour balance and one of its conditions, drawn per image (the image only)."""
    names = list(domain.conditions)
    condition = names[rng.choice(len(names), p=np.array(list(domain.conditions.values())) / sum(
        domain.conditions.values()))]
    arr = arr * np.asarray(domain.tint, dtype=np.float32)
    h, w = arr.shape[:2]
    if condition == "dusk":  # low orange light
        arr = arr * np.array([1.05, 0.8, 0.6], np.float32) * rng.uniform(0.5, 0.75)
    elif condition == "night":  # dark and blue, with lamps and headlights as bright blurred spots
        arr = arr * np.array([0.6, 0.65, 0.9], np.float32) * rng.uniform(0.15, 0.3)
        glow = np.zeros((h, w), np.float32)
        for _ in range(rng.integers(3, 9)):
            cy, cx, rad = rng.uniform(0.2, 0.8) * h, rng.uniform(0, 1) * w, rng.uniform(0.02, 0.06) * h
            yy, xx = np.ogrid[:h, :w]
            glow += 220 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * rad ** 2))
        arr = arr + glow[..., None] * np.array([1.0, 0.9, 0.6], np.float32)
        arr += rng.normal(0, 6, size=arr.shape).astype(np.float32)  # high gain: more sensor noise
    elif condition == "rain":  # grey, low contrast, streaks
        gray = arr.mean(-1, keepdims=True)
        arr = 0.45 * arr + 0.55 * gray
        arr = 0.6 * arr + 0.4 * arr.mean()
        streaks = Image.new("L", (w, h))
        draw = ImageDraw.Draw(streaks)
        for _ in range(int(h * w / 900)):
            x, y, n = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.02, 0.06) * h
            draw.line([(x, y), (x - 0.15 * n, y + n)], fill=int(rng.integers(40, 90)), width=1)
        arr = arr + np.asarray(streaks.filter(ImageFilter.GaussianBlur(0.7)), np.float32)[..., None]
    return arr
