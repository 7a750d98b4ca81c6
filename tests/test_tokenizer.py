"""CLIP tokenizer: parity with transformers and with a plain-Python CLIP BPE, file layout, errors."""
import json
import unicodedata
from pathlib import Path

import pytest
import regex
import torch
import transformers

from magicfusion.errors import InputError
from magicfusion.tokenizer import CLIPTokenizer, bytes_to_unicode, vocab_from_clip_bpe
from tools.random_weights import write_tiny_vocab

CLIP_GZ = Path(__file__).resolve().parents[2] / "shared" / "clip" / "bpe_simple_vocab_16e6.txt.gz"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

PROMPTS = [
    "a photo of a cat",
    "The CAT and the Dog, PAINTING with Art!",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\n  and   runs",
    "punctuation!!! ?? ... (brackets) [x] {y} #tag @user a-b_c ~~ $5.99, 100%",
    "digits 1234567890 and 3.14159 x2",
    "it's they're we've I'm you'll he'd don't 'quoted' rock'n'roll",
    "café naïve Ñandú façade Ærø straße",
    "e\u0301 composed by NFC, \u00a0no-break\u2003em-space",
    "emoji 🙂🐱‍👤 🎨 and CJK 東京 の 猫, 한국어",
    "",
    " ",
    "a<|endoftext|>b <|startoftext|> the",
    "the " * 100,
    "painting of the sun " * 30 + "tail words never seen",
]
# CLIP's own tokenizer lower-cases before matching special tokens; transformers (and ours) match them
# first, so upper-case spellings are plain text there. Only the transformers oracle checks this one.
HF_ONLY = ["an <|ENDOFTEXT|> and <|StartOfText|>"]


def hf_ids(folder, texts) -> torch.Tensor:
    """The oracle: transformers' CLIP tokenizer (fast; in transformers >= 5 the slow name is the same class)."""
    out = []
    for cls in {transformers.CLIPTokenizer, transformers.CLIPTokenizerFast}:
        tok = cls.from_pretrained(str(folder))
        out.append(torch.tensor(tok(texts, padding="max_length", max_length=77, truncation=True).input_ids))
    assert all(torch.equal(o, out[0]) for o in out)
    return out[0]


# CLIP's pattern verbatim (with the special tokens), run by the `regex` package instead of `tokenizers`.
CLIP_SPLIT = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|"""
                           r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")


def reference_ids(folder, texts) -> torch.Tensor:
    """CLIP's simple_tokenizer algorithm in plain Python (no `tokenizers`), minus ftfy/html un-escaping."""
    vocab = json.loads((Path(folder) / "vocab.json").read_text(encoding="utf-8"))
    lines = (Path(folder) / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    ranks = {tuple(line.split()): r for r, line in enumerate(lines)}
    byte_char = bytes_to_unicode()

    def bpe(word: str) -> list[str]:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            best = min(zip(parts, parts[1:]), key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(parts):  # merge every occurrence of the best pair, left to right
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    rows = []
    for text in texts:
        text = " ".join(unicodedata.normalize("NFC", text).split()).lower()
        ids = []
        for piece in CLIP_SPLIT.findall(text):
            if piece in (BOS, EOS):
                ids.append(vocab[piece])
                continue
            word = "".join(byte_char[b] for b in piece.encode("utf-8"))
            ids += [vocab.get(t, vocab[EOS]) for t in bpe(word)]
        ids = [vocab[BOS]] + ids[:75] + [vocab[EOS]]
        rows.append(ids + [vocab[EOS]] * (77 - len(ids)))
    return torch.tensor(rows)


def write_hand_vocab(folder: Path) -> None:
    """A vocab written independently of the module: letters only, special tokens first, unknowns -> eos."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    merges = [("h", "e</w>"), ("t", "he</w>"), ("c", "a"), ("ca", "t</w>"), ("i", "n"), ("in", "g</w>"),
              ("'", "s</w>"), ("a", "r"), ("ar", "t</w>")]
    tokens = [BOS, EOS, *letters, *(c + "</w>" for c in letters), "'", "!", "!</w>", ",</w>", "1</w>",
              *("".join(m) for m in merges)]
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")


@pytest.fixture
def tiny_dir(tmp_path):
    write_tiny_vocab(tmp_path / "tiny")
    return tmp_path / "tiny"


@pytest.fixture
def hand_dir(tmp_path):
    write_hand_vocab(tmp_path / "hand")
    return tmp_path / "hand"


def check_parity(folder) -> CLIPTokenizer:
    tok = CLIPTokenizer.from_dir(folder)
    ids = tok(PROMPTS + HF_ONLY)
    assert ids.dtype == torch.long and ids.shape == (len(PROMPTS) + 1, 77)
    assert torch.equal(ids, hf_ids(folder, PROMPTS + HF_ONLY))
    assert torch.equal(ids[: len(PROMPTS)], reference_ids(folder, PROMPTS))
    return tok


@pytest.mark.parametrize("vocab", ["tiny", "hand"])
def test_parity_small_vocabs(vocab, tiny_dir, hand_dir):
    folder = tiny_dir if vocab == "tiny" else hand_dir
    tok = check_parity(folder)
    table = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (table[BOS], table[EOS], len(table))
    # the tiny vocab's merges must actually fire, else the test above would compare bytes only
    assert tok("the")[0, 1].item() == table["the</w>"]


def test_call_shapes_and_truncation(tiny_dir):
    tok = CLIPTokenizer.from_dir(tiny_dir)
    one = tok("a cat")
    assert one.shape == (1, 77) and torch.equal(one, tok(["a cat"]))
    long_text = "painting of the sun " * 30
    full = tok.tokenizer.encode(long_text, add_special_tokens=False).ids
    assert len(full) > 75
    row = tok(long_text)[0].tolist()
    assert row == [tok.bos_id, *full[:75], tok.eos_id]
    short = tok.tokenizer.encode("a cat", add_special_tokens=False).ids
    assert one[0].tolist() == [tok.bos_id, *short] + [tok.eos_id] * (76 - len(short))


def test_tokenizer_json_and_preference(tiny_dir, hand_dir, tmp_path):
    only_json = tmp_path / "json"
    only_json.mkdir()
    saved = only_json / "tokenizer.json"
    transformers.CLIPTokenizerFast.from_pretrained(str(tiny_dir)).backend_tokenizer.save(str(saved))
    from_json, from_files = CLIPTokenizer.from_dir(only_json), CLIPTokenizer.from_dir(tiny_dir)
    assert torch.equal(from_json(PROMPTS), from_files(PROMPTS))
    assert (from_json.bos_id, from_json.eos_id, from_json.vocab_size) == (
        from_files.bos_id, from_files.eos_id, from_files.vocab_size)
    # with both layouts present, vocab.json + merges.txt win (transformers would pick tokenizer.json)
    (hand_dir / "tokenizer.json").write_bytes(saved.read_bytes())
    assert torch.equal(CLIPTokenizer.from_dir(hand_dir)(PROMPTS), reference_ids(hand_dir, PROMPTS))


def test_write_tiny_vocab_layout(tmp_path):
    write_tiny_vocab(tmp_path / "a")
    write_tiny_vocab(tmp_path / "b")
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    vocab = json.loads((tmp_path / "a" / "vocab.json").read_text(encoding="utf-8"))
    lines = (tmp_path / "a" / "merges.txt").read_text(encoding="utf-8").splitlines()
    tokens = sorted(vocab, key=vocab.get)
    symbols = list(bytes_to_unicode().values())
    assert lines[0] == "#version: 0.2" and 20 <= len(lines) - 1
    assert sorted(vocab.values()) == list(range(len(vocab))) and len(vocab) < 1000
    assert tokens[:512] == symbols + [s + "</w>" for s in symbols]
    assert tokens[512:-2] == [line.replace(" ", "") for line in lines[1:]]
    assert tokens[-2:] == [BOS, EOS]


def test_bytes_to_unicode_matches_gpt2():
    from transformers.convert_slow_tokenizer import bytes_to_unicode as hf_table
    assert list(bytes_to_unicode().items()) == list(hf_table().items())


def test_real_clip_vocab(tmp_path):
    if not CLIP_GZ.is_file():
        pytest.skip(f"CLIP's merges file {CLIP_GZ} is absent")
    vocab_from_clip_bpe(CLIP_GZ, tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
    tok = check_parity(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (49406, 49407, 49408)


def assert_input_error(folder, *needles):
    with pytest.raises(InputError) as info:
        CLIPTokenizer.from_dir(folder)
    msg = str(info.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg


def test_errors(tiny_dir, tmp_path):
    assert_input_error(tmp_path / "nowhere", "nowhere", "not found", "stable-diffusion-v1-5/stable-diffusion-v1-5", "vocab.json")
    (tmp_path / "empty").mkdir()
    assert_input_error(tmp_path / "empty", "vocab.json", "missing", "openai/clip-vit-large-patch14")
    vocab_text = (tiny_dir / "vocab.json").read_text(encoding="utf-8")
    merges_text = (tiny_dir / "merges.txt").read_text(encoding="utf-8")

    (tiny_dir / "merges.txt").unlink()
    assert_input_error(tiny_dir, "merges.txt", "missing")
    (tiny_dir / "merges.txt").write_text(merges_text + "only-one-symbol\n", encoding="utf-8")
    assert_input_error(tiny_dir, "merges.txt", "malformed", "only-one-symbol")
    (tiny_dir / "merges.txt").write_text(merges_text + "q zz\n", encoding="utf-8")
    assert_input_error(tiny_dir, "merges.txt", "does not match vocab.json")
    (tiny_dir / "merges.txt").write_text(merges_text, encoding="utf-8")

    (tiny_dir / "vocab.json").write_text(vocab_text[:-10] + "\n\n", encoding="utf-8")
    assert_input_error(tiny_dir, "vocab.json", "not JSON")
    (tiny_dir / "vocab.json").write_text(json.dumps(["a", "b"]), encoding="utf-8")
    assert_input_error(tiny_dir, "vocab.json", "integer ids")
    vocab = json.loads(vocab_text)
    del vocab[BOS]
    (tiny_dir / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    assert_input_error(tiny_dir, "vocab.json", BOS)

    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "tokenizer.json").write_text("{not json", encoding="utf-8")
    assert_input_error(tmp_path / "json", "tokenizer.json", "not a valid")
    (tmp_path / "gz").write_bytes(b"not gzip")
    with pytest.raises(InputError) as info:
        vocab_from_clip_bpe(tmp_path / "gz", tmp_path / "out")
    assert "\n" not in str(info.value) and "gz" in str(info.value)
