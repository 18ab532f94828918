"""Bundled data: a small document set about the fictional city of Larkhaven and demo questions.

The documents (`docs_dir()`) are an invented handbook of Larkhaven's public library, transit,
parks and city services, written for this package: facts a small model can answer from
context, in .md and .txt files of about 350 words each.
"""

from __future__ import annotations

from pathlib import Path

DEMO_QUESTIONS = (
    "Which tram line goes to the airport?",
    "How many items can I borrow at once with a library card?",
    "How much does a replacement library card cost?",
    "When is the Lantern Festival held?",
    "What is the penalty fare for riding without a ticket?",
)
# a rephrasing of DEMO_QUESTIONS[1]: it retrieves the same passages, so their chain of chunks is
# cached (a follow-up on an overlapping but different set shares only what its canonical order
# happens to put first)
DEMO_FOLLOW_UP = "What is the most I can borrow on one library card?"

# Passages of ~400 characters: one Markdown section each, which the small default model reads
# more reliably than the 800-character default.
DEMO_CHUNK_SIZE = 400
DEMO_CHUNK_OVERLAP = 40


def docs_dir() -> Path:
    """The folder of bundled Larkhaven documents."""
    return Path(__file__).resolve().parent / "docs"
