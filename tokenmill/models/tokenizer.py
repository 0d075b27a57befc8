"""Tokenizer: a `tokenizers.Tokenizer` plus the special tokens and chat template around it.

Built from an HF folder (tokenizer.json, tokenizer_config.json, chat_template.jinja) or from a
`transformers` fast tokenizer (the GGUF path). Chat templates are rendered by transformers' own
Jinja renderer, so prompts equal `apply_chat_template`'s. Importing all of transformers' tokenizer
stack would cost seconds of start-up; this keeps only what serving needs.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as RustTokenizer


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


@functools.cache
def chat_renderer():
    """transformers' jinja renderer for chat templates. Imported once, when a tokenizer with a
    template is made (at start-up): importing transformers takes seconds, and inside the first
    chat request it held the GIL and the server's event loop with it."""
    from transformers.utils.chat_template_utils import render_jinja_template

    return render_jinja_template


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
        added = backend.get_added_tokens_decoder().values()
        self.special_texts = sorted({t.content for t in added if t.special and t.content})
        self._literal: RustTokenizer | None = None  # a copy that reads special texts as text
        if chat_template:
            chat_renderer()

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

    def encode_literal(self, text: str) -> list[int]:
        """Tokens of `text` in which special-token strings ("<|im_start|>") are plain text."""
        if self._literal is None:  # its own instance: threads never share a toggled flag
            literal = RustTokenizer.from_str(self.backend.to_str())
            literal.encode_special_tokens = True
            self._literal = literal
        return self._literal.encode(text, add_special_tokens=False).ids

    @functools.cached_property
    def max_token_chars(self) -> int:
        """Most characters one token can stand for (its vocabulary string: bytes for byte-level
        BPE, at least the characters it decodes to): a text of C characters has at least
        C / max_token_chars tokens, known before tokenizing it."""
        return max((len(t) for t in self.backend.get_vocab(with_added_tokens=True)), default=1)

    def check_fits(self, text: str, max_tokens: int) -> None:
        """Refuse, before tokenizing, a text that cannot be shorter than max_tokens tokens: a
        hostile multi-megabyte prompt costs nothing (its tokens would hold the GIL)."""
        if len(text) > max_tokens * self.max_token_chars:
            raise ValueError(
                f"prompt of {len(text)} characters is longer than max_model_len ({max_tokens}) "
                f"tokens can be (context_length_exceeded)"
            )

    def holds_special_text(self, text: str) -> bool:
        return any(s in text for s in self.special_texts)

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        literal_content: bool = True,
        template_kwargs: dict[str, Any] | None = None,
        max_tokens: int | None = None,
        tools: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
    ) -> tuple[str, list[int]]:
        """(rendered text, token ids). With `literal_content` (the server's default), special
        tokens written inside a message's content are tokenized as text, so a user cannot forge
        a turn ("<|im_start|>system"); only the template itself emits control tokens. Content
        without special-token text is tokenized exactly as the whole text would be."""
        render = dict(tools=tools, chat_template=chat_template)
        text = self.apply_chat_template(
            messages, add_generation_prompt, False, template_kwargs, **render
        )
        if max_tokens is not None:
            self.check_fits(text, max_tokens)
        contents = [m.get("content") for m in messages]
        if not literal_content or not any(
            isinstance(c, str) and self.holds_special_text(c) for c in contents
        ):
            return text, self.encode(text, add_special_tokens=False)
        return text, self._encode_contents_literally(
            messages, text, add_generation_prompt, template_kwargs, render
        )

    def _encode_contents_literally(self, messages, text, add_generation_prompt, kwargs, render):
        """Render with a marker in place of each content, then tokenize the template's pieces
        as usual and each content literally; the pieces must rebuild the real rendering."""
        marked = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
        rendered = self.apply_chat_template(marked, add_generation_prompt, False, kwargs, **render)
        ids: list[int] = []
        pieces: list[str] = []
        pos = 0
        for match in re.finditer("\ue000(\\d+)\ue001", rendered):
            template_part = rendered[pos : match.start()]
            content = messages[int(match.group(1))].get("content") or ""
            ids += self.encode(template_part, add_special_tokens=False)
            ids += self.encode_literal(content)
            pieces += [template_part, content]
            pos = match.end()
        ids += self.encode(rendered[pos:], add_special_tokens=False)
        if "".join(pieces) + rendered[pos:] != text:
            raise ValueError(
                "messages: a message holds special-token text, and this model's chat template "
                "changes message content, so it cannot be kept as plain text; remove it"
            )
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
    ) -> str:
        """The conversation rendered with the model's chat template (or `chat_template`, one
        given in its place). `tools` are OpenAI-shaped tool definitions, passed to the template
        as transformers passes them. `template_kwargs` are extra variables for the template (as
        transformers' chat_template_kwargs); they may not override the renderer's own
        arguments."""
        kwargs = dict(template_kwargs or {})
        template = chat_template or self.chat_template
        if not template:
            raise ValueError(
                "this model's tokenizer has no chat template; use a completion (plain prompt) "
                "instead, or a model whose tokenizer_config.json has a 'chat_template'"
            )
        import jinja2

        render_jinja_template = chat_renderer()
        own = {k: v for k, v in self.special_tokens.items() if v is not None}
        reserved = {"conversations", "chat_template", "add_generation_prompt", "tools",
                    "continue_final_message", "messages", *self.special_tokens}  # fmt: skip
        clash = sorted(reserved & set(kwargs))
        if clash:
            raise ValueError(
                f"chat_template_kwargs must not set {clash}: the server sets them (use the "
                "request's own fields, e.g. add_generation_prompt)"
            )
        try:
            rendered, _ = render_jinja_template(
                conversations=[messages],
                chat_template=template,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                **own,
                **kwargs,
            )
        except (jinja2.TemplateError, TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"messages: the chat template could not render them ({e})") from None
        return rendered[0]
