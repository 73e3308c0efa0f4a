"""The one exception type for mistakes a user can make (bad override, missing file, bad shapes).

The CLI turns it into a single line on stderr and a non-zero exit; anything else is a bug and
keeps its traceback.
"""


class BdrunError(Exception):
    """A user-caused error: the message names the bad value and how to fix it."""


class TrainingInterrupted(BdrunError):
    """A training stopped by SIGTERM (Slurm pre-emption, time limit, `kill`)."""


class TrainingDiverged(BdrunError):
    """A training whose loss or weights stopped being finite (NaN or inf); never a result."""
