"""Editing memories: MEMIT edits and deletion (memit.py) with their key statistics (stats.py); DINM (dinm.py)."""
