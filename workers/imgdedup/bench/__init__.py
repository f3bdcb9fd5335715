"""Rerunnable measurements behind the numbers in the docs (``python -m imgdedup.bench.<name>``)."""
