"""The `Task` interface, and `DatasetTask`: a task whose rows come from jsonl files or the Hub."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

from lit_reason.paths import ENV_VAR, default_data_dir
from lit_reason.tasks.jsonl import read_jsonl, require_field
from lit_reason.tasks.prompt_format import PromptFormat, check_chat_tokenizer, resolve_prompt_format

SPLITS = ("train", "validation", "test")


class Task(ABC):
    """A reasoning task: examples, how to prompt for them, their gold solutions, and a reward.

    Attributes:
        name: Registry name of the task.
        answer_prefix: Text that opens the final-answer line in gold solutions.
        chat_instruction: The instruction a chat prompt puts before the question (see
            :mod:`lit_reason.tasks.prompt_format`).
        chat_example: A worked ``(question, response)`` shown first in one-shot chat prompts.
        prompt_format: Plain (default) or chat prompts; set with :meth:`set_prompt_format`.
    """

    name: str = ""
    answer_prefix: str = ""
    chat_instruction: str = ""
    chat_example: tuple[str, str] | None = None  # a worked (question, response) for one-shot chat prompts
    prompt_format: PromptFormat = PromptFormat()
    _chat_tokenizer = None  # the policy's tokenizer, bound by use_tokenizer for chat prompts

    @abstractmethod
    def examples(self, split: str) -> list[dict]:
        """Returns the rows of ``split`` (one of ``"train"``, ``"validation"``, ``"test"``).

        Raises:
            ValueError: ``split`` is unknown or not available for this task's data.
        """

    def prompt(self, example: dict) -> str:
        """Returns the model input for ``example``, where the response begins.

        Plain format: :meth:`plain_prompt` (ends with ``"\\n"``). Chat format: the question in the
        tokenizer's chat template, ending with the assistant turn's opening (the tokenizer must have
        been bound with :meth:`use_tokenizer`).
        """
        if not self.prompt_format.is_chat:
            return self.plain_prompt(example)
        if self._chat_tokenizer is None:
            raise RuntimeError(f"{self.name} task: prompt_format chat needs the policy's tokenizer; "
                               "call task.use_tokenizer(tokenizer) once the policy is loaded")
        return self.prompt_format.render(self.question_text(example), self.chat_instruction, self._chat_tokenizer,
                                         example=self.chat_example)

    def plain_prompt(self, example: dict) -> str:
        """Returns the plain-text model input; it ends with ``"\\n"``, where the response begins."""
        raise NotImplementedError(f"{type(self).__name__} implements neither prompt nor plain_prompt")

    def question_text(self, example: dict) -> str:
        """The question of a chat prompt's user turn (default: the plain prompt, stripped)."""
        return self.plain_prompt(example).strip()

    def set_prompt_format(self, prompt_format) -> None:
        """Sets the prompt format: a PromptFormat, ``"plain"``, ``"chat"`` or ``{kind, system, instruction}``."""
        self.prompt_format = resolve_prompt_format(prompt_format)

    def use_tokenizer(self, tokenizer) -> "Task":
        """Binds the policy's tokenizer for chat prompts (a no-op for plain ones); returns the task.

        Raises:
            ValueError: chat prompts with a tokenizer that has no chat template.
        """
        if self.prompt_format.is_chat:
            check_chat_tokenizer(tokenizer, owner=f"{self.name} task")
            self._chat_tokenizer = tokenizer
        return self

    def _format_repr(self) -> str:
        # only a non-default format shows, so existing cache keys built from repr() stay valid
        return "" if not self.prompt_format.is_chat else f", prompt_format={self.prompt_format.to_dict()!r}"

    @abstractmethod
    def reference_solution(self, example: dict) -> str:
        """Returns the gold response: one step per line, answer line last, no trailing newline/EOS."""

    @abstractmethod
    def reference_answer(self, example: dict) -> str:
        """Returns the gold final answer of ``example``."""

    @abstractmethod
    def extract_answer(self, text: str) -> str | None:
        """Returns the final answer stated in a response, or None when there is none."""

    @abstractmethod
    def answers_match(self, predicted: str, gold: str) -> bool:
        """Whether an extracted answer equals the gold answer."""

    def reward(self, response: str, example: dict) -> float:
        """Returns 1.0 when ``response`` states the correct final answer, else 0.0 (also when none)."""
        predicted = self.extract_answer(response)
        if predicted is None:
            return 0.0
        return 1.0 if self.answers_match(predicted, self.reference_answer(example)) else 0.0

    def _field(self, example: dict, field: str) -> object:
        """Reads a field of an example, with an error naming the task and field when absent."""
        return require_field(example, field, where=f"{self.name} example")

    @staticmethod
    def _check_split(split: str, available: tuple[str, ...] | list[str]) -> None:
        if split not in available:
            raise ValueError(f"split {split!r} is not available; available splits: {', '.join(available)}")


class DatasetTask(Task):
    """A task over real data: a local folder of ``{split}.jsonl``, one jsonl file, or a Hub dataset.

    Subclasses set the class attributes below. Rows are loaded lazily, on the first call to
    `examples` for a split, and kept.

    Attributes:
        default_folder: Sub-folder of `lit_reason.paths.default_data_dir` tried when neither
            ``path`` nor ``dataset`` is given.
        default_dataset: Hub dataset tried when that folder does not exist either.
        required_fields: Fields every row must have.
        validation_holdout: When the data has a train split but no validation split, this many
            rows from the END of train form validation (and are removed from train), so the two
            never overlap. None: no derived validation split.
    """

    default_folder: str = ""
    default_dataset: str = ""
    required_fields: tuple[str, ...] = ()
    validation_holdout: int | None = None

    def __init__(self, path: str | Path | None = None, dataset: str | None = None, dataset_config: str | None = None,
                 prompt_format=None):
        self.set_prompt_format(prompt_format)
        if path is not None and dataset is not None:
            raise ValueError(f"{self.name}: pass either path= or dataset=, not both")
        self._fallback = False  # True when ``dataset`` was chosen because no local data was found
        if path is None and dataset is None:
            root = default_data_dir()
            if root is not None and (root / self.default_folder).is_dir():
                path = root / self.default_folder
            else:
                dataset, self._fallback = self.default_dataset, True
        self.path = Path(path) if path is not None else None
        if self.path is not None and not self.path.exists():
            raise FileNotFoundError(f"{self.name}: data path {self.path} does not exist")
        self.dataset = dataset
        self.dataset_config = dataset_config
        self._cache: dict[str, list[dict]] = {}
        self._raw: dict[str, list[dict]] | None = None  # every native split, loaded once

    def examples(self, split: str) -> list[dict]:
        """Returns the rows of ``split`` as the data has them (cached after the first call)."""
        if split not in self._cache:
            raw = self._load_raw()
            self._check_split(split, self._available(raw))
            self._cache[split] = self._split_rows(raw, split)
        return self._cache[split]

    def available_splits(self) -> tuple[str, ...]:
        """The splits this task's data provides (loads the data)."""
        return self._available(self._load_raw())

    def _available(self, raw: dict[str, list[dict]]) -> tuple[str, ...]:
        have = set(raw)
        if "validation" not in have and "train" in have and self.validation_holdout:
            have.add("validation")
        return tuple(s for s in SPLITS if s in have)

    def _split_rows(self, raw: dict[str, list[dict]], split: str) -> list[dict]:
        # A derived validation split is the tail of train; train then excludes it.
        derived = "validation" not in raw and self.validation_holdout and "train" in raw
        if not derived or split == "test":
            return raw[split]
        train, k = raw["train"], self.validation_holdout
        if len(train) <= k:
            raise ValueError(f"{self.name}: train has {len(train)} rows, too few to hold out {k} for validation")
        return train[:-k] if split == "train" else train[-k:]

    def _load_raw(self) -> dict[str, list[dict]]:
        if self._raw is None:
            self._raw = self._load_local() if self.path is not None else self._load_hub()
        return self._raw

    def _load_local(self) -> dict[str, list[dict]]:
        # A single file is a test set only: nothing says which split it is, and evaluation is
        # the one use that never needs the others.
        if self.path.is_file():
            return {"test": read_jsonl(self.path, self.required_fields)}
        files = {s: self.path / f"{s}.jsonl" for s in SPLITS}
        raw = {s: read_jsonl(f, self.required_fields) for s, f in files.items() if f.is_file()}
        if not raw:
            raise FileNotFoundError(f"{self.name}: {self.path} holds none of {', '.join(f'{s}.jsonl' for s in SPLITS)}")
        return raw

    def _load_hub(self) -> dict[str, list[dict]]:
        try:
            import datasets

            loaded = datasets.load_dataset(self.dataset, self.dataset_config)
        except Exception as e:
            hint = (
                f"no local data was found, so the Hub dataset {self.dataset!r} was tried. "
                f"Pass path= (a folder with train.jsonl/test.jsonl, or one jsonl file) or set "
                f"${ENV_VAR} to the folder holding {self.default_folder}/"
                if self._fallback
                else "check the dataset name and config, or pass path= to local jsonl files"
            )
            raise RuntimeError(f"{self.name}: could not load Hub dataset {self.dataset!r} ({e}); {hint}") from e
        raw = {}
        for split, ds in loaded.items():
            missing = [f for f in self.required_fields if f not in ds.column_names]
            if missing:
                raise ValueError(f"{self.name}: Hub dataset {self.dataset!r} split {split!r} lacks field(s) {missing}")
            raw[split] = [dict(row) for row in ds]
        return raw

    def __repr__(self) -> str:
        source = f"path={str(self.path)!r}" if self.path is not None else f"dataset={self.dataset!r}"
        return f"{type(self).__name__}({source}{self._format_repr()})"
