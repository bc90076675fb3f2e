"""gpuspool: wait for a GPU with enough free memory, then run spooled extraction jobs on it."""

__version__ = "0.1.0"
