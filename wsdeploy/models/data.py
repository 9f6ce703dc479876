"""Deterministic synthetic datasets for small audio and image classifiers.

Every example is generated from a seeded ``np.random.default_rng``, so the same call always
returns bit-identical arrays and no data ever has to be downloaded.

Audio classes (mono waveforms, frequencies within about 150..5000 Hz):

* ``tone``: one steady sine.
* ``chirp_up`` / ``chirp_down``: a train of fast frequency sweeps (20..60 ms each, ratio 2.5..4),
  rising or falling, so the sweep direction is visible within any short window.
* ``band_noise``: noise band-passed to an octave or two around a random centre frequency.
* ``click_train``: short broadband clicks repeating every 4..20 ms.
* ``am_tone``: a sine whose amplitude is modulated deeply at 20..60 Hz.
* ``harmonic``: a low fundamental (150..450 Hz) with 4..8 integer harmonics.
* ``vibrato``: a sine whose frequency wobbles by 10..25 % at 12..30 Hz.
* ``two_tone``: two equal sines at a non-harmonic ratio of 1.4..1.9.
* ``impulse_decay``: one struck resonance, a sharp attack followed by an exponential decay.

Each audio example also gets a random onset, phase, frequency parameters, white noise at a random
SNR of 10..30 dB, and is finally scaled so that its peak equals a random gain in 0.2..1.0.

Image classes (three channels, shapes in a random position, size and colour on a random
background colour, plus pixel noise): ``disk``, ``square``, ``triangle``, ``ring``, ``cross``,
``blob`` (a soft Gaussian ellipse), and the full-image textures ``hstripes``, ``vstripes``,
``dstripes`` (about 45 or 135 degrees) and ``checker``. Pixel values are built in ``[0, 1]`` and
then standardised with the fixed constants ``IMAGE_MEAN`` and ``IMAGE_STD``.

Labels cycle through the classes, so every class appears ``n // len(classes)`` or one more
times, and are then shuffled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "AUDIO_CLASSES",
    "IMAGE_CLASSES",
    "IMAGE_MEAN",
    "IMAGE_STD",
    "SPLITS",
    "Dataset",
    "make_audio",
    "make_dataset",
    "make_images",
]

AUDIO_CLASSES: tuple[str, ...] = (
    "tone",
    "chirp_up",
    "chirp_down",
    "band_noise",
    "click_train",
    "am_tone",
    "harmonic",
    "vibrato",
    "two_tone",
    "impulse_decay",
)

IMAGE_CLASSES: tuple[str, ...] = (
    "disk",
    "square",
    "triangle",
    "hstripes",
    "vstripes",
    "dstripes",
    "checker",
    "cross",
    "ring",
    "blob",
)

IMAGE_MEAN: float = 0.5
"""Subtracted from every pixel; the expected pixel value of the ``[0, 1]`` images."""

IMAGE_STD: float = 0.28
"""Divides every pixel after ``IMAGE_MEAN`` is subtracted; close to the pixel spread."""

SPLITS: tuple[str, ...] = ("train", "test", "calib")
"""Split names accepted by `make_dataset`; a split's index there selects its derived seed."""

_KINDS: tuple[str, ...] = ("audio", "image")

_MIN_LENGTH = 512
_MIN_SAMPLE_RATE = 11025
_MIN_SIZE = 8
_MAX_HZ = 5000.0

_AudioGen = Callable[[np.random.Generator, np.ndarray, float], np.ndarray]
_ImageGen = Callable[[np.random.Generator, np.ndarray, np.ndarray, float], np.ndarray]


@dataclass(frozen=True)
class Dataset:
    """A labelled batch of examples.

    Attributes:
        x: float32 inputs, ``(n, 1, length)`` for audio and ``(n, 3, size, size)`` for images.
        y: int64 class indices into ``classes``, shape ``(n,)``.
        classes: Class names; ``classes[y[i]]`` names example ``i``.
    """

    x: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.y.shape[0])


def _balanced_labels(rng: np.random.Generator, n: int, n_classes: int) -> np.ndarray:
    """Cycle through the classes, then shuffle."""
    return rng.permutation(np.arange(n, dtype=np.int64) % n_classes)


def _check_count(n: int) -> None:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")


# --------------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------------


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _sin_cycles(cycles: np.ndarray | float) -> np.ndarray:
    """``sin(2π·cycles)`` as float32, wrapped to one cycle in float64 first.

    The float32 ``sin`` is many times faster than the float64 one; the error stays near 3e-7.
    """
    frac = np.asarray(cycles, dtype=np.float64)
    frac = frac - np.rint(frac)
    return np.sin((2 * np.pi * frac).astype(np.float32))


def _gate(rng: np.random.Generator, length: int, sr: float) -> np.ndarray:
    """Random onset and offset with short linear ramps; active over 50..100 % of the window."""
    start = rng.uniform(0.0, 0.2) * length
    stop = start + rng.uniform(0.6, 1.0) * (length - start)
    ramp = max(1.0, min(0.005 * sr, 0.05 * length))
    idx = np.arange(length, dtype=np.float32)
    return np.clip((idx - start) / ramp, 0.0, 1.0) * np.clip((stop - idx) / ramp, 0.0, 1.0)


def _tone(rng: np.random.Generator, t: np.ndarray, sr: float) -> np.ndarray:
    f = _log_uniform(rng, 250.0, 4000.0)
    return _sin_cycles(f * t + rng.random())


def _chirp(rng: np.random.Generator, t: np.ndarray, sr: float, *, up: bool) -> np.ndarray:
    dur = t.shape[0] / sr
    f_lo = _log_uniform(rng, 250.0, 1200.0)
    f_hi = f_lo * rng.uniform(2.5, 4.0)
    period = min(rng.uniform(0.02, 0.06), dur / 2.5)
    shifted = t - rng.uniform(0, period)
    tau = shifted - period * np.floor(shifted / period)
    f0, f1 = (f_lo, f_hi) if up else (f_hi, f_lo)
    ramp = min(0.0015, 0.1 * period)
    taper = np.minimum(1.0, np.minimum(tau, period - tau) / ramp)
    return taper * _sin_cycles(f0 * tau + 0.5 * (f1 - f0) / period * tau**2)


def _chirp_up(rng: np.random.Generator, t: np.ndarray, sr: float) -> np.ndarray:
    return _chirp(rng, t, sr, up=True)


def _chirp_down(rng: np.random.Generator, t: np.ndarray, sr: float) -> np.ndarray:
    return _chirp(rng, t, sr, up=False)


def _band_noise(rng: np.random.Generator, t: np.ndarray, sr: float) -> np.ndarray:
    centre = _log_uniform(rng, 700.0, 2500.0)
    half_octaves = rng.uniform(0.5, 1.0)
    lo, hi = centre * 2.0**-half_octaves, min(centre * 2.0**half_octaves, _MAX_HZ)
    # White Gaussian noise has independent complex Gaussian rfft bins, so draw only the band.
    freqs = np.fft.rfftfreq(t.shape[0], d=1.0 / sr)
    band = (freqs >= lo) & (freqs <= hi)
    m = int(np.count_nonzero(band))
    spec = np.zeros(freqs.shape[0], dtype=np.complex128)
    spec[band] = rng.standard_normal(m) + 1j * rng.standard_normal(m)
    return np.fft.irfft(spec, n=t.shape[0])


def _click_train(rng: np.random.Generator, t: np.ndarray, sr: float) -> np.ndarray:
    length = t.shape[0]
    dur = length / sr
    period = rng.uniform(0.004, max(0.005, min(0.02, dur / 4)))
    times = np.arange(rng.uniform(0, period), dur, period)
    times = times + rng.uniform(-0.05, 0.05, size=times.shape) * period
    pos = np.clip(np.round(times * sr).astype(np.int64), 0, length - 1)
    train = np.zeros(length)
    np.add.at(train, pos, rng.choice([-1.0, 1.0]) * rng.uniform(0.7, 1.0, size=pos.shape))
    k = np.arange(max(4, int(0.0015 * sr)))
    kernel = np.exp(-k / (rng.uniform(0.0002, 0.0005) * sr)) * rng.standard_normal(k.shape[0])
    kernel[0] = abs(kernel[0]) + 1.0
    return np.convolve(train, kernel)[:length]


def _am_tone(rng: np.random.Generator, t: np.ndarray, sr: float) -> np.ndarray:
    dur = t.shape[0] / sr
    fc = _log_uniform(rng, 500.0, 4000.0)
    fm = rng.uniform(min(max(20.0, 2.5 / dur), 50.0), 60.0)
    depth = rng.uniform(0.8, 1.0)
    env = 1.0 - depth * 0.5 * (1.0 - _sin_cycles(fm * t + rng.random()))
    return env * _sin_cycles(fc * t + rng.random())


def _harmonic(rng: np.random.Generator, t: np.ndarray, sr: float) -> np.ndarray:
    f0 = _log_uniform(rng, 150.0, 450.0)
    n_harm = int(rng.integers(4, 9))
    k = np.arange(1, n_harm + 1, dtype=np.float64)
    k = k[k * f0 <= _MAX_HZ]
    amps = k ** -rng.uniform(0.5, 1.2)
    phases = rng.random(k.shape[0])
    base = f0 * t
    out = np.zeros(t.shape[0], dtype=np.float32)
    for kk, amp, phase in zip(k, amps, phases, strict=True):
        out += np.float32(amp) * _sin_cycles(kk * base + phase)
    return out


def _vibrato(rng: np.random.Generator, t: np.ndarray, sr: float) -> np.ndarray:
    dur = t.shape[0] / sr
    fc = _log_uniform(rng, 500.0, 3000.0)
    rate = rng.uniform(min(max(12.0, 2.5 / dur), 25.0), 30.0)
    # Peak deviation of 10..25 % of fc; the phase excursion in cycles is deviation / (2π·rate).
    excursion = rng.uniform(0.1, 0.25) * fc / (2 * np.pi * rate)
    wobble = excursion * _sin_cycles(rate * t + rng.random())
    return _sin_cycles(fc * t + wobble + rng.random())


def _two_tone(rng: np.random.Generator, t: np.ndarray, sr: float) -> np.ndarray:
    f1 = _log_uniform(rng, 400.0, 1500.0)
    f2 = f1 * rng.uniform(1.4, 1.9)
    a2 = rng.uniform(0.7, 1.0)
    return _sin_cycles(f1 * t + rng.random()) + a2 * _sin_cycles(f2 * t + rng.random())


def _impulse_decay(rng: np.random.Generator, t: np.ndarray, sr: float) -> np.ndarray:
    dur = t.shape[0] / sr
    onset = rng.uniform(0.0, 0.5) * dur
    f = _log_uniform(rng, 500.0, 4000.0)
    tau = max(0.003, rng.uniform(0.05, 0.2) * min(dur, 1.0))
    rel = np.maximum(t - onset, 0.0)
    body = np.exp(-rel / tau) * _sin_cycles(f * rel + rng.random())
    # A quieter, faster-decaying inharmonic overtone, as in a struck bar, when below the cap.
    overtone_amp = rng.uniform(0.2, 0.5) if 2.76 * f <= _MAX_HZ else 0.0
    body += overtone_amp * np.exp(-rel / (0.5 * tau)) * _sin_cycles(2.76 * f * rel)
    return np.where(t >= onset, body, 0.0)


_AUDIO_GENERATORS: dict[str, _AudioGen] = {
    "tone": _tone,
    "chirp_up": _chirp_up,
    "chirp_down": _chirp_down,
    "band_noise": _band_noise,
    "click_train": _click_train,
    "am_tone": _am_tone,
    "harmonic": _harmonic,
    "vibrato": _vibrato,
    "two_tone": _two_tone,
    "impulse_decay": _impulse_decay,
}
_UNGATED_AUDIO: frozenset[str] = frozenset({"impulse_decay"})


def _audio_example(
    rng: np.random.Generator, name: str, t: np.ndarray, sr: float, out: np.ndarray
) -> None:
    """Write one waveform of class ``name`` into the float32 row ``out``.

    The clean signal is gated, mixed with white noise at a random SNR, then scaled to a random
    peak.
    """
    clean = _AUDIO_GENERATORS[name](rng, t, sr).astype(np.float32, copy=False)
    if name not in _UNGATED_AUDIO:
        clean = clean * _gate(rng, t.shape[0], sr)
    power = float(np.dot(clean, clean)) / t.shape[0] + 1e-12
    snr_db = rng.uniform(10.0, 30.0)
    rng.standard_normal(t.shape[0], dtype=np.float32, out=out)
    out *= np.float32(np.sqrt(power / 10.0 ** (snr_db / 10.0)))
    out += clean
    gain = rng.uniform(0.2, 1.0)
    out *= np.float32(gain / (float(np.max(np.abs(out))) + 1e-12))


def make_audio(n: int, *, length: int, sample_rate: int = 22050, seed: int) -> Dataset:
    """Generate ``n`` labelled mono waveforms.

    Args:
        n: Number of examples.
        length: Samples per example, at least 512; about 2048..66150 is the intended range.
        sample_rate: Hz, at least 11025 so that the 5 kHz top frequency is not aliased.
        seed: Seed of the generator that draws labels and all example parameters.

    Returns:
        ``x`` of shape ``(n, 1, length)`` with every peak in ``[0.2, 1.0]``, labels over
        `AUDIO_CLASSES`.

    Raises:
        ValueError: If ``n``, ``length`` or ``sample_rate`` is out of range.
    """
    _check_count(n)
    if length < _MIN_LENGTH:
        raise ValueError(f"length must be >= {_MIN_LENGTH}, got {length}")
    if sample_rate < _MIN_SAMPLE_RATE:
        raise ValueError(f"sample_rate must be >= {_MIN_SAMPLE_RATE}, got {sample_rate}")
    rng = np.random.default_rng(seed)
    y = _balanced_labels(rng, n, len(AUDIO_CLASSES))
    sr = float(sample_rate)
    t = np.arange(length, dtype=np.float64) / sr
    x = np.empty((n, 1, length), dtype=np.float32)
    for i, label in enumerate(y):
        _audio_example(rng, AUDIO_CLASSES[label], t, sr, x[i, 0])
    return Dataset(x=x, y=y, classes=AUDIO_CLASSES)


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------
# Generators get pixel-centre coordinates ``(u, v)`` in ``[-1, 1]`` (``u`` to the right, ``v``
# downwards) and the width of one pixel in those units, and return a foreground mask in [0, 1].


def _edge(dist: np.ndarray, px: float) -> np.ndarray:
    """Anti-aliased mask from a signed distance (positive inside)."""
    return np.clip(dist / px + 0.5, 0.0, 1.0)


def _place(
    rng: np.random.Generator, u: np.ndarray, v: np.ndarray, max_angle: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """Random centre, radius and rotation; returns shape-local coordinates and the radius."""
    radius = rng.uniform(0.35, 0.65)
    margin = 1.0 - radius
    cu, cv = rng.uniform(-margin, margin, size=2) * 0.8
    angle = rng.uniform(-max_angle, max_angle)
    c, s = np.cos(angle), np.sin(angle)
    du, dv = u - cu, v - cv
    return c * du + s * dv, -s * du + c * dv, radius


def _disk(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, px: float) -> np.ndarray:
    lu, lv, r = _place(rng, u, v, 0.0)
    return _edge(r - np.hypot(lu, lv), px)


def _square(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, px: float) -> np.ndarray:
    lu, lv, r = _place(rng, u, v, np.pi / 9)
    return _edge(0.8 * r - np.maximum(np.abs(lu), np.abs(lv)), px)


def _triangle(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, px: float) -> np.ndarray:
    lu, lv, r = _place(rng, u, v, np.pi)
    normals = np.pi / 2 + np.arange(3) * (2 * np.pi / 3)
    dist = np.min([0.6 * r - (np.cos(a) * lu + np.sin(a) * lv) for a in normals], axis=0)
    return _edge(dist, px)


def _ring(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, px: float) -> np.ndarray:
    lu, lv, r = _place(rng, u, v, 0.0)
    half_width = rng.uniform(0.12, 0.22) * r
    return _edge(half_width - np.abs(np.hypot(lu, lv) - (r - half_width)), px)


def _cross(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, px: float) -> np.ndarray:
    lu, lv, r = _place(rng, u, v, np.pi / 12)
    w = rng.uniform(0.2, 0.3) * r
    au, av = np.abs(lu), np.abs(lv)
    dist = np.maximum(np.minimum(r - au, w - av), np.minimum(w - au, r - av))
    return _edge(dist, px)


def _blob(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, px: float) -> np.ndarray:
    lu, lv, r = _place(rng, u, v, np.pi)
    sigma = 0.6 * r
    aspect = rng.uniform(0.6, 1.0)
    return np.exp(-0.5 * ((lu / sigma) ** 2 + (lv / (aspect * sigma)) ** 2))


def _grating(
    rng: np.random.Generator, u: np.ndarray, v: np.ndarray, px: float, angle: float
) -> np.ndarray:
    """Square-wave stripes whose bars run at ``angle`` radians from horizontal."""
    period = rng.uniform(0.25, 0.6)
    coord = -np.sin(angle) * u + np.cos(angle) * v
    wave = np.sin(2 * np.pi * coord / period + rng.uniform(0, 2 * np.pi))
    return _edge(wave * period / (2 * np.pi), px)


def _jitter(rng: np.random.Generator) -> float:
    return rng.uniform(-np.pi / 18, np.pi / 18)


def _hstripes(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, px: float) -> np.ndarray:
    return _grating(rng, u, v, px, _jitter(rng))


def _vstripes(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, px: float) -> np.ndarray:
    return _grating(rng, u, v, px, np.pi / 2 + _jitter(rng))


def _dstripes(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, px: float) -> np.ndarray:
    base = np.pi / 4 if rng.random() < 0.5 else 3 * np.pi / 4
    return _grating(rng, u, v, px, base + _jitter(rng))


def _checker(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, px: float) -> np.ndarray:
    period = rng.uniform(0.35, 0.8)
    angle = _jitter(rng)
    c, s = np.cos(angle), np.sin(angle)
    ou, ov = rng.uniform(0, 2 * np.pi, size=2)
    wave = np.sin(2 * np.pi * (c * u + s * v) / period + ou) * np.sin(
        2 * np.pi * (-s * u + c * v) / period + ov
    )
    return _edge(wave * period / (2 * np.pi), px)


_IMAGE_GENERATORS: dict[str, _ImageGen] = {
    "disk": _disk,
    "square": _square,
    "triangle": _triangle,
    "hstripes": _hstripes,
    "vstripes": _vstripes,
    "dstripes": _dstripes,
    "checker": _checker,
    "cross": _cross,
    "ring": _ring,
    "blob": _blob,
}


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Background and foreground RGB in [0, 1], at least 0.5 apart."""
    bg = rng.random(3)
    fg = rng.random(3)
    if np.linalg.norm(fg - bg) < 0.5:
        fg = 1.0 - bg
        if np.linalg.norm(fg - bg) < 0.5:
            fg = np.where(bg < 0.5, 1.0, 0.0)
    return bg, fg


def make_images(n: int, *, size: int = 32, seed: int) -> Dataset:
    """Generate ``n`` labelled square RGB images.

    Args:
        n: Number of examples.
        size: Height and width in pixels, at least 8.
        seed: Seed of the generator that draws labels and all example parameters.

    Returns:
        ``x`` of shape ``(n, 3, size, size)``: ``([0, 1] image - IMAGE_MEAN) / IMAGE_STD``,
        labels over `IMAGE_CLASSES`.

    Raises:
        ValueError: If ``n`` or ``size`` is out of range.
    """
    _check_count(n)
    if size < _MIN_SIZE:
        raise ValueError(f"size must be >= {_MIN_SIZE}, got {size}")
    rng = np.random.default_rng(seed)
    y = _balanced_labels(rng, n, len(IMAGE_CLASSES))
    coords = (np.arange(size, dtype=np.float64) + 0.5) * (2.0 / size) - 1.0
    u, v = np.meshgrid(coords, coords, indexing="xy")
    px = 2.0 / size
    x = np.empty((n, 3, size, size), dtype=np.float32)
    for i, label in enumerate(y):
        mask = _IMAGE_GENERATORS[IMAGE_CLASSES[label]](rng, u, v, px)
        bg, fg = _colours(rng)
        img = bg[:, None, None] + (fg - bg)[:, None, None] * mask[None]
        img = img + rng.standard_normal(img.shape) * rng.uniform(0.02, 0.08)
        x[i] = (np.clip(img, 0.0, 1.0) - IMAGE_MEAN) / IMAGE_STD
    return Dataset(x=x, y=y, classes=IMAGE_CLASSES)


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def _split_seed(seed: int, kind: str, split: str) -> int:
    """Seed of one (kind, split) stream; distinct splits get unrelated streams."""
    state = np.random.SeedSequence([seed, _KINDS.index(kind), SPLITS.index(split)])
    return int(state.generate_state(1, dtype=np.uint64)[0])


def make_dataset(kind: str, split: str, n: int, *, seed: int = 0, **shape: int) -> Dataset:
    """Generate one split of the audio or image dataset.

    Args:
        kind: ``"audio"`` or ``"image"``.
        split: One of `SPLITS`; each split draws from its own seed derived from ``seed``.
        n: Number of examples.
        seed: Base seed shared by all splits of one dataset.
        **shape: Passed on: ``length`` (required) and ``sample_rate`` for audio, ``size`` for
            images.

    Returns:
        The dataset from `make_audio` or `make_images`.

    Raises:
        ValueError: If ``kind`` or ``split`` is unknown, or a shape argument is out of range.
        TypeError: If ``shape`` holds a name the generator does not take, or lacks ``length``
            for audio.
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {', '.join(_KINDS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    derived = _split_seed(seed, kind, split)
    if kind == "audio":
        return make_audio(n, seed=derived, **shape)
    return make_images(n, seed=derived, **shape)
