"""LoRA adapters on the LLM: only the adapters train, checkpoints keep them, merging preserves the function."""

from pathlib import Path

import pytest
import torch

from segllm import SegLLM
from segllm.cli import main
from segllm.config import LoraConfig
from segllm.errors import ConfigError
from segllm.model.lora import has_lora
from segllm.train.objective import training_loss
from tests.tolerance import assert_close_scaled

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "test_tiny.toml"


def _hidden(model, conv):
    model.eval()
    with torch.no_grad():
        batch = model.prepare([conv])
        return model.llm.get_decoder()(inputs_embeds=model.embed(batch)).last_hidden_state


def test_only_adapters_of_the_llm_train(make_model, three_rounds):
    model = make_model()
    model.add_lora(LoraConfig(r=4, targets=("q_proj", "v_proj")))
    assert has_lora(model.llm) and model.config.llm.lora.r == 4
    emb = {id(p) for p in model.part_parameters()["embeddings"]}  # trained too: the tiny preset trains every part
    llm_trainable = [n for n, p in model.llm.named_parameters() if p.requires_grad and id(p) not in emb]
    assert llm_trainable and all("lora_" in n for n in llm_trainable)
    assert len(llm_trainable) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    # the other parts still train
    assert any(p.requires_grad for p in model.decoder.parameters())
    base = {n: p.detach().clone() for n, p in model.llm.named_parameters() if "lora_" not in n and id(p) not in emb}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        training_loss(model, model.prepare([three_rounds])).loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.llm.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n


def test_checkpoint_keeps_adapters_and_merge_preserves_outputs(make_model, three_rounds, tmp_path):
    model = make_model()
    model.add_lora(LoraConfig(r=4))
    with torch.no_grad():  # lora_B starts at zero: give the adapters an effect to preserve
        for n, p in model.llm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    before = _hidden(model, three_rounds)
    model.save_pretrained(tmp_path / "lora")
    again = SegLLM.from_pretrained(tmp_path / "lora")
    assert has_lora(again.llm)
    torch.testing.assert_close(_hidden(again, three_rounds), before)

    assert main(["merge-lora", str(tmp_path / "lora"), str(tmp_path / "merged")]) == 0
    merged = SegLLM.from_pretrained(tmp_path / "merged")
    assert not has_lora(merged.llm) and merged.config.llm.lora.r == 0
    assert not any("lora_" in k or "base_layer" in k for k in merged.state_dict())
    assert_close_scaled(_hidden(merged, three_rounds), before, rel=1e-5, rtol=1e-4)  # merging changes the rounding only
    assert main(["merge-lora", str(tmp_path / "merged"), str(tmp_path / "again")]) == 2


def test_bad_lora_settings_are_named(make_model):
    model = make_model()
    with pytest.raises(ConfigError, match="not linear layers"):
        model.add_lora(LoraConfig(r=4, targets=("query",)))
    with pytest.raises(ConfigError, match="rank"):
        model.add_lora(LoraConfig(r=0))


def test_recipe_trains_with_lora(tmp_path):
    out = tmp_path / "run"
    args = ["train", str(RECIPE), "--set", f'output_dir="{out}"', "--set", "steps=3", "--set", "save_every=3",
            "--set", "model.lora.r=4"]
    assert main(args) == 0
    model = SegLLM.from_pretrained(out / "checkpoint-last" / "model")
    assert has_lora(model.llm) and model.config.llm.lora.r == 4


def test_a_model_without_adapters_loads_without_importing_peft():
    """peft (~2 s to import, with bitsandbytes) is imported only where adapters are made:
    `segllm chat` on the bundled model does not wait for it."""
    import subprocess
    import sys

    code = ("import sys; from segllm.default import load_model; from segllm.model.lora import has_lora, merge_lora; "
            "m = load_model(); print(has_lora(m.llm), merge_lora(m.llm), 'peft' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "0", "False"]
