"""Data sets: the simulator (embedded default) and real-data readers."""
from .her2st import her2st, read_her2st
from .simulate import simulate

__all__ = ["simulate", "her2st", "read_her2st"]
