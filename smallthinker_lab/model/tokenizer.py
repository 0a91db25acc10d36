"""Load the model's tokenizer: the project's tiny BPE (``"default"``) or any folder in Hugging Face format.

>>> tok = load_tokenizer("default")                      # the shipped tiny model's, vocab 8192
>>> ids = apply_chat_template(tok, [{"role": "user", "content": "Hi"}])
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any

from ..resources import default_model_dir

__all__ = ["CHATML_TEMPLATE", "DEFAULT_TOKENIZER_DIR", "TokenizerError", "apply_chat_template", "find_tokenizer",
           "load_tokenizer", "load_tokenizer_file", "resolve_tokenizer_dir"]

# ChatML, as Qwen2 uses it, without an implicit default system message.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

DEFAULT_TOKENIZER_DIR = default_model_dir()

# the JSON files of a tokenizer folder that transformers reads (each must hold one JSON object)
_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json")


class TokenizerError(ValueError):
    """A tokenizer folder whose files cannot be read as a tokenizer; the message names the file."""


def _read_json_object(path: Path) -> dict:
    """The JSON object in ``path``, or :class:`TokenizerError` naming the file and what is wrong with it."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read the tokenizer file ({e.strerror or e})") from None
    if not data.strip():
        raise TokenizerError(f"{path} is empty: expected a JSON object (a truncated or interrupted copy?)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path} is not UTF-8 text (invalid byte at offset {e.start}): a corrupt or binary "
                             f"file, not a tokenizer file") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path} is not valid JSON, truncated or corrupt ({e.msg}: line {e.lineno} column "
                             f"{e.colno})") from None
    if not isinstance(value, dict):
        raise TokenizerError(f"{path} must hold a JSON object, got a JSON {type(value).__name__}")
    return value


def _check_files(folder: Path) -> dict:
    """Read every tokenizer file of ``folder`` that transformers would read; returns tokenizer_config.json's object
    ({} when absent). A file that is empty, not UTF-8, not JSON or of the wrong shape raises TokenizerError."""
    objects = {name: _read_json_object(folder / name) for name in _JSON_FILES if (folder / name).is_file()}
    tok = objects.get("tokenizer.json")
    if tok is not None and not isinstance(tok.get("model"), dict):
        raise TokenizerError(f"{folder / 'tokenizer.json'} has no \"model\" object: not a tokenizers file")
    merges = folder / "merges.txt"
    if merges.is_file():
        try:
            merges.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise TokenizerError(f"{merges} is not UTF-8 text (invalid byte at offset {e.start})") from None
    return objects.get("tokenizer_config.json", {})


def resolve_tokenizer_dir(path: str | Path) -> Path:
    """``"default"`` -> the shipped tiny model's folder (package data when installed, else the checkout's
    ``data/models/smallthinker-tiny``); anything else is taken as a folder path."""
    return DEFAULT_TOKENIZER_DIR if str(path) == "default" else Path(path).expanduser()


def find_tokenizer(folder: Path) -> Any:
    """The tokenizer in ``folder`` (see :func:`load_tokenizer`), or None when it holds no tokenizer files."""
    if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
        return None
    return load_tokenizer(folder)


def load_tokenizer_file(path: str | Path) -> Any:
    """A ``tokenizers.Tokenizer`` from one tokenizer.json; a damaged file raises TokenizerError naming it."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer file at {path}")
    if not isinstance(_read_json_object(path).get("model"), dict):
        raise TokenizerError(f"{path} has no \"model\" object: not a tokenizers file")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
        raise TokenizerError(f"{path}: cannot load the tokenizer ({str(e).splitlines()[0] if str(e) else e!r})"
                             ) from e


@contextlib.contextmanager
def _quiet_model_config():
    """transformers also reads the folder's config.json, whose model_type ('smallthinker') it does not know, and
    warns about it and about its rope keys; the tokenizer needs none of it, so those two messages are silenced."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*rope_scaling.*", category=FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


def load_tokenizer(path: str | Path = "default", chat_template: str | None = None) -> Any:
    """A ``transformers`` tokenizer from a folder holding ``tokenizer.json`` (loaded as PreTrainedTokenizerFast)
    or ``vocab.json`` + ``merges.txt`` (loaded as Qwen2Tokenizer). If the folder has no chat template, the
    ChatML one is set (``chat_template`` overrides either)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = resolve_tokenizer_dir(path)
    has_json = (folder / "tokenizer.json").is_file()
    has_bpe = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if not (has_json or has_bpe):
        raise FileNotFoundError(
            f"no tokenizer in {folder}: expected tokenizer.json, or vocab.json + merges.txt"
            + ("" if folder.is_dir() else " (the folder does not exist)")
        )
    cfg = _check_files(folder)
    try:
        with _quiet_model_config():
            if has_json and not cfg.get("tokenizer_class"):
                tok = PreTrainedTokenizerFast.from_pretrained(str(folder))
            elif has_bpe and not has_json and not cfg.get("tokenizer_class"):
                from transformers import Qwen2Tokenizer

                tok = Qwen2Tokenizer.from_pretrained(str(folder))
            else:
                tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
        main = "tokenizer.json" if has_json else "vocab.json + merges.txt"
        raise TokenizerError(f"{folder}: cannot load the tokenizer from {main} "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e!r})") from e
    if chat_template is not None:
        tok.chat_template = chat_template
    elif not getattr(tok, "chat_template", None):
        tok.chat_template = CHATML_TEMPLATE
    return tok


def apply_chat_template(
    tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True, tokenize: bool = True
) -> list[int] | str:
    """Render ``messages`` with the tokenizer's chat template: token ids (``tokenize=True``) or the string."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    if not tokenize:
        return text
    return tokenizer.encode(text, add_special_tokens=False)
