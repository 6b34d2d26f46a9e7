"""Loading students and teachers: local paths (or an HF cache), no implicit downloads.

``builtin:world`` names the embedded rule-world base model shipped in the package, ``builtin:games`` the FrozenLake
game base (lightning_ctx/tasks/games/frozenlake_base/).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import torch

from lightning_ctx.errors import ModelError

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
# Models shipped inside the package (``model.student: builtin:world``).
BUILTIN_MODELS = {"world": Path(__file__).resolve().parent.parent / "assets" / "world_base",
                  "games": Path(__file__).resolve().parent.parent / "assets" / "games_base"}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ModelError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


class MissingModel(ModelError):
    """A model named by a knob that is not here (``hub_id``: a Hugging Face id that is not in the local cache)."""

    def __init__(self, knob: str, name: str, hub_id: bool = False):
        self.knob, self.name, self.hub_id = knob, name, hub_id
        super().__init__(missing_models_message([self]))

    @property
    def reason(self) -> str:
        if self.hub_id:
            from huggingface_hub.constants import HF_HUB_CACHE

            return f"{self.name!r} is neither a local folder nor in the Hugging Face cache ({HF_HUB_CACHE})"
        if Path(self.name).expanduser().is_file():
            return f"{self.name} is a file, not a model folder (a folder holding config.json and the weights)"
        return f"{self.name} does not exist"


def _flag(knob: str) -> str:
    return knob if knob.startswith("-") else f"--{knob}"


def missing_models_message(missing: list[MissingModel]) -> str:
    """What is missing (every knob), then how to fix it: local folders for paths, the download command for hub ids."""
    text = "; ".join(f"{m.knob}: {m.reason}" for m in missing) + "."
    paths = [m for m in missing if not m.hub_id]
    if paths:
        them = "it" if len(paths) == 1 else "them"
        text += (f" Point {them} at local model folder{'s' if len(paths) > 1 else ''} saved with save_pretrained: "
                 + " ".join(f"{_flag(m.knob)} /path/to/folder" for m in paths) + ".")
    hub = [m for m in missing if m.hub_id]
    if hub:
        folders = {m.knob: f"/models/{m.name.rsplit('/', 1)[-1]}" for m in hub}
        text += (" lightning-ctx never downloads (model.local_files_only: true): on a machine with network run "
                 + " and ".join(f"`hf download {m.name} --local-dir {folders[m.knob]}`" for m in hub)
                 + ", bring the folder here and pass " + " ".join(f"{_flag(m.knob)} {folders[m.knob]}" for m in hub)
                 + ".")
    return text


def resolve_model_path(name: str, local_files_only: bool = True, knob: str = "model.student") -> str:
    """Map ``builtin:world`` to the shipped folder; check that a local path exists.

    A name that is not a folder is passed on as an HF id, which with ``local_files_only`` must already
    sit in the HF cache (never downloaded implicitly). A missing one raises :class:`MissingModel` naming ``knob``.
    """
    if name.startswith(BUILTIN_PREFIX):
        key = name[len(BUILTIN_PREFIX):]
        if key in BUILTIN_MODELS:
            return str(BUILTIN_MODELS[key])
        raise ModelError(f"{knob}: unknown built-in model {name!r}; available: "
                         f"{', '.join(BUILTIN_PREFIX + k for k in BUILTIN_MODELS)}")
    path = Path(os.path.expanduser(name))
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name and not _looks_like_hub_id(name)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{knob}: {path} is not a model folder (no config.json); give a folder written by "
                             f"save_pretrained")
        return str(path)
    if looks_like_path or path.exists():
        raise MissingModel(knob, name)
    if local_files_only and not _in_hf_cache(name):
        raise MissingModel(knob, name, hub_id=True)
    return name


def _in_hf_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id either
        return False


def check_model_sources(sources: dict[str, Optional[str]], local_files_only: bool = True) -> None:
    """Every named model (``{"model.student": ..., "model.teacher": ...}``; None = not used) is here: one error listing
    all that are missing, so a student and a teacher are fixed together."""
    missing: list[MissingModel] = []
    for knob, name in sources.items():
        if name is None:
            continue
        try:
            resolve_model_path(name, local_files_only, knob)
        except MissingModel as err:
            missing.append(err)
    if len(missing) == 1:
        raise missing[0]
    if missing:
        raise ModelError(missing_models_message(missing))


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def load_tokenizer(name: str, trust_remote_code: bool = False, local_files_only: bool = True,
                   knob: str = "model.student"):
    """Load a tokenizer; a folder with ``tokenizer.json`` is read as-is with ``PreTrainedTokenizerFast``.

    ``AutoTokenizer`` on a saved Qwen2 folder silently swaps a custom pre-tokenizer (transformers v5),
    so the fast-tokenizer file wins when present. A missing pad token defaults to EOS: the rollout's
    response mask is built from the first EOS, not from the pad id, so this is safe.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = resolve_model_path(name, local_files_only, knob)
    try:
        if Path(path, "tokenizer.json").exists():
            tok = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
        else:
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                local_files_only=local_files_only)
    except OSError as err:
        raise ModelError(f"{name}: cannot load tokenizer ({err})") from None
    if tok.eos_token_id is None:
        raise ModelError(f"{name}: tokenizer has no eos_token; the student could never learn to stop")
    if tok.pad_token_id is None:
        log.warning("%s: tokenizer has no pad token; using eos_token %r as pad", name, tok.eos_token)
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model_config(name: str, trust_remote_code: bool = False, local_files_only: bool = True):
    """The model's ``config.json`` (no weights): positions, vocabulary, layers, for checks before anything loads."""
    from transformers import AutoConfig

    path = resolve_model_path(name, local_files_only)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=local_files_only)
    except (OSError, ValueError) as err:
        raise ModelError(f"{name}: cannot read the model config ({err})") from None


def load_causal_lm(name: str, dtype: str | torch.dtype = "float32", trust_remote_code: bool = False,
                   local_files_only: bool = True, quantization: Optional[str] = None, device_map=None):
    """Load an HF causal LM from a local folder (safetensors only) or the HF cache.

    ``quantization``: None | ``4bit`` | ``8bit`` (bitsandbytes; for frozen teachers).
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name, local_files_only)
    kwargs = dict(dtype=parse_dtype(dtype), trust_remote_code=trust_remote_code,
                  local_files_only=local_files_only, use_safetensors=True)
    if quantization is not None:
        kwargs["quantization_config"] = quantization_config(quantization, parse_dtype(dtype))
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise ModelError(f"{name}: cannot load model ({err})") from None
    return model


def load_quantized_teacher(name: str, quantization: str, dtype: str | torch.dtype = "float32",
                           trust_remote_code: bool = False, local_files_only: bool = True):
    """A frozen bitsandbytes ``4bit`` (NF4) or ``8bit`` (LLM.int8) model for teacher scoring.

    The weights are quantized while loading, directly on the device they will run on: ``cuda:LOCAL_RANK``
    when CUDA is available (moving a quantized model between devices afterwards is fragile: CPU 4-bit
    weights are repacked for the CPU kernels), else the CPU (bitsandbytes >= 0.45 has a CPU backend).
    ``dtype`` is the compute dtype of the non-quantized parts and of the 4-bit matmuls.
    """
    check_quantized_teacher(name, quantization, trust_remote_code, local_files_only)
    if quantization == "8bit":
        _quiet_int8_cast_warning()
    device_map = {"": f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"} if torch.cuda.is_available() else None
    model = load_causal_lm(name, dtype, trust_remote_code, local_files_only, quantization=quantization,
                           device_map=device_map)
    return freeze(model)


def check_quantized_teacher(name: str, quantization: str, trust_remote_code: bool = False,
                            local_files_only: bool = True) -> None:
    """bitsandbytes is installed, and on a CPU whose 4-bit kernel repacks weights every layer has a shape it takes
    (checked on a skeleton of the model, no weights loaded)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelError(f"teacher quantization {quantization!r} needs bitsandbytes (pip install "
                         f"'lightning-ctx[quant]')") from None
    if quantization == "4bit" and not torch.cuda.is_available() and cpu_4bit_repacks():
        check_cpu_4bit_shapes(name, trust_remote_code, local_files_only)


# bitsandbytes' AVX-512-BF16 CPU kernel repacks each 4-bit weight [out, in] in blocks of 32 output rows
# and reshapes its scales per 64 inputs (the quantization block): other shapes crash in the first forward.
CPU_4BIT_OUT_MULTIPLE, CPU_4BIT_IN_MULTIPLE = 32, 64


def cpu_4bit_repacks() -> bool:
    """Whether bitsandbytes will repack 4-bit weights for its AVX-512-BF16 CPU kernel on this machine."""
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        return False
    return bool(has_avx512bf16())


def cpu_4bit_unfit_layer(model) -> Optional[tuple[str, tuple[int, int]]]:
    """The first linear layer that 4-bit quantization would convert but the CPU kernel cannot take."""
    output_embeddings = model.get_output_embeddings()  # transformers keeps the LM head unquantized
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not output_embeddings:
            if module.out_features % CPU_4BIT_OUT_MULTIPLE or module.in_features % CPU_4BIT_IN_MULTIPLE:
                return name, (module.out_features, module.in_features)
    return None


def check_cpu_4bit_shapes(name: str, trust_remote_code: bool = False, local_files_only: bool = True) -> None:
    """Fail before loading when a layer of ``name`` cannot run in bitsandbytes' 4-bit CPU kernel."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model_path(name, local_files_only)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=local_files_only)
    with torch.device("meta"):  # the layer shapes only: no memory, no weights read
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    unfit = cpu_4bit_unfit_layer(skeleton)
    if unfit is not None:
        layer, (out_features, in_features) = unfit
        raise ModelError(f"{name}: layer {layer!r} has shape [out={out_features}, in={in_features}], which "
                         f"bitsandbytes' 4-bit CPU kernel on this processor cannot run (it needs out divisible by "
                         f"{CPU_4BIT_OUT_MULTIPLE} and in by {CPU_4BIT_IN_MULTIPLE}); use "
                         "model.teacher_quantization: 8bit, no quantization, or a GPU")


class _OnceFilter(logging.Filter):
    """Let a repeated log message through once (bitsandbytes logs one warning per int8 matmul call)."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        if self.seen:
            return False
        self.seen = True
        return True


def _quiet_int8_cast_warning() -> None:
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _OnceFilter) for f in logger.filters):
        logger.addFilter(_OnceFilter("MatMul8bitLt: inputs will be cast"))


LORA_DEFAULTS = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}


def check_lora(lora: dict) -> None:
    """``model.lora``'s keys are known and peft is installed."""
    unknown = sorted(set(lora) - set(LORA_DEFAULTS))
    if unknown:
        raise ModelError(f"model.lora: unknown key(s) {unknown}; allowed: {sorted(LORA_DEFAULTS)}")
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ModelError("model.lora needs peft (pip install 'lightning-ctx[lora]')") from None


def apply_lora(model, lora: dict):
    """Wrap ``model`` with a fresh peft LoRA adapter; only the adapter weights train.

    ``lora`` keys: ``r`` (8), ``alpha`` (16), ``dropout`` (0.0), ``target_modules`` (``all-linear``: every
    linear layer but the LM head; or a list of module names such as ``[q_proj, v_proj]``). The adapter
    starts at zero (LoRA's B = 0), so the wrapped model computes exactly the base model at step 0.
    """
    check_lora(lora)
    from peft import LoraConfig, get_peft_model

    cfg = {**LORA_DEFAULTS, **lora}
    targets = cfg["target_modules"]
    config = LoraConfig(r=int(cfg["r"]), lora_alpha=float(cfg["alpha"]), lora_dropout=float(cfg["dropout"]),
                        target_modules=targets if isinstance(targets, str) else list(targets),
                        task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as err:  # e.g. target modules not found in the model
        raise ModelError(f"model.lora: {err}") from None


def quantization_config(kind: str, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if kind == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ModelError(f"unknown quantization {kind!r}; choose 4bit or 8bit")


def freeze(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def output_vocab_size(model) -> int:
    emb = model.get_output_embeddings()
    return emb.weight.shape[0] if emb is not None else model.config.vocab_size
