"""SentencePiece-style GGUF vocabularies (Llama 2, Mistral: ``tokenizer.ggml.model == "llama"``).

No real SentencePiece vocabulary ships with the installed packages, so the fixture makes one the way a
Llama 2 file lays it out: <unk>, <s>, </s>, the 256 byte-fallback tokens <0x00>..<0xFF>, then BPE pieces
("\u2581" for spaces) best first with scores -rank, then single characters. The pieces come from a BPE
trained by ``tokenizers`` on a small English/French corpus, so merges interact as in a real vocabulary;
text outside it (CJK, emoji) exercises the byte fallback. The reference is transformers' own GGUF tokenizer
(``AutoTokenizer.from_pretrained(dir, gguf_file=...)``) on the same file.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from kvserve.model import load_model
from tests.model.test_loader import _tiny_hf_weights, _to_gguf

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! Hello there; hello again.",
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n\tprint(i * 2)",
    "Le café est très bon, naïve élève à Noël.",
    "1234567890 and 3.14159 are numbers, 42 is the answer.",
    "She sells sea shells by the sea shore, the shells she sells are surely sea shells.",
    "A tokenizer splits text into tokens; tokens are pieces of words.",
]
TEXTS = [
    "Hello, world!",
    "hello  there   spaced",
    " leading space and trailing space ",
    "line one\nline two\n\nline four\ttabbed",
    "def add(a, b):\n    return a + b\n",
    "naïve café, élève à Noël",
    "日本語のテキスト",
    "emoji 😀🚀 and ✓ marks",
    "zebra xylophone quixotic",  # pieces outside the training corpus
    "text with </s> inside",
    "",
]


def _spm_vocab() -> tuple[list[str], list[float], list[int]]:
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, show_progress=False)
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(prepend_scheme="always")
    bpe.train_from_iterator(CORPUS * 4, trainer)
    model = json.loads(bpe.to_str())["model"]
    pieces = ["".join(m.split(" ") if isinstance(m, str) else m) for m in model["merges"]]
    chars = sorted(set(model["vocab"]) - set(pieces))
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces, *chars]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces) + len(chars))]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(pieces) + len(chars))
    return tokens, scores, types


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory):
    """A tiny Llama GGUF (random weights, vocabulary as above) in a folder of its own."""
    tokens, scores, types = _spm_vocab()
    path = tmp_path_factory.mktemp("spm") / "tiny-spm.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in [("block_count", 1), ("context_length", 128), ("embedding_length", 16),
                       ("feed_forward_length", 32), ("head_count", 4), ("head_count_kv", 2),
                       ("layer_norm_rms_eps", 1e-6), ("rope_freq_base", 10000.0)]:  # fmt: skip
        getattr(writer, f"add_{add}")(value)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for name, value in _to_gguf(_tiny_hf_weights(len(tokens), bias=False), True, 4, 2).items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def ours(spm_gguf):
    return load_model(str(spm_gguf))


@pytest.fixture(scope="module")
def reference(spm_gguf):
    return transformers.AutoTokenizer.from_pretrained(str(spm_gguf.parent), gguf_file=spm_gguf.name)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_equal_transformers(ours, reference, text):
    tok = ours.tokenizer
    ids = tok.encode(text)
    assert ids == reference.encode(text), [reference.convert_ids_to_tokens(i) for i in reference.encode(text)]
    assert tok.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids, skip_special_tokens=False) == reference.decode(ids)


def test_spm_vocabulary_shape(ours):
    tok = ours.tokenizer
    assert tok.bos_token_id == 1 and tok.eos_token_ids == (2,)
    assert tok.encode("hi")[0] == 1  # llama.cpp and transformers add BOS when the file does not say
    ids = tok.encode("😀", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids)[-4:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]  # byte fallback
    assert b"".join(tok.token_bytes(i) for i in ids[-4:]) == "😀".encode()
    assert tok.decode(tok.encode("naïve 日本 😀 ok")) == "naïve 日本 😀 ok"
    assert "\u2581the" in tok.backend.get_vocab()


def test_unsupported_tokenizer_model_is_named(tmp_path):
    from kvserve.model.tokenizer import Tokenizer

    path = tmp_path / "bert-vocab.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("bert")
    writer.add_token_list(["[PAD]", "[UNK]", "hello"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"unsupported GGUF tokenizer model 'bert'.*'gpt2'.*'llama'"):
        Tokenizer.from_gguf(gguf.GGUFReader(str(path)))
