"""A tiny SigLIP checkpoint with its text tower, for TRIM's tests (random weights, real layout).

`write_tiny_text_tower(out_dir, dim)` writes what `hf download google/siglip-so400m-patch14-384`
gives, in small: config.json (`model_type: siglip`, `text_config`, `vision_config`), model.safetensors
(`text_model.*`, `vision_model.*`, logit scale / bias) from `SiglipModel.save_pretrained`, and a
SentencePiece tokenizer (`spiece.model`, `SiglipTokenizer`: pad and eos `</s>` = 1, unk 2, no bos)
trained offline on the project's synthetic corpus. The text embedding size (`projection_size`) is
`dim`: TRIM dots it with the vision tower's features, so it must equal the tower's hidden size.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

TEXT_SPEC = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=16)


def write_tiny_text_tower(out_dir: str | Path, dim: int = 32, seed: int = 0, spec: dict | None = None) -> Path:
    import sentencepiece as spm
    import torch
    from transformers import SiglipConfig, SiglipModel

    from dvlm_exp.models.tokenizer_tiny import synthetic_corpus

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(synthetic_corpus(seed, 400)), model_writer=buf, vocab_size=256,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>",
        unk_piece="<unk>", hard_vocab_limit=False, minloglevel=2, num_threads=1)
    (out / "spiece.model").write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    s = {**TEXT_SPEC, **(spec or {})}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "SiglipTokenizer", "model_max_length": s["max_position_embeddings"],
        "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>", "do_lower_case": True}, indent=1))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"}, indent=1))
    cfg = SiglipConfig(
        text_config=dict(vocab_size=sp.get_piece_size(), projection_size=dim, pad_token_id=1, eos_token_id=1,
                         bos_token_id=None, **s),
        vision_config=dict(hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14))
    g = torch.Generator().manual_seed(seed)
    model = SiglipModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1] if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    model.save_pretrained(out)
    return out
