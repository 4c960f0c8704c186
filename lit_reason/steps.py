"""Step segmentation: split a response into reasoning steps and map steps onto tokens.

This is the single segmentation component of the library. Rollouts, value targets, step-level
losses, calibration and search all call :class:`StepSplitter`, so that "step k" means the same
span of text and the same run of tokens everywhere.

Conventions (all policies):

* A step's text *includes* its trailing delimiter, so ``"".join(split(text)) == text`` always and
  :meth:`StepSplitter.char_spans` is a contiguous cover of ``text``.
* There are no empty steps. A piece that is only whitespace (a blank line) is attached to the
  step before it; whitespace-only pieces at the very start are attached to the first real step.
  A text that is all whitespace is one step; the empty text has no steps.
* With ``answer_prefix`` set (e.g. ``"####"`` or ``"Answer:"``), a step whose text starts with the
  prefix (after leading whitespace) is merged into the step before it, unless it is the first
  step. VinePPO's GSM8K segmentation keeps ``"\\n#### 42"`` with the last reasoning step this way,
  so the final answer is not a step of its own whose value is trivially known.

Token mapping: a token belongs to the step containing its first character. A token with an empty
character span (a special token such as EOS, or one byte of a multi-byte character that a later
token completes) belongs to the step of the token before it (step 0 at the very start), except
at the end of the text, where it belongs to the last step.
"""

from __future__ import annotations

import bisect
import codecs
import re
from typing import Any

__all__ = ["POLICIES", "StepSplitter"]

#: The segmentation policies :class:`StepSplitter` accepts.
POLICIES = ("newline", "double_newline", "math", "custom")

# ---------------------------------------------------------------------------------------------
# MATH-aware masking.
#
# LaTeX spans are hidden before splitting so that a period or newline *inside* maths never starts
# a new step. The first alternative consumes escapes (``\$`` is a literal dollar in MATH
# solutions, ``\\`` a LaTeX line break) so they are never mistaken for maths delimiters, and so
# ``\\[2pt]`` is not read as the start of display maths. Unclosed spans (a truncated generation)
# are left unmasked: splitting then proceeds as if they were prose.
# ---------------------------------------------------------------------------------------------
_LATEX_RE = re.compile(
    r"(?P<esc>\\[\\$])"
    r"|(?P<env>\\begin\{(?P<env_name>[^{}]*)\}.*?\\end\{(?P=env_name)\})"
    r"|(?P<asy>\[asy\].*?\[/asy\])"
    r"|(?P<display>\$\$.*?\$\$)"
    r"|(?P<bracket>\\\[.*?\\\])"
    r"|(?P<paren>\\\(.*?\\\))"
    # Inline $..$ may wrap a line but not cross a blank line: a stray "$" must not swallow the
    # rest of the solution.
    r"|(?P<inline>\$(?:\\.|\n(?![ \t]*\n)|[^$\\\n])+?\$)",
    re.DOTALL,
)
# A sentence-final period followed by horizontal whitespace and a capital letter. The whitespace
# stays with the sentence it ends; the next step starts at the capital. Newlines are handled as
# their own boundaries.
_SENTENCE_RE = re.compile(r"\.[ \t]+(?=[A-Z])")
_MATH_MIN_CHARS = 20


def _mask_latex(text: str) -> str:
    """Returns ``text`` with every LaTeX span replaced by ``"x"`` characters (same length)."""
    out = list(text)
    for m in _LATEX_RE.finditer(text):
        if m.lastgroup == "esc":
            continue
        out[m.start() : m.end()] = "x" * (m.end() - m.start())
    return "".join(out)


def _bytes_to_unicode_inverse() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-unicode table used by byte-level BPE vocabularies.

    Printable bytes stand for themselves; the other 68 bytes are shifted to code points 256+ in
    byte order so every byte has a visible, non-whitespace symbol.
    """
    printable = set(range(ord("!"), ord("~") + 1))
    printable |= set(range(ord("\u00a1"), ord("\u00ac") + 1))
    printable |= set(range(ord("\u00ae"), ord("\u00ff") + 1))
    table: dict[str, int] = {}
    shifted = 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


_BYTE_LEVEL_CHARS = _bytes_to_unicode_inverse()


def _decode(tokenizer: Any, ids: list[int]) -> str:
    """Decodes ``ids`` the one way this module treats as the reference text."""
    # clean_up_tokenization_spaces would rewrite " ." to "." *across* tokens, so prefixes of the
    # text would not be prefixes of the token sequence; turning it off keeps decoding exact.
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _special_ids(tokenizer: Any) -> set[int]:
    """Ids that ``skip_special_tokens=True`` drops when decoding."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for idx, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(idx))
    return ids


def _spans_from_pieces(pieces: list[str]) -> list[tuple[int, int]]:
    """Turns per-token text pieces (concatenating to the text) into ``[start, end)`` spans."""
    spans = []
    pos = 0
    for piece in pieces:
        spans.append((pos, pos + len(piece)))
        pos += len(piece)
    return spans


def _pieces_byte_level(tokenizer: Any, token_ids: list[int], full: str) -> list[str] | None:
    """Exact per-token pieces for byte-level BPE tokenizers, in O(n); None where not applicable.

    Each token's symbols are mapped back to raw bytes and fed through an incremental UTF-8
    decoder, so the characters a token completes are emitted by (and assigned to) that token;
    a token holding only the first bytes of a character gets an empty piece.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import decoders

    if not isinstance(backend.decoder, decoders.ByteLevel):
        return None
    special = _special_ids(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(token_ids))
    # "replace" mirrors the lossy UTF-8 decoding of the Rust decoder; the final comparison with
    # the real decode catches any difference in how invalid bytes are replaced.
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces: list[str] = []
    last_real = -1
    for j, (tid, tok) in enumerate(zip(token_ids, tokens)):
        if tid in special or tok is None:
            pieces.append("")
            continue
        raw = bytearray()
        for ch in tok:
            b = _BYTE_LEVEL_CHARS.get(ch)
            # Added (non-special) tokens are stored as plain text, not byte symbols.
            raw += bytes([b]) if b is not None else ch.encode("utf-8")
        pieces.append(utf8.decode(bytes(raw)))
        last_real = j
    tail = utf8.decode(b"", final=True)  # dangling bytes of an unfinished character
    if tail:
        pieces[last_real] += tail
    return pieces if "".join(pieces) == full else None


def _pieces_windowed(tokenizer: Any, token_ids: list[int], full: str) -> list[str] | None:
    """Per-token pieces by decoding short windows, in O(n); None where it is not exact.

    Token j's piece is ``decode(ids[p:j+1])`` minus ``decode(ids[p:r])``, where ``[p, r)`` is the
    last group of tokens that produced text. The shared left context makes tokenizers that
    strip or add spaces at the start of a decode (SentencePiece's "\u2581", WordPiece's "##")
    give the right piece. While the window ends in an unfinished character ("\\ufffd"), the
    token gets nothing and the characters go to the token that completes them.
    """
    n = len(token_ids)
    pieces = [""] * n
    special = _special_ids(tokenizer)
    prefix_off = read_off = 0
    for j in range(n):
        prefix_text = _decode(tokenizer, token_ids[prefix_off:read_off])
        new_text = _decode(tokenizer, token_ids[prefix_off : j + 1])
        if not new_text.startswith(prefix_text):
            return None
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            pieces[j] = new_text[len(prefix_text) :]
            prefix_off, read_off = read_off, j + 1
    if read_off < n:  # the text ends in an unfinished character: flush it
        prefix_text = _decode(tokenizer, token_ids[prefix_off:read_off])
        new_text = _decode(tokenizer, token_ids[prefix_off:])
        if not new_text.startswith(prefix_text):
            return None
        rest = new_text[len(prefix_text) :]
        if rest:
            owners = [k for k in range(read_off, n) if token_ids[k] not in special]
            if not owners:
                return None
            pieces[owners[-1]] += rest
    return pieces if "".join(pieces) == full else None


def _pieces_prefix(tokenizer: Any, token_ids: list[int]) -> tuple[str, list[str]]:
    """Per-token pieces by decoding every prefix ``ids[:j+1]``: exact for any tokenizer, O(n^2).

    Each character is owned by the first token after which it appears (and stays) in the
    decoded prefix. Where a later token rewrites earlier text (a decoder that is not
    prefix-stable), the rewritten characters are owned by the token that rewrote them.
    """
    n = len(token_ids)
    special = _special_ids(tokenizer)
    text = ""
    owners: list[int] = []  # owner token of each character of `text`; non-decreasing
    owner = 0
    for j in range(n):
        # Text that first shows up at a special token (which itself decodes to '') was held back
        # as an unfinished character: it belongs to the last ordinary token before it.
        if token_ids[j] not in special or j == 0:
            owner = j
        new_text = _decode(tokenizer, token_ids[: j + 1])
        if new_text.endswith("\ufffd") and j < n - 1:
            continue  # possibly an unfinished character: let the completing token claim it
        if new_text.startswith(text):  # the usual case, checked at C speed
            common = len(text)
        else:
            common = 0
            limit = min(len(text), len(new_text))
            while common < limit and text[common] == new_text[common]:
                common += 1
        owners = owners[:common] + [owner] * (len(new_text) - common)
        text = new_text
    pieces = [""] * n
    for pos, owner in enumerate(owners):
        pieces[owner] += text[pos]
    return text, pieces


class StepSplitter:
    """Splits response text into reasoning steps and maps the steps onto tokens.

    Policies:

    * ``"newline"`` (default; GSM8K and the synthetic arithmetic task): a step ends after each run
      of ``"\\n"``. Lines that are blank or only whitespace attach to the step before them.
      ``"\\r\\n"`` is left as is (the ``"\\r"`` stays in the step's text).
    * ``"double_newline"``: a step ends after each paragraph break, i.e. a newline followed by one
      or more blank lines (which may hold spaces, tabs or ``"\\r"``), as in DVO-style prompts;
      the whole break stays with the step before it. Single newlines stay inside a step.
    * ``"math"``: MATH-aware. LaTeX spans (``$..$``, ``$$..$$``, ``\\(..\\)``, ``\\[..\\]``,
      ``\\begin{env}..\\end{env}``, ``[asy]..[/asy]``) are hidden first; escaped ``\\$`` is a
      literal dollar. The text is then split after every newline and after a sentence-final
      period followed by spaces/tabs and a capital letter (the spaces stay with the sentence).
      Parts whose stripped text is shorter than 20 characters and does not end in ``"."``
      (``"We have"``, a lone display equation) merge with the part after them; a short last
      part stays a step of its own.
    * ``"custom"``: a step ends after each run of ``delimiter`` (any non-empty string). Passing
      ``delimiter`` with the default policy selects ``"custom"``.

    ``answer_prefix`` applies to every policy; see the module docstring.

    Args:
        policy: One of :data:`POLICIES`.
        answer_prefix: If set, a step starting with it (after leading whitespace) is merged into
            the previous step, unless it is the first step.
        delimiter: The custom step delimiter; only with ``policy="custom"`` (or the default).

    Raises:
        ValueError: Unknown policy, empty delimiter, a delimiter given with ``"double_newline"``
            or ``"math"``, ``"custom"`` without a delimiter, or an empty ``answer_prefix``.
    """

    def __init__(self, policy: str = "newline", answer_prefix: str | None = None, delimiter: str | None = None):
        if policy not in POLICIES:
            raise ValueError(f"unknown step policy {policy!r}; expected one of {', '.join(POLICIES)}")
        if delimiter is not None:
            if not isinstance(delimiter, str) or delimiter == "":
                raise ValueError(f"delimiter must be a non-empty string, got {delimiter!r}")
            if policy not in ("newline", "custom"):
                raise ValueError(f"delimiter={delimiter!r} only applies to policy 'custom', not {policy!r}")
            policy = "custom"
        elif policy == "custom":
            raise ValueError("policy 'custom' needs a non-empty delimiter")
        if answer_prefix is not None and answer_prefix == "":
            raise ValueError("answer_prefix must be None or a non-empty string")
        self.policy = policy
        self.answer_prefix = answer_prefix
        self.delimiter = {"newline": "\n", "double_newline": "\n\n", "math": None, "custom": delimiter}[policy]
        if policy == "double_newline":
            # A paragraph break: a newline, then one or more (possibly whitespace-only) blank
            # lines; the whole run ends the step, so "\r\n\r\n" and "\n \n" count too.
            self._boundary_re = re.compile(r"\n(?:[ \t\r]*\n)+")
        elif policy != "math":
            self._boundary_re = re.compile(f"(?:{re.escape(self.delimiter)})+")

    def __repr__(self) -> str:
        return (
            f"StepSplitter(policy={self.policy!r}, answer_prefix={self.answer_prefix!r}, "
            f"delimiter={self.delimiter!r})"
        )

    # ------------------------------------------------------------------ text -> steps

    def _cut_points(self, text: str) -> list[int]:
        """Raw boundaries (exclusive ends of pieces), before the attachment rules."""
        if self.policy == "math":
            masked = _mask_latex(text)
            points = {i + 1 for i, ch in enumerate(masked) if ch == "\n"}
            points.update(m.end() for m in _SENTENCE_RE.finditer(masked))
        else:
            points = {m.end() for m in self._boundary_re.finditer(text)}
        points.discard(0)
        points.add(len(text))
        return sorted(points)

    def char_spans(self, text: str) -> list[tuple[int, int]]:
        """Character spans of the steps of ``text``.

        Args:
            text: The response text (no prompt).

        Returns:
            One ``[start, end)`` pair per step, in order; they are contiguous, non-empty and cover
            ``text`` exactly (the first starts at 0, the last ends at ``len(text)``). ``[]`` for
            the empty text.
        """
        if not text:
            return []
        spans: list[tuple[int, int]] = []
        start = 0
        for end in self._cut_points(text):
            spans.append((start, end))
            start = end

        # Blank pieces attach to the step before them; leading ones to the first real step.
        merged: list[tuple[int, int]] = []
        carry_start: int | None = None
        for s, e in spans:
            if text[s:e].strip() == "":
                if merged:
                    merged[-1] = (merged[-1][0], e)
                elif carry_start is None:
                    carry_start = s
                continue
            merged.append((carry_start if carry_start is not None else s, e))
            carry_start = None
        if not merged:  # all whitespace: one step
            return [(0, len(text))]
        spans = merged

        if self.policy == "math":
            # Short fragments without a full stop are not steps of their own: glue them forward.
            glued: list[tuple[int, int]] = []
            buf_start: int | None = None
            for s, e in spans:
                s0 = s if buf_start is None else buf_start
                part = text[s0:e].strip()
                if len(part) < _MATH_MIN_CHARS and not part.endswith(".") and e < len(text):
                    buf_start = s0
                    continue
                glued.append((s0, e))
                buf_start = None
            spans = glued

        if self.answer_prefix is not None:
            final: list[tuple[int, int]] = []
            for s, e in spans:
                if final and text[s:e].lstrip().startswith(self.answer_prefix):
                    final[-1] = (final[-1][0], e)
                else:
                    final.append((s, e))
            spans = final
        return spans

    def split(self, text: str) -> list[str]:
        """Splits ``text`` into steps.

        Args:
            text: The response text (no prompt).

        Returns:
            The steps, each non-empty and including its trailing delimiter, so that
            ``"".join(steps) == text``. ``[]`` for the empty text.
        """
        return [text[s:e] for s, e in self.char_spans(text)]

    # ------------------------------------------------------------------ steps -> tokens

    def token_step_ids(self, token_char_spans: list[tuple[int, int]], text: str) -> list[int]:
        """Assigns each token to a step.

        Args:
            token_char_spans: ``[start, end)`` in ``text`` of each of the T tokens (as from an
                offset mapping or :meth:`token_char_spans_from_ids`).
            text: The text the spans index into.

        Returns:
            A list of T step indices (ints in ``[0, num_steps)``; all 0 for the empty text): the
            step holding the token's first character; for an empty span, the last step if it
            lies at (or past) the end of the text, else the previous token's step (0 for a
            leading one).
        """
        spans = self.char_spans(text)
        if not spans:
            return [0] * len(token_char_spans)
        starts = [s for s, _ in spans]
        last = len(spans) - 1
        n_chars = len(text)
        out: list[int] = []
        for start, end in token_char_spans:
            start, end = int(start), int(end)
            if end <= start:
                if start >= n_chars:
                    out.append(last)
                else:
                    out.append(out[-1] if out else 0)
                continue
            if start >= n_chars:
                out.append(last)
                continue
            out.append(max(0, bisect.bisect_right(starts, start) - 1))
        return out

    def step_ends(self, step_ids: list[int]) -> list[int]:
        """Index of the last token of each step.

        Args:
            step_ids: A step index per token (from :meth:`token_step_ids`), length T.

        Returns:
            Ascending token indices, one per step that owns at least one token (a step whose
            text lies entirely inside a token that starts in an earlier step owns none and is
            dropped). ``[]`` for no tokens.
        """
        last: dict[int, int] = {}
        for idx, sid in enumerate(step_ids):
            last[int(sid)] = idx
        return sorted(last.values())

    def token_char_spans_from_ids(self, tokenizer: Any, token_ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
        """Decodes token ids and gives each token its exact character span in the decoded text.

        The text is ``tokenizer.decode(ids, skip_special_tokens=True,
        clean_up_tokenization_spaces=False)``. Three strategies are tried in turn, each checked
        against that text before it is used: per-token byte decoding for byte-level BPE (exact,
        O(n)); decoding short windows (O(n), exact for common decoders); decoding every prefix
        (exact for any tokenizer, O(n^2) in characters; fine up to a few thousand tokens).

        Args:
            tokenizer: A Hugging Face tokenizer (fast or slow).
            token_ids: T token ids of the response (may include special tokens such as EOS).

        Returns:
            ``(text, spans)``: the decoded text and T ``[start, end)`` spans, non-overlapping, in
            token order and covering ``text``. Special tokens get an empty span where they sit
            (EOS at the end: ``(len(text), len(text))``); a token holding only the leading bytes
            of a character gets an empty span and the character goes to the token completing it.
        """
        token_ids = [int(t) for t in token_ids]
        if not token_ids:
            return "", []
        full = _decode(tokenizer, token_ids)
        pieces = _pieces_byte_level(tokenizer, token_ids, full)
        if pieces is None:
            pieces = _pieces_windowed(tokenizer, token_ids, full)
        if pieces is None:
            full, pieces = _pieces_prefix(tokenizer, token_ids)
        return full, _spans_from_pieces(pieces)

    def token_steps(self, tokenizer: Any, token_ids: list[int]) -> tuple[str, list[int], list[int]]:
        """Steps of a generated response given as token ids.

        Args:
            tokenizer: A Hugging Face tokenizer.
            token_ids: T response token ids (EOS included if generated).

        Returns:
            ``(text, step_ids, step_ends)``: the decoded text, a step index per token (length T)
            and the index of the last token of each step (ascending).
        """
        text, spans = self.token_char_spans_from_ids(tokenizer, token_ids)
        step_ids = self.token_step_ids(spans, text)
        return text, step_ids, self.step_ends(step_ids)

    def token_steps_from_text(self, tokenizer: Any, text: str) -> tuple[list[int], list[int], list[int]]:
        """Tokenises ``text`` (no special tokens added) and maps its steps onto the tokens.

        Fast tokenizers give offsets directly; for a slow tokenizer the ids are decoded back
        with :meth:`token_char_spans_from_ids`, which must reproduce ``text``.

        Args:
            tokenizer: A Hugging Face tokenizer.
            text: The response text.

        Returns:
            ``(token_ids, step_ids, step_ends)`` with ``len(step_ids) == len(token_ids)``.

        Raises:
            ValueError: A slow tokenizer that does not decode its own encoding back to ``text``.
        """
        if getattr(tokenizer, "is_fast", False):
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            token_ids = list(enc["input_ids"])
            spans = [(int(s), int(e)) for s, e in enc["offset_mapping"]]
        else:
            token_ids = list(tokenizer.encode(text, add_special_tokens=False))
            decoded, spans = self.token_char_spans_from_ids(tokenizer, token_ids)
            if decoded != text:
                raise ValueError(
                    "slow tokenizer does not round-trip the text, so token spans are undefined; "
                    "use a fast tokenizer (return_offsets_mapping)"
                )
        step_ids = self.token_step_ids(spans, text)
        return token_ids, step_ids, self.step_ends(step_ids)
