"""Training data: read a file, normalise its records, tokenize them and batch them.

The pipeline is ``DataSpec`` (what the config says, :mod:`.spec`) -> :func:`load_records`
(plain dicts, each remembering its ``file:line`` so any later error can point at it;
:mod:`.sources`, record shapes in :mod:`.records`) -> :class:`LabelMap` (classification only;
:mod:`.labels`) -> :func:`tokenize` (a :class:`TokenizedDataset`) -> :func:`collate`
(:mod:`.tokens`). Chat data (``messages``, prompt/completion turns, labelled rows through a
``prompt_template``) becomes conversations rendered with the tokenizer's chat template, the loss
on the assistant's tokens only (:mod:`.chat`). :mod:`.sampling` splits records into train and eval, orders each epoch and
groups rows into micro-batches by length; :func:`build_datasets` (:mod:`.build`) runs the steps
in order for a training config.
"""

from .build import build_datasets, read_splits
from .chat import check_chat_template, render_chats
from .labels import LabelMap
from .records import DataError, Label, infer_task, source_of
from .sampling import length_buckets, seeded_order, split
from .sources import load_records
from .spec import EXTENSIONS, FORMATS, TASKS, DataSpec
from .tokens import IGNORE_INDEX, TokenizedDataset, collate, pad_id_of, tokenize

__all__ = [
    "EXTENSIONS",
    "FORMATS",
    "IGNORE_INDEX",
    "TASKS",
    "DataError",
    "DataSpec",
    "Label",
    "LabelMap",
    "TokenizedDataset",
    "build_datasets",
    "read_splits",
    "check_chat_template",
    "collate",
    "infer_task",
    "length_buckets",
    "load_records",
    "pad_id_of",
    "render_chats",
    "seeded_order",
    "source_of",
    "split",
    "tokenize",
]
