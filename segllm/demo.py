"""``segllm demo``: a Gradio web app on the same :class:`segllm.session.Session` as the CLI.

Every browser session has its own conversation (kept server-side under Gradio's session id),
so one user's rounds never appear in another's. Errors show as a message in the page and the
conversation goes on. Images whose longest side exceeds ``max_side`` pixels are refused, and
uploads over ``max_upload_mb``. Conversations are dropped with everything they hold (session,
files) when their tab closes, when idle ``idle_timeout`` seconds or beyond ``max_sessions``.
"""

import ctypes
import ctypes.util
import gc
import html
import io
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
import zipfile
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image, ImageDraw

from segllm.config import MAX_NEW_TOKENS
from segllm.conversation import load_image
from segllm.default import EXAMPLES, load_model
from segllm.errors import MaskError, SegLLMError
from segllm.session import Session
from segllm.viz import colour, mask_labels

log = logging.getLogger(__name__)

MAX_SIDE = 4096  # pixels; larger uploads are refused (memory and latency on a CPU server)
# Live conversations at once; beyond it the least recently used one is dropped. Each holds its
# image, masks, LLM key/value cache and decoder features: ~2 MB for a 128 px image, up to
# ~100 MB for a 4096 px one with a few rounds, so 32 bounds the worst case to a few GB.
MAX_SESSIONS = 32
IDLE_TIMEOUT = 15 * 60  # seconds without a request after which a conversation and its files are dropped
# Uploads over this are refused by the server while they stream in, before they are stored or
# decoded. 20 MB holds any JPEG/WebP and most PNGs up to MAX_SIDE (a phone photo is 2-6 MB); a
# bigger file costs bandwidth and disk for an image the model reads at a few hundred pixels.
MAX_UPLOAD_MB = 20
_EXPIRED_REMEMBERED = 4096  # dropped session ids kept to explain "your session expired"


DISPLAY_SIDE = 512  # small images are shown enlarged to about this many pixels
PAINT_SIDE = 1024  # larger images are painted on a copy shrunk to this many pixels (longest side)
RECLAIM_SETTLE = 0.5  # seconds after a conversation is dropped before its memory is reclaimed (a burst reclaims once)


def reclaim_memory() -> bool:
    """Free what the dropped conversations held and give it back to the system: a full garbage
    collection (objects in reference cycles: Gradio's per-request objects), then glibc's
    ``malloc_trim(0)``, which returns the free pages of every malloc arena (the handler threads'
    arenas otherwise keep them, and the server's resident memory only grows). Returns whether
    the trim ran (False off glibc)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


_LIBC: list = []  # [malloc_trim or None], looked up once


def _malloc_trim():
    if not _LIBC:
        fn = None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            fn = getattr(libc, "malloc_trim", None)
            if fn is not None:
                fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
        except OSError:
            fn = None
        _LIBC.append(fn)
    return _LIBC[0]


@dataclass
class _Entry:
    session: Session
    folder: Path  # this conversation's files (overlay, zip), under Gradio's cache so it serves them uncopied
    last_used: float
    busy: int = 0  # handlers running on it: never dropped under them
    files: list[Path] = field(default_factory=list)  # what the page currently shows
    scale: int = 1  # the overlay shown is the image enlarged this many times (small images)
    show: int | None = None  # the round shown alone; None: every round (the combined overlay)
    corner: tuple[int, int] | None = None  # a box's first corner (image pixels) until the second click


class SessionStore:
    """Per-browser-session conversations, bounded in number and in idle time.

    A conversation is dropped when it has been idle ``idle_timeout`` seconds, when more than
    ``capacity`` are live (least recently used first), or when its browser tab closes; dropping
    it deletes its files and lets go of the :class:`Session` (image, masks, caches), so nothing
    it held stays alive. ``sweep`` runs the idle check; :meth:`start_sweeper` runs it every
    ``interval`` seconds in a daemon thread so idle memory is given back without traffic, and
    soon after any conversation is dropped it also gives the freed memory back to the system
    (:func:`reclaim_memory`; ``reclaims`` counts how often).
    """

    def __init__(self, model, capacity: int = MAX_SESSIONS, *, idle_timeout: float = IDLE_TIMEOUT,
                 folder: Path | None = None, clock=time.monotonic, **session_kwargs) -> None:
        if capacity < 1 or idle_timeout <= 0:
            raise ValueError(f"capacity must be >= 1 and idle_timeout > 0, got {capacity} and {idle_timeout}")
        self.model = model
        self.capacity = capacity
        self.idle_timeout = idle_timeout
        self.kwargs = session_kwargs
        self.folder = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="segllm-demo-"))
        self.folder.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self._items: OrderedDict[str, _Entry] = OrderedDict()
        self._expired: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._released = threading.Event()  # a conversation was dropped since the last reclaim
        self.reclaims = 0

    @contextmanager
    def use(self, key: str):
        """The entry of ``key`` (created if new), held busy while the block runs."""
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                folder = self.folder / uuid.uuid4().hex
                folder.mkdir()
                entry = self._items[key] = _Entry(Session(self.model, **self.kwargs), folder, self.clock())
            self._items.move_to_end(key)
            entry.last_used = self.clock()
            entry.busy += 1
            self._evict_locked()
        try:
            yield entry
        finally:
            with self._lock:
                entry.busy -= 1
                entry.last_used = self.clock()

    def get(self, key: str) -> Session:
        with self.use(key) as entry:
            return entry.session

    def expired(self, key: str) -> bool:
        """Whether ``key``'s conversation was dropped (idle, over the cap); to say so to its user."""
        with self._lock:
            return key in self._expired

    def drop(self, key: str) -> None:
        """Forget ``key``'s conversation now (its tab closed); one mid-request is left to the idle timeout."""
        with self._lock:
            entry = self._items.get(key)
            if entry is not None and not entry.busy:
                self._release_locked(key, remember=False)

    def sweep(self) -> int:
        """Drop every conversation idle for ``idle_timeout`` seconds; returns how many."""
        now = self.clock()
        with self._lock:
            stale = [k for k, e in self._items.items() if not e.busy and now - e.last_used >= self.idle_timeout]
            for k in stale:
                self._release_locked(k)
        return len(stale)

    def start_sweeper(self, interval: float | None = None, also=None) -> threading.Thread:
        """Sweep every ``interval`` seconds (default: a tenth of the idle timeout, 5 s to 60 s)
        and ``RECLAIM_SETTLE`` seconds after a conversation is dropped, calling ``also()`` and
        then :func:`reclaim_memory` after each sweep."""
        every = interval if interval is not None else min(60.0, max(5.0, self.idle_timeout / 10))

        def loop():
            # wakes every `every` seconds, and soon after a conversation is dropped (a closed tab,
            # the cap): then what it held is given back to the system, not kept by the allocator
            while True:
                dropped = self._released.wait(every)
                if dropped:
                    self._stop.wait(RECLAIM_SETTLE)  # the other tabs of a burst close meanwhile
                if self._stop.is_set():
                    return
                try:
                    self.sweep()
                    self._released.clear()  # what the sweep dropped is reclaimed now, once
                    if also is not None:
                        also()
                    reclaim_memory()
                    self.reclaims += 1
                except Exception:  # the sweeper must outlive any one failure; the next sweep retries
                    log.exception("demo session sweep failed")

        t = threading.Thread(target=loop, name="segllm-demo-sweeper", daemon=True)
        t.start()
        return t

    def close(self) -> None:
        """Stop the sweeper, drop every conversation and delete the store's folder."""
        self._stop.set()
        self._released.set()  # wakes the sweeper to see the stop
        with self._lock:
            for k in list(self._items):
                self._release_locked(k, remember=False)
        shutil.rmtree(self.folder, ignore_errors=True)

    def _evict_locked(self) -> None:
        now = self.clock()
        for k in [k for k, e in self._items.items() if not e.busy and now - e.last_used >= self.idle_timeout]:
            self._release_locked(k)
        idle_first = (k for k, e in list(self._items.items()) if not e.busy)
        while len(self._items) > self.capacity:
            k = next(idle_first, None)
            if k is None:
                break  # every live one is mid-request: over the cap until one ends
            self._release_locked(k)

    def _release_locked(self, key: str, remember: bool = True) -> None:
        entry = self._items.pop(key)
        shutil.rmtree(entry.folder, ignore_errors=True)
        entry.files.clear()
        entry.session = None  # the store held the only reference: image, masks and caches go now
        self._released.set()
        if remember:
            self._expired[key] = None
            while len(self._expired) > _EXPIRED_REMEMBERED:
                self._expired.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def example_images() -> dict[str, Path]:
    return {p.stem: p for p in sorted(EXAMPLES.glob("*.png"))}


def display_scale(size: tuple[int, int], target: int = DISPLAY_SIDE) -> int:
    """The whole factor (>= 1) that brings an image's longest side closest to ``target`` pixels
    from below: a 128 px image is shown at 512, a 1,000 px one as it is."""
    return max(1, target // max(size))


SHOW_ALL = "all"  # the view selector's value for the combined overlay of every round
TOOL_POINT, TOOL_BOX = "point", "box"  # what a click on the image marks


def show_choices(rounds: int) -> list[tuple[str, str]]:
    """The view selector's (label, value) choices for a conversation of ``rounds`` rounds."""
    return [("All rounds", SHOW_ALL)] + [(f"Round {k}", str(k)) for k in range(1, rounds + 1)]


def parse_show(value, rounds: int) -> int | None:
    """The round the view selector's ``value`` shows alone, or None for every round (also for a
    round that no longer exists: a page that was behind an undo)."""
    if value in (None, "", SHOW_ALL):
        return None
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise SegLLMError(f"cannot show {value!r}: pick 'all' or a round number") from None
    return k if 1 <= k <= rounds else None


def box_from_corners(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int, int, int]:
    """The box (x0, y0, x1, y1), x1/y1 exclusive, whose opposite corner pixels are ``a`` and ``b``
    (image pixels, in either order): both clicked pixels are inside it."""
    (ax, ay), (bx, by) = a, b
    return min(ax, bx), min(ay, by), max(ax, bx) + 1, max(ay, by) + 1


def paint_canvas(image: np.ndarray, scale: int = 1, max_side: int = PAINT_SIDE) -> np.ndarray:
    """The image as the paint editor shows it ([h, w, 3] uint8): enlarged ``scale`` times with
    crisp pixels as the overlay is, or, when its longest side exceeds ``max_side`` pixels, shrunk
    to that (the editor's copy is encoded and sent on every new image: 16 s for a 4096 px WebP
    on this server, 0.3 s for a 1024 px PNG)."""
    if scale > 1:
        return image.repeat(scale, axis=0).repeat(scale, axis=1)
    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return image
    f = max_side / max(h, w)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


def painted_mask(layers, shape: tuple[int, int]) -> np.ndarray:
    """The region a user painted in the image editor, as an [H, W] bool mask of an image of
    ``shape`` (H, W): every image pixel that a stroke touches.

    Args:
        layers: the editor's layers, each [h, w, 4] RGBA on the canvas of :func:`paint_canvas`
            (the image enlarged by a whole factor, as it is, or shrunk); painted pixels have
            alpha > 0.

    Raises:
        MaskError: a layer that is not the image's canvas, or nothing painted.
    """
    h, w = shape
    painted = np.zeros((h, w), bool)
    for layer in layers or []:
        a = np.asarray(layer)
        ch, cw = a.shape[:2]
        if a.ndim != 3 or a.shape[2] != 4 or abs(ch / h - cw / w) > 0.02 * max(ch / h, cw / w) + 1 / min(h, w):
            raise MaskError(f"the painted layer is {'x'.join(map(str, a.shape[1::-1]))}, "
                            f"not a canvas of the {w}x{h} image; pick the image again")
        ink = a[..., 3] > 0
        k = ch // h
        if k >= 1 and (ch, cw) == (k * h, k * w):
            # an enlarged canvas: an image pixel is painted when any of its k x k canvas pixels is
            painted |= ink.reshape(h, k, w, k).any(axis=(1, 3))
        else:  # a shrunk canvas: each canvas pixel stands for the image pixels under it
            painted |= np.asarray(Image.fromarray(ink).resize((w, h), Image.Resampling.NEAREST))
    if not painted.any():
        raise MaskError("nothing is painted: paint the region on the image first")
    return painted


def display_image(session: Session, *, show: int | None = None, scale: int = 1,
                  corner: tuple[int, int] | None = None) -> Image.Image:
    """What the page shows: the overlay of every round (or of round ``show`` alone), enlarged
    ``scale`` times with crisp pixels, with a pending box corner (image pixels) marked."""
    shown = session.overlay(None if show is None else [show])
    if scale > 1:
        shown = shown.resize((shown.width * scale, shown.height * scale), Image.Resampling.NEAREST)
    if corner is not None:
        # a cross in black and white, visible on any colour, centred on the clicked pixel
        cx, cy = (int((v + 0.5) * scale) for v in corner)
        arm = max(4, 2 * scale)
        draw = ImageDraw.Draw(shown)
        for width, fill in ((3, (0, 0, 0)), (1, (255, 255, 255))):
            draw.line((cx - arm, cy, cx + arm, cy), fill=fill, width=width)
            draw.line((cx, cy - arm, cx, cy + arm), fill=fill, width=width)
    return shown


def answer_html(text: str, colour_hex: str) -> str:
    """An answer as the page shows it: each ``<seg>`` a small chip in its round's colour (the mask
    it stands for), the rest as text."""
    chip = (f'<span class="segllm-mask" title="mask" style="display:inline-block;width:.9em;height:.9em;border-radius:.2em;'
            f'background:{colour_hex};vertical-align:middle"></span>')
    parts = [html.escape(part) for part in text.split("<seg>")]
    return "<q>" + chip.join(parts) + "</q>"


def scores_note(reply) -> str:
    """A round's mask scores as the legend shows them: "(score 0.91)" for one mask, "(2.1 score
    0.91, 2.2 score 0.85)" for several, labelled as the overlay labels them (the answer's order)."""
    scores = [float(s) for s in reply.scores]
    if len(scores) <= 1:
        return f"(score {scores[0] if scores else 0:.2f})"
    labels = mask_labels(reply.round, len(scores))
    return "(" + ", ".join(f"{lab} score {s:.2f}" for lab, s in zip(labels, scores)) + ")"


def legend_html(session: Session, shown: int | None = None) -> str:
    """One list item per round: its colour, number, question and answer. Round ``shown`` (shown
    alone) is marked ``data-shown="true"`` and the others dimmed; clicking an item (the page's
    script, :data:`LEGEND_JS`) shows that round alone, clicking the shown one every round."""
    if not session.history:
        return '<div id="segllm-legend"><em>No rounds yet.</em></div>'
    items = []
    for r in session.history:
        c = "#{:02x}{:02x}{:02x}".format(*colour(r.round))
        refs = f" (refers to {', '.join(map(str, r.refs))})" if r.refs else ""
        refs += " (your region)" if r.user else ""
        state = ""
        if shown is not None:
            state = ' data-shown="true"' if r.round == shown else ' data-shown="false"'
        hint = "show every round" if r.round == shown else f"show round {r.round} alone"
        items.append(
            f'<li class="segllm-round" data-round="{r.round}"{state} role="button" tabindex="0" title="{hint}">'
            f'<span class="segllm-chip" style="display:inline-block;width:1em;height:1em;'
            f'background:{c};margin-right:.4em;vertical-align:middle"></span><b>{r.round}</b>{html.escape(refs)}: '
            f"{html.escape(r.question)} &rarr; {answer_html(r.text, c)} {scores_note(r)}</li>"
        )
    return '<div id="segllm-legend"><ol style="list-style:none;padding-left:0">' + "".join(items) + "</ol></div>"


# The legend's clicks (and Enter/Space on a focused item) pick its round in the view selector
# (#show), whose own event redraws the overlay: the legend is a shortcut, not a second path.
LEGEND_JS = """
const pick = (li) => {
  const want = li.dataset.shown === 'true' ? 'all' : li.dataset.round;
  const radio = document.querySelector(`#show input[type=radio][value="${want}"]`);
  if (radio) radio.click();
};
element.addEventListener('click', (e) => {
  const li = e.target.closest('li.segllm-round');
  if (li) pick(li);
});
element.addEventListener('keydown', (e) => {
  const li = e.target.closest('li.segllm-round');
  if (li && (e.key === 'Enter' || e.key === ' ')) { e.preventDefault(); pick(li); }
});
"""

CSS = """
#overlay img, #examples img { image-rendering: pixelated; }
#segllm-legend li.segllm-round { cursor: pointer; padding: .15em .3em; border-radius: .3em; }
#segllm-legend li.segllm-round:hover { background: rgba(127, 127, 127, .15); }
#segllm-legend li.segllm-round[data-shown="true"] { outline: 2px solid currentColor; }
#segllm-legend li.segllm-round[data-shown="false"] { opacity: .45; }
"""


ZIP_NAME = "segllm-masks.zip"


def _new_folder(parent: Path) -> Path:
    folder = parent / uuid.uuid4().hex
    folder.mkdir()
    return folder


def masks_zip(session: Session, folder: Path) -> Path:
    """A zip of every round's mask PNGs, the overlay and session.json (COCO-style, RLE masks)."""
    path = folder / ZIP_NAME
    with zipfile.ZipFile(path, "w") as z:
        for r in session.history:
            for j, m in enumerate(r.masks, start=1):
                buf = io.BytesIO()
                Image.fromarray(m.astype(np.uint8) * 255).save(buf, format="PNG")
                z.writestr(f"round{r.round}_mask{j}.png", buf.getvalue())
        buf = io.BytesIO()
        session.overlay().save(buf, format="PNG")
        z.writestr("overlay.png", buf.getvalue())
        z.writestr("session.json", json.dumps(session.to_coco(), indent=1))
    return path


def user_message(text: str, path: str | None = None) -> str:
    """``text`` as a demo user may see it: the uploaded file named by its own name, never by the
    server path it was stored under (which tells a stranger how the server is laid out)."""
    if path:
        name = Path(path).name
        for form in {str(path), os.path.realpath(path)}:
            text = text.replace(form, name)
    for root in _server_roots():
        text = re.sub(re.escape(root) + r"[^\s'\"]*", "<file>", text)
    return text


@contextmanager
def shown_errors(path: str | None = None):
    """Every error a demo user sees is a message naming the problem, never a server path or a
    traceback; unexpected errors are logged here in full and shown by their kind only."""
    try:
        yield
    except gr.Error as e:
        e.message = user_message(str(e.message), path)
        raise
    except SegLLMError as e:
        raise gr.Error(user_message(str(e), path)) from None
    except Exception as e:
        log.exception("demo request failed")
        raise gr.Error(f"internal error ({type(e).__name__}); the conversation is unchanged") from None


def _server_roots() -> list[str]:
    roots = {gr.utils.get_upload_folder(), tempfile.gettempdir()}
    roots |= {os.path.realpath(r) for r in roots}
    return sorted(roots, key=len, reverse=True)  # longest first: a nested root is replaced whole


def _trim_gradio_queue(blocks) -> None:
    """Forget the finished events Gradio's queue keeps forever (gradio 6: every event, its HTTP
    request and its task stay referenced after it completes, ~1 per click, never freed). Only
    finished events go; whatever this Gradio version lacks is left alone."""
    q = getattr(blocks, "_queue", None)
    events, analytics = getattr(q, "event_ids_to_events", None), getattr(q, "event_analytics", None)
    if not isinstance(events, dict) or not isinstance(analytics, dict):
        return
    pending = getattr(q, "pending_event_ids_session", {})
    for eid, info in list(analytics.items()):
        if isinstance(info, dict) and info.get("status") in ("success", "failed", "cancelled"):
            event = events.pop(eid, None)
            ids = pending.get(getattr(event, "session_hash", None)) if event is not None else None
            if ids is not None:
                ids.discard(eid)
                if not ids:
                    pending.pop(event.session_hash, None)
    # the analytics (the monitoring page's table) keep the latest finished events only
    finished = [k for k, v in analytics.items() if isinstance(v, dict) and v.get("status") not in ("queued", "processing")]
    for k in finished[: max(0, len(finished) - 1000)]:
        analytics.pop(k, None)
    tasks = getattr(q, "_asyncio_tasks", None)
    if isinstance(tasks, list):
        for t in [t for t in list(tasks) if t.done()]:
            tasks.remove(t)  # one by one: a task the event loop appends meanwhile is kept


class _Demo(gr.Blocks):
    """The demo's Blocks: launching it refuses uploads over its limit unless told otherwise."""

    max_upload_bytes: int | None = None
    max_sessions: int = MAX_SESSIONS

    def launch(self, *args, **kwargs):
        kwargs.setdefault("max_file_size", self.max_upload_bytes)
        kwargs.setdefault("css", CSS)  # Gradio 6 takes the page's CSS here, no longer in the constructor
        # Gradio keeps a copy of the page's settings per browser session (10,000 by default,
        # ~50 kB each); past our cap those conversations are gone, so their copies may go too
        kwargs.setdefault("state_session_capacity", 2 * self.max_sessions + 16)
        return super().launch(*args, **kwargs)

    def close(self, *args, **kwargs):
        try:
            return super().close(*args, **kwargs)
        finally:
            store = getattr(self, "segllm_store", None)
            if store is not None:
                store.close()


def build_demo(model, *, max_side: int = MAX_SIDE, max_new_tokens: int = MAX_NEW_TOKENS, max_sessions: int = MAX_SESSIONS,
               idle_timeout: float = IDLE_TIMEOUT, max_upload_mb: float | None = MAX_UPLOAD_MB):
    """The Gradio Blocks app for ``model``.

    Args:
        max_side: images whose longest side exceeds it (pixels) are refused.
        max_sessions: live conversations at most (least recently used dropped first).
        idle_timeout: seconds after which an idle conversation and its files are dropped.
        max_upload_mb: uploads over it (MB) are refused; None: no limit.
    """
    # the store's files live in Gradio's cache folder, so Gradio serves them without a copy
    # of its own that only its age-based cleanup would delete
    cache = Path(gr.utils.get_upload_folder())
    cache.mkdir(parents=True, exist_ok=True)
    store = SessionStore(model, max_sessions, idle_timeout=idle_timeout,
                         folder=Path(tempfile.mkdtemp(prefix="segllm-demo-", dir=cache)), max_new_tokens=max_new_tokens)
    limit = None if max_upload_mb is None else int(max_upload_mb * 2**20)
    examples = example_images()

    def key_of(request: gr.Request) -> str:
        return request.session_hash or "default"

    def view(entry: _Entry, status: str, *, keep: bool = False):
        """The page's outputs for ``entry``. A new state of the conversation (``keep`` False)
        shows every round and forgets the ticked references and a pending box corner; a change of
        view only (``keep``) leaves them as they are."""
        s = entry.session
        if not keep:
            entry.show = entry.corner = None
        entry.show = parse_show(entry.show, len(s.history))
        refs = gr.update() if keep else gr.update(choices=[str(r.round) for r in s.history], value=[])
        show = gr.update(choices=show_choices(len(s.history)), value=str(entry.show or SHOW_ALL))
        # what the page showed before is superseded: its files go, so one overlay and one zip
        # per conversation are on disk at any time (a change of view keeps the zip: the masks
        # are the same)
        kept = [f for f in entry.files if keep and f.name == ZIP_NAME]
        for old in entry.files:
            if old not in kept:
                shutil.rmtree(old.parent, ignore_errors=True)
        entry.files[:] = kept
        image = download = None
        if s.image is not None:
            image = _new_folder(entry.folder) / "overlay.png"  # a new URL each time: no stale browser cache
            # small images are shown enlarged by a whole factor with crisp pixels; clicks on the
            # overlay are divided by it
            entry.scale = display_scale(s.image.shape[:2])
            display_image(s, show=entry.show, scale=entry.scale, corner=entry.corner).save(image)
            entry.files.append(image)
            if s.history and not kept:
                download = masks_zip(s, _new_folder(entry.folder))
                entry.files.append(download)
        legend = legend_html(s, entry.show)
        download = gr.update() if kept else (str(download) if download else None)
        return (str(image) if image else None), legend, refs, status, download, show

    def no_session(request: gr.Request) -> str:
        if store.expired(key_of(request)):
            return (f"This conversation expired (idle over {idle_timeout / 60:g} minutes, or too many users at once). "
                    "Upload or pick the image again.")
        return "Upload or pick an image first."

    @contextmanager
    def conversation(request: gr.Request, path: str | None = None):
        """This browser session's entry, with an image, errors shown as messages."""
        with shown_errors(path), store.use(key_of(request)) as entry:
            if entry.session.image is None:
                raise gr.Error(no_session(request))
            yield entry

    def set_image(path, request: gr.Request, progress=gr.Progress()):  # noqa: B008 (Gradio injects progress this way)
        if not path:
            raise gr.Error("No image given.")
        name = Path(path).name
        try:
            size = os.path.getsize(path)
        except OSError:
            raise gr.Error(f"the upload {name} is gone; upload it again") from None
        if limit is not None and size > limit:
            # reached only where a file bypassed the server's upload limit (e.g. launched without it)
            raise gr.Error(f"{name} is {size / 2**20:.1f} MB; uploads may be at most {limit / 2**20:g} MB")
        with shown_errors(path), store.use(key_of(request)) as entry:
            image = load_image(path, max_side=max_side)
            progress(0.2, desc="encoding the image")
            entry.session.set_image(image)
            h, w = image.shape[:2]
            return (*view(entry, f"Image {w}x{h} ready. Ask a question."), canvas(entry))

    def canvas(entry: _Entry):
        """The paint editor's value: the image (enlarged as the overlay is, or shrunk past
        ``PAINT_SIDE``, see :func:`paint_canvas`), with nothing painted."""
        return {"background": paint_canvas(entry.session.image, entry.scale), "layers": [], "composite": None}

    def pick_example(name, request: gr.Request, progress=gr.Progress()):  # noqa: B008 (Gradio injects progress this way)
        if not name:
            raise gr.Error("Pick an example.")
        if name not in examples:
            raise gr.Error(f"no example {name!r}; the examples are {', '.join(examples)}")
        return set_image(str(examples[name]), request, progress)

    def pick_thumbnail(evt: gr.SelectData, request: gr.Request, progress=gr.Progress()):  # noqa: B008
        return pick_example(names[evt.index], request, progress)

    def ask(question, refs, request: gr.Request, progress=gr.Progress()):  # noqa: B008 (Gradio injects progress this way)
        with conversation(request) as entry:
            progress(0.1, desc="thinking")
            r = entry.session.ask(question or "", refs=[int(k) for k in refs or []])
            note = " (the model gave no mask; one was asked for)" if r.forced else ""
            return (*view(entry, f"Round {r.round}: {r.text.replace('<seg>', '[mask]')}{note}"), "")

    def region_added(entry: _Entry, r, where: str):
        return (*view(entry, f"Round {r.round}: your region {where}; refer to it as instance {r.round}."), "")

    def mark(label, tool, evt: gr.SelectData, request: gr.Request):
        """A click on the image: a point region round there, or one corner of a box region round
        (the box's round comes with the second click)."""
        with conversation(request) as entry:
            x, y = (int(v) // entry.scale for v in evt.index)
            if tool == TOOL_BOX:
                if entry.corner is None:
                    entry.corner = (x, y)
                    return (*view(entry, f"Box: first corner at ({x}, {y}); click the opposite corner.", keep=True), label)
                x0, y0, x1, y1 = box_from_corners(entry.corner, (x, y))
                entry.corner = None  # spent, whatever add_region says
                r = entry.session.add_region(box=(x0, y0, x1, y1), label=label or None)
                return region_added(entry, r, f"box ({x0}, {y0})-({x1}, {y1})")
            r = entry.session.add_region(point=(x, y), label=label or None)
            return region_added(entry, r, f"at ({x}, {y})")

    def add_mask(path, label, request: gr.Request):
        """An uploaded mask image (the image's size; non-zero pixels are the region): a region round."""
        if not path:
            raise gr.Error("No mask given.")
        with conversation(request, path) as entry:
            r = entry.session.add_region(mask=np.asarray(load_image(path, max_side=max_side)), label=label or None)
            return region_added(entry, r, f"from {Path(path).name}")

    def add_painted(painting, label, request: gr.Request):
        """The strokes painted in the editor: a region round; the editor is cleared."""
        with conversation(request) as entry:
            region = painted_mask((painting or {}).get("layers"), entry.session.image.shape[:2])
            r = entry.session.add_region(mask=region, label=label or None)
            return (*region_added(entry, r, f"painted ({int(region.sum())} pixels)"), canvas(entry))

    def pick_tool(tool, request: gr.Request):
        """A change of click tool drops a box's pending first corner."""
        with shown_errors(), store.use(key_of(request)) as entry:
            entry.corner = None
            if entry.session.image is None:
                return view(entry, no_session(request), keep=True)
            what = "a box: click one corner, then the opposite one" if tool == TOOL_BOX else "a point region"
            return view(entry, f"A click on the image marks {what}.", keep=True)

    def show_round(value, request: gr.Request):
        """The view selector (and the legend's items): one round's masks alone, or every round's."""
        with conversation(request) as entry:
            entry.show = parse_show(value, len(entry.session.history))
            status = "Showing every round." if entry.show is None else f"Showing round {entry.show} alone."
            return view(entry, status, keep=True)

    def undo(request: gr.Request):
        with shown_errors(), store.use(key_of(request)) as entry:
            r = entry.session.undo()
            return view(entry, f"Undid round {r.round}." if r else "Nothing to undo.")

    def clear(request: gr.Request):
        with shown_errors(), store.use(key_of(request)) as entry:
            if entry.session.image is not None:
                entry.session.reset()
            return view(entry, "Cleared the conversation.")

    def closed(request: gr.Request):
        store.drop(key_of(request))

    limit_text = f" and {max_upload_mb:g} MB" if limit is not None else ""
    names = list(examples)
    # Gradio's own copies of uploads are deleted once older than the idle timeout (their
    # conversation is gone by then); our files are deleted as soon as they are superseded
    with _Demo(title="SegLLM", delete_cache=(int(min(idle_timeout, 300)) or 1, int(idle_timeout) or 1)) as demo:
        gr.Markdown(
            "# SegLLM: multi-round segmentation\n"
            "Upload an image (or pick an example), then ask for one object per round (Enter asks). A later question "
            "can refer to an earlier round's object: tick its round below, or write `instance k` or `[REF:k]`. "
            "Click on the image to mark a region yourself (a point, or a box by two clicks), paint one or upload a mask: "
            "it becomes a round you can refer to. Click a round in the legend to see its mask alone. "
            f"Images up to {max_side} pixels on the longest side{limit_text}."
        )
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.UploadButton("Upload an image", file_types=["image"], type="filepath", elem_id="upload",
                                         variant="secondary")
                gallery = gr.Gallery([(str(examples[n]), n) for n in names], label="…or pick an example", columns=len(names) or 1,
                                     rows=1, height=230, allow_preview=False, object_fit="contain", interactive=False,
                                     buttons=[], elem_id="examples")
                # the examples by name, for API clients (the thumbnails above are the page's picker)
                example = gr.Dropdown(choices=names, value=None, visible=False, elem_id="example")
                question = gr.Textbox(label="Question", placeholder="Segment the red circle.", elem_id="question")
                refs = gr.CheckboxGroup(label="Refers to rounds", choices=[], elem_id="refs")
                with gr.Row():
                    ask_btn = gr.Button("Ask", variant="primary", elem_id="ask")
                    undo_btn = gr.Button("Undo", elem_id="undo")
                    clear_btn = gr.Button("Clear", elem_id="clear")
                with gr.Accordion("Your own region", open=True):
                    tool = gr.Radio([("Point", TOOL_POINT), ("Box (two clicks: opposite corners)", TOOL_BOX)], value=TOOL_POINT,
                                    label="A click on the image marks", elem_id="tool")
                    region_label = gr.Textbox(label="Label for your region (optional)", placeholder="the cup",
                                              elem_id="region-label")
                    # a mask image of the image's size: its non-zero pixels are the region
                    region_mask = gr.UploadButton("Upload a region mask", file_types=["image"], type="filepath",
                                                  elem_id="region-mask", size="md")
                    with gr.Accordion("Paint a region", open=False, elem_id="paint-box"):
                        # PNG: the image's copy is encoded on every new image (WebP, the default, is 5x slower)
                        paint = gr.ImageEditor(type="numpy", format="png", sources=[], transforms=[], layers=False, eraser=gr.Eraser(),
                                               brush=gr.Brush(default_size=16, colors=["#ff00ff"], color_mode="fixed"),
                                               show_label=False, height=360, elem_id="paint")
                        paint_btn = gr.Button("Add the painted region", elem_id="add-painted")
                status = gr.Markdown(elem_id="status")
                download = gr.File(label="Download masks (zip: PNGs, overlay, session.json)", elem_id="download")
            with gr.Column(scale=1):
                overlay = gr.Image(label="Masks by round", interactive=False, elem_id="overlay", format="png", height=420,
                                   type="filepath")
                show = gr.Radio(show_choices(0), value=SHOW_ALL, label="Show", elem_id="show")
                legend = gr.HTML(legend_html(Session(model)), elem_id="legend", js_on_load=LEGEND_JS)
        outs = [overlay, legend, refs, status, download, show]
        upload.upload(set_image, [upload], outs + [paint])
        gallery.select(pick_thumbnail, None, outs + [paint], api_visibility="private")
        example.change(pick_example, [example], outs + [paint])
        paint_btn.click(add_painted, [paint, region_label], outs + [region_label, paint])
        ask_btn.click(ask, [question, refs], outs + [question])
        question.submit(ask, [question, refs], outs + [question])
        overlay.select(mark, [region_label, tool], outs + [region_label])
        region_mask.upload(add_mask, [region_mask, region_label], outs + [region_label])
        tool.input(pick_tool, [tool], outs)
        show.input(show_round, [show], outs)
        undo_btn.click(undo, None, outs)
        clear_btn.click(clear, None, outs)
        demo.unload(closed)
    demo.queue(default_concurrency_limit=1)
    demo.max_upload_bytes, demo.max_sessions = limit, max_sessions
    demo.segllm_store = store
    store.start_sweeper(also=lambda: _trim_gradio_queue(demo))
    return demo


def launch(
    checkpoint=None, *, revision: str | None = None, host: str = "127.0.0.1", port: int = 7860, device: str = "cpu",
    dtype: torch.dtype | None = None, quantize: str | None = None, mask_region: str | None = None, compile: bool = False,
    edge_filter: bool | None = None, **kwargs,
):
    """Serve the demo on ``host:port`` with the model in ``checkpoint`` (a folder or hub id, see
    :func:`segllm.default.load_model`; default: the bundled model) on ``device`` in ``dtype``
    (``quantize``: "8bit" or "4bit" LLM weights; ``compile``: see :func:`segllm.default.load_model`)."""
    model = load_model(checkpoint, revision=revision, device=device, dtype=dtype, quantize=quantize, mask_region=mask_region,
                       compile=compile, edge_filter=edge_filter)
    demo = build_demo(model, **kwargs)
    demo.launch(server_name=host, server_port=port)
