"""What one call asks a model: chat messages, or one prompt text for a base model.

Request building only: nothing here sends anything. The inference engine hands a `ModelInput` to
litellm (`acompletion` or `atext_completion`); `openai_body` gives the same request as the JSON body
of an OpenAI-compatible endpoint, so any HTTP client can send exactly what was evaluated.

Base models were never trained on chat turns: they continue text. In completion mode the chat
messages a task renders (system prompt, few-shot examples as earlier turns, the case) are laid out
as one document by the model's `CompletionTemplate`, and stop sequences end the answer where the
next turn would begin, which is how base models are prompted in practice.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, Mapping

MODES = ("chat", "completion")
TEMPLATE_FIELDS = ("system", "user", "assistant", "stop")
PLACEHOLDER = "text"


class TemplateError(ValueError):
    """A completion template that cannot be used; `field` names the offending part."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class CompletionTemplate:
    """How chat turns become one prompt: a format per role, each with one `{text}`, and stop sequences.

    The assistant format's text before `{text}` is written after the last user turn as the cue for
    the answer; trailing spaces of that cue are left out, because tokenizers of base models attach a
    space to the word after it and a prompt ending in a space asks for an unusual token.
    """

    system: str
    user: str
    assistant: str
    stop: tuple[str, ...]

    @classmethod
    def from_mapping(cls, raw: Any) -> "CompletionTemplate":
        if not isinstance(raw, Mapping):
            raise TemplateError("", f"must be a mapping with {', '.join(TEMPLATE_FIELDS)}")
        unknown = sorted(set(raw) - set(TEMPLATE_FIELDS))
        if unknown:
            raise TemplateError(unknown[0], f"unknown field; allowed: {', '.join(TEMPLATE_FIELDS)}")
        formats = {}
        for role in ("system", "user", "assistant"):
            value = raw.get(role)
            if not isinstance(value, str):
                raise TemplateError(role, "required, a string with one {text} placeholder")
            try:
                fields = [name for _, name, _, _ in string.Formatter().parse(value) if name is not None]
            except ValueError as exc:
                raise TemplateError(role, f"does not parse ({exc}); write literal braces as {{{{ and }}}}") from None
            if fields != [PLACEHOLDER]:
                raise TemplateError(role, f"needs exactly one {{text}} and no other placeholder, found {fields or 'none'}")
            formats[role] = value
        stop = raw.get("stop")
        if not isinstance(stop, list) or not stop or not all(isinstance(s, str) and s for s in stop):
            raise TemplateError("stop", "required, a non-empty list of non-empty strings (where an answer ends)")
        if len(stop) > 4:
            raise TemplateError("stop", "at most 4 stop sequences (the OpenAI API's limit)")
        return cls(system=formats["system"], user=formats["user"], assistant=formats["assistant"], stop=tuple(stop))

    def as_record(self) -> dict[str, Any]:
        return {"system": self.system, "user": self.user, "assistant": self.assistant, "stop": list(self.stop)}

    @property
    def answer_cue(self) -> str:
        return _halves(self.assistant)[0].rstrip(" ")

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text: every turn in its role's format, then the cue for the answer."""
        if not messages or messages[-1]["role"] != "user":
            raise ValueError("a completion prompt must end with a user turn")
        formats = {"system": self.system, "user": self.user, "assistant": self.assistant}
        parts = []
        for message in messages:
            role = message["role"]
            if role not in formats:
                raise ValueError(f"no format for role '{role}'")
            before, after = _halves(formats[role])
            # The content goes in as it is: braces in a turn (a JSON answer) are text, not placeholders.
            parts.append(before + message["content"] + after)
        return "".join(parts) + self.answer_cue


def _halves(role_format: str) -> tuple[str, str]:
    """The format's text before and after `{text}`, with doubled braces turned back into literal ones."""
    before, after = role_format.split("{" + PLACEHOLDER + "}", 1)
    unescape = lambda part: part.replace("{{", "{").replace("}}", "}")  # noqa: E731
    return unescape(before), unescape(after)


@dataclass(frozen=True)
class ModelInput:
    """What is sent for one call, independent of the client that sends it."""

    mode: str
    messages: list[dict[str, str]]          # the chat turns; in completion mode, what the prompt was built from
    prompt: str | None = None               # completion mode only
    stop: tuple[str, ...] = ()              # completion mode only

    def identity(self) -> dict[str, Any]:
        """The part of the cache key that says what was asked (see `response_cache.cache_key`)."""
        if self.mode == "chat":
            return {"messages": self.messages}
        return {"mode": self.mode, "prompt": self.prompt, "stop": list(self.stop)}

    def litellm_arguments(self) -> dict[str, Any]:
        """`messages=` for litellm.acompletion, or `prompt=` and `stop=` for litellm.atext_completion."""
        if self.mode == "chat":
            return {"messages": self.messages}
        return {"prompt": self.prompt, "stop": list(self.stop)}

    @property
    def endpoint_path(self) -> str:
        """Path under an OpenAI-compatible base URL (".../v1")."""
        return "/chat/completions" if self.mode == "chat" else "/completions"

    def openai_body(self, model_id: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """The JSON body for `endpoint_path`; `model_id` is the provider's name, without litellm's prefix."""
        return {"model": model_id, **params, **self.litellm_arguments()}


def build_input(messages: list[dict[str, str]], mode: str = "chat", template: CompletionTemplate | None = None) -> ModelInput:
    if mode == "chat":
        return ModelInput("chat", messages)
    if mode != "completion" or template is None:
        raise ValueError(f"mode '{mode}' needs one of {MODES}, and completion mode a template")
    return ModelInput("completion", messages, template.render(messages), template.stop)
