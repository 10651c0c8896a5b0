"""jaxedit: locate and edit memories in language models, in JAX."""
import logging as _logging


class _NoTorchAdvice(_logging.Filter):
    """transformers says "PyTorch was not found. Models won't be available ..." when it is imported without torch;
    jaxedit uses it for tokenizers and configs only, so that one notice is dropped (its other warnings pass)."""

    def filter(self, record):
        return not str(record.msg).startswith("PyTorch was not found. Models won't be available")


if not any(isinstance(f, _NoTorchAdvice) for f in _logging.getLogger("transformers").filters):
    _logging.getLogger("transformers").addFilter(_NoTorchAdvice())  # before anything imports transformers

from jaxedit.config import ModelConfig
from jaxedit.errors import JaxeditError
from jaxedit.forward import ForwardOutput, Interventions, apply
from jaxedit.loading import DEFAULT_MODEL, load, save
from jaxedit.loading.export import export_hf
from jaxedit.model import count_params, create_model, forward, model_from_params, params_of, shard_model
from jaxedit.locate.attribution import attribution_patching
from jaxedit.layer_selection import select_layers
from jaxedit.locate.saliency import SaliencyResult, saliency, saliency_batch
from jaxedit.locate.tracing import TraceResult, trace, trace_batch
from jaxedit.edit.memit import EditHparams, delete, hparams_for, memit
from jaxedit.edit.alphaedit import alphaedit
from jaxedit.edit.ultraedit import ultraedit
from jaxedit.edit.sequential import edit_sequential
from jaxedit.edit.stats import layer_stats
from jaxedit.edit.dinm import DinmHparams, dinm, dinm_locate
from jaxedit.edit.profs import profs
from jaxedit.edit.aura import aura
from jaxedit.evaluate.safeedit import evaluate as evaluate_safeedit, read_cases as read_safeedit
from jaxedit.evaluate.metrics import fluency, perplexity, toxic_rate
from jaxedit.evaluate.editing import counterfact_eval, load_counterfact, load_zsre, protocol_record, zsre_eval
from jaxedit.synthetic import synthetic_edits
from jaxedit.evaluate.toxicity import toxicity_scores
from jaxedit.detox.chunking import toxic_span
from jaxedit.sharding import make_mesh
from jaxedit.runtime import set_progress
from jaxedit.planning import plan

__all__ = ["ModelConfig", "JaxeditError", "ForwardOutput", "Interventions", "apply", "load", "DEFAULT_MODEL",
           "forward", "create_model", "model_from_params", "params_of", "count_params", "trace", "trace_batch",
           "TraceResult", "saliency", "saliency_batch", "SaliencyResult", "select_layers", "attribution_patching",
           "memit", "alphaedit", "ultraedit", "edit_sequential", "delete", "EditHparams", "hparams_for",
           "layer_stats", "save", "export_hf", "perplexity", "fluency", "toxic_rate", "toxicity_scores",
           "toxic_span", "dinm", "dinm_locate", "DinmHparams", "profs", "aura", "read_safeedit", "evaluate_safeedit",
           "make_mesh", "shard_model", "counterfact_eval", "zsre_eval", "load_counterfact", "load_zsre",
           "protocol_record", "synthetic_edits", "set_progress", "plan"]
__version__ = "0.1.0"
