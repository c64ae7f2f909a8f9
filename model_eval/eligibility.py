"""Which models a discovery endpoint lists are evaluated: only chat models, narrowed by the endpoint's patterns.

Rules, in order; the first that decides names itself in the verdict:
1. `include` patterns (if any): the model id must match one.
2. `exclude` patterns: the model id must match none.
3. Capability (unless `require_chat: false`):
   a. Ollama's `/api/show` capabilities, when the endpoint reports them, decide alone: chat needs "completion".
   b. Otherwise litellm's model map, when it knows the model: its `mode` must be "chat".
   c. And the id must match no non-chat name pattern (embedding, speech, image, ... models; the map
      mislabels a few of those as chat, so names are checked even after it).
Patterns are Python regular expressions, searched case-insensitively anywhere in the model id.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

from model_eval.model_map import mode_of

CHAT_MODES = ("chat",)


def _word(text: str) -> str:
    """`text` not inside a longer run of letters or digits (so 'tts' does not match 'mattstral')."""
    return rf"(?<![a-z0-9]){text}(?![a-z0-9])"


# Model-name patterns of what is not a chat model, and what each kind of model does instead.
DEFAULT_NON_CHAT_PATTERNS: dict[str, str] = {
    "embed": "embedding",
    _word("(bge|gte|e5|minilm|all-minilm|mxbai|sentence-t5|paraphrase)"): "embedding",
    "rerank": "reranking",
    "whisper|transcri|speech-to-text|" + _word("(stt|asr)"): "speech recognition",
    _word("tts") + "|text-to-speech|" + _word("(bark|musicgen|speecht5)"): "speech synthesis",
    "dall-e|stable-diffusion|sdxl|gpt-image|image-gen|imagen|midjourney|" + _word("flux"): "image generation",
    _word("(sora|veo)"): "video generation",
    "moderation": "moderation",
    _word("clip"): "image embedding",
}


@dataclass(frozen=True)
class Pattern:
    text: str
    regex: re.Pattern
    kind: str = ""       # for non-chat patterns: what such a model does

    @classmethod
    def compile(cls, text: str, kind: str = "") -> "Pattern":
        """Raises re.error for a bad pattern (the caller names the file, line and field)."""
        return cls(text, re.compile(text, re.IGNORECASE), kind)

    def matches(self, model_id: str) -> bool:
        return self.regex.search(model_id) is not None


def default_non_chat_patterns() -> tuple[Pattern, ...]:
    return tuple(Pattern.compile(text, kind) for text, kind in DEFAULT_NON_CHAT_PATTERNS.items())


@dataclass(frozen=True)
class EligibilityRules:
    include: tuple[Pattern, ...] = ()
    exclude: tuple[Pattern, ...] = ()
    require_chat: bool = True
    non_chat_patterns: tuple[Pattern, ...] = field(default_factory=default_non_chat_patterns)

    def fingerprint(self) -> str:
        """Changes when the rules do: a model turned away under older rules is judged again."""
        material = [[p.text for p in self.include], [p.text for p in self.exclude], self.require_chat,
                    [p.text for p in self.non_chat_patterns]]
        return hashlib.sha256(json.dumps(material).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Verdict:
    eligible: bool
    rule: str            # include | exclude | ollama capabilities | litellm model map | name pattern | no check
    reason: str


def judge(model_id: str, litellm_model: str, rules: EligibilityRules, capabilities: list[str] | None = None) -> Verdict:
    """Whether a listed model is evaluated as a chat model, and the rule that said so.

    `capabilities`: Ollama's /api/show list for the model, or None when the endpoint does not report it."""
    if rules.include and not any(p.matches(model_id) for p in rules.include):
        return Verdict(False, "include", f"matches no include pattern ({', '.join(p.text for p in rules.include)})")
    excluded = next((p for p in rules.exclude if p.matches(model_id)), None)
    if excluded is not None:
        return Verdict(False, "exclude", f"matches exclude pattern '{excluded.text}'")
    if not rules.require_chat:
        return Verdict(True, "no check", "require_chat is off for this endpoint")
    if capabilities is not None:
        listed = ", ".join(capabilities) or "none"
        if "completion" in capabilities:
            return Verdict(True, "ollama capabilities", f"Ollama /api/show capabilities [{listed}] include 'completion'")
        return Verdict(False, "ollama capabilities", f"Ollama /api/show capabilities [{listed}] lack 'completion' (not a chat model)")
    mode = mode_of(litellm_model)
    if mode is not None and mode not in CHAT_MODES:
        return Verdict(False, "litellm model map", f"litellm's model map gives mode '{mode}', not chat")
    named = next((p for p in rules.non_chat_patterns if p.matches(model_id)), None)
    if named is not None:
        what = f" ({named.kind})" if named.kind else ""
        return Verdict(False, "name pattern", f"its name matches the non-chat pattern '{named.text}'{what}")
    if mode is not None:
        return Verdict(True, "litellm model map", "litellm's model map gives mode 'chat'")
    return Verdict(True, "name pattern", "unknown to litellm's model map; its name matches no non-chat pattern")
