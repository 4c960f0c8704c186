"""MATH / MATH-500: competition problems whose answer is a LaTeX expression in ``\\boxed{}``.

Answers are compared with ``math_verify`` (symbolic equivalence), run in a separate worker
process under a timeout; see `SympyVerifier` for why.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

from lit_reason.tasks.base import DatasetTask

# "\boxed" / "\fbox" as whole commands ("\fboxsep" is another command).
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")

# Without a box, the final answer instruct models write after "####", "Answer:" or "the answer is"
# (the last cue wins), up to the end of its line.
_CUE_RE = re.compile(r"####|(?<![A-Za-z])[Aa]nswer(?:\s+is)?[ \t]*:?")

DEFAULT_CHAT_INSTRUCTION = "Solve the problem step by step, one step per line, and put the final answer in \\boxed{}."


def extract_cued(text: str) -> str | None:
    """The rest of the line after the last ``####`` / ``Answer:`` / ``the answer is`` cue, without
    surrounding ``$``, ``*`` and a trailing full stop; None when there is no cue or nothing follows."""
    cues = list(_CUE_RE.finditer(text))
    if not cues:
        return None
    line = text[cues[-1].end() :].split("\n", 1)[0].strip()
    line = line.rstrip(". *").lstrip("* ")
    if len(line) >= 2 and line[0] == line[-1] == "$":
        line = line[1:-1].strip()
    return line or None


def extract_boxed(text: str) -> str | None:
    """Returns the content of the LAST ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``.

    Nested braces are matched (``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``), escaped braces
    ``\\{``/``\\}`` are literal characters and do not count, and the brace-less form
    ``\\boxed 5`` gives ``5``.

    Returns:
        The stripped content, or None when there is no box, the last box is empty, or it is
        never closed (a truncated response).
    """
    matches = list(_BOX_RE.finditer(text))
    if not matches:
        return None
    start = matches[-1].end()
    j = start
    while j < len(text) and text[j].isspace():
        j += 1
    if j < len(text) and text[j] == "{":
        depth, k = 0, j
        while k < len(text):
            c = text[k]
            if c == "\\":
                k += 2  # an escaped character (\{, \}, \\) never opens or closes a group
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[j + 1 : k].strip() or None
            k += 1
        return None
    token = re.match(r"[^\s$]*", text[j:]).group().rstrip(".")
    return token or None


def normalize_latex(answer: str) -> str:
    """A light canonical form of a LaTeX answer, for the string comparison fallback.

    Drops spacing commands, ``$``, ``\\left``/``\\right``, ``\\text{}`` wrappers, degree signs,
    ``\\%`` and a trailing period; unifies ``\\dfrac``/``\\tfrac`` to ``\\frac``.
    """
    s = answer.strip()
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\^\{?\\circ\}?", "", s)
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])|\\[!,;:]|\\%|\$|~", "", s)
    s = re.sub(r"\s+", "", s)
    return s.rstrip(".")


def _wrap(answer: str) -> str:
    # math_verify extracts answers from boxed LaTeX most reliably; both sides get the same form.
    return "$\\boxed{" + answer + "}$"


def _check_in_process(gold: str, predicted: str) -> bool | None:
    """math_verify equivalence with its own (signal-based) timeouts off; None when unparsable."""
    from math_verify import parse, verify

    parsed_gold = parse(_wrap(gold), parsing_timeout=None)
    parsed_pred = parse(_wrap(predicted), parsing_timeout=None)
    if not parsed_gold or not parsed_pred:
        return None
    return bool(verify(parsed_gold, parsed_pred, timeout_seconds=None))


def _worker_main() -> None:
    """Entry point of the verifier worker: JSON requests on stdin, JSON replies on stdout."""
    import logging

    # Keep the reply channel clean: anything a library prints goes to stderr instead.
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled" warnings
    _check_in_process("1", "1")  # import sympy & co. before announcing readiness
    replies.write('{"ready": true}\n')
    replies.flush()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = {"result": _check_in_process(request["gold"], request["predicted"])}
        except Exception as e:  # a parser bug on odd input must not kill the worker
            reply = {"error": repr(e)[:500]}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


class SympyVerifier:
    """Runs math_verify equivalence checks in a persistent worker process, each under a timeout.

    Why a process: sympy can hang on inputs such as ``9^{9^{9^{9^{9}}}}`` (big-integer work in C
    that no Python-level signal interrupts), and math_verify's own timeouts use ``SIGALRM``,
    which only works in the main thread. A child process can always be killed, from any thread.
    The worker is a plain ``python -c`` subprocess rather than a multiprocessing child so that
    nothing re-imports the caller's ``__main__`` script. It starts on first use (its start-up,
    mostly importing sympy, is not charged to the timeout) and is restarted after a timeout.
    Calls are serialised by a lock. POSIX only (``select`` on a pipe).

    Args:
        timeout_s: Seconds allowed per check.
        startup_timeout_s: Seconds allowed for the worker to start.
    """

    def __init__(self, timeout_s: float = 5.0, startup_timeout_s: float = 120.0):
        self.timeout_s = timeout_s
        self.startup_timeout_s = startup_timeout_s
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._owner_pid = os.getpid()
        self._buffer = b""

    def check(self, gold: str, predicted: str) -> bool | None:
        """Whether ``predicted`` is equivalent to ``gold``; None on timeout or when unparsable."""
        request = (json.dumps({"gold": gold, "predicted": predicted}) + "\n").encode("utf-8")
        with self._lock:
            proc = self._ensure_worker()
            try:
                proc.stdin.write(request)
                proc.stdin.flush()
            except OSError:  # the worker died between calls; one fresh try
                self._stop()
                proc = self._ensure_worker()
                proc.stdin.write(request)
                proc.stdin.flush()
            line = self._read_line(proc, self.timeout_s)
            if line is None:  # timed out (or the worker died mid-check): restart next time
                self._stop()
                return None
        reply = json.loads(line)
        return reply.get("result")  # an "error" reply counts as unparsable

    def close(self) -> None:
        """Stops the worker (a later `check` starts a new one)."""
        with self._lock:
            self._forget_if_forked()
            self._stop()

    def _forget_if_forked(self) -> None:
        # After a fork (e.g. DataLoader workers) the inherited pipes belong to the parent's
        # worker: talking to it from two processes would mix replies, and stopping it would break
        # the parent. So a forked copy drops it, untouched, and starts its own.
        if os.getpid() != self._owner_pid:
            self._proc, self._buffer, self._owner_pid = None, b"", os.getpid()

    def _ensure_worker(self) -> subprocess.Popen:
        self._forget_if_forked()
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        self._stop()
        env = dict(os.environ)
        # The worker imports this module, so make the package importable even when not installed.
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        proc = subprocess.Popen(
            [sys.executable, "-c", "from lit_reason.tasks.math import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            bufsize=0,
        )
        weakref.finalize(self, _kill, proc, os.getpid())
        line = self._read_line(proc, self.startup_timeout_s)
        if line is None or not json.loads(line).get("ready"):
            _kill(proc)
            self._buffer = b""
            raise RuntimeError(
                f"the math_verify worker process did not start within {self.startup_timeout_s} s "
                f"(see its stderr above; is math-verify installed for {sys.executable}?)"
            )
        self._proc = proc
        return proc

    def _read_line(self, proc: subprocess.Popen, timeout_s: float) -> str | None:
        """One line from the worker, or None on timeout or end of file."""
        deadline = time.monotonic() + timeout_s
        fd = proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode("utf-8")

    def _stop(self) -> None:
        if self._proc is not None:
            _kill(self._proc)
        self._proc, self._buffer = None, b""

    def __getstate__(self):
        # A worker process cannot be pickled; the copy starts its own on first use.
        return {"timeout_s": self.timeout_s, "startup_timeout_s": self.startup_timeout_s}

    def __setstate__(self, state):
        self.__init__(**state)


def _kill(proc: subprocess.Popen, owner_pid: int | None = None) -> None:
    """Stops a worker; a forked copy of its owner (``owner_pid`` differs) leaves it alone."""
    if owner_pid is not None and os.getpid() != owner_pid:
        return
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()


class MathTask(DatasetTask):
    """MATH-style problems (e.g. MATH-500) graded by symbolic equivalence of boxed answers.

    Args:
        path: A folder holding ``test.jsonl`` (and ``train.jsonl``/``validation.jsonl`` if
            present), or one jsonl file used as the test split only.
        dataset: A Hugging Face Hub dataset name for `datasets.load_dataset`, instead of ``path``.
        timeout_s: Seconds allowed per equivalence check; a check that takes longer scores 0.
        prompt_format: ``plain`` (``Problem: ...\\nSolution:\\n``, the default), ``chat`` or a dict
            (see :mod:`lit_reason.tasks.prompt_format`); a chat prompt's question is the row's
            ``problem`` alone.

    With neither ``path`` nor ``dataset``, ``math500/`` under `lit_reason.paths.default_data_dir`
    is used, else the Hub dataset ``HuggingFaceH4/MATH-500``.
    """

    name = "math"
    answer_prefix = "\\boxed"
    default_folder = "math500"
    default_dataset = "HuggingFaceH4/MATH-500"
    required_fields = ("problem", "solution")
    chat_instruction = DEFAULT_CHAT_INSTRUCTION

    def __init__(self, path: str | Path | None = None, dataset: str | None = None, timeout_s: float = 5.0,
                 prompt_format: str | dict | None = None):
        if not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
            raise ValueError(f"timeout_s must be a positive number, got {timeout_s!r}")
        super().__init__(path=path, dataset=dataset, prompt_format=prompt_format)
        self.timeout_s = float(timeout_s)
        self.verifier = SympyVerifier(timeout_s=self.timeout_s)

    def plain_prompt(self, example: dict) -> str:
        """Returns ``"Problem: {problem}\\nSolution:\\n"``."""
        return f"Problem: {self._field(example, 'problem')}\nSolution:\n"

    def question_text(self, example: dict) -> str:
        """The row's ``problem`` (the user turn of a chat prompt)."""
        return str(self._field(example, "problem")).strip()

    def reference_solution(self, example: dict) -> str:
        """Returns the row's ``solution`` text (stripped)."""
        return str(self._field(example, "solution")).strip()

    def reference_answer(self, example: dict) -> str:
        """Returns the row's ``answer`` if present, else the last ``\\boxed{}`` of its ``solution``."""
        answer = example.get("answer") if isinstance(example, dict) else None
        if isinstance(answer, str) and answer.strip():
            return answer.strip()
        boxed = extract_boxed(str(self._field(example, "solution")))
        if boxed is None:
            raise ValueError("math example has no 'answer' field and its 'solution' has no \\boxed{} answer")
        return boxed

    def extract_answer(self, text: str) -> str | None:
        """Returns the content of the last ``\\boxed{}`` in a response; without a box, what follows the
        last ``####`` / ``Answer:`` / ``the answer is`` on its line (see :func:`extract_cued`); else None."""
        if _BOX_RE.search(text):
            return extract_boxed(text)  # a box decides, also an unclosed (truncated) one: None
        return extract_cued(text)

    def answers_match(self, predicted: str, gold: str) -> bool:
        """Equal after `normalize_latex`, else math_verify-equivalent within ``timeout_s``."""
        if normalize_latex(predicted) == normalize_latex(gold):
            return True
        # None (timeout / unparsable) falls back to the string comparison above, already False.
        return self.verifier.check(gold, predicted) is True
