"""The base of every error a user can fix by changing an input (a path, a flag, a config field)."""


class UserError(ValueError):
    """Bad input, said in one sentence that names it; the CLI prints it as one `error:` line."""
