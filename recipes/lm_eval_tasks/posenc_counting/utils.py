"""Loads the posenc_counting task's programs from the jsonl file next to this one (offline)."""

from pathlib import Path

DATA = Path(__file__).resolve().parent / "posenc_counting.jsonl"


def load(**_metadata):
    """The task's dataset, ``{"test": Dataset}``; the harness passes its metadata, which is not needed."""
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(DATA)})
