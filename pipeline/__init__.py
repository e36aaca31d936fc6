"""Drift-aware pipeline for fine-tuning vision-language models: curate, split, train, evaluate, monitor."""
