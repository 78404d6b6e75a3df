"""Tokenizers: a checkpoint's `tokenizer.json` through the `tokenizers` package, or a byte-level one for the
debug presets (trained here on plain text, no files needed).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ByteTokenizer", "HFTokenizer", "load_tokenizer"]

BYTE_VOCAB = 256
TOKENIZER_FILE = "tokenizer.json"


class ByteTokenizer:
    """One token per UTF-8 byte (ids 0..255), then BOS, EOS and PAD: 259 ids. Decoding replaces an
    incomplete or invalid UTF-8 sequence with U+FFFD, so any id sequence decodes."""

    def __init__(self) -> None:
        self.bos_token_id = BYTE_VOCAB
        self.eos_token_id = BYTE_VOCAB + 1
        self.pad_token_id = BYTE_VOCAB + 2
        self.vocab_size = BYTE_VOCAB + 3

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_bos else ids

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < BYTE_VOCAB).decode("utf-8", errors="replace")

    @property
    def stop_token_ids(self) -> list[int]:
        return [self.eos_token_id]


class HFTokenizer:
    """A `tokenizer.json` (Hugging Face `tokenizers`), with the model's BOS / EOS ids."""

    def __init__(self, path: str | Path, *, bos_token_id: int | None = None, eos_token_id=None) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise ImportError(
                f"HFTokenizer: reading {path} needs the `tokenizers` package (pip install tokenizers)"
            ) from exc

        self.path = Path(path)
        self._tok = Tokenizer.from_file(str(self.path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        eos = eos_token_id if eos_token_id is not None else []
        self._eos = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
        self.eos_token_id = self._eos[0] if self._eos else None
        self.pad_token_id = None

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if add_bos and self.bos_token_id is not None else ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    @property
    def stop_token_ids(self) -> list[int]:
        return list(self._eos)


def load_tokenizer(checkpoint_dir: str | Path | None = None, config=None) -> ByteTokenizer | HFTokenizer:
    """The checkpoint's `tokenizer.json` when it has one (BOS / EOS from `config` when given), else the
    byte-level tokenizer (which the model's vocabulary must hold: vocab_size >= 259)."""
    if checkpoint_dir is not None and (Path(checkpoint_dir) / TOKENIZER_FILE).is_file():
        return HFTokenizer(
            Path(checkpoint_dir) / TOKENIZER_FILE,
            bos_token_id=getattr(config, "bos_token_id", None),
            eos_token_id=getattr(config, "eos_token_id", None),
        )
    tok = ByteTokenizer()
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and vocab < tok.vocab_size:
        raise ValueError(
            f"load_tokenizer: no {TOKENIZER_FILE} in {checkpoint_dir} and the model's vocab_size={vocab} is too "
            f"small for the byte-level tokenizer (needs >= {tok.vocab_size})"
        )
    return tok
