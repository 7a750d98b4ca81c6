"""Prompt -> text embeddings, written the way Stable Diffusion users write prompts (AUTOMATIC1111's syntax).

* Emphasis: `(words)` multiplies their weight by 1.1, `((words))` by 1.21, `[words]` divides it by 1.1,
  `(words:1.3)` sets a factor; `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are literal characters; unclosed brackets
  close at the end. The weights multiply the encoder's output vectors of those tokens, and each 77-token
  chunk is then scaled back to its unweighted mean (AUTOMATIC1111's "Original" emphasis).
* Length: the tokens are cut into chunks of 75, each encoded on its own as `bos, 75 ids, eos` (eos-padded) and
  the chunks concatenated, so the UNet attends to 77 * chunks context vectors. `BREAK` (upper case) ends a
  chunk early; a chunk that fills up within 20 tokens after a comma moves those tokens to the next chunk.
  The negative prompt is padded with empty chunks (or the prompt is) to the same number of chunks.
* Textual inversion: an embedding's token (written in the prompt as a word) stands for its vectors, which are
  extra rows of the text encoder's token table (see `add_embeddings`); a token of n vectors takes n positions.

A prompt of at most 75 tokens without any of this syntax gives exactly the plain CLIP encoding.
Reference: AUTOMATIC1111/stable-diffusion-webui `modules/prompt_parser.py` and `sd_hijack_clip.py` (behaviour);
Gal et al. 2022, "An Image is Worth One Word" (arXiv 2208.01618) for textual inversion.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import InputError
from .paths import kind, read_bytes, shown
from .weights_io import read_tensors

EMPHASIS = 1.1         # `(x)` multiplies, `[x]` divides by this
CHUNK = 75             # tokens per chunk between its bos and eos
COMMA_BACKTRACK = 20   # AUTOMATIC1111's default "prompt word wrap length limit"
BREAK = object()       # marks a forced chunk end in the parsed prompt
TOKEN_TABLE = "text_model.embeddings.token_embedding.weight"
MAX_EMBEDDING_BYTES = 64 << 20  # embeddings are a few vectors; a file this large is something else
# one lexical item per match: an escape, a lone backslash, a bracket, a `:number)` closer, plain text, a colon
_ITEM = re.compile(r"\\[\\()\[\]]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_LORA_TAG = re.compile(r"<lora:([^:>]+)(?::[^>]*)?>")


def parse_weights(text: str) -> list:
    """A prompt -> [(text, weight), ...] with BREAK entries as (BREAK, None); neighbours of equal weight merged."""
    out, round_open, square_open = [], [], []

    def scale_from(start: int, factor: float) -> None:
        for j in range(start, len(out)):
            if out[j][1] is not None:  # a BREAK inside brackets still breaks
                out[j][1] *= factor

    for m in _ITEM.finditer(text):
        item = m[0]
        if item.startswith("\\"):
            out.append([item[1:], 1.0])
        elif item == "(":
            round_open.append(len(out))
        elif item == "[":
            square_open.append(len(out))
        elif m[1] is not None and round_open:
            try:
                factor = float(m[1])
            except ValueError:
                raise InputError(f"prompt weight {m[1]!r} in {item!r} is not a number; write e.g. (word:1.3)") from None
            scale_from(round_open.pop(), factor)
        elif item == ")" and round_open:
            scale_from(round_open.pop(), EMPHASIS)
        elif item == "]" and square_open:
            scale_from(square_open.pop(), 1 / EMPHASIS)
        else:  # text, and brackets or colons that close nothing
            for i, part in enumerate(_BREAK.split(item)):
                if i:
                    out.append([BREAK, None])
                out.append([part, 1.0])
    for start in round_open:
        scale_from(start, EMPHASIS)
    for start in square_open:
        scale_from(start, 1 / EMPHASIS)
    merged = []
    for text_, weight in out or [["", 1.0]]:
        if merged and weight is not None and merged[-1][1] == weight:
            merged[-1][0] += text_
        else:
            merged.append([text_, weight])
    return [tuple(x) for x in merged]


@dataclass
class Chunks:
    """A prompt's token ids and weights, CHUNK + 2 per chunk (bos and eos included)."""
    ids: list = field(default_factory=list)
    weights: list = field(default_factory=list)


def _units(model, parsed: list) -> list:
    """Per parsed fragment (None for a BREAK) its units: a token id, or the rows of an embedding's vectors.

    An embedding's token is found in the text (ignoring case) before tokenizing, as diffusers finds its added
    tokens, so punctuation next to it (`<cat-toy>,`) does not hide it; the text between is tokenized as usual."""
    tok = model.tokenizer.tokenizer
    names = sorted(model.embeddings, key=len, reverse=True)  # the longest token wins where several match
    finder = re.compile("|".join(map(re.escape, names)), re.IGNORECASE) if names else None
    lowered = {n.lower(): n for n in names}
    pieces = []  # (fragment index, text, the embedding's token or None)
    for i, (text, weight) in enumerate(parsed):
        if weight is None:
            continue
        at = 0
        for m in finder.finditer(text) if finder else ():
            pieces += [(i, text[at:m.start()], None), (i, "", lowered[m[0].lower()])]
            at = m.end()
        pieces.append((i, text[at:], None))
    texts = [text for _, text, token in pieces if token is None]
    encoded = iter(tok.encode_batch(texts, add_special_tokens=False)) if texts else iter(())
    units = [None if w is None else [] for _, w in parsed]
    for i, _, token in pieces:
        if token is None:
            units[i] += next(encoded).ids
        else:
            first, n, _ = model.embeddings[token]
            units[i].append(list(range(first, first + n)))
    return units


def drop_lora_tags(model, text: str) -> str:
    """Remove AUTOMATIC1111's `<lora:name:scale>` tags of LoRAs this model was loaded with (a prompt pasted from an
    infotext carries them); a tag naming a LoRA that is not loaded is refused rather than read as words."""
    def drop(m):
        if m[1] not in {name for name, _, _ in model.loras}:
            raise InputError(f"the prompt names {m[0]} but {model.name} was loaded without a LoRA {m[1]!r}; pass it "
                             f"with --lora {m[1]}.safetensors:SCALE (lora= in load) or remove the tag")
        return ""
    return _LORA_TAG.sub(drop, text)


def chunk_prompt(model, text: str) -> Chunks:
    """Parse, tokenize and cut one prompt into 77-id chunks (with the model's textual-inversion tokens)."""
    tok = model.tokenizer
    parsed = parse_weights(drop_lora_tags(model, text))
    comma = tok.tokenizer.token_to_id(",</w>")
    out = Chunks()
    ids, weights, last_comma = [], [], -1

    def close() -> None:
        nonlocal ids, weights, last_comma
        pad = CHUNK - len(ids)
        out.ids.append([tok.bos_id] + ids + [tok.eos_id] * (pad + 1))
        out.weights.append([1.0] + weights + [1.0] * (pad + 1))
        ids, weights, last_comma = [], [], -1

    for (_, weight), units in zip(parsed, _units(model, parsed)):
        if weight is None:
            close()
            continue
        for unit in units:
            if unit == comma:
                last_comma = len(ids)
            elif len(ids) == CHUNK and last_comma != -1 and CHUNK - last_comma <= COMMA_BACKTRACK:
                moved_ids, moved_w = ids[last_comma + 1:], weights[last_comma + 1:]
                ids, weights = ids[:last_comma + 1], weights[:last_comma + 1]
                close()
                ids, weights = moved_ids, moved_w
            if len(ids) == CHUNK:
                close()
            rows = unit if isinstance(unit, list) else [unit]
            if len(ids) + len(rows) > CHUNK:  # an embedding is never split across chunks
                close()
            ids += rows
            weights += [weight] * len(rows)
    if ids or not out.ids:
        close()
    return out


def emphasize(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(77, width) chunk embedding, (77,) weights -> weighted, then scaled back to the chunk's original mean."""
    zf = z.float()
    weighted = zf * weights[:, None]
    return (weighted * (zf.mean() / weighted.mean())).to(z.dtype)


@torch.no_grad()
def encode_prompt(model, prompt: str, negative_prompt: str, batch: int, clip_skip: int = 0) -> torch.Tensor:
    """-> (2B, 77 * chunks, width) text embeddings, the B unconditional (negative prompt) rows first."""
    layers = model.text_encoder.cfg.layers
    if not isinstance(clip_skip, int) or not 0 <= clip_skip < layers:
        raise InputError(f"clip skip must be an integer in 0..{layers - 1} for {model.name}, got {clip_skip}; "
                         "0 uses the last layer")
    rows = [chunk_prompt(model, negative_prompt), chunk_prompt(model, prompt)]
    n = max(len(r.ids) for r in rows)
    empty = chunk_prompt(model, "")
    for r in rows:  # the shorter side gets empty chunks, so both rows have the same context length
        r.ids += empty.ids * (n - len(r.ids))
        r.weights += empty.weights * (n - len(r.weights))
    ids = torch.tensor([c for r in rows for c in r.ids], dtype=torch.long, device=model.device)
    emb = model.text_encoder(ids, clip_skip=clip_skip)  # (2 * n, 77, width)
    for i, w in enumerate(w for r in rows for w in r.weights):
        if any(x != 1 for x in w):  # an unweighted chunk stays exactly as encoded
            emb[i] = emphasize(emb[i], torch.tensor(w, dtype=torch.float32, device=model.device))
    emb = emb.reshape(2, -1, emb.shape[-1])  # (2 * n, 77, width) -> (2, n * 77, width): each row's chunks in order
    return emb.repeat_interleave(batch, dim=0)


# ------------------------------------------------------------------------------------------ textual inversion

def read_embedding(path, token: str | None = None) -> tuple[str, torch.Tensor]:
    """One textual-inversion file -> (token, (n, width) vectors).

    AUTOMATIC1111 (`string_to_param` in a .pt, `emb_params` in a .safetensors): the token is the file's name,
    as in its web UI. diffusers (`learned_embeds.safetensors`/`.bin`, {token: vectors}): the stored token.
    `token` overrides both. The file is read by `weights_io.read_tensors`, with its checks (a FIFO or a device is
    refused before it is opened, zip entries and sizes are capped, the pickle runs no code).
    """
    path = Path(path)
    found = kind(path, "embedding")
    if found != "file":
        problem = "no such file; check the path" if found == "missing" else "is a folder; pass the file itself"
        raise InputError(f"embedding {shown(path)}: {problem}")
    if path.stat().st_size > MAX_EMBEDDING_BYTES:
        raise InputError(f"embedding {shown(path)}: {path.stat().st_size >> 20} MiB is far too large for a "
                         "textual-inversion embedding (a few KiB); is it a checkpoint or a LoRA? (those go to "
                         "--model / --lora)")
    if path.suffix.lower() not in (".safetensors", ".pt", ".bin", ".ckpt", ".pth"):
        raise InputError(f"embedding {shown(path)}: unsupported type {path.suffix or '(none)'!r}; "
                         "use .safetensors, .pt or .bin")
    try:  # AUTOMATIC1111's .pt nests its vectors as `string_to_param: {"*": tensor}`; diffusers' are flat
        tensors = read_tensors(path, nested=True)
    except InputError as e:
        raise InputError(f"embedding {e}") from None
    if {"clip_l", "clip_g"} & set(tensors):
        raise InputError(f"embedding {path.name}: an SDXL embedding (clip_l/clip_g); use one made for SD 1.x")
    a1111 = [k for k in tensors if k == "emb_params" or k.startswith("string_to_param.")]
    if a1111:
        if len(a1111) != 1:
            raise InputError(f"embedding {path.name}: holds {len(a1111)} terms ({', '.join(a1111[:3])}); "
                             "one is expected")
        vectors, name = tensors[a1111[0]], path.stem
    elif len(tensors) == 1:
        (name, vectors), = tensors.items()
    else:
        keys = ", ".join(list(tensors)[:3])
        raise InputError(f"embedding {path.name}: not a textual-inversion file (keys {keys}); use an AUTOMATIC1111 "
                         "(string_to_param / emb_params) or diffusers (learned_embeds) embedding")
    vectors = vectors[None] if vectors.ndim == 1 else vectors
    if vectors.ndim != 2 or not vectors.is_floating_point() or vectors.shape[0] == 0:
        raise InputError(f"embedding {path.name}: vectors of shape {tuple(vectors.shape)} ({vectors.dtype}); expected "
                         "(n, width) floats")
    token = token or name
    if not token or not token.strip():
        raise InputError(f"embedding {path.name}: empty token; pass the token to use with it")
    return token.strip(), vectors


def add_embeddings(items, clip_sd: dict, name: str) -> dict:
    """Append each embedding's vectors as new rows of the token table in `clip_sd` (in place).

    items: files, or (file, token) pairs. -> {token: (first row, number of vectors, short hash)}.
    """
    if not items or TOKEN_TABLE not in clip_sd:  # a text encoder without its table fails to build, with its own error
        return {}
    table = clip_sd[TOKEN_TABLE]
    rows, found = [table], {}
    first = table.shape[0]
    for item in [items] if isinstance(items, (str, Path)) else items:
        if not (isinstance(item, (str, Path)) or (isinstance(item, (tuple, list)) and len(item) == 2
                                                  and isinstance(item[0], (str, Path)) and isinstance(item[1], str))):
            raise InputError(f"embeddings= takes files or (file, token) pairs, got {item!r}")
        path, token = (item, None) if isinstance(item, (str, Path)) else item
        token, vectors = read_embedding(path, token)
        if vectors.shape[1] != table.shape[1]:
            family = {1024: " (a Stable Diffusion 2.x embedding)", 1280: " (an SDXL embedding)"}
            family = family.get(vectors.shape[1], "")
            raise InputError(f"embedding {Path(path).name}: {vectors.shape[1]}-wide vectors{family}, but {name}'s text "
                             f"encoder is {table.shape[1]} wide; use an embedding made for SD 1.x")
        if token in found:
            raise InputError(f"embedding {Path(path).name}: token {token!r} is already taken by another embedding; "
                             "rename one of the files")
        digest = hashlib.sha256(read_bytes(path, MAX_EMBEDDING_BYTES, "embedding")).hexdigest()[:12]
        found[token] = (first, vectors.shape[0], digest)
        first += vectors.shape[0]
        rows.append(vectors.to(table.dtype))
    if found:
        clip_sd[TOKEN_TABLE] = torch.cat(rows)
    return found
