"""Fake providers speaking real wire formats, for tests and for trying Ferry without keys."""
