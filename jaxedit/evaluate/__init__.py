"""Evaluating models and edits: toxicity scorers (toxicity.py) and the text metrics (metrics.py: perplexity,
n-gram-entropy fluency, the toxic-generation rate), and SafeEdit's cases and metrics (safeedit.py)."""
