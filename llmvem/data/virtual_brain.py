"""The built-in virtual brain: procedurally rendered scenes and simulated voxels with a known ground truth.

It is the offline default dataset of the demo and the tests, generated in seconds from a seed.

Generative model
----------------
**Scenes.** Each image shows one or two objects on a textured background. An object has a *category* (one of
``CATEGORIES``: circle, square, triangle, star, cross), a *colour* (one of ``COLOURS``), a *size* (small: radius
12% of the image side; large: 24%) and a *position* (centre uniform in [0.2, 0.8]², named on a 3×3 grid such as
"upper left"). The background is one of ``BACKGROUNDS`` (plain, gradient, stripes at a random orientation and
frequency, checkerboard, noise) in one of the colours. The generator writes an exact description of each scene,
e.g. "A large red circle in the upper left and a small blue star at the bottom, on a green striped background."
These descriptions are the dataset's captions.

**Early visual voxels** (ROI ``early_visual``). Luminance is filtered with a quadrature pair of Gabor filters at 4
orientations × 2 spatial frequencies (4 and 8 cycles per image); the energy (sum of squares of the pair) is
averaged in a 24×24 grid. Each voxel has a Gaussian retinotopic receptive field (centre in the visual field
contralateral to its hemisphere: left-hemisphere voxels see the right half, σ = 6–20% of the image side) and a
preferred orientation (von Mises tuning, κ = 2) and frequency (weights 0.75/0.25). Its signal is
``log(1 + Σ_channels w_c Σ_positions RF(p) E_c(p) / s)``.

**Semantic voxels** (ROI ``semantic``, subdivided into ``semantic_<category>``). The scene's content vector ``f``
holds the number of objects of each category (5), the presence of each colour (7), whether any object is large
(1), the number of objects (1) and the background type (5). Each voxel prefers one category (weight 1.0), has a
preferred colour (weight 0.4) and small random weights (N(0, 0.15²)) on every other entry; its signal is ``f·w``.

**Relational voxels** (ROI ``relational``; only with ``n_relational > 0``, the positive control of alignment).
They respond to scene attributes that the exact descriptions state in words but that frozen, spatially pooled
backbone features encode poorly: the number of objects, where the objects are (any object in the left / right
column, in the top / bottom row, in the centre cell of the 3×3 grid), whether both objects share a category, and
which two categories co-occur (10 pairs) — ``Scene.relational_vector``, 17 entries. Each voxel has two preferred
entries (weight 1.0 each) and small random weights (N(0, 0.15²)) on the rest. Measured on 150 training scenes
(ridge, 5-fold CV α, 200 test scenes, EfficientNet-Lite0 block5+block10+pooled vs MiniLM embeddings of the
descriptions): position attributes r = 0.19–0.42 from image features vs 0.86–0.95 from the description
embeddings; number of objects 0.50 vs 0.99; same-category pairs 0.08 vs 0.92; category pairs 0.04–0.34 vs
0.57–0.88 (``bench/bench_alignment.py`` prints the table). So these voxels are where caption supervision has
information to add. Their parameters are drawn after every other voxel's, so a brain generated with
``n_relational=0`` is identical to one generated before this population existed.

**Noise.** Each voxel's signal is z-scored over all images (variance 1). Every image is shown ``n_repeats`` times;
each single trial adds independent Gaussian noise with a voxel-specific standard deviation σ drawn log-uniformly
from ``noise_range``. The responses are the mean over repeats, so the true noise ceiling (fraction of variance of
the repeat-averaged response that the signal explains) is ``1 / (1 + σ² / n_repeats)``; it is the dataset's
``noise_ceiling``. The noise-free signal of every image and all voxel parameters are kept in
``dataset.meta["ground_truth"]`` for recovery tests; ``dataset.meta["attributes"]`` holds each image's exact
attribute vector by image id (``names``, ``by_id``), the non-language alignment target.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from llmvem.data.dataset import EncodingDataset, Split
from llmvem.data.images import ArrayImages
from llmvem.errors import DataValidationError

CATEGORIES = ("circle", "square", "triangle", "star", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
}
BACKGROUNDS = ("plain", "gradient", "stripes", "checkerboard", "noise")
_BG_WORDS = {"plain": "plain", "gradient": "gradient", "stripes": "striped", "checkerboard": "checkered",
             "noise": "speckled"}
_POSITION_NAMES = (("upper left", "top", "upper right"), ("left", "centre", "right"),
                   ("lower left", "bottom", "lower right"))
_SIZES = {"small": 0.12, "large": 0.24}
_GRID = 24
_ORIENTATIONS = 4
_FREQUENCIES = (4.0, 8.0)


@dataclass
class SceneObject:
    category: str
    colour: str
    size: str
    x: float
    y: float

    @property
    def position_name(self) -> str:
        col = min(int(self.x * 3), 2)
        row = min(int(self.y * 3), 2)
        return _POSITION_NAMES[row][col]


@dataclass
class Scene:
    objects: list[SceneObject]
    background: str
    background_colour: str
    stripe_angle: float
    stripe_frequency: float

    def description(self) -> str:
        """Exact one-sentence description of the scene."""
        parts = []
        for obj in self.objects:
            where = "in the centre" if obj.position_name == "centre" else (
                f"at the {obj.position_name}" if obj.position_name in ("top", "bottom") else
                f"on the {obj.position_name}" if obj.position_name in ("left", "right") else
                f"in the {obj.position_name}")
            parts.append(f"a {obj.size} {obj.colour} {obj.category} {where}")
        text = " and ".join(parts)
        bg = f"{self.background_colour} {_BG_WORDS[self.background]} background"
        return f"{text[0].upper()}{text[1:]}, on a {bg}."

    def content_vector(self) -> np.ndarray:
        """Semantic content, shape (19,): category counts, colour presence, any large, n objects, background."""
        f = np.zeros(len(CATEGORIES) + len(COLOURS) + 2 + len(BACKGROUNDS))
        colours = list(COLOURS)
        for obj in self.objects:
            f[CATEGORIES.index(obj.category)] += 1.0
            f[len(CATEGORIES) + colours.index(obj.colour)] = 1.0
        base = len(CATEGORIES) + len(COLOURS)
        f[base] = float(any(o.size == "large" for o in self.objects))
        f[base + 1] = len(self.objects)
        f[base + 2 + BACKGROUNDS.index(self.background)] = 1.0
        return f

    def relational_vector(self) -> np.ndarray:
        """Relational content, shape (17,): number of objects; any object in the left column, right column,
        top row, bottom row, centre cell; both objects of one category; each of the 10 category pairs present."""
        objs = self.objects
        cats = {o.category for o in objs}
        pairs = [float(a in cats and b in cats) for i, a in enumerate(CATEGORIES) for b in CATEGORIES[i + 1:]]
        return np.array([
            float(len(objs)),
            float(any(o.x < 1 / 3 for o in objs)),
            float(any(o.x >= 2 / 3 for o in objs)),
            float(any(o.y < 1 / 3 for o in objs)),
            float(any(o.y >= 2 / 3 for o in objs)),
            float(any(o.position_name == "centre" for o in objs)),
            float(len(objs) == 2 and objs[0].category == objs[1].category),
            *pairs,
        ])


    def attribute_vector(self) -> np.ndarray:
        """Every fact :meth:`description` states, without language, shape (58,) (names: ``ATTRIBUTE_NAMES``): for
        each of two object slots (in the description's order; zeros when absent) presence, category (5), colour
        (7), large and the 3×3 cell (9); then the background type (5) and colour (7). The non-language alignment
        target of the positive control (``model.align_target=attributes``)."""
        colours = list(COLOURS)
        slot = 1 + len(CATEGORIES) + len(colours) + 1 + 9
        v = np.zeros(2 * slot + len(BACKGROUNDS) + len(colours))
        for k, obj in enumerate(self.objects[:2]):
            base = k * slot
            v[base] = 1.0
            v[base + 1 + CATEGORIES.index(obj.category)] = 1.0
            v[base + 1 + len(CATEGORIES) + colours.index(obj.colour)] = 1.0
            v[base + 1 + len(CATEGORIES) + len(colours)] = float(obj.size == "large")
            v[base + slot - 9 + 3 * min(int(obj.y * 3), 2) + min(int(obj.x * 3), 2)] = 1.0
        v[2 * slot + BACKGROUNDS.index(self.background)] = 1.0
        v[2 * slot + len(BACKGROUNDS) + colours.index(self.background_colour)] = 1.0
        return v


ATTRIBUTE_NAMES = (*(f"obj{k}_{name}" for k in (1, 2) for name in (
    "present", *CATEGORIES, *COLOURS, "large", *(f"cell{r}{c}" for r in range(3) for c in range(3)))),
    *(f"background_{b}" for b in BACKGROUNDS), *(f"background_colour_{c}" for c in COLOURS))

RELATIONAL_NAMES = ("n_objects", "left", "right", "top", "bottom", "centre", "same_category",
                    *(f"pair_{a}_{b}" for i, a in enumerate(CATEGORIES) for b in CATEGORIES[i + 1:]))


def _random_scene(rng: np.random.Generator) -> Scene:
    colours = list(COLOURS)
    n_obj = int(rng.integers(1, 3))
    objects = [
        SceneObject(category=CATEGORIES[rng.integers(len(CATEGORIES))], colour=colours[rng.integers(len(colours))],
                    size=("small", "large")[rng.integers(2)], x=float(rng.uniform(0.2, 0.8)),
                    y=float(rng.uniform(0.2, 0.8)))
        for _ in range(n_obj)
    ]
    bg_colour = colours[rng.integers(len(colours))]
    return Scene(objects=objects, background=BACKGROUNDS[rng.integers(len(BACKGROUNDS))],
                 background_colour=bg_colour, stripe_angle=float(rng.uniform(0, np.pi)),
                 stripe_frequency=float(rng.uniform(3, 9)))


def _shape_polygon(category: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if category == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if category == "triangle":
        return [(cx + r * np.cos(a), cy - r * np.sin(a)) for a in np.pi / 2 + np.arange(3) * 2 * np.pi / 3]
    if category == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = np.pi / 2 + k * np.pi / 5
            pts.append((cx + rad * np.cos(a), cy - rad * np.sin(a)))
        return pts
    if category == "cross":
        w = r * 0.35
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    return None


def render_scene(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    """Render ``scene`` to a uint8 array of shape (size, size, 3) (drawn at 2× and downsampled)."""
    big = size * 2
    yy, xx = np.mgrid[0:big, 0:big] / big
    base = np.asarray(COLOURS[scene.background_colour], dtype=np.float64)
    if scene.background == "plain":
        shade = np.ones((big, big))
    elif scene.background == "gradient":
        shade = 0.45 + 0.55 * (xx * np.cos(scene.stripe_angle) + yy * np.sin(scene.stripe_angle) + 0.5) / 2.0
    elif scene.background == "stripes":
        phase = 2 * np.pi * scene.stripe_frequency * (xx * np.cos(scene.stripe_angle) + yy * np.sin(scene.stripe_angle))
        shade = 0.6 + 0.4 * np.sign(np.sin(phase))
    elif scene.background == "checkerboard":
        k = int(round(scene.stripe_frequency))
        shade = 0.6 + 0.4 * (((xx * k).astype(int) + (yy * k).astype(int)) % 2 * 2 - 1)
    else:
        shade = 0.55 + 0.45 * rng.random((big // 4, big // 4)).repeat(4, 0).repeat(4, 1)
    canvas = np.clip(base[None, None, :] * shade[..., None], 0, 255).astype(np.uint8)
    img = Image.fromarray(canvas, mode="RGB")
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        cx, cy, r = obj.x * big, obj.y * big, _SIZES[obj.size] * big
        colour = COLOURS[obj.colour]
        outline = (20, 20, 20)
        poly = _shape_polygon(obj.category, cx, cy, r)
        if poly is None:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour, outline=outline, width=2)
        else:
            draw.polygon(poly, fill=colour, outline=outline)
    return np.asarray(img.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)


def make_virtual_scenes(n: int, image_size: int = 64, seed: int = 7) -> tuple[ArrayImages, list[str], list[Scene]]:
    """Extra captioned scenes without responses: images drawn like the brain's, with their exact descriptions.

    The alignment stream of the positive control (``align_data.spec = "virtual-scenes:n=2000,seed=7"``): many
    more captioned scenes than scenes with responses. Use a ``seed`` other than the brain's so the scenes differ.

    Parameters
    ----------
    n : int
        Number of scenes (>= 1).
    image_size : int
        Side of the images in pixels (the brain's ``image_size``).
    seed : int
        Scenes and rendering follow from it.

    Returns
    -------
    images : ArrayImages
        ``n`` images of shape (image_size, image_size, 3), ids ``vs<seed>_<i>``.
    descriptions : list of str
        The exact description of each scene (:meth:`Scene.description`).
    scenes : list of Scene
    """
    if n < 1 or image_size < 8:
        raise DataValidationError(None, "virtual-scenes", f"got n={n}, image_size={image_size}; expected n >= 1 "
                                  "and image_size >= 8")
    scene_seq, render_seq = np.random.SeedSequence([seed, 23]).spawn(2)
    scene_rng, render_rng = np.random.default_rng(scene_seq), np.random.default_rng(render_seq)
    scenes = [_random_scene(scene_rng) for _ in range(n)]
    images = np.stack([render_scene(s, image_size, render_rng) for s in scenes])
    return ArrayImages(images, [f"vs{seed:03d}_{i:05d}" for i in range(n)]), [s.description() for s in scenes], scenes


def _gabor_energy(images: np.ndarray) -> np.ndarray:
    """Oriented energy maps, (n_images, n_channels, GRID, GRID), channels = orientation × frequency."""
    n, h, w, _ = images.shape
    lum = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32) / 255.0
    lum -= lum.mean(axis=(1, 2), keepdims=True)
    fy = np.fft.fftfreq(h)[:, None] * h
    fx = np.fft.fftfreq(w)[None, :] * w
    spectrum = np.fft.fft2(lum)
    maps = []
    for freq in _FREQUENCIES:
        for k in range(_ORIENTATIONS):
            theta = k * np.pi / _ORIENTATIONS
            u = fx * np.cos(theta) + fy * np.sin(theta)
            v = -fx * np.sin(theta) + fy * np.cos(theta)
            bw = freq * 0.5
            # One-sided Gaussian in frequency = complex (quadrature) Gabor; |response|² is the energy.
            gain = np.exp(-((u - freq) ** 2 + v**2) / (2 * bw**2))
            resp = np.fft.ifft2(spectrum * gain[None])
            energy = (resp.real**2 + resp.imag**2).astype(np.float32)
            pooled = energy.reshape(n, _GRID, h // _GRID, _GRID, w // _GRID).mean(axis=(2, 4))
            maps.append(pooled)
    return np.stack(maps, axis=1)


def _zscore(x: np.ndarray) -> np.ndarray:
    sd = x.std(axis=0, keepdims=True)
    return (x - x.mean(axis=0, keepdims=True)) / np.where(sd > 0, sd, 1.0)


def check_virtual_brain(n_train: int, n_test: int, image_size: int, n_early: int, n_semantic: int, n_repeats: int,
                        n_relational: int) -> None:
    """The argument checks of :func:`make_virtual_brain`, drawing nothing (``config validate`` runs them too):
    an image side that is a multiple of 24, sizes >= 1 and at most :data:`llmvem.data.sizes.MAX_GENERATED_IMAGES`
    images that fit the memory available.

    Raises
    ------
    DataValidationError
        Naming the option (source ``<in memory>``; :func:`llmvem.data.load_dataset` names the spec).
    """
    from llmvem.data.sizes import check_generated_size

    if image_size % _GRID != 0 or image_size < _GRID:
        raise DataValidationError(None, "image_size", f"got {image_size}, expected a multiple of {_GRID}")
    if n_relational < 0:
        raise DataValidationError(None, "n_relational", f"got {n_relational}, expected >= 0")
    if n_train < 2 or n_test < 2 or n_repeats < 1 or n_early + n_semantic + n_relational < 1:
        raise DataValidationError(None, "virtual brain size", "expected n_train, n_test >= 2, n_repeats >= 1, voxels >= 1")
    n_voxels = n_early + n_semantic + n_relational
    check_generated_size(n_train + n_test, image_size, None, "n_train + n_test",
                         values_per_image=(n_repeats + 3) * n_voxels)


def make_virtual_brain(
    n_train: int = 500,
    n_test: int = 100,
    image_size: int = 96,
    n_early: int = 300,
    n_semantic: int = 200,
    n_repeats: int = 3,
    noise_range: tuple[float, float] = (0.6, 2.5),
    seed: int = 0,
    n_relational: int = 0,
) -> EncodingDataset:
    """Generate the virtual brain (see the module docstring for the generative model).

    Parameters
    ----------
    n_train, n_test : int
        Images in the train and test splits.
    image_size : int
        Side of the square images in pixels (a multiple of 24).
    n_early, n_semantic : int
        Voxels of each population (half in each hemisphere).
    n_repeats : int
        Presentations of every image; responses are their mean.
    noise_range : (float, float)
        Range of the single-trial noise standard deviation (signal variance is 1).
    seed : int
        Everything (scenes, voxel tuning, noise) follows from it.
    n_relational : int
        Relational voxels (ROI ``relational``, the positive control of alignment; see the module docstring).
        0 (default) leaves the dataset exactly as without them.

    Returns
    -------
    EncodingDataset
        ``train``/``test`` splits with responses of shape (n_images, n_early + n_semantic) and repeats of shape
        (n_images, n_repeats, n_voxels); ROI masks ``early_visual``, ``semantic``, ``semantic_<category>``;
        hemisphere labels; the true noise ceiling; one exact description per image in ``captions``;
        ``meta["ground_truth"]`` with the noise-free signal, the voxel parameters and the scenes.
    """
    check_virtual_brain(n_train, n_test, image_size, n_early, n_semantic, n_repeats, n_relational)
    scene_seq, voxel_seq, noise_seq, render_seq = np.random.SeedSequence(seed).spawn(4)
    scene_rng, voxel_rng = np.random.default_rng(scene_seq), np.random.default_rng(voxel_seq)
    noise_rng, render_rng = np.random.default_rng(noise_seq), np.random.default_rng(render_seq)
    n = n_train + n_test
    scenes = [_random_scene(scene_rng) for _ in range(n)]
    images = np.stack([render_scene(s, image_size, render_rng) for s in scenes])

    # Early visual population.
    energy = _gabor_energy(images)  # (n, C, G, G)
    energy /= energy.mean()
    n_vox = n_early + n_semantic
    hemisphere = np.array(["lh"] * (n_vox // 2) + ["rh"] * (n_vox - n_vox // 2))
    voxel_rng.shuffle(hemisphere)
    hemi_e = hemisphere[:n_early]
    cx = np.where(hemi_e == "lh", voxel_rng.uniform(0.5, 0.95, n_early), voxel_rng.uniform(0.05, 0.5, n_early))
    cy = voxel_rng.uniform(0.05, 0.95, n_early)
    sigma = voxel_rng.uniform(0.06, 0.2, n_early)
    pref_ori = voxel_rng.integers(0, _ORIENTATIONS, n_early)
    pref_freq = voxel_rng.integers(0, len(_FREQUENCIES), n_early)
    grid = (np.arange(_GRID) + 0.5) / _GRID
    gx, gy = np.meshgrid(grid, grid)
    rf = np.exp(-((gx[None] - cx[:, None, None]) ** 2 + (gy[None] - cy[:, None, None]) ** 2) / (2 * sigma[:, None, None] ** 2))
    rf = rf.reshape(n_early, -1)
    rf /= rf.sum(axis=1, keepdims=True)
    oris = np.arange(_ORIENTATIONS) * np.pi / _ORIENTATIONS
    ori_w = np.exp(2.0 * np.cos(2 * (oris[None, :] - oris[pref_ori][:, None])))
    ori_w /= ori_w.sum(axis=1, keepdims=True)
    freq_w = np.where(np.arange(len(_FREQUENCIES))[None, :] == pref_freq[:, None], 0.75, 0.25)
    chan_w = (freq_w[:, :, None] * ori_w[:, None, :]).reshape(n_early, -1)  # (n_early, C) freq-major like energy
    flat = energy.reshape(n, energy.shape[1], -1)  # (n, C, G²)
    drive = np.einsum("ncp,vp,vc->nv", flat, rf, chan_w, optimize=True)
    early_signal = np.log1p(drive / np.median(drive, axis=0, keepdims=True))

    # Semantic population.
    content = np.stack([s.content_vector() for s in scenes])  # (n, 19)
    pref_cat = voxel_rng.integers(0, len(CATEGORIES), n_semantic)
    pref_col = voxel_rng.integers(0, len(COLOURS), n_semantic)
    w = voxel_rng.normal(0.0, 0.15, (n_semantic, content.shape[1]))
    w[np.arange(n_semantic), pref_cat] = 1.0
    w[np.arange(n_semantic), len(CATEGORIES) + pref_col] = 0.4
    semantic_signal = content @ w.T
    signals = [early_signal, semantic_signal]

    # Relational population (drawn last, from its own stream, so n_relational = 0 changes nothing above).
    relational = np.stack([s.relational_vector() for s in scenes])  # (n, 17)
    rel_w = np.zeros((0, relational.shape[1]))
    if n_relational > 0:
        rel_rng = np.random.default_rng(np.random.SeedSequence([seed, 17]))
        rel_w = rel_rng.normal(0.0, 0.15, (n_relational, relational.shape[1]))
        for v in range(n_relational):
            rel_w[v, rel_rng.choice(relational.shape[1], 2, replace=False)] = 1.0
        signals.append(relational @ rel_w.T)
        rel_hemi = np.array(["lh"] * (n_relational // 2) + ["rh"] * (n_relational - n_relational // 2))
        rel_rng.shuffle(rel_hemi)
        hemisphere = np.concatenate([hemisphere, rel_hemi])

    signal = _zscore(np.concatenate(signals, axis=1)).astype(np.float32)
    noise_sd = np.exp(noise_rng.uniform(np.log(noise_range[0]), np.log(noise_range[1]), n_vox)).astype(np.float32)
    repeats = signal[:, None, :n_vox] + noise_rng.standard_normal((n, n_repeats, n_vox)).astype(np.float32) * noise_sd
    if n_relational > 0:  # their noise from their own stream too
        rel_noise_sd = np.exp(rel_rng.uniform(np.log(noise_range[0]), np.log(noise_range[1]), n_relational)
                              ).astype(np.float32)
        rel_repeats = signal[:, None, n_vox:] + rel_rng.standard_normal((n, n_repeats, n_relational)
                                                                        ).astype(np.float32) * rel_noise_sd
        repeats = np.concatenate([repeats, rel_repeats], axis=2)
        noise_sd = np.concatenate([noise_sd, rel_noise_sd])
        n_vox += n_relational
    responses = repeats.mean(axis=1)
    true_nc = 1.0 / (1.0 + noise_sd.astype(np.float64) ** 2 / n_repeats)

    ids = [f"vb{seed:03d}_{i:05d}" for i in range(n)]
    all_images = ArrayImages(images, ids)
    tr, te = np.arange(n_train), np.arange(n_train, n)
    splits = {
        "train": Split(all_images.subset(tr), responses[tr], repeats[tr]),
        "test": Split(all_images.subset(te), responses[te], repeats[te]),
    }
    is_early = np.zeros(n_vox, dtype=bool)
    is_early[:n_early] = True
    is_semantic = np.zeros(n_vox, dtype=bool)
    is_semantic[n_early:n_early + n_semantic] = True
    rois: dict[str, np.ndarray] = {"early_visual": is_early, "semantic": is_semantic}
    if n_relational > 0:
        rois["relational"] = ~(is_early | is_semantic)
    preferred = np.full(n_vox, -1)
    preferred[n_early:n_early + n_semantic] = pref_cat
    for k, cat in enumerate(CATEGORIES):
        rois[f"semantic_{cat}"] = preferred == k
    ground_truth = {
        "signal": signal,
        "noise_sd": noise_sd,
        "preferred_category": preferred,
        "preferred_colour": np.concatenate([np.full(n_early, -1), pref_col, np.full(n_relational, -1)]),
        "relational_weights": rel_w,
        "relational": relational,
        "relational_names": RELATIONAL_NAMES,
        "rf_centre": np.stack([cx, cy], axis=1),
        "rf_sigma": sigma,
        "preferred_orientation_deg": oris[pref_ori] * 180 / np.pi,
        "preferred_frequency": np.asarray(_FREQUENCIES)[pref_freq],
        "semantic_weights": w,
        "content": content,
        "scenes": scenes,
        "categories": CATEGORIES,
        "colours": tuple(COLOURS),
    }
    return EncodingDataset(
        name=f"virtual_brain_seed{seed}",
        splits=splits,
        roi_masks=rois,
        hemisphere=hemisphere,
        noise_ceiling=true_nc,
        captions={ids[i]: [scenes[i].description()] for i in range(n)},
        source=f"virtual brain (seed={seed})",
        meta={"ground_truth": ground_truth,
              "attributes": {"names": ATTRIBUTE_NAMES,
                             "by_id": {ids[i]: scenes[i].attribute_vector() for i in range(n)}},
              "n_repeats": n_repeats, "image_size": image_size,
              "params": {"n_train": n_train, "n_test": n_test, "image_size": image_size, "n_early": n_early,
                         "n_semantic": n_semantic, "n_relational": n_relational, "n_repeats": n_repeats, "noise_range": list(noise_range),
                         "seed": seed}},
    )
