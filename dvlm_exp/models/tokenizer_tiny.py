"""Offline, deterministic Hugging Face fast tokenizer in the LLaDA / LLaDA-V layout.

Long file: the tiny tokenizer's vocabulary tables and template are data kept beside the code
that writes them (test fixture; one checkpoint layout per file).

Tiny test models need a *real* tokenizer that behaves like ``GSAI-ML/LLaDA-V``'s
(a ``PreTrainedTokenizerFast`` with ``add_bos_token: false``) and carries every
LLaDA special token at its official id, so that the hard-coded ids used all over
the diffusion code (mask 126336, EOS 126081, ``<|eot_id|>`` 126348, ...) are
exercised unchanged.  ``build_llada_tokenizer`` trains a small byte-level BPE on
a built-in synthetic English corpus and lays it out like the official one:

* ids ``[0, n_bpe)``: the trained byte-level BPE (``n_bpe <= bpe_vocab``; the
  trainer may stop early on a small corpus); ordinary text only ever gets these;
* ids ``[n_bpe, 126080)``: filler entries ``<|tiny_unused_{id}|>`` in the BPE
  model vocabulary.  They are unreachable by encoding (no merge produces them)
  and only exist so that the base vocabulary is contiguous and 126080 long, as
  in the official tokenizer (see "Id gaps" below);
* ids ``[126080, 126348]``: the 269 official added tokens, names and flags as
  in the official ``tokenizer_config.json`` ``added_tokens_decoder``.

So ``len(tokenizer) == 126349`` and ``tokenizer.vocab_size == 126080`` exactly as
for the official tokenizer; the model's embedding has 126464 rows (the extra
rows are padding, also as in the official checkpoint).

Id gaps.  ``tokenizers`` does *not* honour explicit ids of added tokens that are
not in the model vocabulary: on load it renumbers them to follow the model
vocabulary (an added token with ``"id": 126080`` after a 2048-entry BPE becomes
2048).  Ids are kept only for tokens that are also model-vocabulary entries, and
the BPE model itself does accept a vocabulary with holes; but then
``len(tokenizer)`` is ~2300 instead of 126349, which breaks code that sizes or
resizes embeddings with ``len(tokenizer)`` (the official LLaDA-V loader does).
Hence the filler entries.

Prompt ids.  ``build_llada_v_prompt`` reproduces the official evaluation path
(``llava_onevision_llada.generate_until`` -> ``conv_llava_llada.get_prompt()`` ->
``tokenizer.apply_chat_template(tokenize=False, add_generation_prompt=True)`` ->
``mm_utils.tokenizer_image_token``); see its docstring for the one quirk this
implies (the ``"\\n"`` after ``<image>`` is dropped).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_IMAGE_TOKEN",
    "IMAGE_TOKEN_INDEX",
    "LLADA_ADDED_TOKENS",
    "LLADA_BASE_VOCAB_SIZE",
    "LLADA_CHAT_TEMPLATE",
    "LLADA_MODEL_VOCAB_SIZE",
    "LLADA_SPECIAL_IDS",
    "LLADA_SPECIAL_TOKENS",
    "LLADA_TOKENIZER_LEN",
    "LLADA_V_SYSTEM_PROMPT",
    "THINK_SUFFIXES",
    "build_llada_tokenizer",
    "build_llada_v_prompt",
    "render_llada_chat",
    "special_ids_from_tokenizer",
    "synthetic_corpus",
]

# --------------------------------------------------------------------------------------
# Official constants (ML-GSAI/LLaDA-V: train/llada_v_prepare/files/tokenizer_config.json,
# special_tokens_map.json, config.json; train/llava/conversation.py; train/llava/constants.py)
# --------------------------------------------------------------------------------------

IMAGE_TOKEN_INDEX = -200
DEFAULT_IMAGE_TOKEN = "<image>"

LLADA_BASE_VOCAB_SIZE = 126080  # ids below this are the base (BPE) vocabulary
LLADA_TOKENIZER_LEN = 126349  # len(tokenizer): base vocabulary + 269 added tokens
LLADA_MODEL_VOCAB_SIZE = 126464  # rows of the embedding / LM head in config.json

LLADA_SPECIAL_IDS: dict[str, int] = {
    "bos": 126080,
    "eos": 126081,
    "mask": 126336,
    "start_header": 126346,
    "end_header": 126347,
    "eot": 126348,
}

LLADA_SPECIAL_TOKENS: dict[str, str] = {
    "bos": "<|startoftext|>",
    "eos": "<|endoftext|>",
    "mask": "<|mdm_mask|>",
    "start_header": "<|start_header_id|>",
    "end_header": "<|end_header_id|>",
    "eot": "<|eot_id|>",
}


def _official_added_tokens() -> tuple[tuple[int, str], ...]:
    """(id, content) of the 269 added tokens, ids 126080..126348, all ``special: true``."""
    named = {
        126080: "<|startoftext|>",
        126081: "<|endoftext|>",
        126082: "[CLS]",
        126083: "[gMASK]",
        126336: "<|mdm_mask|>",  # takes the slot of reserved_token_252
        126340: "<role>",
        126341: "</role>",
        126342: "<|arithmetic_start|>",
        126343: "<|arithmetic_end|>",
        126344: "<|number_start|>",
        126345: "<|number_end|>",
        126346: "<|start_header_id|>",
        126347: "<|end_header_id|>",
        126348: "<|eot_id|>",
    }
    out = []
    for tid in range(LLADA_BASE_VOCAB_SIZE, LLADA_TOKENIZER_LEN):
        # 126084 + k is <|reserved_token_k|> for every k in 0..255 not taken by a named token.
        out.append((tid, named.get(tid, f"<|reserved_token_{tid - 126084}|>")))
    return tuple(out)


LLADA_ADDED_TOKENS: tuple[tuple[int, str], ...] = _official_added_tokens()

_ADDITIONAL_SPECIAL_TOKENS = [
    "<|mdm_mask|>",
    "<role>",
    "</role>",
    "<|arithmetic_start|>",
    "<|arithmetic_end|>",
    "<|number_start|>",
    "<|number_end|>",
]

# Verbatim from the official tokenizer_config.json.  Note: it appends the generation
# prompt unconditionally (``add_generation_prompt`` is ignored) and trims each content.
LLADA_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
)

# conv_llava_llada.system in train/llava/conversation.py.
LLADA_V_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)

# eval/lmms-eval/lmms_eval/models/llava_onevision_llada.py (gen_kwargs["think_mode"]).
THINK_SUFFIXES: dict[str, str] = {"no_think": " /no_think", "think": " /think"}

_MODEL_MAX_LENGTH = 8192
_FILLER = "<|tiny_unused_{}|>"


def _added_token_dict(content: str) -> dict[str, Any]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def _special_tokens_map() -> dict[str, Any]:
    """The official special_tokens_map.json content."""

    def tok(content: str) -> dict[str, Any]:
        d = _added_token_dict(content)
        d.pop("special")
        return d

    return {
        "additional_special_tokens": list(_ADDITIONAL_SPECIAL_TOKENS),
        "bos_token": tok("<|startoftext|>"),
        "cls_token": tok("[CLS]"),
        "eos_token": tok("<|endoftext|>"),
        "pad_token": tok("<|endoftext|>"),
    }


# --------------------------------------------------------------------------------------
# Synthetic corpus
# --------------------------------------------------------------------------------------

_SHAPES = ["square", "circle", "triangle", "rectangle", "star", "hexagon", "pentagon", "diamond", "oval", "arrow"]
_COLOURS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple", "grey", "brown", "pink", "cyan"]
_DOCS = ["invoice", "receipt", "report", "form", "letter", "table", "chart", "page", "menu", "poster", "ticket", "map"]
_FIELDS = ["total", "date", "title", "name", "address", "amount", "price", "number", "year", "value", "label", "heading"]
_PLACES = ["top", "bottom", "left", "right", "centre", "middle", "corner", "edge", "first row", "last column"]
_NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "James", "Laura", "Maria"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
_DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve"]
_WORDS = (
    "the a an of in on at to from with by for and or but not is are was were be been has have had do does did "
    "this that these those there here which what where when who whom whose why how many much more most less "
    "image picture photo figure diagram graph plot axis bar line pie slice legend scale unit percent sum "
    "shown visible written printed drawn located placed inside outside above below next between near far "
    "large small big tiny tall short wide narrow long round flat bright dark light heavy empty full open "
    "count answer question reason final word phrase single option choice correct wrong true false yes no "
    "text font bold title caption header footer column row cell value total amount price cost tax paid due "
    "company customer order item quantity description account balance payment signature stamp logo "
    "please describe explain identify read compute calculate compare list find select choose give write "
    "first second third fourth fifth last next previous other each every both all some any none "
    "system user assistant model vision language visual content helpful able understand provides assist "
    "variety tasks using natural think reasoning step because therefore so then also only very about over "
    "after before during while until since into onto through across along around behind beside under "
    "person people man woman child dog cat car bus train plane boat tree house building street road sign "
    "water sky cloud sun moon grass flower table chair book phone screen window door wall floor room "
    "left right top bottom center centre side front back upper lower half quarter part whole group set "
    "number digit letter symbol mark point dot circle square triangle rectangle shape colour color size "
    "year month week day hour minute second time date today yesterday tomorrow morning evening night "
    "name address city country state street code phone email website invoice receipt report form letter "
    "chart table page menu poster ticket map document file record note list summary result data source "
    "increase decrease higher lower highest lowest maximum minimum average median total difference ratio "
    "percentage rate growth share trend compared between among across per million billion thousand hundred "
    "can could should would will may might must shall need want like see look show tell say said made make "
    "get got take took give gave go went come came know knew think thought find found use used work worked "
    "good better best bad worse worst new old young same different important possible real main general"
).split()
_POST_PROMPTS = [
    "\nGive the reason and then write your final answer in the format 'Answer: X' where X is the answer to "
    "the question.",
    "\nAnswer the question using a single word or phrase.",
    "\nAnswer the question with a single word.",
    "\nAnswer with the option's letter from the given choices directly.",
]


def synthetic_corpus(seed: int = 0, n_items: int = 3000) -> list[str]:
    """Deterministic synthetic English text: VQA-style questions and answers about
    documents, shapes, colours and digits, the LLaDA-V system prompt, post-prompts
    and think suffixes."""
    rng = random.Random(seed)
    out: list[str] = [LLADA_V_SYSTEM_PROMPT] * 20 + [p.strip() for p in _POST_PROMPTS] * 10
    out += ["/no_think /think"] * 10
    out += [" ".join(_WORDS)] * 3
    out += [f"{role}\n\n{role.capitalize()}: {role}" for role in ("system", "user", "assistant")] * 20
    out += [f"{i} {i * 7 % 100:02d} {d}" for i, d in enumerate(_DIGIT_WORDS)]
    out.append("0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 0.5 3.14 12.5% $9.99 #1 (a) (b) (c) (d) A B C D E")

    def num() -> str:
        k = rng.random()
        if k < 0.4:
            return str(rng.randint(0, 20))
        if k < 0.7:
            return str(rng.randint(21, 9999))
        if k < 0.85:
            return f"{rng.randint(0, 999)}.{rng.randint(0, 99):02d}"
        return f"{rng.randint(1, 28)} {rng.choice(_MONTHS)} {rng.randint(1990, 2025)}"

    templates = [
        lambda: f"What colour is the {rng.choice(_SHAPES)} in the {rng.choice(_PLACES)} of the image?",
        lambda: f"The {rng.choice(_SHAPES)} is {rng.choice(_COLOURS)}.",
        lambda: f"How many {rng.choice(_COLOURS)} {rng.choice(_SHAPES)}s are there?",
        lambda: f"There are {rng.choice(_DIGIT_WORDS)} {rng.choice(_SHAPES)}s and {num()} {rng.choice(_SHAPES)}s.",
        lambda: f"What is the {rng.choice(_FIELDS)} on the {rng.choice(_DOCS)}?",
        lambda: f"The {rng.choice(_FIELDS)} of the {rng.choice(_DOCS)} is {num()}.",
        lambda: f"Answer: {rng.choice([num(), rng.choice(_COLOURS), rng.choice(_SHAPES), rng.choice(_NAMES)])}",
        lambda: f"Which digit is written in the {rng.choice(_PLACES)}? Answer: {rng.randint(0, 9)}",
        lambda: f"Who signed the {rng.choice(_DOCS)}? {rng.choice(_NAMES)} signed it on {num()}.",
        lambda: f"Is the {rng.choice(_SHAPES)} {rng.choice(_COLOURS)}? {rng.choice(['Yes', 'No'])}, it is "
        f"{rng.choice(_COLOURS)}.",
        lambda: f"{rng.choice(_NAMES)} paid ${num()} for {rng.randint(1, 12)} {rng.choice(_WORDS)} items.",
        lambda: " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 16))).capitalize() + ".",
        lambda: f"Question: what is shown in the {rng.choice(_DOCS)}?{rng.choice(_POST_PROMPTS)}",
        lambda: f"The {rng.choice(_DOCS)} shows a {rng.choice(_COLOURS)} {rng.choice(_SHAPES)} next to "
        f"{num()} {rng.choice(_COLOURS)} {rng.choice(_SHAPES)}s.\nThe answer is {num()}.",
    ]
    for _ in range(n_items):
        out.append(rng.choice(templates)())
    return out


# --------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------


def _train_bpe(texts: list[str], bpe_vocab: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def compact_added_tokens(n_bpe: int) -> tuple[tuple[int, str], ...]:
    """The 269 LLaDA added tokens, same names and order, renumbered to follow a BPE
    vocabulary of n_bpe entries (the compact layout)."""
    return tuple((n_bpe + k, content) for k, (_, content) in enumerate(LLADA_ADDED_TOKENS))


def _layout_backend(trained, compact: bool = False) -> Any:
    """Pad the trained BPE vocabulary to 126080 with fillers and append the official
    added tokens, which then land on their official ids 126080..126348. `compact`: no
    fillers; the added tokens follow the BPE vocabulary (small models, e.g. the sandbox)."""
    from tokenizers import Tokenizer

    spec = json.loads(trained.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    n_bpe = len(vocab)
    if sorted(vocab.values()) != list(range(n_bpe)):
        raise RuntimeError("trained BPE vocabulary is not contiguous")
    added = compact_added_tokens(n_bpe) if compact else LLADA_ADDED_TOKENS
    if not compact:
        for tid in range(n_bpe, LLADA_BASE_VOCAB_SIZE):
            vocab[_FILLER.format(tid)] = tid
    spec["added_tokens"] = [
        {"id": tid, **_added_token_dict(content)} for tid, content in added
    ]
    backend = Tokenizer.from_str(json.dumps(spec))
    for tid, content in added:
        got = backend.token_to_id(content)
        if got != tid:  # would mean tokenizers renumbered the added tokens
            raise RuntimeError(f"{content!r} got id {got}, expected {tid}")
    return backend, n_bpe


def build_llada_tokenizer(
    out_dir: str | Path,
    vocab_size: int = LLADA_MODEL_VOCAB_SIZE,
    bpe_vocab: int = 2048,
    corpus: Iterable[str] | None = None,
    seed: int = 0,
    compact: bool = False,
) -> Path:
    """Train and save a tiny LLaDA-layout fast tokenizer into ``out_dir``; return the path.

    ``vocab_size`` is the model's embedding size: in the official layout
    ``vocab_size >= 126349`` (the ids above ``len(tokenizer)`` are model padding rows);
    ``compact=True`` drops the filler entries, so the 269 added tokens (same names and
    order) follow the trained BPE and ``vocab_size >= n_bpe + 269`` (the sandbox model;
    special ids are then read from the tokenizer, never assumed).  ``bpe_vocab`` caps the trained BPE (ordinary text gets ids in
    ``[0, bpe_vocab)``).  ``corpus`` adds text to the built-in synthetic corpus
    generated from ``seed``.  Fully offline; two builds with equal arguments write
    byte-identical files (tokenizer.json, tokenizer_config.json, special_tokens_map.json).
    """
    from transformers import PreTrainedTokenizerFast

    if not compact and vocab_size < LLADA_TOKENIZER_LEN:
        raise ValueError(
            f"vocab_size={vocab_size} < {LLADA_TOKENIZER_LEN}: the tiny tokenizer keeps the official LLaDA "
            f"special-token ids (up to 126348), so the model vocabulary must cover them (official: 126464)"
        )
    if not 256 < bpe_vocab <= LLADA_BASE_VOCAB_SIZE:
        raise ValueError(f"bpe_vocab must be in (256, {LLADA_BASE_VOCAB_SIZE}], got {bpe_vocab}")

    texts = synthetic_corpus(seed)
    if corpus is not None:
        texts += [str(t) for t in corpus]

    backend, n_bpe = _layout_backend(_train_bpe(texts, bpe_vocab), compact=compact)
    added = compact_added_tokens(n_bpe) if compact else LLADA_ADDED_TOKENS
    if compact and vocab_size < n_bpe + len(added):
        raise ValueError(f"vocab_size={vocab_size} < {n_bpe + len(added)} (compact tokenizer: {n_bpe} BPE + "
                         f"{len(added)} added tokens)")

    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        cls_token="[CLS]",
        additional_special_tokens=list(_ADDITIONAL_SPECIAL_TOKENS),
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=_MODEL_MAX_LENGTH,
        model_input_names=["input_ids", "attention_mask"],
        chat_template=LLADA_CHAT_TEMPLATE,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json (official layout).
    tok.save_pretrained(str(out), save_jinja_files=False)

    # transformers 5 drops a few keys of the official config on save (add_bos_token /
    # add_eos_token, added_tokens_decoder, additional_special_tokens) and writes no
    # special_tokens_map.json; restore them so the folder matches the official layout and
    # also loads the same way in transformers 4.x.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.pop("extra_special_tokens", None)
    cfg.update(
        {
            "add_bos_token": False,
            "add_eos_token": False,
            "added_tokens_decoder": {str(tid): _added_token_dict(c) for tid, c in added},
            "additional_special_tokens": list(_ADDITIONAL_SPECIAL_TOKENS),
            "bos_token": "<|startoftext|>",
            "chat_template": LLADA_CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "cls_token": "[CLS]",
            "eos_token": "<|endoftext|>",
            "gmask_token": "[gMASK]",
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": _MODEL_MAX_LENGTH,
            "pad_token": "<|endoftext|>",
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
    )
    _write_json(cfg_path, cfg)
    _write_json(out / "special_tokens_map.json", _special_tokens_map())
    return out


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------
# Special ids and prompts
# --------------------------------------------------------------------------------------


def special_ids_from_tokenizer(tok: Any) -> dict[str, int]:
    """Ids of the LLaDA special tokens (keys of ``LLADA_SPECIAL_IDS``), looked up by token
    string in ``tok``'s vocabulary, so the tokenizer is the source of truth.  Raises
    ``ValueError`` naming the first missing token."""
    vocab = tok.get_vocab()
    out: dict[str, int] = {}
    for name, token in LLADA_SPECIAL_TOKENS.items():
        tid = vocab.get(token)
        if tid is None:
            raise ValueError(
                f"tokenizer {getattr(tok, 'name_or_path', type(tok).__name__)!r} has no {name} token {token!r}; "
                "is it a LLaDA-family tokenizer?"
            )
        out[name] = int(tid)
    return out


def render_llada_chat(messages: list[Mapping[str, str]], bos_token: str = "<|startoftext|>") -> str:
    """Pure-Python rendering of the official LLaDA chat template (always ends with the
    assistant generation header; each content is ``str.strip()``-ed like Jinja ``trim``)."""
    parts = []
    for i, m in enumerate(messages):
        s = f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
        parts.append(bos_token + s if i == 0 else s)
    return "".join(parts) + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def build_llada_v_prompt(
    tokenizer: Any,
    question: str,
    system: str | None = LLADA_V_SYSTEM_PROMPT,
    image: bool = True,
    think: str | None = None,
    official_chunk_offset: bool = True,
) -> list[int]:
    """Prompt ids of LLaDA-V's official single-image evaluation path, with one
    ``IMAGE_TOKEN_INDEX`` (-200) where ``<image>`` stands.

    Text: user content is ``"<image>\\n" + question + suffix`` (suffix " /no_think" or
    " /think" for ``think="no_think"``/``"think"``, nothing for ``None``; the official
    wrapper appends it only in its image branch, here it is appended in both), rendered
    with the tokenizer's chat template (the official one; pure-Python fallback if the
    tokenizer has none) after an optional system message:
    ``<|startoftext|><|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>``
    ``<|start_header_id|>user<|end_header_id|>\\n\\n<image>\\n{question}<|eot_id|>``
    ``<|start_header_id|>assistant<|end_header_id|>\\n\\n`` (contents trimmed; BOS only
    before the first message).

    Ids (``official_chunk_offset=True``): exactly ``mm_utils.tokenizer_image_token``:
    split the string on ``<image>``, encode each chunk with ``tokenizer(chunk)`` (default
    ``add_special_tokens=True``), and if the first chunk starts with BOS keep one BOS
    and drop the *first token of every chunk* before splicing ``-200`` between chunks.
    That rule assumes the tokenizer prepends BOS to each chunk (LLaMA-1/2); LLaDA's
    does not (``add_bos_token: false``; the BOS comes from the chat template), so BOS
    appears once and the first token of the text after ``<image>``, the ``"\\n"``, is
    dropped: ``[..., "\\n\\n", -200, question..., <|eot_id|>, ...]``.  This is what the
    official eval feeds the model.  ``official_chunk_offset=False`` instead splices the
    halves encoded with ``add_special_tokens=False`` (keeps the ``"\\n"``; this is the
    training layout of ``preprocess_llada``, where ``<image>`` is a special token).
    """
    if think is None:
        suffix = ""
    elif think in THINK_SUFFIXES:
        suffix = THINK_SUFFIXES[think]
    else:
        raise ValueError(f"think must be None, 'no_think' or 'think', got {think!r}")
    content = question + suffix
    if image:
        content = DEFAULT_IMAGE_TOKEN + "\n" + content
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": content})

    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        prompt = render_llada_chat(messages, bos_token=tokenizer.bos_token)

    chunks_text = prompt.split(DEFAULT_IMAGE_TOKEN)
    if not official_chunk_offset:
        ids: list[int] = []
        for i, chunk in enumerate(chunks_text):
            if i:
                ids.append(IMAGE_TOKEN_INDEX)
            ids.extend(tokenizer(chunk, add_special_tokens=False).input_ids)
        return ids

    chunks = [list(tokenizer(chunk).input_ids) for chunk in chunks_text]
    ids = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i:
            # the separator is [-200] * (offset + 1), and it too loses `offset` leading items
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk[offset:])
    return ids
