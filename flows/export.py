"""Export a `GPT` to the Hugging Face Llama layout, loadable with `AutoModelForCausalLM` offline.

Our parameter names are HF's minus the "model." prefix (see tasks/core/model.py), so the
weights are a rename; the config maps our dims onto LlamaConfig's fields.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

from tasks.core.model import GPT, load_model
from tasks.core.store import current_umask

SPECIAL_ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def export_hf(model: GPT | str | Path, out_dir: str | Path, tokenizer_json: str | Path | None = None,
              special_tokens: dict[str, str] | None = None, chat_template: str | None = None) -> Path:
    """Write model.safetensors, config.json, generation_config.json (+ tokenizer files) to out_dir.

    model: a GPT or a directory written by `save_model`. special_tokens maps a role in
    SPECIAL_ROLES (e.g. "eos_token") to its token string in tokenizer_json; their ids go into
    the configs. chat_template: a Jinja template for `apply_chat_template` (in tokenizer_config.json).
    Files are written readable by group and others (0644 less the umask; safetensors writes 0600).
    Refuses a model with qk_norm: Llama has no q/k normalization.
    """
    model = model if isinstance(model, GPT) else load_model(model)
    d = model.dims
    if d.qk_norm:
        raise ValueError("qk_norm=True cannot be exported as LlamaForCausalLM (Llama has no q/k norm)")
    special_tokens = dict(special_tokens or {})
    if bad := set(special_tokens) - set(SPECIAL_ROLES):
        raise ValueError(f"unknown special token roles {sorted(bad)}; use {SPECIAL_ROLES}")
    if special_tokens and tokenizer_json is None:
        raise ValueError("special_tokens need tokenizer_json to resolve their ids")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    state = {(k if k == "lm_head.weight" else f"model.{k}"): v.detach().float().cpu().contiguous()
             for k, v in model.state_dict().items()}
    if d.tie_embeddings:
        del state["lm_head.weight"]  # HF re-ties it from the embedding (tie_word_embeddings)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})

    ids: dict[str, int | None] = {role: None for role in SPECIAL_ROLES}
    if tokenizer_json is not None:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_json))
        if tokenizer.get_vocab_size() > d.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, model only {d.vocab_size}")
        for role, token in special_tokens.items():
            ids[role] = tokenizer.token_to_id(token)
            if ids[role] is None:
                raise ValueError(f"{role} {token!r} is not in {tokenizer_json}")
        shutil.copyfile(tokenizer_json, out / "tokenizer.json")
        _write_json(out / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": d.max_seq_len,
            "clean_up_tokenization_spaces": False, **special_tokens,
            **({"chat_template": chat_template} if chat_template else {})})
        _write_json(out / "special_tokens_map.json", special_tokens)

    _write_json(out / "config.json", {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": d.width,
        "intermediate_size": d.mlp_hidden,
        "num_hidden_layers": d.depth,
        "num_attention_heads": d.n_heads,
        "num_key_value_heads": d.n_kv_heads,
        "head_dim": d.head_dim,
        "vocab_size": d.vocab_size,
        "max_position_embeddings": d.max_seq_len,
        "rms_norm_eps": d.norm_eps,
        "rope_theta": d.rope_theta,  # transformers 4.x reads this ...
        "rope_parameters": {"rope_type": "default", "rope_theta": d.rope_theta},  # ... and 5.x this
        "tie_word_embeddings": d.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
        "bos_token_id": ids["bos_token"],
        "eos_token_id": ids["eos_token"],
        "pad_token_id": ids["pad_token"],
    })
    _write_json(out / "generation_config.json", {
        "bos_token_id": ids["bos_token"], "eos_token_id": ids["eos_token"], "pad_token_id": ids["pad_token"],
        "max_length": d.max_seq_len})
    mask = current_umask()
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json"):
        if (out / name).exists():
            os.chmod(out / name, 0o644 & ~mask)
    return out
