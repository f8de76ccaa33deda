"""Serving: a TensorFlow SavedModel export (saved_model.py) and an HTTP search service
(service.py, with its web page in static/)."""
