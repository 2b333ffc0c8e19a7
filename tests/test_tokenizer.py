"""Tokenizers: the char tokenizer's ids and round trip, a locally built Hugging Face tokenizer.json
behind the same interface, and `load_tokenizer`'s dispatch."""

import json

import pytest

from moe_jax.data.tokenizer import (
    DEFAULT_ALPHABET,
    SPECIAL_TOKENS,
    UNKNOWN_ID_TEXT,
    CharTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
)

COMPLETIONS = [
    "<think> 12+34 = 46\n46*2 = 92 </think> <answer> 92 </answer>",
    "<think>(7-3)/2 = 2</think><answer>2</answer>",
    "Using the numbers [3, 5, 8], create an equation that equals 13.\n",
    "<answer><think></answer></think>  <<answer>>  </ answer> <answer",
    "<eos><pad><bos> ~!@#$%^&*()_+{}|:\"<>?`-=[]\\;',./",
]


# --- CharTokenizer ---------------------------------------------------------------------------


def test_char_default_vocab_fits_tiny_moe():
    tok = CharTokenizer()
    assert tok.vocab_size == len(SPECIAL_TOKENS) + len(DEFAULT_ALPHABET) == 7 + 96
    assert tok.vocab_size <= 256
    assert isinstance(tok, Tokenizer)


@pytest.mark.parametrize("text", COMPLETIONS + ["", DEFAULT_ALPHABET])
def test_char_round_trip(text):
    tok = CharTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_char_special_ids_and_single_token_tags():
    tok = CharTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert [tok.token_id(t) for t in SPECIAL_TOKENS] == list(range(7))
    assert tok.encode("<think>x</think><answer>5</answer>") == [3, tok.token_id("x"), 4, 5, tok.token_id("5"), 6]
    # Characters are ids 7.. in alphabet order; "<" alone (not a tag) is an ordinary character.
    assert tok.encode(" <a") == [7, 7 + DEFAULT_ALPHABET.index("<"), 7 + DEFAULT_ALPHABET.index("a")]


def test_char_bos_eos_and_skip_special():
    tok = CharTokenizer()
    body = tok.encode("<answer>3</answer>")
    ids = tok.encode("<answer>3</answer>", add_bos=True, add_eos=True)
    assert ids == [tok.bos_id] + body + [tok.eos_id]
    padded = ids + [tok.pad_id] * 3
    assert tok.decode(padded) == "<bos><answer>3</answer><eos><pad><pad><pad>"
    # Tags are kept: the reward parses them. Decoding does not stop at eos.
    assert tok.decode(padded + body, skip_special=True) == "<answer>3</answer><answer>3</answer>"


def test_char_unknown_character_and_token():
    tok = CharTokenizer()
    with pytest.raises(ValueError, match=r"'é' at position 7"):
        tok.encode("<think>é")  # the tag is one token but positions count characters
    with pytest.raises(ValueError, match=r"'\\t' at position 1"):
        tok.encode("1\t2")
    with pytest.raises(KeyError, match="<tool>"):
        tok.token_id("<tool>")


def test_char_out_of_vocab_ids_decode_to_replacement():
    tok = CharTokenizer()
    assert tok.decode([tok.token_id("7"), tok.vocab_size, 255, -1]) == "7" + UNKNOWN_ID_TEXT * 3


def test_char_custom_alphabet():
    tok = CharTokenizer("0123456789+-*/=() \n")
    assert tok.vocab_size == 7 + 19
    assert tok.decode(tok.encode("<answer>(1+2)*3</answer>")) == "<answer>(1+2)*3</answer>"
    with pytest.raises(ValueError, match="'x' at position 1"):
        tok.encode("2x3")
    with pytest.raises(ValueError, match="repeated"):
        CharTokenizer("abca")


# --- HFTokenizer -----------------------------------------------------------------------------

TAGS = ["<think>", "</think>", "<answer>", "</answer>"]


def _build_tokenizer_json(directory, special_tokens, wrap_with=None):
    """Train a tiny byte-level BPE on task-like strings and save it as directory/tokenizer.json;
    `wrap_with=(bos, eos)` adds a post-processor that frames every encoding with them."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(COMPLETIONS * 4, trainer)
    if wrap_with is not None:
        bos, eos = wrap_with
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}", special_tokens=[(t, tok.token_to_id(t)) for t in (bos, eos)])
    path = directory / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture
def hf_path(tmp_path):
    return _build_tokenizer_json(tmp_path, ["<|endoftext|>"] + TAGS)


def test_hf_load_by_file_and_directory(hf_path):
    by_file, by_dir = load_tokenizer(str(hf_path)), load_tokenizer(str(hf_path.parent))
    assert isinstance(by_file, HFTokenizer) and isinstance(by_dir, HFTokenizer)
    assert isinstance(by_file, Tokenizer)
    assert by_file.vocab_size == by_dir.vocab_size == len(json.loads(hf_path.read_text())["model"]["vocab"])
    text = COMPLETIONS[0]
    assert by_file.encode(text) == by_dir.encode(text)


@pytest.mark.parametrize("text", COMPLETIONS[:3])
def test_hf_round_trip(hf_path, text):
    tok = load_tokenizer(str(hf_path))
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_hf_tags_are_single_tokens(hf_path):
    tok = load_tokenizer(str(hf_path))
    tag_ids = [tok.token_id(t) for t in TAGS]
    assert len(set(tag_ids)) == 4
    for tag, tag_id in zip(TAGS, tag_ids):
        assert tok.encode(tag) == [tag_id]
    ids = tok.encode("<think>1</think><answer>1</answer>")
    assert [i for i in ids if i in tag_ids] == tag_ids
    with pytest.raises(KeyError, match="<tool>"):
        tok.token_id("<tool>")


def test_hf_eos_pad_bos_fall_back_to_endoftext(hf_path):
    tok = load_tokenizer(str(hf_path))
    eos = tok.token_id("<|endoftext|>")
    assert tok.eos_id == tok.pad_id == tok.bos_id == eos
    ids = tok.encode("<answer>92</answer>", add_bos=True, add_eos=True)
    assert ids[0] == ids[-1] == eos
    assert tok.decode(ids + [tok.pad_id], skip_special=True) == "<answer>92</answer>"
    assert tok.decode(ids) == "<|endoftext|><answer>92</answer><|endoftext|>"


def test_hf_lookup_order_prefers_explicit_names(tmp_path):
    path = _build_tokenizer_json(tmp_path, ["<|endoftext|>", "<pad>", "<s>", "</s>"] + TAGS,
                                 wrap_with=("<s>", "</s>"))
    tok = HFTokenizer(path)
    assert tok.eos_id == tok.token_id("</s>")  # "</s>" comes before "<|endoftext|>"
    assert tok.bos_id == tok.token_id("<s>")
    assert tok.pad_id == tok.token_id("<pad>")
    assert len({tok.eos_id, tok.bos_id, tok.pad_id}) == 3
    # The file's post-processor would frame every encoding; only add_bos/add_eos may do that.
    body = tok.encode("12+34")
    assert tok.bos_id not in body and tok.eos_id not in body
    assert tok.encode("12+34", add_bos=True, add_eos=True) == [tok.bos_id] + body + [tok.eos_id]


def test_hf_missing_eos_raises(tmp_path):
    path = _build_tokenizer_json(tmp_path, ["<pad>"] + TAGS)
    with pytest.raises(ValueError, match="no end-of-sequence token.*<\\|endoftext\\|>"):
        load_tokenizer(str(path))


def test_hf_out_of_vocab_ids_decode_to_replacement(hf_path):
    tok = load_tokenizer(str(hf_path))
    a, b = tok.encode("12"), tok.encode("34")
    assert tok.decode(a + [tok.vocab_size + 7] + b + [-1]) == "12" + UNKNOWN_ID_TEXT + "34" + UNKNOWN_ID_TEXT


# --- load_tokenizer --------------------------------------------------------------------------


def test_load_char():
    tok = load_tokenizer("char")
    assert isinstance(tok, CharTokenizer) and tok.vocab_size == CharTokenizer().vocab_size


def test_load_unknown_names_options(tmp_path):
    for bad in ("gpt2", str(tmp_path / "missing.json"), str(tmp_path)):  # tmp_path has no tokenizer.json
        with pytest.raises(ValueError, match="'char'.*tokenizer.json"):
            load_tokenizer(bad)


def test_load_invalid_file(tmp_path):
    pytest.importorskip("tokenizers")
    path = tmp_path / "tokenizer.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="could not load"):
        load_tokenizer(str(path))
