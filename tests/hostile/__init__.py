"""Hostile-input helpers for ``tests/test_hostile.py``: requests mutated field by field from OpenAI's
spec (``cases``), the checks every answer must pass (``answers``) and raw-socket abuse
(``transport``)."""
