"""Data sets: the simulator (embedded default), real-data readers and :func:`load`."""
from .her2st import her2st, read_her2st
from .load import detect_kind, load
from .simulate import simulate

__all__ = ["simulate", "her2st", "read_her2st", "load", "detect_kind"]
