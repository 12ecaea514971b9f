"""Hub ids wherever a folder is accepted (segllm.hub), resolved offline from a hub cache folder built
here by hand in huggingface_hub's documented layout:

    HF_HOME/hub/models--ORG--NAME/refs/REVISION            the commit hash a branch or tag points to
    HF_HOME/hub/models--ORG--NAME/blobs/SHA256             each file's content, once
    HF_HOME/hub/models--ORG--NAME/snapshots/COMMIT/PATH    relative symlinks to the blobs

Nothing here reaches the network: HF_HUB_OFFLINE is set, and the one test of the online path
replaces ``snapshot_download`` to see what it would be asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from segllm import SegLLM
from segllm.cli import main
from segllm.default import load_model
from segllm.errors import CheckpointError, SegLLMError
from segllm.hub import HubError, HubId, hub_cache_dir, parse_hub_id, resolve_folder
from segllm.model.llava import segllm_from_llava15
from segllm.model.loading import load_pretrained
from segllm.session import Session
from tests.helpers import llava_original

COMMIT_MAIN = "a" * 40
COMMIT_V1 = "b" * 40


def add_snapshot(cache: Path, repo_id: str, commit: str, files: dict[str, bytes], refs: tuple[str, ...] = ("main",)) -> Path:
    """Write ``files`` (path in the repository -> content) as one snapshot of ``repo_id`` in the hub
    cache ``cache``, the way huggingface_hub lays it out; ``refs`` are the branches or tags that point
    at ``commit``. Returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def folder_files(folder: Path, prefix: str = "") -> dict[str, bytes]:
    """Every file under ``folder`` as (``prefix`` + relative path) -> content."""
    return {prefix + str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty hub cache under HF_HOME=tmp_path/hf, downloads switched off; returns the cache folder."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    assert hub_cache_dir() == cache  # read from the environment now, not at import
    return cache


@pytest.fixture
def tiny_checkpoint(make_model, tmp_path) -> tuple[SegLLM, Path]:
    model = make_model(seed=3)
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    return model, folder


def test_parse_hub_ids():
    assert parse_hub_id("Marlo-Z/SegLLM/all_data_checkpoint") == HubId("Marlo-Z/SegLLM", "all_data_checkpoint", None)
    assert parse_hub_id("org/name") == HubId("org/name", "", None)
    assert parse_hub_id("org/name/a/b@v1.0") == HubId("org/name", "a/b", "v1.0")
    assert parse_hub_id("org/name", revision="dev") == HubId("org/name", "", "dev")
    assert parse_hub_id("org/name@dev", revision="dev").revision == "dev"
    for not_an_id in ("/abs/path/x", "./org/name", "../org/name", "~/org/name", "name", "org/na me", "C:\\org\\name", ""):
        assert parse_hub_id(not_an_id) is None, not_an_id
    with pytest.raises(HubError, match="names revision 'v1' but revision 'v2'"):
        parse_hub_id("org/name@v1", revision="v2")
    assert str(HubId("org/name", "sub", "v1")) == "org/name/sub@v1"
    assert HubId("org/name", "sub", "v1").download_command() == "hf download org/name --include 'sub/*' --revision v1"


def test_resolves_ids_to_the_cached_snapshot(hub, tmp_path, monkeypatch):
    files = {"config.json": b"{}", "all_data_checkpoint/config.json": b'{"x": 1}', "mr_paco_checkpoint/a/b.txt": b"b"}
    main_snap = add_snapshot(hub, "Marlo-Z/SegLLM", COMMIT_MAIN, files)
    v1_snap = add_snapshot(hub, "Marlo-Z/SegLLM", COMMIT_V1, {"all_data_checkpoint/config.json": b'{"x": 2}'}, refs=("v1",))
    monkeypatch.chdir(tmp_path)  # no local folder of these names

    assert resolve_folder("Marlo-Z/SegLLM") == main_snap
    sub = resolve_folder("Marlo-Z/SegLLM/all_data_checkpoint")
    assert sub == main_snap / "all_data_checkpoint" and json.loads((sub / "config.json").read_text()) == {"x": 1}
    assert resolve_folder("Marlo-Z/SegLLM/mr_paco_checkpoint/a") == main_snap / "mr_paco_checkpoint" / "a"
    # a revision: a tag through refs/, "@rev" or the keyword, or a commit hash directly
    assert resolve_folder("Marlo-Z/SegLLM/all_data_checkpoint@v1") == v1_snap / "all_data_checkpoint"
    assert resolve_folder("Marlo-Z/SegLLM/all_data_checkpoint", revision="v1") == v1_snap / "all_data_checkpoint"
    assert resolve_folder(f"Marlo-Z/SegLLM/all_data_checkpoint@{COMMIT_V1}") == v1_snap / "all_data_checkpoint"
    # HF_HUB_CACHE overrides HF_HOME, as in huggingface_hub
    other = tmp_path / "other_cache"
    other_snap = add_snapshot(other, "Marlo-Z/SegLLM", COMMIT_MAIN, {"all_data_checkpoint/config.json": b"{}"})
    monkeypatch.setenv("HF_HUB_CACHE", str(other))
    assert resolve_folder("Marlo-Z/SegLLM/all_data_checkpoint") == other_snap / "all_data_checkpoint"


def test_a_local_folder_wins_and_nothing_is_fetched_without_a_hub_id(hub, tmp_path, monkeypatch):
    add_snapshot(hub, "org/name", COMMIT_MAIN, {"sub/config.json": b"{}"})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name" / "sub").mkdir(parents=True)
    assert resolve_folder("org/name/sub") == Path("org/name/sub")  # the local folder, not the cached snapshot
    with pytest.raises(HubError, match="is a local path, and a revision .'v1'. applies to hub ids only"):
        resolve_folder("org/name/sub", revision="v1")

    def refuse(*args, **kwargs):
        raise AssertionError("snapshot_download called")

    monkeypatch.setattr("segllm.hub.snapshot_download", refuse)
    assert resolve_folder(None) is None
    assert resolve_folder(str(tmp_path / "absent")) == tmp_path / "absent"  # not an id: the caller's own error
    assert load_model().dtype == torch.float32  # the bundled model: no hub default
    with pytest.raises(CheckpointError, match="absent") as err:
        load_model(tmp_path / "absent")
    assert not isinstance(err.value, HubError)


def test_missing_id_offline_says_how_to_download(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HubError) as err:
        resolve_folder("Marlo-Z/SegLLM/all_data_checkpoint")
    msg = str(err.value)
    assert isinstance(err.value, SegLLMError)
    assert "Marlo-Z/SegLLM" in msg and str(hub) in msg and "HF_HUB_OFFLINE" in msg
    assert "hf download Marlo-Z/SegLLM --include 'all_data_checkpoint/*'" in msg
    # the repository is cached, but not that subfolder, nor that revision
    add_snapshot(hub, "Marlo-Z/SegLLM", COMMIT_MAIN, {"mr_paco_checkpoint/config.json": b"{}"})
    with pytest.raises(HubError, match=r"has no folder 'all_data_checkpoint'.*--include 'all_data_checkpoint/\*'"):
        resolve_folder("Marlo-Z/SegLLM/all_data_checkpoint")
    with pytest.raises(HubError, match="revision v9.*--revision v9"):
        resolve_folder("Marlo-Z/SegLLM/mr_paco_checkpoint@v9")
    # through the command line: one line, no traceback
    capsys.readouterr()
    assert main(["chat", "--checkpoint", "Marlo-Z/SegLLM/all_data_checkpoint", "--ask", "x", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint 'Marlo-Z/SegLLM/all_data_checkpoint'") and "Traceback" not in err


def test_online_fetches_only_the_subfolder(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setattr("segllm.hub.constants.HF_HUB_OFFLINE", False)
    calls = []

    def fake(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        snap = tmp_path / "snap"
        (snap / "all_data_checkpoint").mkdir(parents=True, exist_ok=True)
        (snap / "all_data_checkpoint" / "config.json").write_text("{}")
        return str(snap)

    monkeypatch.setattr("segllm.hub.snapshot_download", fake)
    monkeypatch.chdir(tmp_path)
    assert resolve_folder("Marlo-Z/SegLLM/all_data_checkpoint", revision="r1") == tmp_path / "snap" / "all_data_checkpoint"
    resolve_folder("Marlo-Z/SegLLM/all_data_checkpoint", patterns=("*.json",))
    assert calls[0] == ("Marlo-Z/SegLLM", {"revision": "r1", "allow_patterns": ["all_data_checkpoint/*"],
                                           "cache_dir": str(tmp_path / "home" / "hub"), "local_files_only": False})
    assert calls[1][1]["allow_patterns"] == ["all_data_checkpoint/*.json"] and calls[1][1]["revision"] is None


def test_session_loads_a_checkpoint_by_hub_id(hub, tiny_checkpoint, tmp_path, monkeypatch, image):
    model, folder = tiny_checkpoint
    add_snapshot(hub, "org/name", COMMIT_MAIN, folder_files(folder, "sub/"))
    other = folder.parent / "other"
    load_model().save_pretrained(other)  # a different model at tag v1
    add_snapshot(hub, "org/name", COMMIT_V1, folder_files(other, "sub/"), refs=("v1",))
    monkeypatch.chdir(tmp_path)

    session = Session.from_pretrained("org/name/sub", image)
    loaded = session.model.state_dict()
    assert loaded.keys() == model.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    reply = session.ask("Segment the red circle.", answer="<seg>")
    assert reply.masks.shape == (1, *image.shape[:2])
    # the same id at another revision, three ways; each is the other model
    for m in (SegLLM.from_pretrained("org/name/sub@v1"), load_model("org/name/sub", revision="v1"),
              load_pretrained(f"org/name/sub@{COMMIT_V1}")):
        assert m.config.to_dict() == load_model().config.to_dict()
    with pytest.raises(CheckpointError, match="revision was given without a hub id"):
        load_model(revision="v1")


def test_cli_chat_runs_a_hub_id_in_bfloat16(hub, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    _, folder = tiny_checkpoint
    add_snapshot(hub, "org/name", COMMIT_V1, folder_files(folder, "sub/"), refs=("v1",))
    monkeypatch.chdir(tmp_path)
    seen = []
    import segllm.session

    real = segllm.session.load_model

    def spy(*args, **kwargs):
        model = real(*args, **kwargs)
        seen.append((model.llm.dtype, model.dtype, str(model.device)))
        return model

    monkeypatch.setattr(segllm.session, "load_model", spy)
    rc = main(["chat", "--checkpoint", "org/name/sub", "--revision", "v1", "--dtype", "bfloat16", "--device", "cpu",
               "--ask", "Segment the red circle.", "--out", str(tmp_path / "o"), "--max-new-tokens", "2"])
    assert rc == 0, capsys.readouterr().err
    assert seen == [(torch.bfloat16, torch.bfloat16, "cpu")]
    assert (tmp_path / "o" / "round1_overlay.png").is_file()


def test_llava_and_clip_by_hub_id(hub, llava_parts, tmp_path, monkeypatch):
    from segllm.decoders.hipie import HipieDecoderConfig

    root = llava_parts[0]
    add_snapshot(hub, "liuhaotian/llava-mini", COMMIT_MAIN, folder_files(llava_original(llava_parts)))
    add_snapshot(hub, "openai/clip-mini", COMMIT_MAIN, folder_files(root / "clip"))
    monkeypatch.chdir(tmp_path)
    by_id = segllm_from_llava15("liuhaotian/llava-mini", vision_tower="openai/clip-mini", hipie=HipieDecoderConfig.reduced())
    by_folder = segllm_from_llava15(root / "original", vision_tower=root / "clip", hipie=HipieDecoderConfig.reduced())
    ours, theirs = by_id.state_dict(), by_folder.state_dict()
    for k in ours:
        if k.startswith(("llm.", "projector.", "vision.")):
            assert torch.equal(ours[k], theirs[k]), k
    with pytest.raises(HubError, match="vision tower 'openai/clip-absent'.*hf download openai/clip-absent"):
        segllm_from_llava15("liuhaotian/llava-mini", vision_tower="openai/clip-absent", hipie=HipieDecoderConfig.reduced())
