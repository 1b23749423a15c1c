"""``python -m llmvem …`` (also what ``torchrun -m llmvem train …`` runs)."""

from llmvem.cli import console_main

if __name__ == "__main__":
    console_main()
