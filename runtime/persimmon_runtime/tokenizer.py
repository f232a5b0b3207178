"""Persimmon tokenizer: the sentencepiece model itself, with HF LlamaTokenizer's BOS convention.

ids = [BOS] + SentencePieceProcessor.encode(text). Two deliberate choices:
- BOS is added by default (HF's convention); the original adept server did not, so it can be
  turned off (`add_bos=False`).
- Text the user sends never becomes a special token: control pieces are never matched by
  sentencepiece, and a special token that the vocabulary stores as a user-defined piece (which
  sentencepiece *would* match in text) is re-spelled with its byte pieces.
"""

from __future__ import annotations

import json
import os

import sentencepiece as spm

from .errors import PersimmonError
from .regular_files import read_regular

MAX_CONFIG_BYTES = 16 << 20  # tokenizer_config.json: a few KB in practice
MAX_MODEL_BYTES = 1 << 30    # a sentencepiece model: Persimmon's 262144 pieces take a few MB
# what normalizers that shrink text shrink: runs of spaces, a combining accent, a control character
_SHRINK_PROBE = "a    b e\u0301 c\x01d  "

MODEL_FILES = ("tokenizer.model", "adept_vocab.model")
DEFAULT_BOS = "|ENDOFTEXT|"


class TokenizerError(PersimmonError):
    pass


class Tokenizer:
    def __init__(self, model_file: str, add_bos: bool = True, bos_token: str | None = DEFAULT_BOS,
                 eos_token: str | None = None):
        model_file = os.fspath(model_file)
        if not os.path.exists(model_file):  # (one that exists but is no regular file is refused when read)
            raise TokenizerError(f"{model_file}: tokenizer model not found")
        for name, token in (("bos_token", bos_token), ("eos_token", eos_token)):
            if token is not None and not isinstance(token, str):
                raise TokenizerError(f"{model_file}: {name}={token!r} must be a string (a piece of the vocabulary) "
                                     f"or None")
        if not isinstance(add_bos, bool):
            raise TokenizerError(f"{model_file}: add_bos={add_bos!r} must be true or false")
        self.sp, pieces = _load_model(model_file)
        self.model_file = model_file
        self.add_bos = add_bos
        self.bos_id = self._piece_id(bos_token) if bos_token else None
        if self.bos_id is None and self.sp.bos_id() >= 0:
            self.bos_id = self.sp.bos_id()
        self.eos_id = self._piece_id(eos_token) if eos_token else None
        if add_bos and self.bos_id is None:
            raise TokenizerError(f"{model_file}: has no BOS piece ({bos_token!r} or a bos id); "
                                 f"use add_bos=False")
        self.special_ids = {i for i in (self.bos_id, self.eos_id) if i is not None}
        self.special_ids |= {i for i in range(self.vocab_size) if self.sp.is_control(i)}
        # the most characters one token can stand for: a bound on a text's length from a token
        # budget, checked before tokenizing (which costs time and memory in the text's length)
        self.max_piece_chars = max(1, max(map(len, pieces), default=1))
        # a normalizer that shrinks text (nmt_nfkc: runs of spaces, combining marks, control characters)
        # breaks that bound on the raw text; it holds on the normalized text
        self._shrinks = len(self.sp.normalize(_SHRINK_PROBE)) < len(_SHRINK_PROBE)
        # Special tokens that sentencepiece would parse out of plain text, mapped to their bytes.
        self._respell = {i: self._byte_ids(self.sp.id_to_piece(i)) for i in self.special_ids
                         if i in self.sp.encode(self.sp.id_to_piece(i))}

    @classmethod
    def from_dir(cls, directory: str, add_bos: bool | None = None) -> "Tokenizer":
        """Load `tokenizer.model` (or `adept_vocab.model`) and `tokenizer_config.json` if present."""
        directory = os.fspath(directory)
        # exists, not isfile: a FIFO or device there is refused by name when read, not passed over
        model_file = next((os.path.join(directory, name) for name in MODEL_FILES
                           if os.path.exists(os.path.join(directory, name))), None)
        if model_file is None:
            raise TokenizerError(f"{directory}: no tokenizer model ({' or '.join(MODEL_FILES)})")
        config_path = os.path.join(directory, "tokenizer_config.json")
        settings = _read_config(config_path) if os.path.exists(config_path) else {}
        if add_bos is None:
            add_bos = settings.get("add_bos_token", True)
            if not isinstance(add_bos, bool):
                raise TokenizerError(f"{config_path}: add_bos_token={add_bos!r} must be true or false")
        return cls(model_file, add_bos=add_bos,
                   bos_token=_token_text(config_path, "bos_token", settings.get("bos_token", DEFAULT_BOS)),
                   eos_token=_token_text(config_path, "eos_token", settings.get("eos_token")))

    def check_length(self, what: str, text: str, tokens: int, limit: str) -> None:
        """Refuse, before tokenizing, a text longer than `tokens` tokens could spell (each token
        stands for at most max_piece_chars characters); `limit` says where the budget comes from."""
        most = tokens * self.max_piece_chars
        if len(text) <= most:
            return
        shown = f"{len(text):,} characters"
        if self._shrinks:  # one linear pass, far cheaper than tokenizing: what the pieces spell is this
            normalized = len(self.sp.normalize(text))
            if normalized <= most:
                return
            shown += f" ({normalized:,} after the tokenizer's normalization)"
        raise TokenizerError(f"{what} has {shown}, more than {tokens} tokens can hold (at most {most:,} characters "
                             f"with this tokenizer: {limit}); shorten it")

    @property
    def bos_token(self) -> str | None:
        return self.sp.id_to_piece(self.bos_id) if self.bos_id is not None else None

    @property
    def eos_token(self) -> str | None:
        return self.sp.id_to_piece(self.eos_id) if self.eos_id is not None else None

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def _piece_id(self, piece: str) -> int | None:
        token_id = self.sp.piece_to_id(piece)
        return token_id if self.sp.id_to_piece(token_id) == piece else None

    def _byte_ids(self, text: str) -> list[int]:
        ids = [self._piece_id(f"<0x{b:02X}>") for b in text.encode("utf-8")]
        if None in ids:
            raise TokenizerError(f"{self.model_file}: special token {text!r} can be typed as text and the "
                                 f"vocabulary has no byte pieces to spell it otherwise")
        return ids

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        _require_text(text)
        ids = self.sp.encode(text)
        if self._respell and any(i in self._respell for i in ids):
            ids = [j for i in ids for j in self._respell.get(i, (i,))]
        add_bos = self.add_bos if add_bos is None else add_bos
        return [self.bos_id] + ids if add_bos else ids

    def encode_with_offsets(self, text: str, add_bos: bool | None = None) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode(text)` and, per id, the characters of `text` it stands for, text[start:end].

        From sentencepiece's piece spans (UTF-8 byte offsets into `text`, turned into character
        offsets): BOS stands for (0, 0); of a character spelled in byte pieces, the last one spans
        it and the others are empty at its start; a respelled special token's byte pieces each
        span the whole token.
        """
        _require_text(text)
        pieces = self.sp.encode_as_proto(text).pieces  # the ids of encode(), with their spans
        char_at = [0] * (len(text.encode("utf-8")) + 1)  # byte offset -> character offset
        offset = 0
        for index, char in enumerate(text):
            offset += len(char.encode("utf-8"))
            char_at[offset] = index + 1
        ids, spans = [], []
        for piece in pieces:
            span = (char_at[piece.begin], char_at[piece.end]) if piece.begin < piece.end else (char_at[piece.begin],) * 2
            respelled = self._respell.get(piece.id, (piece.id,))
            ids += respelled
            spans += [span] * len(respelled)
        add_bos = self.add_bos if add_bos is None else add_bos
        return ([self.bos_id] + ids, [(0, 0)] + spans) if add_bos else (ids, spans)

    def decode(self, ids) -> str:
        """Text of `ids`; special tokens and ids past the vocabulary (the model's unused embedding
        rows) are skipped; byte pieces become bytes again."""
        size = self.vocab_size
        return self.sp.decode([int(i) for i in ids if 0 <= int(i) < size and int(i) not in self.special_ids])


def _load_model(model_file: str) -> tuple[spm.SentencePieceProcessor, list[str]]:
    """The sentencepiece model and its pieces, every one checked to be UTF-8 text.

    A damaged file may still parse; a piece whose bytes are no longer UTF-8 would then raise
    UnicodeDecodeError from inside sentencepiece at the first decode that meets it, mid-generation.
    Reading all pieces once (one call) finds that now.
    """
    try:
        # read here: sentencepiece's own open takes only UTF-8 paths (and would follow a FIFO)
        proto = read_regular(model_file, MAX_MODEL_BYTES, "a sentencepiece model")
        sp = spm.SentencePieceProcessor()
        sp.LoadFromSerializedProto(proto)  # raises on a bad model (the constructor's model_proto= does not)
        pieces = sp.id_to_piece(list(range(sp.get_piece_size())))
    except (RuntimeError, OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{model_file}: not a sentencepiece model, or a damaged one ({type(e).__name__}: {e}); "
                             f"replace it with an intact copy") from None
    return sp, pieces


def _read_config(config_path: str) -> dict:
    try:
        settings = json.loads(read_regular(config_path, MAX_CONFIG_BYTES, "tokenizer_config.json").decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{config_path}: cannot read it as JSON ({type(e).__name__}: {e})") from None
    if not isinstance(settings, dict):
        raise TokenizerError(f"{config_path}: must hold a JSON object, not {type(settings).__name__}")
    return settings


def _token_text(config_path: str, name: str, token) -> str | None:
    """tokenizer_config.json stores a token as a string, as {"content": string} or as null."""
    text = token.get("content") if isinstance(token, dict) else token
    if text is not None and not isinstance(text, str):
        raise TokenizerError(f"{config_path}: {name}={token!r} must be a string, {{\"content\": string}} or null")
    return text


def _require_text(text) -> None:
    """Reject a non-str, and lone surrogates (from a bad JSON escape or a careless decode): they are
    not Unicode text, have no UTF-8 form and sentencepiece would fail on them with a RuntimeError. Replacing
    them would silently answer a prompt the user did not send, so the request is refused."""
    if not isinstance(text, str):
        raise TokenizerError(f"text must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizerError(f"text has a lone surrogate U+{ord(text[e.start]):04X} at character {e.start}, "
                             f"which is not valid Unicode; send well-formed text (UTF-8 without "
                             f"surrogate escapes)") from None


def build_tokenizer(build_dir: str, manifest) -> Tokenizer:
    """The tokenizer of a build directory, as its manifest (`manifest.Manifest`) describes it."""
    spec = manifest.tokenizer
    return Tokenizer(os.path.join(build_dir, spec.file), add_bos=spec.add_bos, bos_token=spec.bos_token,
                     eos_token=spec.eos_token)


class IncrementalDetokenizer:
    """Turns a growing list of ids into text pieces for streaming.

    Each piece is the text the newest ids add, withheld while it ends in an incomplete UTF-8
    character. Joining every piece, plus `finish()`, gives exactly `decode(ids)`. Decoding a
    window that starts a few tokens back keeps leading spaces right (sentencepiece drops the
    space of the first piece it decodes).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids=()):
        self.tokenizer = tokenizer
        self.ids = [int(i) for i in prompt_ids]
        self.read_offset = len(self.ids)  # ids before this are already emitted
        self.prefix_offset = max(0, self.read_offset - 6)  # context start for the next decode

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        decode = self.tokenizer.decode
        emitted = decode(self.ids[self.prefix_offset:self.read_offset])
        text = decode(self.ids[self.prefix_offset:])
        if len(text) <= len(emitted) or text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(emitted):]

    def finish(self) -> str:
        """Whatever is still withheld (an unfinished character decodes as U+FFFD, as in `decode`)."""
        decode = self.tokenizer.decode
        emitted = decode(self.ids[self.prefix_offset:self.read_offset])
        text = decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(emitted):]
