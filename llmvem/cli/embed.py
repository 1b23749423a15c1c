"""CLI commands (see llmvem.cli)."""
