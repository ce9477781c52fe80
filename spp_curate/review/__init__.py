"""Curation by hand: the review page (``server``) and the decisions it records (``store``)."""
