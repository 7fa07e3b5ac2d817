"""Hugging Face export: the exported Llama gives our logits, the tokenizer encodes the same."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from flows.export import export_hf  # noqa: E402
from tasks.core.model import GPT, ModelConfig, save_model  # noqa: E402
from tasks.core.store import current_umask  # noqa: E402

V = 120


def random_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=V, depth=2, width=64, **overrides))
    with torch.no_grad():  # large weights so attention matters; norms perturbed so a lost one would show
        for p in model.parameters():
            p.normal_(0.0, 0.3) if p.dim() == 2 else p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize("overrides", [
    dict(n_heads=4, n_kv_heads=2),  # GQA, tied
    dict(n_heads=2, tie_embeddings=False, rope_theta=500.0, mlp_hidden=96),  # untied, odd sizes
])
def test_hf_llama_gives_the_same_logits(tmp_path, overrides):
    model = random_gpt(**overrides)
    out = export_hf(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    x = torch.randint(0, V, (3, 33))
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    assert hf.config.tie_word_embeddings == model.dims.tie_embeddings


def test_export_from_saved_directory_and_refuses_qk_norm(tmp_path):
    save_model(random_gpt(), tmp_path / "ours")
    out = export_hf(tmp_path / "ours", tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    with pytest.raises(ValueError, match="qk_norm"):
        export_hf(random_gpt(qk_norm=True), tmp_path / "bad")


def test_tokenizer_round_trip(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|bos|>", "<|eos|>", "<|pad|>"]
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, héllo wörld!", "1 + 2 = 3"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))

    special = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}
    model = GPT(ModelConfig(vocab_size=tok.get_vocab_size() + 5, depth=1, width=64))  # room to spare is fine
    out = export_hf(model, tmp_path / "hf", tokenizer_json=path, special_tokens=special)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    for text in ["the lazy fox", "héllo, wörld 1 + 2", "unseen ✓ bytes"]:
        ids = tok.encode(text).ids
        assert hf_tok(text)["input_ids"] == ids
        assert hf_tok.decode(ids) == tok.decode(ids)
    assert hf_tok.eos_token == "<|eos|>" and hf_tok.eos_token_id == tok.token_to_id("<|eos|>")
    assert hf_tok.pad_token_id == tok.token_to_id("<|pad|>")
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == tok.token_to_id("<|eos|>")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert hf.generation_config.eos_token_id == tok.token_to_id("<|eos|>")


def test_chat_template_and_readable_files(tmp_path):
    """`apply_chat_template` on the export gives the prompt ids SFT and RL trained on; files are 0644."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from tasks.core.chat import HF_CHAT_TEMPLATE, prompt_ids
    from tasks.core.tokens import BOS, END, PAD, SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["What is 3 + 4? Answer: 7", "the gcd of 12 and 18 is 6", "hello world"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    special = {"bos_token": BOS, "eos_token": END, "pad_token": PAD}
    model = GPT(ModelConfig(vocab_size=tok.get_vocab_size(), depth=1, width=64))
    out = export_hf(model, tmp_path / "hf", tokenizer_json=path, special_tokens=special, chat_template=HF_CHAT_TEMPLATE)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    for question in ["What is 3 + 4?", "Find the gcd of 12 and 18.\nBe brief."]:
        ids = hf_tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)
        assert list(ids) == prompt_ids(tok, question)
    with pytest.raises(Exception, match="user and assistant"):
        hf_tok.apply_chat_template([{"role": "system", "content": "x"}], tokenize=False)
    for f in out.iterdir():
        assert f.stat().st_mode & 0o777 == 0o644 & ~current_umask(), f
