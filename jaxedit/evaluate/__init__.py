"""Evaluating models and edits: toxicity scorers (toxicity.py) and the text metrics (metrics.py: perplexity,
n-gram-entropy fluency, the toxic-generation rate), SafeEdit's cases and metrics (safeedit.py),
and the knowledge-editing evaluation: CounterFact's and zsRE's metrics (editing.py)."""
