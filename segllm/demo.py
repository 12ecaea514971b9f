"""``segllm demo``: a Gradio web app on the same :class:`segllm.session.Session` as the CLI.

Every browser session has its own conversation (kept server-side under Gradio's session id),
so one user's rounds never appear in another's. Errors show as a message in the page and the
conversation goes on. Images whose longest side exceeds ``max_side`` pixels are refused.
"""

import html
import io
import json
import logging
import tempfile
import threading
import zipfile
from collections import OrderedDict
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from segllm.conversation import load_image
from segllm.default import EXAMPLES, load_model
from segllm.errors import SegLLMError
from segllm.session import Session
from segllm.viz import colour

log = logging.getLogger(__name__)

MAX_SIDE = 4096  # pixels; larger uploads are refused (memory and latency on a CPU server)
MAX_SESSIONS = 64  # conversations kept at once; the least recently used is dropped first


class SessionStore:
    """Per-browser-session conversations, least recently used dropped beyond ``capacity``."""

    def __init__(self, model, capacity: int = MAX_SESSIONS, **session_kwargs) -> None:
        self.model = model
        self.capacity = capacity
        self.kwargs = session_kwargs
        self._items: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> Session:
        with self._lock:
            if key not in self._items:
                self._items[key] = Session(self.model, **self.kwargs)
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
            self._items.move_to_end(key)
            return self._items[key]

    def __len__(self) -> int:
        return len(self._items)


def example_images() -> dict[str, Path]:
    return {p.stem: p for p in sorted(EXAMPLES.glob("*.png"))}


def legend_html(session: Session) -> str:
    """One list item per round: its colour, number, question and answer."""
    if not session.history:
        return '<div id="segllm-legend"><em>No rounds yet.</em></div>'
    items = []
    for r in session.history:
        c = "#{:02x}{:02x}{:02x}".format(*colour(r.round))
        refs = f" (refers to {', '.join(map(str, r.refs))})" if r.refs else ""
        items.append(
            f'<li class="segllm-round" data-round="{r.round}"><span style="display:inline-block;width:1em;height:1em;'
            f'background:{c};margin-right:.4em;vertical-align:middle"></span><b>{r.round}</b>{html.escape(refs)}: '
            f"{html.escape(r.question)} &rarr; <code>{html.escape(r.text)}</code> (score {float(r.scores[0]) if len(r.scores) else 0:.2f})</li>"
        )
    return '<div id="segllm-legend"><ol style="list-style:none;padding-left:0">' + "".join(items) + "</ol></div>"


def masks_zip(session: Session, folder: Path) -> Path:
    """A zip of every round's mask PNGs, the overlay and session.json (COCO-style, RLE masks)."""
    path = folder / "segllm-masks.zip"
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


def build_demo(model, *, max_side: int = MAX_SIDE, max_new_tokens: int = 32):
    """The Gradio Blocks app for ``model``."""
    store = SessionStore(model, max_new_tokens=max_new_tokens)
    tmp = Path(tempfile.mkdtemp(prefix="segllm-demo-"))
    examples = example_images()

    def session_of(request: gr.Request) -> Session:
        return store.get(request.session_hash or "default")

    def view(s: Session, status: str):
        refs = gr.update(choices=[str(r.round) for r in s.history], value=[])
        image = np.asarray(s.overlay()) if s.image is not None else None
        download = None
        if s.history:
            folder = tmp / (str(id(s)) + f"-{len(s.history)}")
            folder.mkdir(parents=True, exist_ok=True)
            download = str(masks_zip(s, folder))
        return image, legend_html(s), refs, status, download

    def set_image(path, request: gr.Request, progress=gr.Progress()):  # noqa: B008 (Gradio injects progress this way)
        if not path:
            raise gr.Error("No image given.")
        s = session_of(request)
        try:
            image = load_image(path, max_side=max_side)
            progress(0.2, desc="encoding the image")
            s.set_image(image)
        except SegLLMError as e:
            raise gr.Error(str(e)) from e
        h, w = image.shape[:2]
        return view(s, f"Image {w}x{h} ready. Ask a question.")

    def pick_example(name, request: gr.Request, progress=gr.Progress()):  # noqa: B008 (Gradio injects progress this way)
        if not name:
            raise gr.Error("Pick an example.")
        return set_image(str(examples[name]), request, progress)

    def ask(question, refs, request: gr.Request, progress=gr.Progress()):  # noqa: B008 (Gradio injects progress this way)
        s = session_of(request)
        if s.image is None:
            raise gr.Error("Upload or pick an image first.")
        progress(0.1, desc="thinking")
        try:
            r = s.ask(question or "", refs=[int(k) for k in refs or []])
        except SegLLMError as e:
            raise gr.Error(str(e)) from e
        note = " (the model gave no mask; one was asked for)" if r.forced else ""
        return (*view(s, f"Round {r.round}: `{r.text}`{note}"), "")

    def undo(request: gr.Request):
        s = session_of(request)
        r = s.undo()
        return view(s, f"Undid round {r.round}." if r else "Nothing to undo.")

    def clear(request: gr.Request):
        s = session_of(request)
        if s.image is not None:
            s.reset()
        return view(s, "Cleared the conversation.")

    with gr.Blocks(title="SegLLM") as demo:
        gr.Markdown(
            "# SegLLM: multi-round segmentation\n"
            "Upload an image (or pick an example), then ask for one object per round. A later question "
            "can refer to an earlier round's object: tick its round below, or write `instance k` or `[REF:k]`. "
            f"Images up to {max_side} pixels on the longest side."
        )
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Upload an image", file_types=["image"], type="filepath", elem_id="upload")
                example = gr.Dropdown(choices=list(examples), label="…or pick an example", value=None, elem_id="example")
                question = gr.Textbox(label="Question", placeholder="Segment the red circle.", elem_id="question")
                refs = gr.CheckboxGroup(label="Refers to rounds", choices=[], elem_id="refs")
                with gr.Row():
                    ask_btn = gr.Button("Ask", variant="primary", elem_id="ask")
                    undo_btn = gr.Button("Undo", elem_id="undo")
                    clear_btn = gr.Button("Clear", elem_id="clear")
                status = gr.Markdown(elem_id="status")
                download = gr.File(label="Download masks (zip: PNGs, overlay, session.json)", elem_id="download")
            with gr.Column(scale=1):
                overlay = gr.Image(label="Masks by round", interactive=False, elem_id="overlay", format="png", height=420)
                legend = gr.HTML(legend_html(Session(model)), elem_id="legend")
        outs = [overlay, legend, refs, status, download]
        upload.upload(set_image, [upload], outs)
        example.change(pick_example, [example], outs)
        ask_btn.click(ask, [question, refs], outs + [question])
        question.submit(ask, [question, refs], outs + [question])
        undo_btn.click(undo, None, outs)
        clear_btn.click(clear, None, outs)
    demo.queue(default_concurrency_limit=1)
    return demo


def launch(checkpoint=None, *, host: str = "127.0.0.1", port: int = 7860, device: str = "cpu", **kwargs):
    model = load_model(checkpoint, device=device)
    demo = build_demo(model, **kwargs)
    demo.launch(server_name=host, server_port=port)
