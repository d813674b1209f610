"""The one exception type users see: a message that names the file or key and the fix."""


class UserError(Exception):
    """Bad input from the user (params, data, checkpoints). The CLI prints it as one line."""
