"""Locating memories: causal tracing (ROME), its files, saliency profiles (SaLEM) and attribution patching."""
