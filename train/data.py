"""Training data: moved to the shared core, reft_edge/records.py (the runtime and evaluation read the
same records); these names stay importable from here.

Example::

    from reft_edge.train.data import read_jsonl, tokenize   # the same as from reft_edge.records
"""

from reft_edge.records import Example, Record, file_digest, prompt_text, read_jsonl, tokenize

__all__ = ["Example", "Record", "file_digest", "prompt_text", "read_jsonl", "tokenize"]
