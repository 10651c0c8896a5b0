"""The toxic-memory study (Das et al. 2025) as a pipeline: data.py (prompts and shipped texts), chunking.py (the
most toxic chunk), config.py (the options), one module per stage: selection.py (select), localization.py
(localize), editing.py (edit; methods.py: the DINM, ProFS and AurA runs beside the deletions), evaluation.py (evaluate),
report.py (tables and figures); common.py (what the stages share) and pipeline.py (:func:`run_study`, the stages in
order)."""
from jaxedit.detox.chunking import toxic_span
from jaxedit.detox.config import DetoxConfig
from jaxedit.detox.editing import edit
from jaxedit.detox.evaluation import evaluate
from jaxedit.detox.localization import localize
from jaxedit.detox.pipeline import run_study
from jaxedit.detox.report import report
from jaxedit.detox.selection import select

__all__ = ["DetoxConfig", "select", "localize", "edit", "evaluate", "report", "run_study", "toxic_span"]
