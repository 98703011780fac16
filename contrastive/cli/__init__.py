"""Command-line entry points: the only code that reads arguments or a composed config."""
