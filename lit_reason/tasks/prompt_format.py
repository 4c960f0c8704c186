"""How a task's question becomes the model's input: plain text, or an instruct model's chat template.

``plain`` (the default) is the task's own prompt (``Compute: 3+4-2\\n``), for models trained from
scratch on the task such as ``embedded:arithmetic``. ``chat`` puts an optional system prompt and a
user turn (the instruction, a blank line, the question) through the tokenizer's chat template with
the generation prompt appended, so the response starts where the assistant's turn begins; the
response ends at the template's end-of-turn token, which becomes the tokenizer's EOS (for ChatML
models such as SmolLM2 it already is: ``<|im_end|>``).

In a config::

    task: {name: arithmetic, prompt_format: chat}
    task: {name: gsm8k, prompt_format: {kind: chat, system: "You are a careful math tutor.", instruction: null}}

``instruction`` left out (or ``default``) takes the task's own instruction (``Task.chat_instruction``),
which asks for one step per line and an ``Answer: N`` last line; ``null`` or ``""`` sends the
question alone. ``system: null`` keeps the template's default system prompt (SmolLM2 has one).
``one_shot: true`` (the default) puts the task's worked example (``Task.chat_example``, if it has
one) before the question as an earlier user/assistant exchange, which shows a small model the
response format far better than a description does.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

KINDS = ("plain", "chat")
DEFAULT = "default"
_PROBE = "\u2063lit-reason-probe\u2063"  # text no template rewrites, to find where an assistant turn ends


@dataclass(frozen=True)
class PromptFormat:
    """A prompt format (see module doc).

    Attributes:
        kind: ``plain`` or ``chat``.
        system: System prompt of a chat prompt; None keeps the template's default.
        instruction: Text before the question in the user turn; ``"default"`` takes the task's
            instruction, None or ``""`` none.
        one_shot: Put the task's worked example first as an earlier exchange (when it has one).
    """

    kind: str = "plain"
    system: str | None = None
    instruction: str | None = DEFAULT
    one_shot: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"prompt_format kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "plain" and (self.system is not None or self.instruction not in (DEFAULT, None, "")):
            raise ValueError("prompt_format: system and instruction only apply to kind: chat")
        if not isinstance(self.one_shot, bool):
            raise ValueError(f"prompt_format one_shot must be true or false, got {self.one_shot!r}")

    @property
    def is_chat(self) -> bool:
        return self.kind == "chat"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def user_text(self, question: str, default_instruction: str) -> str:
        """The user turn: the instruction (the task's when ``"default"``), a blank line, the question."""
        instruction = default_instruction if self.instruction == DEFAULT else self.instruction
        return f"{instruction.strip()}\n\n{question}" if instruction else question

    def render(self, question: str, default_instruction: str, tokenizer,
               example: tuple[str, str] | None = None) -> str:
        """The chat prompt text (special tokens written out) ending where the assistant's reply starts.

        Args:
            question: The task's question text.
            default_instruction: The task's instruction, used when ``instruction`` is ``"default"``.
            tokenizer: A tokenizer with a chat template (checked by :func:`check_chat_tokenizer`).
            example: The task's worked ``(question, response)``, shown first when ``one_shot``.
        """
        messages = [{"role": "system", "content": self.system}] if self.system is not None else []
        if self.one_shot and example is not None:
            messages.append({"role": "user", "content": self.user_text(example[0], default_instruction)})
            messages.append({"role": "assistant", "content": example[1]})
        messages.append({"role": "user", "content": self.user_text(question, default_instruction)})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def resolve_prompt_format(spec: Any) -> PromptFormat:
    """Accepts a PromptFormat, None / ``"plain"`` / ``"chat"``, or ``{kind, system, instruction}``."""
    if isinstance(spec, PromptFormat):
        return spec
    if spec is None:
        return PromptFormat()
    if isinstance(spec, str):
        return PromptFormat(kind=spec)
    if isinstance(spec, dict):
        unknown = set(spec) - {"kind", "system", "instruction", "one_shot"}
        if unknown:
            raise ValueError(f"prompt_format has unknown key(s) {sorted(unknown)}; "
                             "known: kind, system, instruction, one_shot")
        return PromptFormat(**spec)
    raise TypeError(f"prompt_format must be 'plain', 'chat' or a dict, got {type(spec).__name__}")


def end_of_turn_token(tokenizer) -> str | None:
    """The special token the chat template writes right after an assistant reply (``<|im_end|>``), or None."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    tail = text.split(_PROBE, 1)[1] if _PROBE in text else ""
    specials = sorted(getattr(tokenizer, "all_special_tokens", []) or [], key=len, reverse=True)
    tail = tail.lstrip(" ")
    return next((t for t in specials if t and tail.startswith(t)), None)


def check_chat_tokenizer(tokenizer, owner: str) -> None:
    """Makes generation stop at the end of the assistant's turn; refuses a tokenizer without a template.

    Raises:
        ValueError: the tokenizer has no chat template (the message names the fix).
    """
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"{owner}: prompt_format chat needs a tokenizer with a chat template, and the policy's "
                         f"tokenizer ({name}) has none; use prompt_format: plain, or an instruct model "
                         "(e.g. policy: smollm2:135m-instruct)")
    eot = end_of_turn_token(tokenizer)
    if eot is not None and eot != tokenizer.eos_token:
        warnings.warn(f"{owner}: the chat template ends a turn with {eot!r}, the tokenizer's EOS was "
                      f"{tokenizer.eos_token!r}; EOS is set to {eot!r} so generation stops at the end of the turn",
                      stacklevel=3)
        tokenizer.eos_token = eot
