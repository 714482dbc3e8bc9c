"""Evaluation: the field's retrieval protocol (``metrics``) and encode-score-evaluate runs (``runner``)."""
