"""CLIP's byte-level BPE tokenizer (the text side of Stable Diffusion 1.x), built on `tokenizers`.

Pipeline, as in CLIP's `simple_tokenizer.py` and the `tokenizers` port that transformers ships:
NFC -> whitespace runs to one space -> lower-case -> CLIP's split regex -> GPT-2 byte-to-unicode
mapping -> BPE whose word-final symbols carry `</w>`. A prompt becomes
`<|startoftext|> ids[:75] <|endoftext|>` padded with `<|endoftext|>` to 77 ids (SD1 pads with eos).

References: Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision" (github.com/openai/CLIP, clip/simple_tokenizer.py); Sennrich et al. 2016, "Neural
Machine Translation of Rare Words with Subword Units" (BPE); GPT-2's `bytes_to_unicode`.
"""
import gzip
import json
from pathlib import Path
from typing import NoReturn

import torch
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers

from .errors import InputError
from .paths import kind, read_bytes, shown

TOKENIZER_HINT = ("get CLIP ViT-L/14's vocab.json and merges.txt from the `tokenizer/` folder of a Stable "
                  "Diffusion 1.x diffusers repository on Hugging Face (CompVis/stable-diffusion-v1-4, "
                  "stable-diffusion-v1-5/stable-diffusion-v1-5) or the top of openai/clip-vit-large-patch14, "
                  "into weights/tokenizer/ or a folder given with --tokenizer")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenizer: contractions, letter runs, single digits, runs of other non-space characters.
# CLIP's regex also lists <|startoftext|> and <|endoftext|>; here they are added tokens, matched before
# lower-casing, so an upper-case "<|ENDOFTEXT|>" is ordinary text (as in transformers, unlike CLIP).
SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+"""
CLIP_MERGES = 49152 - 256 - 2  # CLIP (and every SD1 merges.txt) uses this many merges, no more
MAX_FILE = 64 * 2 ** 20  # bytes in vocab.json, merges.txt or tokenizer.json (CLIP's are 2-4 MB)
MAX_ID = 2 ** 24         # token ids; CLIP's largest is 49407


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table; vocab ids 0..255 follow its value order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]  # control/space bytes get code points 256, 257, ...
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def _fail(path, problem: str, fix: str = TOKENIZER_HINT) -> NoReturn:
    raise InputError(" ".join(f"{shown(path)}: {problem}; fix: {fix}".split()))  # one line, whatever the path holds


def _read_text(path: Path) -> str:
    try:
        return read_bytes(path, MAX_FILE, "a tokenizer file").decode("utf-8")
    except UnicodeDecodeError as e:
        _fail(path, f"is not UTF-8 text ({e.reason} at byte {e.start})")


def check_text(text, what: str) -> None:
    """A prompt must be a str that is valid Unicode: a command-line argument in another encoding than the
    terminal's arrives with lone surrogates (Python's surrogateescape), which no tokenizer can encode."""
    if not isinstance(text, str):
        raise InputError(f"{what} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{what} is not valid UTF-8 text (undecodable byte at character {e.start}); "
                         "pass it in UTF-8 (check the terminal's or the file's encoding)") from None


def _check_specials(path, vocab: dict) -> None:
    for token in (BOS, EOS):
        if token not in vocab:
            _fail(path, f"has no {token} token", "use CLIP's tokenizer files, whose vocabulary ends with "
                  "<|startoftext|> and <|endoftext|>; " + TOKENIZER_HINT)


class CLIPTokenizer:
    """Prompts -> (batch, 77) token ids for SD1's CLIP text encoder; wraps a `tokenizers.Tokenizer`."""
    max_length = 77

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.bos_id, self.eos_id = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
        self.vocab_size = tokenizer.get_vocab_size()
        # The largest id it can produce, which must index the text encoder's table: ids need not be dense,
        # so counting entries (vocab_size) says nothing about it.
        self.max_id = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)

    @classmethod
    def from_dir(cls, path) -> "CLIPTokenizer":
        """Load `vocab.json` + `merges.txt` (diffusers' `tokenizer/` folder) or else a `tokenizer.json`."""
        path = Path(path)
        vocab_file, merges_file, json_file = path / "vocab.json", path / "merges.txt", path / "tokenizer.json"
        if kind(path, "tokenizer folder") != "dir":
            _fail(path, "tokenizer folder not found")
        found = {f: kind(f, "tokenizer file") for f in (vocab_file, merges_file, json_file)}
        if "file" in (found[vocab_file], found[merges_file]) or found[json_file] != "file":
            tokenizer = cls._from_vocab_merges(vocab_file, merges_file)
        else:
            text = _read_text(json_file)  # read here, not by path in Rust: any file name works
            try:
                tokenizer = Tokenizer.from_str(text)
            except Exception as e:
                _fail(json_file, f"not a valid `tokenizers` file ({str(e)[:200]})")
            tokenizer.no_truncation()  # a saved file may carry its own settings; __call__ does both itself
            tokenizer.no_padding()
            _check_specials(json_file, tokenizer.get_vocab(with_added_tokens=True))
        return cls(tokenizer)

    @staticmethod
    def _from_vocab_merges(vocab_file: Path, merges_file: Path) -> Tokenizer:
        for f in (vocab_file, merges_file):
            if kind(f, "tokenizer file") != "file":
                _fail(f, "missing (a CLIP tokenizer needs vocab.json and merges.txt, or tokenizer.json)")
        try:
            vocab = json.loads(_read_text(vocab_file))
        except (json.JSONDecodeError, RecursionError) as e:
            _fail(vocab_file, f"unreadable or not JSON ({e})")
        if not isinstance(vocab, dict) or not all(type(i) is int and 0 <= i < MAX_ID for i in vocab.values()):
            _fail(vocab_file, f"is not a JSON object mapping tokens to integer ids in 0..{MAX_ID - 1}")
        lines = _read_text(merges_file).splitlines()
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        merges = [tuple(line.split()) for line in lines[:CLIP_MERGES] if line.strip()]
        bad = next((i for i, m in enumerate(merges) if len(m) != 2), None)
        if bad is not None:
            _fail(merges_file, f"malformed merge {' '.join(merges[bad])!r} (expected two space-separated symbols)")
        _check_specials(vocab_file, vocab)
        try:  # out-of-vocabulary characters map to <|endoftext|>, as in CLIP
            bpe = models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", unk_token=EOS, fuse_unk=False)
        except Exception as e:
            _fail(merges_file, f"does not match vocab.json ({e})")
        tokenizer = Tokenizer(bpe)
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip(), normalizers.Lowercase()])
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),  # keep matches, drop gaps
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        # Literal special tokens in a prompt become their ids, as in CLIP's own tokenizer.
        tokenizer.add_special_tokens([AddedToken(BOS, special=True), AddedToken(EOS, special=True)])
        return tokenizer

    def __call__(self, texts: "str | list[str]") -> torch.LongTensor:
        """Token ids of shape (len(texts), 77): bos, at most 75 BPE ids, eos, eos padding."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        for text in texts:
            check_text(text, "prompt")
        rows = []
        for enc in self.tokenizer.encode_batch(texts, add_special_tokens=False):
            ids = [self.bos_id, *enc.ids[: self.max_length - 2], self.eos_id]
            rows.append(ids + [self.eos_id] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.max_length)


def write_vocab(out_dir, merges: list[tuple[str, str]]) -> None:
    """Write CLIP's layout: 256 byte symbols, the same with `</w>`, one token per merge, bos, eos."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False),
                                        encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                        encoding="utf-8")


def vocab_from_clip_bpe(gz_path, out_dir) -> None:
    """Turn CLIP's original `bpe_simple_vocab_16e6.txt.gz` into vocab.json + merges.txt (49,408 tokens)."""
    try:
        with gzip.open(gz_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError, EOFError) as e:
        _fail(gz_path, f"unreadable gzip text ({e})", "download clip/bpe_simple_vocab_16e6.txt.gz from "
              "github.com/openai/CLIP, or " + TOKENIZER_HINT)
    write_vocab(out_dir, [tuple(line.split()) for line in lines[1:CLIP_MERGES + 1]])  # line 0 is a header
