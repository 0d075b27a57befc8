"""Tokenizer: a `tokenizers.Tokenizer` plus the special tokens and chat template around it.

Built from an HF folder (tokenizer.json, tokenizer_config.json, chat_template.jinja) or from a
`transformers` fast tokenizer (the GGUF path). Chat templates are rendered by transformers' own
Jinja renderer, so prompts equal `apply_chat_template`'s. Importing all of transformers' tokenizer
stack would cost seconds of start-up; this keeps only what serving needs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as RustTokenizer


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(
        self,
        backend: RustTokenizer,
        special_tokens: dict[str, str | None],
        chat_template: str | None,
    ) -> None:
        self.backend = backend
        self.special_tokens = special_tokens  # bos_token, eos_token, pad_token, unk_token
        self.chat_template = chat_template
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.all_special_ids = {
            t.content and backend.token_to_id(t.content)
            for t in backend.get_added_tokens_decoder().values()
            if t.special
        } - {None}

    @classmethod
    def from_folder(cls, path: str | Path) -> Tokenizer:
        folder = Path(path)
        file = folder / "tokenizer.json"
        if not file.exists():
            raise FileNotFoundError(
                f"{folder} has no tokenizer.json; save the tokenizer with "
                "`AutoTokenizer.from_pretrained(...).save_pretrained(folder)` (a fast tokenizer)"
            )
        config: dict[str, Any] = {}
        if (folder / "tokenizer_config.json").exists():
            config = json.loads((folder / "tokenizer_config.json").read_text())
        template = config.get("chat_template")
        if (folder / "chat_template.jinja").exists():
            template = (folder / "chat_template.jinja").read_text()
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        special = {
            k: _token_text(config.get(k))
            for k in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        return cls(RustTokenizer.from_file(str(file)), special, template)

    @classmethod
    def from_transformers(cls, tok: Any) -> Tokenizer:
        """Wrap a transformers fast tokenizer (e.g. one converted from GGUF metadata)."""
        special = {
            k: getattr(tok, k, None) for k in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        special = {k: (str(v) if v is not None else None) for k, v in special.items()}
        return cls(tok.backend_tokenizer, special, getattr(tok, "chat_template", None))

    def token_id(self, name: str) -> int | None:
        text = self.special_tokens.get(name)
        return None if text is None else self.backend.token_to_id(text)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> str:
        if not self.chat_template:
            raise ValueError(
                "this model's tokenizer has no chat template; use a completion (plain prompt) "
                "instead, or a model whose tokenizer_config.json has a 'chat_template'"
            )
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template(
            conversations=[messages],
            chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            **{k: v for k, v in self.special_tokens.items() if v is not None},
            **kwargs,
        )
        return rendered[0]
