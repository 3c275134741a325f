"""Tests for dvlm_exp.models.tokenizer_tiny (offline tiny LLaDA-layout tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers

from conftest import REPO
from dvlm_exp.models.tokenizer_tiny import (
    IMAGE_TOKEN_INDEX,
    LLADA_ADDED_TOKENS,
    LLADA_CHAT_TEMPLATE,
    LLADA_SPECIAL_IDS,
    LLADA_TOKENIZER_LEN,
    LLADA_V_SYSTEM_PROMPT,
    build_llada_tokenizer,
    build_llada_v_prompt,
    render_llada_chat,
    special_ids_from_tokenizer,
)

BPE_VOCAB = 2048
FILES = ("special_tokens_map.json", "tokenizer.json", "tokenizer_config.json")
OFFICIAL_FACTS = REPO / "tests" / "golden" / "llada_v_tokenizer" / "official_tokenizer_facts.json"

SYSTEM_TURN = (
    "<|startoftext|><|start_header_id|>system<|end_header_id|>\n\n"
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language.<|eot_id|>"
)
ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"

TEXTS = [
    "What colour is the square in the top left corner?",
    "The total on the invoice is $1,234.56 (paid 3 March 2021).\nAnswer: 42",
    "  leading and trailing spaces, tabs\tand\nnewlines\n\n",
    "Unusual words: zyzzyva, quixotic, Xylophone_99; café – 5 × 3 = 15 ✓ 日本",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return build_llada_tokenizer(tmp_path_factory.mktemp("tok_a"), bpe_vocab=BPE_VOCAB)


@pytest.fixture(scope="module")
def tok(tok_dir):
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)


def _ids(t, text, special=False):
    return list(t(text, add_special_tokens=special).input_ids)


# ------------------------------------------------------------------------------- files


def test_saved_files_and_config(tok_dir):
    assert sorted(p.name for p in tok_dir.iterdir()) == sorted(FILES)
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == LLADA_CHAT_TEMPLATE
    assert cfg["bos_token"] == "<|startoftext|>"
    assert cfg["eos_token"] == cfg["pad_token"] == "<|endoftext|>"
    assert cfg["add_bos_token"] is False and cfg["add_eos_token"] is False
    assert cfg["model_max_length"] == 8192
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert len(cfg["added_tokens_decoder"]) == 269
    stm = json.loads((tok_dir / "special_tokens_map.json").read_text())
    assert stm["bos_token"]["content"] == "<|startoftext|>"
    assert stm["pad_token"]["content"] == "<|endoftext|>"
    assert "<|mdm_mask|>" in stm["additional_special_tokens"]


def test_matches_official_tokenizer_config():
    """Added tokens, chat template and special-tokens map equal the official release files
    (their contents as recorded in tests/golden/llada_v_tokenizer, see its README)."""
    import hashlib

    facts = json.loads(OFFICIAL_FACTS.read_text())
    decoder = {int(k): v for k, v in facts["added_tokens_decoder"].items()}
    assert sorted(decoder) == [tid for tid, _ in LLADA_ADDED_TOKENS]
    for tid, content in LLADA_ADDED_TOKENS:
        d = decoder[tid]
        assert d["content"] == content and d["special"] is True
        assert not (d["lstrip"] or d["rstrip"] or d["normalized"] or d["single_word"])
    assert hashlib.sha256(LLADA_CHAT_TEMPLATE.encode()).hexdigest() == facts["chat_template_sha256"]
    from dvlm_exp.models.tokenizer_tiny import _special_tokens_map

    assert facts["special_tokens_map"] == _special_tokens_map()


# -------------------------------------------------------------------------- special ids


def test_special_ids_are_official(tok):
    assert special_ids_from_tokenizer(tok) == LLADA_SPECIAL_IDS
    assert LLADA_SPECIAL_IDS == {
        "bos": 126080, "eos": 126081, "mask": 126336, "start_header": 126346, "end_header": 126347, "eot": 126348,
    }
    assert tok.bos_token_id == 126080
    assert tok.eos_token_id == tok.pad_token_id == 126081
    assert len(tok) == LLADA_TOKENIZER_LEN == 126349
    assert tok.vocab_size == 126080
    decoder = tok.added_tokens_decoder
    for tid, content in LLADA_ADDED_TOKENS:
        assert decoder[tid].content == content and decoder[tid].special, tid
    assert tok.convert_ids_to_tokens([126082, 126083, 126084, 126335, 126337, 126340]) == [
        "[CLS]", "[gMASK]", "<|reserved_token_0|>", "<|reserved_token_251|>", "<|reserved_token_253|>", "<role>",
    ]


def test_special_ids_missing_token_raises():
    class Stub:
        name_or_path = "stub"

        def get_vocab(self):
            return {t: i for i, (_, t) in enumerate(LLADA_ADDED_TOKENS) if t != "<|mdm_mask|>"}

    with pytest.raises(ValueError, match=r"mask token '<\|mdm_mask\|>'"):
        special_ids_from_tokenizer(Stub())


def test_special_token_strings_encode_to_single_ids(tok):
    assert _ids(tok, "<|eot_id|>") == [126348]
    assert _ids(tok, "<|mdm_mask|>") == [126336]
    assert _ids(tok, "a<|start_header_id|>b") == [_ids(tok, "a")[0], 126346, _ids(tok, "b")[0]]


# --------------------------------------------------------------------------- ordinary text


@pytest.mark.parametrize("text", TEXTS)
def test_roundtrip_ordinary_text(tok, text):
    ids = _ids(tok, text, special=True)  # add_bos_token false: no BOS even with special tokens on
    assert ids and all(0 <= i < BPE_VOCAB for i in ids)
    assert tok.decode(ids) == text


def test_common_words_are_merged(tok):
    # a trained BPE, not bytes: frequent words are single tokens
    assert len(_ids(tok, " colour")) == 1
    assert len(_ids(tok, "What colour is the square?")) <= 6


def test_fillers_unreachable(tok):
    ids = _ids(tok, "<|tiny_unused_5000|> <|reserved_token_0|x")
    assert all(i < BPE_VOCAB for i in ids)


def test_decode_skip_special_tokens(tok):
    text = TEXTS[1]
    ids = _ids(tok, text)
    s = LLADA_SPECIAL_IDS
    full = [s["bos"], s["start_header"], *ids, s["eot"], s["mask"], s["mask"], s["eos"], s["eos"]]
    assert tok.decode(full, skip_special_tokens=True) == text
    raw = tok.decode(full)
    assert raw.startswith("<|startoftext|><|start_header_id|>")
    assert raw.endswith("<|eot_id|><|mdm_mask|><|mdm_mask|><|endoftext|><|endoftext|>")


# ------------------------------------------------------------------------------ build


def test_build_is_deterministic(tok_dir, tmp_path):
    other = build_llada_tokenizer(tmp_path / "tok_b", bpe_vocab=BPE_VOCAB)
    assert sorted(p.name for p in other.iterdir()) == sorted(FILES)
    for name in FILES:
        assert (tok_dir / name).read_bytes() == (other / name).read_bytes(), name


def test_build_rejects_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        build_llada_tokenizer(tmp_path / "x", vocab_size=4096)
    with pytest.raises(ValueError, match="bpe_vocab"):
        build_llada_tokenizer(tmp_path / "y", bpe_vocab=200_000)


# ------------------------------------------------------------------------------ prompts


def test_chat_template_official_string(tok):
    msgs = [
        {"role": "system", "content": LLADA_V_SYSTEM_PROMPT},
        {"role": "user", "content": "<image>\nWhat is the total?  \n"},
    ]
    expected = (
        SYSTEM_TURN
        + "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is the total?<|eot_id|>"
        + ASSISTANT_HEADER
    )
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == expected
    assert render_llada_chat(msgs) == expected
    # tokenized: exactly one BOS, at the start
    out = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    ids = list(out["input_ids"] if hasattr(out, "keys") else out)
    assert ids[0] == LLADA_SPECIAL_IDS["bos"] and ids.count(LLADA_SPECIAL_IDS["bos"]) == 1
    assert ids[-3:] == [LLADA_SPECIAL_IDS["end_header"]] + _ids(tok, "\n\n")


def _split_at_image(ids):
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    k = ids.index(IMAGE_TOKEN_INDEX)
    return ids[:k], ids[k + 1 :]


def test_llada_v_prompt_official_ids(tok):
    q = "What colour is the square?"
    ids = build_llada_v_prompt(tok, q)
    left, right = _split_at_image(ids)
    first = SYSTEM_TURN + "<|start_header_id|>user<|end_header_id|>\n\n"
    second = f"\n{q}<|eot_id|>" + ASSISTANT_HEADER
    assert left == _ids(tok, first)
    assert left[0] == LLADA_SPECIAL_IDS["bos"] and ids.count(LLADA_SPECIAL_IDS["bos"]) == 1
    # tokenizer_image_token drops the first token of the chunk after <image> (the "\n"),
    # because the LLaDA tokenizer adds no BOS to that chunk.
    second_ids = _ids(tok, second)
    assert tok.decode(second_ids[:1]) == "\n"
    assert right == second_ids[1:]
    assert tok.decode(right) == f"{q}<|eot_id|>" + ASSISTANT_HEADER


def test_llada_v_prompt_clean_splice(tok):
    q = "How many circles are there?"
    ids = build_llada_v_prompt(tok, q, official_chunk_offset=False)
    left, right = _split_at_image(ids)
    assert left == _ids(tok, SYSTEM_TURN + "<|start_header_id|>user<|end_header_id|>\n\n")
    assert right == _ids(tok, f"\n{q}<|eot_id|>" + ASSISTANT_HEADER)


def test_llada_v_prompt_think_and_variants(tok):
    q = "Which digit is shown?"
    base = build_llada_v_prompt(tok, q, official_chunk_offset=False)
    no_think = build_llada_v_prompt(tok, q, think="no_think", official_chunk_offset=False)
    think = build_llada_v_prompt(tok, q, think="think", official_chunk_offset=False)
    tail = "<|eot_id|>" + ASSISTANT_HEADER
    assert tok.decode(_split_at_image(base)[1]) == f"\n{q}{tail}"
    assert tok.decode(_split_at_image(no_think)[1]) == f"\n{q} /no_think{tail}"
    assert tok.decode(_split_at_image(think)[1]) == f"\n{q} /think{tail}"
    with pytest.raises(ValueError, match="think"):
        build_llada_v_prompt(tok, q, think="maybe")

    # no image: plain tokenization of the rendered prompt, no placeholder
    text_only = build_llada_v_prompt(tok, q, image=False)
    assert IMAGE_TOKEN_INDEX not in text_only
    assert text_only == _ids(tok, SYSTEM_TURN + f"<|start_header_id|>user<|end_header_id|>\n\n{q}{tail}")

    # no system message: BOS goes before the user turn
    no_sys = build_llada_v_prompt(tok, q, system=None)
    s = LLADA_SPECIAL_IDS
    assert no_sys[:2] == [s["bos"], s["start_header"]]
    assert tok.decode(_split_at_image(no_sys)[0]) == "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n"
