"""Handlers turn raw rows into token sequences (AscendSpeed's ``--handler-name`` values).

- ``GeneralPretrainHandler``: plain text under ``--json-keys`` (default ``text``), one
  document per key; ``--append-eod`` ends each with EOS.
- ``GeneralInstructionHandler``: Alpaca-style rows (instruction / input / output).
- ``MOSSInstructionHandler``: MOSS conversations (moss-003-sft ``chat.turn_N.Human/MOSS``
  with ``<|Human|>: ...<eoh>`` / ``<|MOSS|>: ...<eom>`` markers, or the
  ``conversation: [{human, assistant}]`` conversion).

Instruction samples are ``BOS + prompt + response (+ more turns) + EOS`` with labels
equal to the tokens on response positions and -100 on prompt positions, so only
responses train.  Prompt templates (``--prompt-template``):

- ``alpaca`` (Stanford Alpaca's): "Below is an instruction that describes a task[, paired
  with an input that provides further context]. Write a response that appropriately
  completes the request.\\n\\n### Instruction:\\n{instruction}\\n\\n[### Input:\\n{input}\\n\\n]
  ### Response:\\n"; an empty input leaves the Input block out entirely.
- ``llama2-chat``: "[INST] {instruction}[\\n\\n{input}] [/INST] " (LLaMA-2-chat's turn
  format; the system prompt, if any, goes in ``<<SYS>>\\n...\\n<</SYS>>\\n\\n``).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

from recipes.errors import BadInput

IGNORE_INDEX = -100
HANDLERS = ("GeneralPretrainHandler", "GeneralInstructionHandler", "MOSSInstructionHandler")
TEMPLATES = ("alpaca", "llama2-chat")

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class SkipRow(Exception):
    """A row that yields no sample; the message is the reason, reported with file and row."""


def _text_field(record: dict, key: str) -> str:
    if key not in record:
        raise SkipRow(f"missing column {key!r}")
    value = record[key]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise SkipRow(f"column {key!r} is {type(value).__name__}, not text")
    return value


def alpaca_prompt(instruction: str, inp: str, template: str) -> str:
    inp = inp.strip()
    if template == "alpaca":
        return (ALPACA_WITH_INPUT if inp else ALPACA_NO_INPUT).format(instruction=instruction, input=inp)
    body = f"{instruction}\n\n{inp}" if inp else instruction
    return f"[INST] {body} [/INST] "


class GeneralPretrainHandler:
    def __init__(self, tokenizer, json_keys=("text",), append_eod=False, threads=-1, **_):
        # threads: the tokenizer's own threads per batch (-1: all cores; 1 in each of several workers)
        self.tok, self.keys, self.append_eod, self.threads = tokenizer, list(json_keys), append_eod, threads

    def output_names(self) -> List[str]:
        return [f"{k}_document" for k in self.keys]

    def _texts(self, record: dict) -> List[str]:
        texts = []
        for key in self.keys:
            text = _text_field(record, key)
            if not text.strip():
                raise SkipRow(f"empty text in column {key!r}")
            texts.append(text)
        return texts

    def _sample(self, ids_per_key) -> Dict[str, Tuple[list, None]]:
        eod = [self.tok.eos_id] if self.append_eod else []
        return {f"{key}_document": (ids + eod, None) for key, ids in zip(self.keys, ids_per_key)}

    def process(self, record: dict) -> Dict[str, Tuple[list, None]]:
        return self._sample([self.tok.encode(t) for t in self._texts(record)])

    def process_many(self, records: List[dict]) -> List[object]:
        """``process`` for a chunk of rows, the texts tokenized in one call (the tokenizer's
        native batch path: per-row calls into sentencepiece cost as much as the work);
        each entry a sample or the ``SkipRow`` that row raised."""
        texts, out = [], []
        for record in records:
            try:
                texts.append(self._texts(record))
                out.append(None)
            except SkipRow as e:
                out.append(e)
        flat = self.tok.encode_batch([t for row in texts for t in row], self.threads)
        n, k = 0, len(self.keys)
        for i, entry in enumerate(out):
            if entry is None:
                out[i] = self._sample(flat[n:n + k])
                n += k
        return out


class _InstructionBase:
    def process_many(self, records: List[dict]) -> List[object]:
        out = []
        for record in records:
            try:
                out.append(self.process(record))
            except SkipRow as e:
                out.append(e)
        return out

    def __init__(self, tokenizer, seq_length=None, prompt_template="alpaca", **_):
        if prompt_template not in TEMPLATES:
            raise BadInput(f"--prompt-template {prompt_template!r}: expected one of {', '.join(TEMPLATES)}")
        self.tok, self.seq_length, self.template = tokenizer, seq_length, prompt_template

    def output_names(self) -> List[str]:
        return ["packed_input_ids_document", "packed_labels_document"]

    def _pack(self, pieces: List[Tuple[str, bool]]):
        """pieces: (text, trains) in order. Returns the sample, truncated to seq_length."""
        ids, labels = [self.tok.bos_id], [IGNORE_INDEX]
        for text, trains in pieces:
            t = self.tok.encode(text)
            ids += t
            labels += t if trains else [IGNORE_INDEX] * len(t)
        ids.append(self.tok.eos_id)
        labels.append(self.tok.eos_id)
        if self.seq_length is not None and len(ids) > self.seq_length:
            ids, labels = ids[: self.seq_length], labels[: self.seq_length]
        # labels[i] is the target *at* position i; the loop shifts by one when training,
        # so a sample needs a trained label after its first position.
        if all(l == IGNORE_INDEX for l in labels[1:]):
            raise SkipRow("no response tokens left after truncation to --seq-length"
                          if self.seq_length is not None else "empty response")
        return {"packed_input_ids_document": (ids, None), "packed_labels_document": (labels, None)}


class GeneralInstructionHandler(_InstructionBase):
    def process(self, record: dict):
        instruction = _text_field(record, "instruction")
        inp = _text_field(record, "input") if "input" in record else ""
        output = _text_field(record, "output")
        if not instruction.strip():
            raise SkipRow("empty instruction")
        if not output.strip():
            raise SkipRow("empty output")
        return self._pack([(alpaca_prompt(instruction, inp, self.template), False), (output, True)])


class MOSSInstructionHandler(_InstructionBase):
    def process(self, record: dict):
        pieces = []
        if "chat" in record:
            meta = record.get("meta_instruction") or ""
            if meta:
                pieces.append((meta, False))
            turns = record["chat"]
            if not isinstance(turns, dict) or not turns:
                raise SkipRow("'chat' holds no turns")
            for n in range(1, len(turns) + 1):
                turn = turns.get(f"turn_{n}")
                if not isinstance(turn, dict) or "Human" not in turn or "MOSS" not in turn:
                    raise SkipRow(f"turn_{n} missing or without Human/MOSS")
                pieces += [(turn["Human"], False), (turn["MOSS"], True)]
        elif "conversation" in record:
            conv = record["conversation"]
            if not isinstance(conv, list) or not conv:
                raise SkipRow("'conversation' holds no turns")
            for n, turn in enumerate(conv, start=1):
                if not isinstance(turn, dict) or "human" not in turn or "assistant" not in turn:
                    raise SkipRow(f"conversation turn {n} without human/assistant")
                pieces += [(f"<|Human|>: {turn['human']}<eoh>\n", False),
                           (f"<|MOSS|>: {turn['assistant']}<eom>\n", True)]
        else:
            raise SkipRow("neither 'chat' (moss-003-sft) nor 'conversation' present")
        return self._pack(pieces)


def make_handler(name: str, tokenizer, **kw):
    classes = {"GeneralPretrainHandler": GeneralPretrainHandler,
               "GeneralInstructionHandler": GeneralInstructionHandler,
               "MOSSInstructionHandler": MOSSInstructionHandler}
    if name not in classes:
        raise BadInput(f"--handler-name {name!r}: expected one of {', '.join(HANDLERS)}")
    return classes[name](tokenizer, **kw)
