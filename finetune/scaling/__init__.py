"""The scaling study: source-data fractions x target-data fractions x seeds, one command, resumable, ending in
results.csv, TensorBoard curves, a PNG figure and a Markdown table (``python -m finetune.scaling``)."""

from .config import ScalingConfig, load_study
from .grid import Cell, grid
from .runner import Study

__all__ = ["Cell", "ScalingConfig", "Study", "grid", "load_study"]
