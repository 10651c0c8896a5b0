"""The toxic-memory study (Das et al. 2025) as a pipeline: data.py (prompts and shipped texts), chunking.py (the
most toxic chunk), pipeline.py (the stages: select, localize, edit, evaluate), report.py (tables and figures)."""
from jaxedit.detox.chunking import toxic_span
from jaxedit.detox.pipeline import (DetoxConfig, edit, evaluate, localize, run_study, select)
from jaxedit.detox.report import report

__all__ = ["DetoxConfig", "select", "localize", "edit", "evaluate", "report", "run_study", "toxic_span"]
